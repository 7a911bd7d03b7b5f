"""Runs that could not reach Tiled while they were taken: backed up, then restored into ``raw``.

``TiledWriter(backup_directory=...)`` (bluesky-tiled-plugins) keeps a run's documents in a JSON
Lines file once a write to Tiled fails, instead of raising into the RunEngine and aborting the
scan: the scan goes on, and its documents (which name the detector's HDF5 files, never copy them)
are kept whole. :func:`restore_backups` writes them into Tiled once it is back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..tiled_paths import tiled_key

logger = logging.getLogger(__name__)

#: Where restored backup files are moved, inside the backup folder.
RESTORED = "restored"


def restore_backups(client: Any, directory: str | Path) -> list[str]:
    """Write every run backed up in ``directory`` into ``raw``; return the uids restored.

    A partial copy of the run (what reached Tiled before the failure) is replaced. The files
    are JSON (never unpickled); each restored file moves to ``<directory>/restored``, and one
    that fails stays where it is, for the next try, with the reason logged.
    """
    from bluesky_tiled_plugins import TiledWriter

    from .servers import ensure_raw_catalog

    raw = ensure_raw_catalog(client)
    directory = Path(directory)
    restored = []
    for path in sorted(directory.glob("*.jsonl")):
        try:
            docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            start = next(d["doc"] for d in docs if d["name"] == "start")
            uid = tiled_key(start["uid"], "run uid")
            if uid in raw:  # what reached Tiled before the outage; the backup holds the whole run
                raw[uid].delete(recursive=True, external_only=False)
            writer = TiledWriter(raw)
            for d in docs:
                writer(d["name"], d["doc"])
        except Exception as err:
            logger.error("backup %s not restored (kept for the next try): %r", path, err)
            continue
        (directory / RESTORED).mkdir(exist_ok=True)
        path.rename(directory / RESTORED / path.name)
        logger.warning("run %s restored into Tiled from %s", uid, path)
        restored.append(uid)
    return restored
