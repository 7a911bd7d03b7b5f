"""A consumer's start and end: results a dead consumer left ``running``, and stopping on a signal."""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from ..tiled_paths import PROCESSED, PTYCHONN, REFINED

if TYPE_CHECKING:
    from .service import Consumer

logger = logging.getLogger(__name__)


def run_until_signalled(consumer: Consumer) -> None:
    """Run ``consumer`` in this (main) thread until SIGTERM (as a service manager sends) or Ctrl-C.

    Either way open runs are finished as ``interrupted`` with their partial images before it returns.
    """
    stale = mark_stale_results(consumer.callback.client)
    if stale:
        logger.warning("results left running by an earlier consumer, now marked interrupted: %s", ", ".join(stale))

    def stop(*_: Any) -> None:
        # Ctrl-C stops as SIGTERM does, through the dispatcher's own loop (a KeyboardInterrupt inside
        # it left its receive task pending: "Task was destroyed"); a second Ctrl-C interrupts at once.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        consumer.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        consumer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


#: A ``running`` live or refined result not updated for this long belongs to no live process.
STALE_AFTER_S = 600.0


def mark_stale_results(client: Any, stale_after_s: float = STALE_AFTER_S) -> list[str]:
    """Mark results left ``running`` by a consumer that died (SIGKILL, power): live ``interrupted``, refined ``failed``.

    A result is stale when its ``updated`` time (or its ``started`` time, for results written
    before results carried one) is older than ``stale_after_s``: a consumer alive publishes
    well within that, and a refinement records each epoch's progress (at most every 30 s). A live
    result's partial image stays; each reason names the command that finishes the run from the
    archive. Returns the raw uids marked.
    """
    if client is None or PROCESSED not in client:
        return []
    marked = []
    now = time.time()
    for uid, results in client[PROCESSED].items():
        for name, command in ((PTYCHONN, "replay"), (REFINED, "refine")):
            if name not in results:
                continue
            node = results[name]
            md = dict(node.metadata)
            if not is_stale(md, now, stale_after_s):
                continue
            reason = f"left running by a consumer that stopped; finish it with: bluesky-ptychonn {command} {uid}"
            fate: dict[str, Any]
            if name == PTYCHONN:  # its partial image stays
                fate = {"status": "interrupted", "reason": reason}
            else:  # as any failed refinement records it: a list of errors
                fate = {"status": "failed", "errors": [reason], "finished": now}
            node.update_metadata({**fate, "updated": now})
            if uid not in marked:
                marked.append(uid)
    return marked


def is_stale(md: Any, now: float, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether a result's metadata says ``running`` with no update (or, written before results carried
    one, no start) for ``stale_after_s``: no live process is finishing it."""
    return md.get("status") == "running" and now - float(md.get("updated") or md.get("started") or 0) >= stale_after_s
