"""Reprocessing many runs at once: one task per run, in this process or on a Dask cluster.

``replay``, ``iterative``, ``refine`` and the label generation of ``train-runs`` hand their runs
to :func:`map_runs`. With ``workers`` > 1 it starts a ``distributed.LocalCluster`` of that many
single-threaded worker processes; with ``scheduler`` it uses a running Dask scheduler (a
facility's cluster, or one that dask-jobqueue started on its batch system). Each task connects to
Tiled itself, reads its run and writes its result there, so nothing but uids and options crosses
the cluster: never frames, never the API key, which each worker reads from its own environment
(the variable :class:`TiledConnection` names; a ``LocalCluster`` inherits this process's). A run
that fails is reported in its summary (``error``), never fatal to the batch.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, PtychoNNError
from ..tiled_paths import RAW

logger = logging.getLogger(__name__)

#: A task: (root client, run, **options) -> summary dict. Module-level, so Dask sends it by name.
Task = Callable[..., dict[str, Any]]
#: Where workers read the Tiled API key by default (as the command line does).
API_KEY_ENV = "TILED_API_KEY"


@dataclass(frozen=True)
class TiledConnection:
    """How a worker reaches the Tiled server: its API URI, and the environment variable holding the key."""

    uri: str
    api_key_env: str = API_KEY_ENV

    @classmethod
    def of(cls, client: Any, api_key_env: str = API_KEY_ENV) -> TiledConnection:
        """The connection of an open client (its URI carries no key)."""
        return cls(str(client.context.api_uri), api_key_env)

    def connect(self) -> tuple[Any, Any]:
        """(root client, ``raw`` catalog), one connection per worker process."""
        return _connect(self.uri, os.environ.get(self.api_key_env) or None)


@functools.lru_cache(maxsize=4)
def _connect(uri: str, api_key: str | None) -> tuple[Any, Any]:
    from .servers import connect

    return connect(uri, api_key=api_key)


@functools.lru_cache(maxsize=4)
def predictor_for(checkpoint: str, device: str, stamp: int = 0, compile: bool = False) -> Any:
    """The model of a checkpoint, loaded once per worker process (``stamp``: its mtime, so a new file reloads).

    A compiled graph (``compile``) is thus built once per process and serves every run the worker replays.
    """
    from ..core.inference import Predictor

    return Predictor.from_checkpoint(Path(checkpoint), device=device, compile=compile)


def load_predictor(checkpoint: str | Path, device: str, compile: bool = False) -> Any:
    """:func:`predictor_for` keyed by the file's modification time."""
    path = Path(checkpoint)
    return predictor_for(str(path.resolve()), device, path.stat().st_mtime_ns, compile)


def map_runs(
    task: Task,
    uids: Sequence[str],
    client: Any,
    *,
    api_key_env: str = API_KEY_ENV,
    scheduler: str | None = None,
    workers: int = 1,
    bar: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """``task(client, run, **options)`` for every run, in the order of ``uids``; one summary each.

    In this process, on ``client``, when ``workers`` <= 1 and no ``scheduler`` is given; else one
    Dask task per run, each worker connecting to ``client``'s server with the key in its
    ``$api_key_env``. A task that raises gives ``{"raw_uid": uid, "error": "..."}``; the rest go on.
    ``bar``: a progress bar over the runs.
    """
    if not uids:
        return []
    if scheduler is None and workers <= 1:
        raw = client[RAW]
        return [_guarded(task, uid, options, opened=(client, raw)) for uid in _progress(uids, bar)]
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as err:
        raise ConfigurationError(
            "reprocessing on Dask needs the `distributed` package: pip install 'bluesky-ptychonn[cluster]'"
        ) from err
    connection = TiledConnection.of(client, api_key_env)
    # A LocalCluster's nannies set OMP_NUM_THREADS=1 and the like in this process's environment, and
    # leave them: put them back afterwards, or every later subprocess of the caller runs on one thread.
    import dask

    environ = {k: os.environ.get(k) for k in dask.config.get("distributed.nanny.pre-spawn-environ", {})}
    if scheduler is None:
        # Threads of one worker would share torch's thread pool; single-threaded processes do not. The
        # statistical profiler (sys._current_frames every 10 ms) is off: a worker hung starting a thread with it on.
        with dask.config.set({"distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        pool, threads = Client(cluster, set_as_default=False), max(1, (os.cpu_count() or 1) // workers)
    else:
        cluster, pool, threads = None, Client(scheduler, timeout="30s", set_as_default=False), None
    try:
        logger.info("%d runs on the Dask cluster at %s", len(uids), pool.scheduler.address)
        batch = uuid.uuid4().hex[:8]  # keys unique to this command on a long-lived cluster
        futures = {
            pool.submit(_guarded, task, uid, options, connection, threads, key=f"{task.__name__}-{uid}-{batch}"): i
            for i, uid in enumerate(uids)
        }
        results: list[dict[str, Any]] = [{} for _ in uids]
        with _progress(range(len(uids)), bar) as shown:
            for future in as_completed(futures, loop=pool.loop):
                i = futures[future]
                try:
                    results[i] = future.result()  # _guarded never raises
                except Exception as err:  # but a worker can die under it (memory, a signal): that run failed
                    results[i] = {"raw_uid": uids[i], "error": f"its Dask worker was lost: {type(err).__name__}: {err}"}
                    logger.error("run %s: %s", uids[i], results[i]["error"])
                shown.update(1)
        return results
    finally:
        pool.close()
        if cluster is not None:
            cluster.close()
        restore_environment(environ)


def restore_environment(saved: dict[str, str | None]) -> None:
    """Put environment variables back as ``saved`` had them (None: unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _guarded(
    task: Task,
    uid: str,
    options: dict[str, Any],
    connection: TiledConnection | None = None,
    threads: int | None = None,
    *,
    opened: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """One run's task; its failure becomes its summary, so one bad run never ends the batch."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        client, raw = opened if opened is not None else connection.connect()  # type: ignore[union-attr]
        if opened is not None:
            return task(client, raw[uid], **options)
        import dask

        # Tiled's client reads arrays through dask; on a worker that would send those reads back to the
        # cluster as tasks, to wait on workers that are busy with runs. Read with local threads instead.
        with dask.config.set(scheduler="threads"):
            return task(client, raw[uid], **options)
    except Exception as err:
        reason = str(err) if isinstance(err, PtychoNNError) else f"{type(err).__name__}: {err}"
        logger.error("run %s: %s failed: %s", uid, task.__name__, reason)
        return {"raw_uid": uid, "error": reason, "seconds": time.perf_counter() - started}


def _progress(items: Any, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc="runs", unit="run", disable=not enabled or len(items) < 2, leave=False)
