"""What reprocessing does to one run, as :func:`~bluesky_ptychonn.archive.cluster.map_runs` tasks.

Each task takes the server's root client, a run of ``raw`` and plain options, writes its result
into Tiled and returns the summary the command line prints. Models travel as checkpoint paths
(a path every worker can read) and are loaded once per worker process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..tiled_paths import ITERATIVE, PTYCHONN, processed_path
from .cluster import load_predictor

if TYPE_CHECKING:
    from ..core.engine import LiveOptions
    from ..core.iterative import IterativeOptions

#: The lines of a replay's metadata worth printing.
REPLAY_KEYS = ("raw_uid", "path", "status", "frames_done", "frames_dropped", "frames_duplicate", "model_hash")


def replay_task(
    client: Any,
    run: Any,
    *,
    checkpoint: str,
    device: str = "auto",
    compile: bool = False,
    options: LiveOptions | None = None,
    replace: bool = True,
    name: str = PTYCHONN,
    refine: bool | IterativeOptions = False,
    progress: bool = False,
) -> dict[str, Any]:
    """``replay`` of one run (then ``refine`` from the new image when asked); its summary.

    ``progress``: bars over frames and epochs (for a run in this process, not on a cluster).
    """
    from .refine import refine_run
    from .replay import replay_run

    predictor = load_predictor(checkpoint, device, compile)
    result = replay_run(run, predictor, client, options=options, replace=replace, name=name, progress=progress)
    summary = {k: result.get(k) for k in REPLAY_KEYS} | {"errors": result["errors"]}
    if refine is not False:
        refined = refine_run(run, client, options=None if refine is True else refine, progress=progress)
        summary["refined"] = refine_summary(refined)
    return summary


def iterative_task(
    client: Any,
    run: Any,
    *,
    options: IterativeOptions,
    photons_per_frame: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``iterative`` (pty-chi, stored as training labels) of one run; its summary."""
    from .labels import iterative_run

    result = iterative_run(run, client, options, photons_per_frame=photons_per_frame, progress=progress)
    uid = run.metadata["start"]["uid"]
    return {
        "raw_uid": uid,
        "path": processed_path(uid, ITERATIVE),
        "engine": result.engine,
        "epochs": result.epochs,
        "frames": result.frames,
        "final_error": result.error_per_epoch[-1] if result.error_per_epoch else None,
        "seconds": result.seconds,
        "device": result.device,
    }


def refine_task(
    client: Any,
    run: Any,
    *,
    options: IterativeOptions,
    seed: str = "ptychonn",
    checkpoint: str | None = None,
    device: str = "auto",
    photons_per_frame: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``refine`` (pty-chi from the PtychoNN image; replayed first with ``checkpoint`` when it has none)."""
    from .refine import refine_run

    predictor = None if checkpoint is None else load_predictor(checkpoint, device)
    result = refine_run(
        run,
        client,
        options=options,
        seed=seed,  # type: ignore[arg-type]
        predictor=predictor,
        photons_per_frame=photons_per_frame,
        progress=progress,
    )
    return refine_summary(result)


def refine_summary(metadata: dict[str, Any]) -> dict[str, Any]:
    """The lines of a refinement's metadata worth printing."""
    keys = ("raw_uid", "path", "status", "engine", "epochs", "max_epochs", "stopped_by", "seconds", "device")
    errors = metadata.get("error_per_epoch") or [None]
    return {k: metadata.get(k) for k in keys} | {
        "final_error": errors[-1],
        "seed": metadata["seed"]["source"],
        "seed_replayed": metadata["seed"].get("replayed", False),
        "probe_source": metadata["probe"]["source"],
    }
