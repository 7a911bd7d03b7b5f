"""Training from prior runs pulled through databroker, fine-tuning, and models registered in Tiled.

The paper trained on ePIE reconstructions of the first scan lines of a prior scan; here the prior
runs come from the catalog (selected by uid or start-document query), their labels from their
stored pty-chi reconstructions (computed when missing) or, for simulated runs, the ground truth
(:mod:`~bluesky_ptychonn.archive.labels`). A new checkpoint is written atomically
(:func:`~bluesky_ptychonn.core.checkpoint.save_checkpoint` writes beside the target, then renames), so a
consumer's :class:`~bluesky_ptychonn.live.service.ModelWatcher` never reads half a file. A model can be
registered at ``models/<content hash>`` in Tiled so that every result's ``model_hash`` leads to
the runs and label source behind it.

Under ``torchrun`` (:mod:`~bluesky_ptychonn.core.distributed`) every process reads the runs and
trains its share; iterative labels missing from Tiled are computed and stored by the writer alone
(the others wait, then read them), and only the writer writes the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import schema
from ..errors import ConfigurationError, RunError
from .runs import check_ptychography, root_of, scan_from_run, select

if TYPE_CHECKING:
    from ..core.checkpoint import CheckpointInfo
    from ..core.config import NetworkConfig, PreprocessRecipe, TrainConfig
    from ..core.iterative import IterativeOptions
    from ..core.network import PtychoNN
    from ..core.training import TrainingSet
    from .labels import LabelSource

#: Fine-tuning defaults: a few epochs at a tenth of the paper's rate refine a model rather than overwrite it.
FINE_TUNE_EPOCHS = 10
FINE_TUNE_LEARNING_RATE = 1e-4


def training_set_from_runs(
    catalog: Any,
    uids_or_queries: Iterable[Any],
    *,
    label_source: LabelSource = "iterative",
    lines: float = 1.0,
    client: Any = None,
    iterative_options: IterativeOptions | None = None,
    recipe: PreprocessRecipe | None = None,
    newest: int | None = None,
    progress: bool = False,
) -> TrainingSet:
    """Frames of prior runs with label patches at each frame's position, one group per run.

    Parameters
    ----------
    catalog : databroker.client.CatalogOfBlueskyRuns
    uids_or_queries : iterable
        As for :func:`~bluesky_ptychonn.archive.runs.select`: uids, queries, tuples of queries.
    label_source : {"iterative", "truth"}
    lines : float
        Use the frames on the first ``lines`` fraction of each run's scan lines (the paper: 100 lines).
    client : tiled Container, optional
        The server's root, to read and store iterative labels; default: the catalog's connection.
    iterative_options : IterativeOptions, optional
        For iterative labels that have to be computed.
    recipe : PreprocessRecipe, optional
        The network's recipe (fine-tuning); its pixel grid must be the runs' (no crop, bin or resize).
    newest : int, optional
        Keep only the ``newest`` selected runs (by start time).

    Raises
    ------
    RunError
        Any selection or run problem (see :func:`~bluesky_ptychonn.archive.runs.select`), runs of different
        frame sizes or pixel sizes, no truth or no probe for the chosen labels; each names the run.
    ConfigurationError
        ``recipe`` does not fit the runs.
    """
    from ..core.geometry import split_lines
    from ..core.training import TrainingSet
    from .labels import check_labels_available, label_patches

    if label_source not in ("iterative", "truth"):
        raise ConfigurationError(f"label source must be 'iterative' or 'truth', got {label_source!r}")
    if not 0 < lines <= 1:
        raise ConfigurationError(f"lines must be a fraction in (0, 1], got {lines!r}")
    if newest is not None and newest < 1:
        raise ConfigurationError(f"newest must be a positive number of runs, got {newest!r}")
    runs = sorted(select(catalog, uids_or_queries), key=lambda r: r.metadata["start"].get("time", 0.0))
    runs = runs[-newest:] if newest else runs
    check_ptychography(runs)
    client = root_of(catalog) if client is None else client
    # Everything that metadata alone can refuse is refused before any frame is read or pty-chi runs.
    first_uid = runs[0].metadata["start"]["uid"]  # select() never returns an empty list
    geometry = schema.geometry(schema.read_section(runs[0].metadata["start"]))
    for run in runs[1:]:
        start = run.metadata["start"]
        uid, this = start["uid"], schema.geometry(schema.read_section(start))
        if this.frame_pixels != geometry.frame_pixels or not np.isclose(
            this.pixel_size_m(), geometry.pixel_size_m(), rtol=1e-6
        ):
            raise RunError(
                f"runs of different geometry cannot share a training set: run {uid} has {this.frame_pixels}-pixel "
                f"frames of {this.pixel_size_m():.6g} m pixels ({this}), run {first_uid} {geometry.frame_pixels}-pixel "
                f"frames of {geometry.pixel_size_m():.6g} m pixels ({geometry})"
            )
    check_labels_available(runs, label_source, client)
    n = geometry.frame_pixels
    if recipe is not None:
        pixel = recipe.pixel_size_m(geometry)
        if recipe.output_pixels != n or not np.isclose(pixel, geometry.pixel_size_m(), rtol=1e-6):
            raise ConfigurationError(
                f"the recipe makes {recipe.output_pixels}-pixel inputs of {pixel:.6g} m pixels, but the labels of run "
                f"{first_uid} are {n}-pixel patches of {geometry.pixel_size_m():.6g} m pixels"
            )
    parts = []
    for run in runs:
        scan = scan_from_run(run, with_truth=False)
        uid = scan.metadata["uid"]
        index = split_lines(scan.positions_m, lines)[0] if lines < 1 else np.arange(len(scan.frames))
        amplitude, phase, provenance = label_patches(
            run,
            scan.positions_m[index],
            source=label_source,
            pixel_size_m=geometry.pixel_size_m(),
            patch_pixels=n,
            client=client,
            iterative_options=iterative_options,
            progress=progress,
        )
        source = {
            "run_uid": uid,
            "scan_id": run.metadata["start"].get("scan_id"),
            "sample_id": scan.metadata.get("sample_id"),
            "lines_fraction": lines,
            "frames": int(len(index)),
            **provenance,
        }
        probe_description = schema.read_section(run.metadata["start"]).get("probe")
        if probe_description:
            source["probe"] = probe_description
        groups = np.zeros(len(index), np.int64)  # one validation block per run
        parts.append(
            TrainingSet(
                scan.frames[index], amplitude, phase, scan.positions_m[index], groups, [source], probes=[scan.probe]
            )
        )
    return TrainingSet.concatenate(parts)


def _training_set_everywhere(
    catalog: Any, uids_or_queries: Iterable[Any], *, label_source: LabelSource, device: str, **kwargs: Any
) -> TrainingSet:
    """:func:`training_set_from_runs` in every process; missing iterative labels are stored by the writer first.

    Raises :class:`RunError` in every process when they did not select the same runs (a query such as
    ``--newest`` can match a run that arrived while the writer computed labels).
    """
    import hashlib

    import torch

    from ..core import distributed

    def make() -> TrainingSet:
        return training_set_from_runs(catalog, uids_or_queries, label_source=label_source, **kwargs)

    data = distributed.writer_first(make, device) if label_source == "iterative" else make()
    dev = distributed.start(device)
    if distributed.world_size() > 1:
        uids = ",".join(str(s["run_uid"]) for s in data.sources)
        digest = float(int(hashlib.sha256(uids.encode()).hexdigest()[:12], 16))  # 48 bits: exact in a float64
        differs = float(distributed.agree([digest], dev)[0] != digest)
        if float(distributed.total(torch.tensor(differs, dtype=torch.float64, device=dev))):
            raise RunError(
                f"the processes selected different runs (this one: {uids}); the selection changed while they read "
                "it: name the runs by uid"
            )
    return data


def _run_provenance(data: TrainingSet, label_source: str) -> dict[str, Any]:
    return {"run_uids": [s["run_uid"] for s in data.sources], "label_source": label_source}


def train_from_runs(
    catalog: Any,
    uids_or_queries: Iterable[Any],
    *,
    label_source: LabelSource = "iterative",
    lines: float = 1.0,
    network: NetworkConfig | str = "paper",
    batch_norm: bool = False,
    transform: Literal["none", "sqrt", "log1p"] = "sqrt",
    recipe: PreprocessRecipe | None = None,
    config: TrainConfig | None = None,
    client: Any = None,
    iterative_options: IterativeOptions | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool = True,
    base: str | Path | None = None,
) -> tuple[PtychoNN, CheckpointInfo]:
    """Train a model on prior runs: :func:`training_set_from_runs`, then ``core.training.fit``.

    ``network`` is a configuration or a preset name (``"paper"``, ``"small"``) sized to the runs'
    frames, with BatchNorm when ``batch_norm``; ``recipe`` defaults to whole frames, the given
    input ``transform`` and a scale fitted on the training frames. ``base`` starts from a
    pretrained model instead (a checkpoint path, a shipped base model's name, or ``"auto"``: the
    shipped base for the runs' geometry, if there is one); its network and recipe then replace
    ``network``, ``transform`` and ``recipe``. The provenance holds ``run_uids``, ``label_source``
    and each run's source; with ``out`` the checkpoint is written there, atomically (by the writer
    alone under ``torchrun``, see the module's docstring).
    """
    from ..core import distributed
    from ..core.checkpoint import load_model, save_checkpoint
    from ..core.config import NetworkConfig, PreprocessRecipe
    from ..core.training import fit

    uids_or_queries = list(uids_or_queries)
    base_path = _resolve_base(base, catalog, uids_or_queries)
    initial_state, base_info = None, None
    if base_path is not None:
        base_model, base_info = load_model(base_path, "cpu")
        network, recipe, initial_state = base_info.network, base_info.recipe, base_model.state_dict()
    data = _training_set_everywhere(
        catalog,
        uids_or_queries,
        label_source=label_source,
        device=device,
        lines=lines,
        client=client,
        iterative_options=iterative_options,
        recipe=recipe,
        progress=progress,
    )
    n = data.amplitude.shape[-1]
    if isinstance(network, str):
        network = NetworkConfig.preset(network, n).model_copy(update={"batch_norm": batch_norm})
    recipe = recipe or PreprocessRecipe(frame_shape=tuple(data.frames.shape[1:]), transform=transform)
    model, info = fit(
        data,
        network,
        recipe,
        config,
        device=device,
        progress=progress,
        fit_scale=initial_state is None,
        initial_state=initial_state,
    )
    info.provenance.update(_run_provenance(data, label_source))
    if base_info is not None:
        info.provenance["fine_tuned_from"] = {"base": str(base), "content_hash": base_info.content_hash}
    if out is not None and distributed.is_writer():
        info = save_checkpoint(out, model, info)  # atomic: written beside ``out``, then renamed over it
    return model, info


def _resolve_base(base: str | Path | None, catalog: Any, uids_or_queries: Iterable[Any]) -> Path | None:
    """The checkpoint path that ``base`` names (see :func:`train_from_runs`), or None."""
    from ..core.base_model import BASE_MODELS, base_for, base_model_path

    if base is None:
        return None
    if base == "auto":
        runs = select(catalog, uids_or_queries)
        name = base_for(schema.geometry(schema.read_section(runs[0].metadata["start"])))
        return None if name is None else base_model_path(name)
    if str(base) in BASE_MODELS:
        return base_model_path(str(base))
    return Path(base)


def _start_from(checkpoint: str | Path, out: str | Path | None) -> tuple[Path, Path]:
    """(checkpoint to load, where to write): a shipped base model's name loads it, and needs ``out``."""
    from ..core.base_model import BASE_MODELS, base_model_path

    if str(checkpoint) in BASE_MODELS:
        if out is None:
            raise ConfigurationError(
                f"{checkpoint!s} is a shipped base model and is never replaced: give an output path"
            )
        return base_model_path(str(checkpoint)), Path(out)
    return Path(checkpoint), Path(checkpoint if out is None else out)


def fine_tune(
    checkpoint: str | Path,
    catalog: Any,
    uids_or_queries: Iterable[Any],
    *,
    epochs: int = FINE_TUNE_EPOCHS,
    out: str | Path | None = None,
    newest: int | None = None,
    label_source: LabelSource = "iterative",
    lines: float = 1.0,
    learning_rate: float = FINE_TUNE_LEARNING_RATE,
    config: TrainConfig | None = None,
    client: Any = None,
    iterative_options: IterativeOptions | None = None,
    device: str = "auto",
    progress: bool = True,
) -> tuple[PtychoNN, CheckpointInfo]:
    """Continue training an existing model on the newest runs and publish it where the consumer watches.

    The network, the recipe and its input scale stay those of ``checkpoint`` (the weights were
    trained for that scale); training starts from its weights at ``learning_rate`` (below the
    paper's 1e-3 from scratch, so a few runs refine the model rather than overwrite it). The new
    checkpoint goes to ``out`` (default: ``checkpoint`` itself, replaced atomically) and its
    provenance names the model it came from.
    """
    from ..core import distributed
    from ..core.checkpoint import load_model, save_checkpoint
    from ..core.config import TrainConfig
    from ..core.training import fit

    checkpoint, out = _start_from(checkpoint, out)
    base, base_info = load_model(checkpoint, "cpu")
    data = _training_set_everywhere(
        catalog,
        uids_or_queries,
        label_source=label_source,
        device=device,
        lines=lines,
        client=client,
        iterative_options=iterative_options,
        recipe=base_info.recipe,
        newest=newest,
        progress=progress,
    )
    settings = (config or TrainConfig()).model_dump()
    config = TrainConfig(**{**settings, "epochs": epochs, "learning_rate": learning_rate})
    model, info = fit(
        data,
        base_info.network,
        base_info.recipe,
        config,
        device=device,
        progress=progress,
        fit_scale=False,
        initial_state=base.state_dict(),
    )
    info.provenance.update(_run_provenance(data, label_source))
    info.provenance["fine_tuned_from"] = {
        "content_hash": base_info.content_hash,
        "run_uids": base_info.provenance.get("run_uids", []),
        "label_source": base_info.provenance.get("label_source"),
    }
    if distributed.is_writer():
        info = save_checkpoint(out, model, info)  # atomic, see save_checkpoint
    return model, info


def adapt_to_run(
    checkpoint: str | Path,
    catalog: Any,
    uid_or_query: Any,
    *,
    out: str | Path | None = None,
    minutes: float = 5.0,
    client: Any = None,
    device: str = "auto",
    progress: bool = True,
) -> tuple[PtychoNN, CheckpointInfo]:
    """Self-supervised fine-tuning on one run's own frames: no labels, its probe and the physics.

    The probe is found as for trust maps (:func:`~bluesky_ptychonn.schema.probe_for`); a run
    without one is refused. The new checkpoint goes to ``out`` (default: ``checkpoint``,
    atomically), updated as it trains; its provenance names the run and the model it came from.
    """
    from ..core.adapt import ADAPT_CONFIG, adapt
    from ..core.checkpoint import load_model
    from ..core.consistency import unsupported_reason
    from ..tiled_paths import stored_probe
    from .labels import run_inputs

    runs = select(catalog, [uid_or_query])
    if len(runs) != 1:
        raise RunError(f"self-supervised fine-tuning adapts to one run; the selection matched {len(runs)}")
    run = runs[0]
    check_ptychography(runs)
    client = root_of(catalog) if client is None else client
    checkpoint, out = _start_from(checkpoint, out)
    base, info = load_model(checkpoint, "cpu")
    section = schema.read_section(run.metadata["start"])
    uid = run.metadata["start"]["uid"]
    geometry = schema.geometry(section)
    reason = unsupported_reason(info.recipe, (geometry.frame_pixels, geometry.frame_pixels))
    if reason or not np.isclose(info.recipe.pixel_size_m(geometry), geometry.pixel_size_m(), rtol=1e-6):
        raise ConfigurationError(f"model {checkpoint} cannot adapt to run {uid}: {reason or 'its pixel size differs'}")
    probe, probe_source = schema.probe_for(section, info.provenance, stored_probe(client, uid))
    if probe is None:
        raise RunError(f"run {uid}: {probe_source}")
    inputs = run_inputs(run)
    config = ADAPT_CONFIG.model_copy(update={"budget_s": minutes * 60})
    known = inputs.photons_source != "estimate: largest frame sum"
    return adapt(
        base,
        info,
        inputs.frames,
        inputs.positions_m,
        probe,
        geometry.pixel_size_m(),
        photons_per_frame=inputs.photons_per_frame if known else None,
        config=config,
        device=device,
        out=out,
        provenance={"run_uids": [uid], "label_source": "none (self-supervised)", "probe_source": probe_source},
        progress=progress,
    )
