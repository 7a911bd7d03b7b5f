"""Training with the paper's recipe: MAE loss, Adam, halve the rate on a validation plateau.

Validation frames are a spatially separate block of each scan (the last rows along y), never a
random sample: neighbouring scan points share most of their pixels, so a random split leaks the
validation set into training and cannot tell a model that generalises from one that memorises.

Under ``torchrun`` (:mod:`~bluesky_ptychonn.core.distributed`) every process draws the same
permutation and takes its share of each global batch; DistributedDataParallel averages the
gradients, so several processes train the model one process would, up to rounding.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigurationError
from . import distributed
from .checkpoint import CheckpointInfo
from .config import NetworkConfig, PreprocessRecipe, TrainConfig
from .network import PtychoNN
from .preprocess import check_frames, fitted_scale, preprocess
from .stitching import patch_window

logger = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """Frames with their label patches.

    Attributes
    ----------
    frames : (N, rows, cols)
        Raw detector counts.
    amplitude, phase : (N, n, n) float32
        Label patches on the network's pixel grid, centred at each frame's position.
    positions_m : (N, 2) float64
        Frame positions (y, x) in metres, used for the spatial validation split.
    groups : (N,) int
        Which scan each frame came from; each scan gives its own validation block.
    sources : list of dict
        Provenance of each group (file or run uid, label source, probe description), stored in the checkpoint.
    probes : list of (n, n) complex or None
        Each group's probe, where known: the checkpoint's validation block is scored with it to set
        the out-of-domain threshold of live trust maps (:mod:`~bluesky_ptychonn.core.consistency`).
    """

    frames: np.ndarray
    amplitude: np.ndarray
    phase: np.ndarray
    positions_m: np.ndarray
    groups: np.ndarray
    sources: list[dict[str, Any]] = field(default_factory=list)
    probes: list[np.ndarray | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.frames)
        for name in ("amplitude", "phase", "positions_m", "groups"):
            if len(getattr(self, name)) != n:
                raise ConfigurationError(f"{name} has {len(getattr(self, name))} entries for {n} frames")
        if self.amplitude.shape != self.phase.shape:
            raise ConfigurationError(f"amplitude {self.amplitude.shape} and phase {self.phase.shape} labels differ")

    @classmethod
    def concatenate(cls, parts: list[TrainingSet]) -> TrainingSet:
        """Join sets from several scans, renumbering their groups."""
        groups, offset = [], 0
        probes: list[np.ndarray | None] = []
        for p in parts:
            groups.append(p.groups + offset)
            size = int(p.groups.max()) + 1 if len(p.groups) else 0
            probes.extend(p.probes[g] if g < len(p.probes) else None for g in range(size))
            offset += size
        return cls(
            frames=np.concatenate([p.frames for p in parts]),
            amplitude=np.concatenate([p.amplitude for p in parts]),
            phase=np.concatenate([p.phase for p in parts]),
            positions_m=np.concatenate([p.positions_m for p in parts]),
            groups=np.concatenate(groups),
            sources=[s for p in parts for s in p.sources],
            probes=probes,
        )


def spatial_split(positions_m: np.ndarray, groups: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): in each group, the ``fraction`` of frames with the largest y."""
    train, val = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        order = idx[np.argsort(positions_m[idx, 0], kind="stable")]
        n_val = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        train.append(order[: len(order) - n_val])
        val.append(order[len(order) - n_val :])
    return np.concatenate(train), np.concatenate(val)


def _loss(model: nn.Module, x: torch.Tensor, amp: torch.Tensor, ph: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted MAE of amplitude plus weighted MAE of phase (``weight`` has mean 1)."""
    pred_amp, pred_ph = model(x)
    return ((pred_amp.float() - amp).abs() * weight).mean() + ((pred_ph.float() - ph).abs() * weight).mean()


def fit(
    data: TrainingSet,
    network: NetworkConfig,
    recipe: PreprocessRecipe,
    config: TrainConfig | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
    fit_scale: bool = True,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> tuple[PtychoNN, CheckpointInfo]:
    """Train a network; return it with the best validation weights, and its checkpoint info.

    ``fit_scale`` replaces ``recipe.scale`` by :func:`~bluesky_ptychonn.core.preprocess.fitted_scale`
    of the training frames. With ``progress`` a tqdm bar shows epochs and losses.
    ``initial_state`` (a state dict of ``network``) starts from those weights: fine-tuning.

    Under ``torchrun`` each process takes ``batch[rank::world_size]`` of every global batch of
    ``config.batch_size`` frames (the same permutation everywhere, from ``config.seed``) and scales its
    loss by its share, so the averaged gradient is the one-process gradient of the whole batch.
    Validation is sharded and summed, so the learning-rate schedule and early stopping decide alike
    everywhere; every process returns the same model and info, and only the writer shows progress.
    """
    config = config or TrainConfig()
    if data.amplitude.shape[1:] != (network.input_pixels, network.input_pixels):
        raise ConfigurationError(
            f"labels of shape {data.amplitude.shape[1:]} do not match a {network.input_pixels}-pixel network"
        )
    if recipe.output_pixels != network.input_pixels:
        raise ConfigurationError(
            f"the recipe makes {recipe.output_pixels}-pixel inputs for a {network.input_pixels}-pixel network"
        )
    check_frames(data.frames, recipe.frame_shape)
    train_idx, val_idx = spatial_split(data.positions_m, data.groups, config.validation_fraction)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ConfigurationError(
            f"need frames for both training and validation, got {len(train_idx)} and {len(val_idx)}"
        )
    if fit_scale:
        recipe = recipe.model_copy(update={"scale": fitted_scale(data.frames[train_idx], recipe)})

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    dev = distributed.start(device)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    rank, world = distributed.rank(), distributed.world_size()
    autocast = config.mixed_precision and dev.type == "cuda"

    def tensors(idx: np.ndarray) -> tuple[torch.Tensor, ...]:
        x = torch.from_numpy(preprocess(data.frames[idx], recipe)).unsqueeze(1)
        a = torch.from_numpy(np.ascontiguousarray(data.amplitude[idx], np.float32)).unsqueeze(1)
        p = torch.from_numpy(np.ascontiguousarray(data.phase[idx], np.float32)).unsqueeze(1)
        return x.to(dev), a.to(dev), p.to(dev)

    window = patch_window(network.input_pixels, config.loss_window)
    weight = torch.from_numpy(window / window.mean()).to(dev)
    xt, at, pt = tensors(train_idx)
    xv, av, pv = tensors(val_idx[rank::world])  # this process's share of the validation frames
    model = PtychoNN(network).to(dev)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    net = distributed.wrap(model, dev)  # DistributedDataParallel under torchrun, else ``model``
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, factor=0.5, patience=config.plateau_patience, min_lr=config.min_learning_rate
    )

    def evaluate() -> float:
        distributed.sync_buffers(model)  # every process scores (and keeps) the writer's running statistics
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=dev)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            for s in range(0, len(xv), 256):
                total += _loss(model, xv[s : s + 256], av[s : s + 256], pv[s : s + 256], weight).double() * len(
                    xv[s : s + 256]
                )
        return float(distributed.total(total)) / len(val_idx)

    best_loss, best_state, best_epoch, history = float("inf"), None, 0, []
    started = time.perf_counter()
    bar = _progress(config.epochs, progress and distributed.is_writer())
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.from_numpy(rng.permutation(len(xt))).to(dev)
        running = torch.zeros((), device=dev)
        for s in range(0, len(order), config.batch_size):
            b = order[s : s + config.batch_size]
            mine = b[rank::world]
            # The averaged gradient of the shares weighted by their size is the whole batch's gradient.
            # A process left without frames (a last batch smaller than the job) still joins the average, at 0.
            share = len(mine) * world / len(b)
            if len(mine) == 0:
                mine = b[:1]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                loss = _loss(net, xt[mine], at[mine], pt[mine], weight)
            optimiser.zero_grad(set_to_none=True)
            (loss * share).backward()  # share is exactly 1 in one process
            optimiser.step()
            running += loss.detach() * (len(mine) if share else 0)  # no host sync per step
        train_loss, val_loss = float(distributed.total(running)) / len(xt), evaluate()
        scheduler.step(val_loss)
        lr = optimiser.param_groups[0]["lr"]
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr})
        if val_loss < best_loss:
            best_loss, best_epoch = val_loss, epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}", best=f"{best_loss:.4f}", lr=f"{lr:.1e}")
        bar.update(1)
        if distributed.is_writer():
            logger.info("epoch %d train %.4f val %.4f lr %.1e", epoch, train_loss, val_loss, lr)
        if epoch - best_epoch >= config.early_stop_patience:
            break
    bar.close()
    if best_state is None:  # no epoch gave a finite validation loss (NaN never compares below inf)
        raise ConfigurationError(
            f"training diverged: the validation loss was never finite in {len(history)} epochs; "
            f"lower the learning rate ({config.learning_rate})"
        )
    model = PtychoNN(network).to(dev)  # unwrapped, with plain BatchNorm again
    model.load_state_dict(best_state)
    model.eval()
    metrics: dict[str, Any] = {}
    calibration = _validation_consistency(model, recipe, data, val_idx, dev)
    if calibration is not None:
        metrics["consistency"] = calibration
    descriptions = [s.get("probe") for s in data.sources]
    shared_probe = descriptions[0] if descriptions and all(d and d == descriptions[0] for d in descriptions) else None
    info = CheckpointInfo(
        network=network,
        recipe=recipe,
        provenance={
            "sources": data.sources,
            "train_frames": int(len(train_idx)),
            "validation_frames": int(len(val_idx)),
            "validation_split": "spatial block: largest y of each scan",
            "train_config": config.model_dump(mode="json"),
            "device": str(dev),
            "distributed": distributed.describe(),
            **({"probe": shared_probe} if shared_probe else {}),
        },
        metrics={
            **metrics,
            "best_val_loss": best_loss,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "train_seconds": time.perf_counter() - started,
            "history": history,
        },
    )
    return model, info


def _validation_consistency(
    model: PtychoNN, recipe: PreprocessRecipe, data: TrainingSet, val_idx: np.ndarray, dev: torch.device
) -> dict[str, Any] | None:
    """Consistency errors of the trained model on the validation block, and the out-of-domain threshold.

    None when no validation group has a probe that can model the patches (then live trust maps
    are drawn, but no frame is flagged).
    """
    from .consistency import ConsistencyModel, out_of_domain_threshold, unsupported_reason
    from .inference import Predictor

    predictor = Predictor(model, CheckpointInfo(network=model.config, recipe=recipe), device=str(dev))
    errors = []
    for g in np.unique(data.groups[val_idx]):
        probe = data.probes[g] if g < len(data.probes) else None
        if probe is None or unsupported_reason(recipe, probe.shape):
            continue
        idx = val_idx[data.groups[val_idx] == g]
        amplitude, phase = predictor.predict(data.frames[idx])
        errors.append(ConsistencyModel(probe, recipe, dev).score(amplitude, phase, data.frames[idx]).error)
    if not errors:
        return None
    return out_of_domain_threshold(np.concatenate(errors))


def choose_transform(
    data: TrainingSet,
    network: NetworkConfig,
    recipe: PreprocessRecipe,
    config: TrainConfig,
    candidates: tuple[str, ...] = ("sqrt", "log1p", "none"),
    *,
    device: str = "auto",
) -> tuple[str, dict[str, float]]:
    """Pick the input transform with the lowest loss on the held-out block after a short training.

    Returns the best transform and each candidate's best validation loss. ``config`` sets the
    (short) budget of each trial; the choice is made on held-out rows, never on training rows.
    """
    scores = {}
    for name in candidates:
        _, info = fit(
            data, network, recipe.model_copy(update={"transform": name}), config, device=device, progress=False
        )
        scores[name] = float(info.metrics["best_val_loss"])
        logger.info("transform %s: validation loss %.4f", name, scores[name])
    return min(scores, key=scores.__getitem__), scores


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="epoch", disable=not enabled)
