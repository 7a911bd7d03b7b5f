"""The out-of-process consumer: ``bluesky-ptychonn consume --config <file>``.

It subscribes a :class:`~bluesky_ptychonn.live.callback.PtychoNNCallback` to a ``bluesky-0MQ-proxy``
(``RemoteDispatcher``), so the RunEngine's process never runs the analysis. The configuration is
a TOML file (see ``callbacks/ptychonn.toml``)::

    [model]     checkpoint = "...", device = "auto", reload_interval_s = 10
    [tiled]     uri = "http://127.0.0.1:8000", api_key_env = "TILED_API_KEY"
    [zmq]       address = "tcp://127.0.0.1:5578"
    [callback]  data_roots = ["/data"], frames_key = "diffraction", ...  (CallbackConfig)
    [live]      batch_size = 64, publish_interval_s = 1.0, ...            (LiveOptions)

A new checkpoint written at the configured path is picked up without a restart (checked every
``reload_interval_s``; runs in progress keep their model).
"""

from __future__ import annotations

import logging
import os
import threading
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..core.engine import LiveOptions
from ..errors import CheckpointError, ConfigurationError
from .callback import CallbackConfig, PtychoNNCallback

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(_Section):
    checkpoint: Path = Field(description="The model to load (safetensors checkpoint).")
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:n]'.")
    reload_interval_s: float = Field(10.0, ge=0, description="How often to look for a new checkpoint; 0 never.")


class TiledSection(_Section):
    uri: str = Field(description="Tiled server root URI.")
    api_key_env: str = Field("TILED_API_KEY", description="Environment variable holding the API key (writes need one).")


class ZmqSection(_Section):
    address: str = Field("tcp://127.0.0.1:5578", description="The proxy's output (subscriber) address.")
    prefix: str = Field("", description="0MQ topic prefix, as given to the Publisher.")


class ServiceConfig(_Section):
    """The whole consumer configuration."""

    model: ModelSection
    tiled: TiledSection | None = None
    zmq: ZmqSection = Field(default_factory=ZmqSection)
    callback: dict[str, Any] = Field(default_factory=dict)
    live: dict[str, Any] = Field(default_factory=dict)

    def callback_config(self) -> CallbackConfig:
        """The callback's configuration, with paths relative to nothing (absolute as written)."""
        return CallbackConfig(**self.callback, live=LiveOptions(**self.live))


def load_config(path: str | Path) -> ServiceConfig:
    """Read and validate a TOML service configuration; relative paths resolve against its folder."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigurationError(f"cannot read the service configuration {path}: {err}") from err
    base = path.resolve().parent
    if "model" in raw and "checkpoint" in raw["model"]:
        raw["model"]["checkpoint"] = str(base / raw["model"]["checkpoint"])
    if "callback" in raw and "data_roots" in raw["callback"]:
        raw["callback"]["data_roots"] = [str(base / r) for r in raw["callback"]["data_roots"]]
    try:
        config = ServiceConfig(**raw)
        config.callback_config()
    except (ValueError, TypeError) as err:
        raise ConfigurationError(f"invalid service configuration {path}: {err}") from err
    return config


def tiled_client(section: TiledSection | None) -> Any:
    """A Tiled client with the API key from the environment (None without a [tiled] section)."""
    if section is None:
        return None
    from tiled.client import from_uri

    api_key = os.environ.get(section.api_key_env)
    if not api_key:
        raise ConfigurationError(f"Tiled writes need an API key: set ${section.api_key_env}")
    return from_uri(section.uri, api_key=api_key)


class ModelWatcher:
    """Swaps the callback's model when the checkpoint file changes (a fine-tuned model lands)."""

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
            predictor = Predictor.from_checkpoint(self.section.checkpoint, device=self.section.device)
        except CheckpointError as err:  # a half-written or bad file: keep the current model
            logger.error(
                "new checkpoint refused, keeping model %s: %s", self.callback.predictor.info.content_hash[:12], err
            )
            return False
        if predictor.info.content_hash == self.callback.predictor.info.content_hash:
            return False
        self.callback.set_predictor(predictor)
        logger.warning("model reloaded: %s", predictor.info.content_hash[:12])
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.section.reload_interval_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()


def build_callback(config: ServiceConfig) -> PtychoNNCallback:
    """The callback a service configuration describes (model loaded, Tiled client connected)."""
    from ..core.inference import Predictor

    predictor = Predictor.from_checkpoint(config.model.checkpoint, device=config.model.device)
    return PtychoNNCallback(predictor, tiled_client(config.tiled), config.callback_config())


def consume(config: ServiceConfig) -> None:
    """Subscribe to the 0MQ proxy and reconstruct every ptychography run until interrupted."""
    from bluesky.callbacks.zmq import RemoteDispatcher

    callback = build_callback(config)
    watcher = ModelWatcher(callback, config.model).start()
    dispatcher = RemoteDispatcher(config.zmq.address, prefix=config.zmq.prefix.encode())
    dispatcher.subscribe(callback)
    logger.warning(
        "consuming documents from %s with model %s", config.zmq.address, callback.predictor.info.content_hash[:12]
    )
    try:
        dispatcher.start()
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()
