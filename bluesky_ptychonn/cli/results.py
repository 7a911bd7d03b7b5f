"""Commands to look at what is in Tiled without writing code: ``show`` a result, list ``runs`` and ``models``."""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import schema
from ..tiled_paths import ITERATIVE, MODELS, PROCESSED, PTYCHONN, REFINED
from .options import add_command, add_selection_arguments, add_tiled_arguments, connect_from_args, runs_from_args

#: Results ``show`` draws, in this order, when the run has them.
RESULTS = (PTYCHONN, REFINED, ITERATIVE)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``show``, ``runs`` and ``models``."""
    p = add_command(
        sub,
        "show",
        "render a run's results from Tiled to a PNG",
        """  bluesky-ptychonn show 3f2a9c1e                       # -> 3f2a9c1e.png
  bluesky-ptychonn show 3f2a9c1e --out live.png --result ptychonn
  TILED_URI=http://127.0.0.1:8000 bluesky-ptychonn show 3f2a9c1e""",
        "Amplitude and phase of the PtychoNN, refined and iterative results the run has, side by side on "
        "the run's grid in micrometres, the trust map below, and the run's sample, frames, model and "
        "status in the title.",
    )
    p.add_argument("uid", help="the run's uid (or its first 5+ characters)")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: <uid's first 8>.png here)")
    p.add_argument(
        "--result", action="append", choices=RESULTS, default=None, help="draw only this result (repeatable)"
    )
    add_tiled_arguments(p)
    p.set_defaults(func=show)

    p = add_command(
        sub,
        "runs",
        "list runs with the status of their results",
        """  bluesky-ptychonn runs                                 # the newest 20
  bluesky-ptychonn runs sample_id=sim-features-0 --since 2026-11-01
  bluesky-ptychonn runs --stale                         # live or refined results nobody is finishing
  bluesky-ptychonn runs --json --limit 100""",
        "One line per run: uid, start time, plan, sample, points, and the status of its ptychonn, refined "
        "and iterative results with the model that made the image. A live or refined result still 'running' "
        "whose process stopped updating it is flagged STALE (`replay` or `refine` finishes it from the archive).",
    )
    add_selection_arguments(p, dry_run=False)
    p.add_argument("--limit", type=int, default=20, help="the newest N runs at most (default: 20)")
    p.add_argument("--stale", action="store_true", help="only runs with a live or refined result nobody is finishing")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=runs)

    p = add_command(
        sub,
        "models",
        "list the models registered in Tiled",
        """  bluesky-ptychonn models
  bluesky-ptychonn models --json""",
        "One line per model at models/<content hash>: its file, network, label source, the runs it was "
        "trained on and its validation figures. Every result's model_hash is one of these.",
    )
    add_tiled_arguments(p)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=models)


def _results_of(client: Any, uid: str) -> dict[str, Any]:
    """The result nodes under ``processed/<uid>`` (none when the run has none)."""
    try:
        node = client[PROCESSED][uid]
    except KeyError:
        return {}
    return {name: node[name] for name in RESULTS if name in node}


def show(args: argparse.Namespace) -> dict:
    """``show``: one PNG of the run's results; returns its path and each result's status."""
    from ..archive.runs import select
    from ..core.geometry import ObjectGrid
    from ..errors import RunError
    from ..files.figures import save_figure
    from ..live.sink import read_image

    client, raw = connect_from_args(args)
    (run,) = select(raw, [args.uid])
    start = run.metadata["start"]
    uid = start["uid"]
    nodes = {k: v for k, v in _results_of(client, uid).items() if args.result is None or k in args.result}
    if not nodes:
        raise RunError(f"run {uid[:8]} has no {' or '.join(args.result or RESULTS)} result in Tiled")
    panels, maps, statuses, grid, mask, skipped, live = [], [], {}, None, None, [], None
    for name, node in nodes.items():
        arrays, md = read_image(node)
        statuses[name] = md.get("status")
        if "amplitude" not in arrays:
            skipped.append(f"{name} ({md.get('status')}, no image)")
            continue
        this = ObjectGrid.from_metadata(md["grid"])
        if grid is not None and this != grid:
            skipped.append(f"{name} (another grid)")
            continue
        grid = this
        label = f"{name} ({md.get('status')}{', ' + md['source'] if md.get('source') else ''})"  # live or replay
        panels.append((label, arrays["amplitude"], arrays["phase"]))
        if "weight" in arrays and mask is None:
            mask = arrays["weight"] > 0
        if "trust" in arrays:
            maps.append((f"{name}: trust (consistency error)", arrays["trust"], "magma"))
        if name == PTYCHONN:
            live = md
    if grid is None:
        raise RunError(f"run {uid[:8]}: no result has an image yet: {', '.join(skipped)}")
    section = start.get("ptychography", {})
    when = datetime.fromtimestamp(start.get("time", 0)).strftime("%Y-%m-%d %H:%M")
    title = f"run {uid[:8]} · {section.get('sample_id', '?')} · {start.get('plan_name', '?')} · {when}"
    if live is not None:
        title += f" · {live.get('frames_done')} frames · model {(live.get('model_hash') or '')[:12]}"
    out = args.out or Path(f"{uid[:8]}.png")
    save_figure(out, panels, grid, mask=mask, title=title, maps=maps)
    return {"figure": str(out), "run": uid, "results": statuses, "not_drawn": skipped}


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def run_row(client: Any, run: Any, now: float) -> dict[str, Any]:
    from ..live.lifecycle import is_stale

    start, stop = run.metadata["start"], run.metadata.get("stop") or {}
    section = start.get("ptychography", {})
    row = {
        "uid": start["uid"],
        "started": datetime.fromtimestamp(start.get("time", 0)).isoformat(timespec="seconds"),
        "age": _age(now - start.get("time", now)),
        "plan": start.get("plan_name"),
        "sample": section.get("sample_id"),
        "points": (stop.get("num_events") or {}).get(schema.stream_name(section)) if section else None,
        "exit": stop.get("exit_status", "open" if not stop else None),  # open: no stop document (yet)
        "stale": [],  # the results left running by a process that is gone (live or refined)
    }
    for name, node in _results_of(client, start["uid"]).items():
        md = node.metadata
        row[name] = md.get("status")
        if is_stale(md, now):
            row["stale"].append(name)
        if name == PTYCHONN:
            row["model"] = (md.get("model_hash") or "")[:12]
            row["frames_done"] = md.get("frames_done")
    return row


def runs(args: argparse.Namespace) -> list[dict] | None:
    """``runs``: the selected (else the newest) runs and their results' status; a table, or JSON with --json."""
    now = time.time()
    if args.runs or args.uids or args.where or args.since or args.until or args.plan_name:
        client, raw, uids = runs_from_args(args)
        chosen = [raw[uid] for uid in uids][-args.limit :]
    else:
        client, raw = connect_from_args(args)
        # Tiled slices from the end only backwards: the newest first, then put in time order.
        chosen = list(raw.values()[-1 : -args.limit - 1 : -1])[::-1] if len(raw) else []
    rows = [run_row(client, run, now) for run in chosen]
    if args.stale:
        rows = [row for row in rows if row.get("stale")]
    if args.json:
        return rows
    columns = ("uid", "started", "age", "plan", "sample", "points", "exit", PTYCHONN, "model", REFINED, ITERATIVE)
    _table(
        [{**row, "uid": row["uid"][:8], **{name: _status(row, name) for name in (PTYCHONN, REFINED)}} for row in rows],
        columns,
        empty="no runs",
    )
    return None


def _status(row: dict, name: str) -> str:
    status = row.get(name) or "-"
    return f"{status} STALE" if name in row["stale"] else status


def models(args: argparse.Namespace) -> list[dict] | None:
    """``models``: the model registry; a table, or JSON with --json."""
    client, _ = connect_from_args(args)
    rows = []
    if MODELS in client:
        for content_hash, node in client[MODELS].items():
            md = node.metadata
            provenance, network = md.get("provenance") or {}, md.get("network") or {}
            metrics = md.get("metrics") or {}
            rows.append(
                {
                    "hash": content_hash,
                    "file": md.get("checkpoint_file"),
                    "network": f"{network.get('input_pixels', '?')} px, {network.get('base_channels', '?')} channels",
                    "labels": provenance.get("label_source"),
                    "runs": len(provenance.get("run_uids") or []),
                    "best_val_loss": metrics.get("best_val_loss"),
                    "version": md.get("package_version"),
                }
            )
    if args.json:
        return rows
    _table([{**row, "hash": row["hash"][:12]} for row in rows], tuple(rows[0]) if rows else (), empty="no models")
    return None


def _table(rows: list[dict], columns: tuple[str, ...], *, empty: str) -> None:
    """Print ``rows`` as aligned columns ("-" where a row has no value)."""
    if not rows:
        print(empty)
        return
    cells = [list(columns)] + [["-" if row.get(c) is None else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
