"""The out-of-process consumer: ``bluesky-ptychonn consume --config <file>``.

It subscribes a :class:`~bluesky_ptychonn.live.callback.PtychoNNCallback` to a ``bluesky-0MQ-proxy``
(``RemoteDispatcher``), so the RunEngine's process never runs the analysis. Documents cross the
proxy in the msgpack format of :mod:`bluesky_ptychonn.live.wire`, never as pickles; with
``[zmq]`` CURVE keys, only holders of a key the proxy trusts can connect at all.

The configuration (:mod:`~bluesky_ptychonn.live.settings`) is a TOML file, ``PTYCHONN_*``
environment variables and arguments. A new checkpoint written at the configured path is picked
up without a restart (checked every ``reload_interval_s``; runs in progress keep their model).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from ..core.faults import permanent_error
from ..errors import CheckpointError, ConfigurationError, DocumentDecodeError
from .callback import PtychoNNCallback
from .settings import (  # noqa: F401  (re-exported: the consumer's configuration)
    ENV_PREFIX,
    ModelSection,
    RefineSection,
    ServiceConfig,
    TiledSection,
    ZmqSection,
    load_config,
)
from .wire import deserialize

logger = logging.getLogger(__name__)


def tiled_client(section: TiledSection | None) -> Any:
    """A Tiled client authenticated with the section's API key (None without a [tiled] section)."""
    if section is None:
        return None
    from tiled.client import from_uri

    if section.api_key is None:
        raise ConfigurationError(f"Tiled writes need an API key: set ${section.api_key_env}")
    from .sink import check_write_access

    try:
        client = from_uri(section.uri, api_key=section.api_key.get_secret_value())
    except Exception as err:  # a wrong key or URI is refused here, in one line
        reason = permanent_error(err) or (str(err).strip().splitlines() or [repr(err)])[0]
        raise ConfigurationError(
            f"cannot open Tiled at {section.uri} with the key in ${section.api_key_env}: {reason}"
        ) from err
    check_write_access(client)
    return client


class ModelWatcher:
    """Swaps the callback's model when the checkpoint file changes (a fine-tuned model lands).

    Parameters
    ----------
    callback : PtychoNNCallback
        The callback whose model is swapped; runs in progress keep theirs.
    section : ModelSection
        The checkpoint path, the device, and how often to look (0 never: call :meth:`check`).
    """

    def __init__(self, callback: PtychoNNCallback, section: ModelSection) -> None:
        self.callback, self.section = callback, section
        self._stamp = self._mtime()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ptychonn-model-watch", daemon=True)

    def _mtime(self) -> float:
        try:
            return self.section.checkpoint.stat().st_mtime
        except OSError:
            return 0.0

    def start(self) -> ModelWatcher:
        """Look for a new checkpoint every ``reload_interval_s`` on a daemon thread; returns self."""
        if self.section.reload_interval_s > 0:
            self._thread.start()
        return self

    def check(self) -> bool:
        """Load the checkpoint if it changed and validates; True when the model was swapped."""
        from ..core.inference import Predictor

        stamp = self._mtime()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            predictor = Predictor.from_checkpoint(
                self.section.checkpoint, device=self.section.device, compile=self.section.compile
            )
        except CheckpointError as err:  # a half-written or bad file: keep the current model
            logger.error(
                "new checkpoint refused, keeping model %s: %s", self.callback.predictor.info.content_hash[:12], err
            )
            return False
        if predictor.info.content_hash == self.callback.predictor.info.content_hash:
            return False
        old, new = self.callback.predictor.info, predictor.info
        if (old.recipe.frame_shape, old.network.input_pixels) != (new.recipe.frame_shape, new.network.input_pixels):
            logger.error(
                "new checkpoint refused, keeping model %s: it takes %s frames and predicts %d-pixel patches, the "
                "running one %s and %d (a new geometry needs a restart)",
                old.content_hash[:12],
                new.recipe.frame_shape,
                new.network.input_pixels,
                old.recipe.frame_shape,
                old.network.input_pixels,
            )
            return False
        self.callback.set_predictor(predictor)
        logger.warning("model reloaded: %s", predictor.info.content_hash[:12])
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.section.reload_interval_s):
            self.check()

    def stop(self) -> None:
        """Stop looking (the thread ends within one interval)."""
        self._stop.set()


def build_callback(config: ServiceConfig, *, after_final: Callable[[str], None] | None = None) -> PtychoNNCallback:
    """The callback a service configuration describes (model loaded, Tiled client connected).

    ``after_final`` is the callback's hook for each run whose final image is written (the command
    line passes a refinement worker's ``submit`` there when ``[refine]`` is enabled).
    """
    from ..core.inference import Predictor

    client = tiled_client(config.tiled)  # a wrong key or URI fails here, before the model loads
    predictor = Predictor.from_checkpoint(
        config.model.checkpoint, device=config.model.device, compile=config.model.compile
    )
    return PtychoNNCallback(predictor, client, config.callback_config(), after_final=after_final)


def _deserialize_or_report(data: bytes) -> dict[str, Any]:
    """:func:`~bluesky_ptychonn.live.wire.deserialize`, logging a refused message before bluesky drops it."""
    try:
        return deserialize(data)
    except DocumentDecodeError as err:
        logger.warning("dropped a 0MQ message that is not a document: %s", err)
        raise


def _cancel_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the dispatcher's receive task; called in the loop's own thread."""
    for task in asyncio.all_tasks(loop):
        task.cancel()


class Consumer:
    """The service: one callback and model watcher, fed by a ``RemoteDispatcher`` on the proxy.

    Parameters
    ----------
    config : ServiceConfig
        The validated configuration.
    callback : PtychoNNCallback, optional
        The callback to feed; built from ``config`` (model loaded, Tiled connected) when omitted.
    """

    def __init__(self, config: ServiceConfig, callback: PtychoNNCallback | None = None) -> None:
        self.config = config
        self.callback = callback if callback is not None else build_callback(config)
        self.watcher = ModelWatcher(self.callback, config.model)
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> None:
        """Dispatch documents until :meth:`stop` or Ctrl-C.

        bluesky's dispatcher drops a message it cannot decode but ends on one whose document name
        is unknown (a ``KeyError`` out of its receive loop); such a message must not end the
        service, so a fresh dispatcher takes over (documents sent while it connects are lost).
        """
        from bluesky.callbacks.zmq import RemoteDispatcher

        zmq = self.config.zmq
        prefix, curve, decode = zmq.prefix.encode(), zmq.curve(), _deserialize_or_report
        self.watcher.start()
        logger.debug("service configuration: %r", self.config)
        logger.warning(
            "consuming documents from %s with model %s", zmq.address, self.callback.predictor.info.content_hash[:12]
        )
        try:
            while not self._stopping.is_set():
                dispatcher = RemoteDispatcher(zmq.address, deserializer=decode, prefix=prefix, curve_config=curve)
                dispatcher.subscribe(self.callback)
                self._loop = dispatcher.loop
                if self._stopping.is_set():  # stop() may have seen the previous, closed loop
                    dispatcher.stop()
                    break
                try:
                    dispatcher.start()
                except (KeyboardInterrupt, asyncio.CancelledError):
                    break
                except KeyError as err:
                    logger.error("0MQ message with unknown document name %s dropped; dispatcher restarted", err)
        finally:
            self.watcher.stop()
            stopped = self.callback.interrupt("the consumer stopped before the run's stop document")
            if stopped:
                logger.warning("finished %d open runs as interrupted: %s", len(stopped), ", ".join(stopped))

    def stop(self) -> None:
        """End :meth:`run` from any thread (it returns once the dispatcher has closed its socket)."""
        self._stopping.set()
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(_cancel_tasks, loop)
            except RuntimeError:  # the loop is already closed: run() is ending anyway
                pass
