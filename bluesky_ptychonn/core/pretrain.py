"""Training from a stream of batches: pretraining on simulated physics and self-supervised adaptation.

Unlike :func:`~bluesky_ptychonn.core.training.fit` (a fixed set, epochs, a spatial validation
block) the batches here are never repeated: each step sees fresh frames, so the model cannot
memorise and the only limits are the budget and the network. The loss is any mix of

* the paper's MAE on labels (where the batch has labels), weighted by the loss window;
* the Poisson deviance of the forward model with each frame's known probe
  (:func:`~bluesky_ptychonn.core.physics_loss.poisson_deviance`);
* the overlap constraint between neighbouring frames (:func:`~.physics_loss.overlap_loss`).

The learning rate follows a cosine from ``learning_rate`` to ``min_learning_rate`` over the
budget (steps or seconds, whichever ends first). The best weights on fixed validation batches
are kept, and written to ``out`` every ``checkpoint_every_s`` seconds, so an interrupted run
leaves a usable checkpoint behind.

Under ``torchrun`` (:mod:`~bluesky_ptychonn.core.distributed`) each process trains on its own
stream (the caller seeds it by rank) and DistributedDataParallel averages the gradients: a step
sees ``world_size`` batches. The writer's clock, recipe scale and validation decide for all.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigurationError
from . import distributed
from .checkpoint import CheckpointInfo, save_checkpoint
from .config import NetworkConfig, PreprocessRecipe, StreamConfig  # noqa: F401  (StreamConfig re-exported)
from .consistency import unsupported_reason
from .network import PtychoNN
from .physics_loss import PhysicsBatch, overlap_loss, poisson_deviance
from .preprocess import orientation_only, preprocess
from .stitching import patch_window

logger = logging.getLogger(__name__)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


class _Step:
    """Tensors of one batch on the device, and the loss of a model on them."""

    def __init__(self, batch: PhysicsBatch, recipe: PreprocessRecipe, weight: torch.Tensor, dev: torch.device):
        self.x = torch.from_numpy(preprocess(batch.frames, recipe)).unsqueeze(1).to(dev)
        self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.counts = torch.from_numpy(preprocess(batch.frames, orientation_only(recipe))).to(dev)
        probes = torch.from_numpy(np.asarray(batch.probes, np.complex64)).to(dev)
        self.probe = probes[torch.from_numpy(np.asarray(batch.probe_index, np.int64)).to(dev)]
        self.labels = None
        if batch.amplitude is not None and batch.phase is not None:
            self.labels = (torch.from_numpy(batch.amplitude).to(dev), torch.from_numpy(batch.phase).to(dev))
        self.flux = None if batch.flux is None else torch.as_tensor(batch.flux, dtype=torch.float32, device=dev)
        self.pairs = batch.pairs
        self.weight = weight

    def losses(self, model: torch.nn.Module, config: StreamConfig, autocast: bool) -> dict[str, torch.Tensor]:
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=autocast):
            amp, ph = model(self.x)
        amp, ph = amp[:, 0].float(), ph[:, 0].float()
        out: dict[str, torch.Tensor] = {}
        if self.labels is not None:
            a, p = self.labels
            out["supervised"] = ((amp - a).abs() * self.weight).mean() + ((ph - p).abs() * self.weight).mean()
        out["physics"] = poisson_deviance(amp, ph, self.probe, self.counts, self.flux).mean()
        out["overlap"] = overlap_loss(amp, ph, self.probe.abs().square(), self.pairs)
        weights = {"supervised": config.supervised_weight, "physics": config.physics_weight}
        weights["overlap"] = config.overlap_weight
        out["total"] = sum(weights[k] * v for k, v in out.items())  # type: ignore[assignment]
        return out


def fit_stream(
    batches: Iterable[PhysicsBatch],
    validation: list[PhysicsBatch],
    network: NetworkConfig,
    recipe: PreprocessRecipe,
    config: StreamConfig | None = None,
    *,
    device: str = "auto",
    out: str | Path | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> tuple[PtychoNN, CheckpointInfo]:
    """Train ``network`` on ``batches`` until the budget ends; return the best model on ``validation``.

    ``recipe`` must not crop, bin or resize (the forward model needs the frame's own sampling);
    its ``scale`` is used as given. ``initial_state`` starts from those weights (adaptation).
    The checkpoint's provenance holds ``provenance`` plus the configuration, steps, frames seen,
    seconds and the device; its metrics the validation history.

    Under ``torchrun`` each process must be given its own ``batches`` (else every process computes
    the same gradient); ``validation`` and ``recipe`` may differ too, but the writer's recipe scale
    is used everywhere, its validation picks the weights kept, and only the writer writes ``out``.
    ``frames_seen`` counts every process's frames.
    """
    config = config or StreamConfig()
    reason = unsupported_reason(recipe, (network.input_pixels, network.input_pixels))
    if reason:
        raise ConfigurationError(f"physics-informed training needs the frame's own sampling: {reason}")
    if not validation:
        raise ConfigurationError("fit_stream needs at least one validation batch")
    torch.manual_seed(config.seed)
    dev = distributed.start(device)
    if distributed.world_size() > 1:  # every process preprocesses as the writer does
        recipe = recipe.model_copy(update={"scale": distributed.agree([recipe.scale], dev)[0]})
    autocast = config.mixed_precision and dev.type == "cuda"
    n = network.input_pixels
    window = patch_window(n, config.loss_window)
    weight = torch.from_numpy(window / window.mean()).to(dev)
    model = PtychoNN(network).to(dev).to(memory_format=torch.channels_last)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    net = distributed.wrap(model, dev)  # DistributedDataParallel under torchrun, else ``model``
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    held_out = [_Step(b, recipe, weight, dev) for b in validation]

    def validate() -> dict[str, float]:
        distributed.sync_buffers(model)  # the writer's running statistics: the weights kept are the same everywhere
        model.eval()
        sums: dict[str, float] = {}
        with torch.inference_mode():
            for step in held_out:
                for k, v in step.losses(model, config, autocast).items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(held_out)
        model.train()
        return sums

    key = "supervised" if held_out[0].labels is not None else "total"
    best = validate()
    best_state, best_step, history = copy.deepcopy(model.state_dict()), 0, [{"step": 0, "seconds": 0.0, **best}]
    started = last_save = time.perf_counter()
    frames_seen = mine = 0  # every process's frames (counted at validations), this process's

    def clock() -> float:
        """Seconds since the start by the writer's clock, so every process stops at the same step."""
        return distributed.agree([time.perf_counter() - started], dev)[0]

    def save() -> CheckpointInfo:
        """The checkpoint of the best weights so far (written to ``out`` when given)."""
        last = history[-1]
        info = CheckpointInfo(
            network=network,
            recipe=recipe,
            provenance={
                **(provenance or {}),
                "stream_config": config.model_dump(mode="json"),
                "steps": int(last["step"]),
                "frames_seen": int(frames_seen),
                "train_seconds": float(last["seconds"]),
                "device": _device_name(dev),
                "distributed": distributed.describe(),
                "torch": torch.__version__,
            },
            metrics={"best_validation": best, "best_step": best_step, "history": history},
        )
        if out is None or not distributed.is_writer():
            return info
        snapshot = PtychoNN(network)
        snapshot.load_state_dict({k: v.detach().cpu() for k, v in best_state.items()})
        return save_checkpoint(out, snapshot, info)

    bar = _progress(config.steps, progress and distributed.is_writer())
    iterator: Iterator[PhysicsBatch] = iter(batches)
    for step in range(1, config.steps + 1):
        elapsed = clock()
        done = max((step - 1) / config.steps, elapsed / config.budget_s if config.budget_s else 0.0)
        if done >= 1:
            break
        lr = config.min_learning_rate + 0.5 * (config.learning_rate - config.min_learning_rate) * (
            1 + math.cos(math.pi * done)
        )
        for group in optimiser.param_groups:
            group["lr"] = lr
        batch = next(iterator)
        mine += len(batch.frames)
        losses = _Step(batch, recipe, weight, dev).losses(net, config, autocast)
        optimiser.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimiser.step()
        bar.update(1)
        elapsed = clock()
        if step % config.validate_every == 0 or step == config.steps or elapsed >= (config.budget_s or math.inf):
            frames_seen = _frames_everywhere(mine, dev)
            figures = validate()
            history.append({"step": step, "seconds": round(elapsed, 1), "lr": lr, **figures})
            if distributed.agree([figures[key] < best[key]], dev)[0]:
                best, best_step, best_state = figures, step, copy.deepcopy(model.state_dict())
            bar.set_postfix({k: f"{v:.4f}" for k, v in figures.items()})
            if distributed.is_writer():
                logger.info("step %d (%.0f s) lr %.1e validation %s", step, elapsed, lr, figures)
            if out is not None and time.perf_counter() - last_save > config.checkpoint_every_s:
                save()
                last_save = time.perf_counter()
    bar.close()
    frames_seen = _frames_everywhere(mine, dev)
    info = save()
    model.load_state_dict(best_state)
    return model.to(memory_format=torch.contiguous_format).eval(), info


def _frames_everywhere(mine: int, dev: torch.device) -> int:
    """The frames every process has trained on, ``mine`` in this one."""
    return int(distributed.total(torch.tensor(mine, dtype=torch.int64, device=dev)))


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="training", unit="step", disable=not enabled)
