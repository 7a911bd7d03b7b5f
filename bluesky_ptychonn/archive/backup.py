"""What could not reach Tiled while a scan ran: backed up on disk, then restored into Tiled.

``TiledWriter(backup_directory=...)`` (bluesky-tiled-plugins) keeps a run's documents in a JSON
Lines file once a write to Tiled fails, instead of raising into the RunEngine and aborting the
scan: the scan goes on, and its documents (which name the detector's HDF5 files, never copy them)
are kept whole. The live consumer keeps a final image Tiled would not take the same way
(``CallbackConfig.backup_dir``). :func:`restore_backups` (``bluesky-ptychonn restore``) writes both
into Tiled once it is back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..files.results import BACKUP_SUFFIX, read_result
from ..tiled_paths import tiled_key

logger = logging.getLogger(__name__)

#: Where restored backup files are moved, inside the backup folder.
RESTORED = "restored"


def restore_backups(client: Any, directory: str | Path) -> list[str]:
    """Write everything backed up in ``directory`` into Tiled; return the uids restored.

    Two kinds of backup: a raw run's documents (``*.jsonl``, TiledWriter's), written into ``raw``
    and replacing the partial copy that reached Tiled before the failure; and a live result
    whose final image Tiled could not take (``<uid>.ptychonn.h5``), written to
    ``processed/<uid>/ptychonn`` with the status it ended with. Neither is ever unpickled.
    Each restored file moves to ``<directory>/restored``; one that fails stays for the next
    try, with the reason logged.
    """
    directory = Path(directory)
    restored = []
    kinds = [("*.jsonl", _restore_run), (f"*{BACKUP_SUFFIX}", _restore_result)]
    for pattern, restore in kinds:
        for path in sorted(directory.glob(pattern)):
            try:
                uid = restore(client, path)
            except Exception as err:
                logger.error("backup %s not restored (kept for the next try): %r", path, err)
                continue
            (directory / RESTORED).mkdir(exist_ok=True)
            path.rename(directory / RESTORED / path.name)
            logger.warning("%s restored into Tiled from %s", uid, path)
            restored.append(uid)
    return restored


def _restore_run(client: Any, path: Path) -> str:
    from bluesky_tiled_plugins import TiledWriter

    from .servers import ensure_raw_catalog

    raw = ensure_raw_catalog(client)
    docs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    start = next(d["doc"] for d in docs if d["name"] == "start")
    uid = tiled_key(start["uid"], "run uid")
    if uid in raw:  # what reached Tiled before the outage; the backup holds the whole run
        raw[uid].delete(recursive=True, external_only=False)
    writer = TiledWriter(raw)
    for d in docs:
        writer(d["name"], d["doc"])
    return uid


def _restore_result(client: Any, path: Path) -> str:
    from ..live.sink import TiledSink

    uid = tiled_key(path.name.removesuffix(BACKUP_SUFFIX), "run uid")
    image, metadata = read_result(path)
    TiledSink(client, uid, replace=True).publish(image, {**metadata, "restored_from": path.name})
    return uid
