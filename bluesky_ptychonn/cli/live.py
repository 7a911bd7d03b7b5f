"""Commands of the live path: ``consume`` documents from a bluesky-0MQ-proxy."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .options import add_command

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``consume``."""
    p = add_command(
        sub,
        "consume",
        "reconstruct live the runs published through a bluesky-0MQ-proxy",
        """  TILED_API_KEY=secret bluesky-ptychonn consume --config callbacks/ptychonn.toml
  PTYCHONN_LIVE__BATCH_SIZE=32 bluesky-ptychonn consume --config callbacks/ptychonn.toml""",
        "Runs until interrupted (Ctrl-C or SIGTERM: the run in progress is finished first). Any key of the "
        "file can be overridden as PTYCHONN_<TABLE>__<KEY>; the API key comes from the environment only.",
    )
    p.add_argument(
        "--config", type=Path, required=True, help="TOML service configuration (see callbacks/ptychonn.toml)"
    )
    p.set_defaults(func=consume)


def consume(args: argparse.Namespace) -> None:
    """``consume``: subscribe to the proxy and reconstruct every ptychography run until interrupted.

    With ``[refine] enabled``, each run is also refined with pty-chi once its live image is final.
    The worker is wired here because the live layer may not import the archive layer.
    """
    from ..live.lifecycle import run_until_signalled
    from ..live.service import Consumer, build_callback, load_config, tiled_client

    config = load_config(args.config)
    if not config.refine.enabled:
        run_until_signalled(Consumer(config))
        return
    from ..archive.refine_worker import RefineWorker

    worker = RefineWorker(
        tiled_client(config.tiled),
        options=config.refine.options(),
        run_timeout_s=config.refine.run_timeout_s,
        nice=config.refine.nice,
    )
    try:
        run_until_signalled(Consumer(config, build_callback(config, after_final=worker.submit)))
    finally:
        logger.warning("waiting for the refinement in progress, if any (interrupt again to stop it as interrupted)")
        worker.close()
