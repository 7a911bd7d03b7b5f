"""Inference: raw frames in, amplitude and phase patches out, with the checkpoint's preprocessing."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointInfo, load_model
from .device import choose_device
from .host_runtime import release_openmp_team
from .network import PtychoNN, fold_batch_norm
from .preprocess import preprocess
from .tensor_preprocess import preprocess_tensor

logger = logging.getLogger(__name__)


class Predictor:
    """A loaded model ready for inference on any number of raw frames.

    Parameters
    ----------
    model : PtychoNN
    info : CheckpointInfo
        Supplies the preprocessing recipe and the model's identity (``info.content_hash``).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    batch_size : int, optional
        Frames per forward pass; by default 256 on a GPU, and on the CPU 64 (the live engine's
        micro-batch: one forward per micro-batch) or 16 for a compiled graph, which pads every
        smaller batch to its one shape.
    precision : {"auto", "float32", "bfloat16"}
        ``"auto"``: bfloat16 autocast where the device computes bf16 natively (CUDA with bf16, a
        CPU whose oneDNN has AVX-512 BF16 or AMX), float32 elsewhere: emulated bf16 ran the paper
        network 20x slower than float32 on an AVX2-only CPU. bf16 images stay within
        :data:`BF16_TOLERANCE` of float32 (tested).
    compile : bool
        Run the network as a ``torch.compile`` graph, built here on a batch of zeros, so that its
        cost falls where the model is loaded (a consumer's start, a hot reload's own thread), not
        on a scan's first frames; batches are padded to ``batch_size`` so one graph serves them
        all. On a GPU: 2.3x (paper network) and 1.8x (small) the eager forward rate on an H200 at
        batch 1,024 (`make bench`, ``bench_compile``), after 8-17 s of compilation. On the CPU the
        graph is frozen (weights folded in as constants, in bf16 where that is the precision, so
        oneDNN gets them prepacked and fuses each ReLU into its convolution): 1.06-1.2x eager on
        the 2-core AVX-512 VM after 7-21 s of compilation (``bench_inference``), so it pays for
        long sessions, not for one short scan. Should the graph fail to build (no C++ compiler),
        the network runs eager, with a warning.

    Notes
    -----
    Weights and inputs are channels-last in every precision: on a 2-core AVX2 CPU it ran the
    paper network 1.65x and the small one 1.4x faster at batch 16 (oneDNN's NHWC convolutions).
    ``model`` (the attribute) is the network as it runs: a copy with its BatchNorm layers folded
    into the convolutions (:func:`~bluesky_ptychonn.core.network.fold_batch_norm`); the model
    passed in keeps its layers (it is put in eval mode on the device, as before).
    """

    def __init__(
        self,
        model: PtychoNN,
        info: CheckpointInfo,
        device: str = "auto",
        batch_size: int | None = None,
        precision: str = "auto",
        compile: bool = False,
    ) -> None:
        self.device = choose_device(device)
        self.info = info
        # A GPU wants large batches. On the 2-core CPU, 256 ran 2x slower than 16 (out of cache), but
        # 64 beat 16: the shipped model's live engine in memory ran 955-1,070 against 782-931
        # frames/s, and in paced in-process scans, where the scan's threads and the Tiled server
        # take turns on the interpreter lock with the inference thread after every op, a frame's
        # inference took 4-9 % less and the latency's p95 fell from 4.9-9.9 to 3.3-3.7 s
        # (benchmarks/results/ab-forward-batch/). A compiled graph pads to its batch: 16 wastes less.
        cpu_batch = 16 if compile else CPU_BATCH
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else cpu_batch)
        self.precision = resolve_precision(precision, self.device)
        self.model = self._placed(model)
        self._graph: Any = self._compiled() if compile else None
        if self._graph is not None:
            with torch.inference_mode():  # the layout and shape of every later batch: no rebuild
                self._network(self._on_device(torch.zeros((self.batch_size, self.patch_pixels, self.patch_pixels))))
        release_openmp_team()  # the model usually runs on another thread (the live engine's worker) from here

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        batch_size: int | None = None,
        precision: str = "auto",
        compile: bool = False,
    ) -> Predictor:
        """Load a checkpoint (validated, no pickle) and wrap it."""
        model, info = load_model(path, "cpu")
        return cls(model, info, device=device, batch_size=batch_size, precision=precision, compile=compile)

    @property
    def compiled(self) -> bool:
        """True when the network runs as a compiled graph."""
        return self._graph is not None

    @property
    def patch_pixels(self) -> int:
        """Side of the predicted patches."""
        return self.info.network.input_pixels

    def predict(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw detector frames (N, rows, cols) -> (amplitude, phase), each (N, n, n) float32.

        Raises :class:`~bluesky_ptychonn.errors.FrameError` for a wrong shape, NaN or negative counts.
        """
        x = preprocess(frames, self.info.recipe)
        return self.predict_preprocessed(x)

    @property
    def bf16(self) -> bool:
        """True when inference runs in bfloat16 autocast."""
        return self.precision == "bfloat16"

    def _placed(self, model: PtychoNN) -> PtychoNN:
        return fold_batch_norm(model.to(self.device).eval()).to(memory_format=torch.channels_last)

    def _compiled(self) -> Any:
        if self.device.type == "cuda":
            return torch.compile(self.model, dynamic=False)
        # Frozen weights must not be cast at every call, as autocast does: the graph holds a bf16
        # copy and takes bf16 inputs (see _network).
        weights = copy.deepcopy(self.model).to(torch.bfloat16) if self.bf16 else self.model
        return torch.compile(weights, dynamic=False, options={"freezing": True})

    def _network(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass of a (B, 1, n, n) channels-last batch, eager or through the graph."""
        if self._graph is None:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                return self.model(batch)
        if len(batch) < self.batch_size:  # one shape, one graph
            padding = batch.new_zeros((self.batch_size - len(batch), *batch.shape[1:]))
            batch = torch.cat([batch, padding]).contiguous(memory_format=torch.channels_last)
        cpu_bf16 = self.bf16 and self.device.type == "cpu"
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and not cpu_bf16):
                return self._graph(batch.to(torch.bfloat16) if cpu_bf16 else batch)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            logger.warning("torch.compile failed (%s); the network runs eager", str(exc).splitlines()[0])
            self._graph = None
            return self._network(batch)

    def upload(self, frames: np.ndarray) -> torch.Tensor:
        """Raw frames (N, rows, cols) as float32 tensors on the inference device.

        On a GPU through page-locked memory and asynchronously: the host goes on while the copy
        runs. torch's pinned-memory cache keeps a staging block until its copy is done, so
        reusing it is safe without a wait here.
        """
        host = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))
        if self.device.type != "cuda":
            return host
        staged = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def predict_counts(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw counts already on the device (:meth:`upload`) -> (amplitude, phase), (N, n, n) float32 there.

        For a pipeline that stays on the device (the live engine on a GPU): preprocessing runs
        there too (:func:`~bluesky_ptychonn.core.tensor_preprocess.preprocess_tensor`) and nothing
        comes back to the host. The caller has checked the frames (shape, NaN, negative counts).
        """
        x = preprocess_tensor(counts, self.info.recipe)
        if not len(x):
            empty = torch.empty((0, self.patch_pixels, self.patch_pixels), device=self.device)
            return empty, empty
        parts = [(amp.to(self.device), ph.to(self.device)) for _, _, amp, ph in self._forward(x)]
        return torch.cat([a for a, _ in parts]), torch.cat([p for _, p in parts])

    @torch.inference_mode()
    def predict_preprocessed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`predict` for frames already preprocessed with the recipe (N, n, n)."""
        n = self.patch_pixels
        if self.device.type != "cuda":
            amplitude = np.empty((len(x), n, n), np.float32)
            phase = np.empty((len(x), n, n), np.float32)
            for start, stop, amp, ph in self._forward(torch.from_numpy(x)):
                amplitude[start:stop], phase[start:stop] = amp.numpy(), ph.numpy()
            return amplitude, phase
        if len(x) > PINNED_FRAMES:  # bounded page-locked memory, whatever the call's size
            parts = [self.predict_preprocessed(x[s : s + PINNED_FRAMES]) for s in range(0, len(x), PINNED_FRAMES)]
            return np.concatenate([a for a, _ in parts]), np.concatenate([p for _, p in parts])
        # Results land in page-locked memory, copied back asynchronously: no wait per batch, so the
        # host stages the next batch while the device computes this one; one wait at the end.
        out = torch.empty((2, len(x), n, n), pin_memory=True)
        for start, stop, amp, ph in self._forward(torch.from_numpy(x)):
            out[0, start:stop].copy_(amp, non_blocking=True)
            out[1, start:stop].copy_(ph, non_blocking=True)
        torch.cuda.synchronize()
        return out[0].numpy(), out[1].numpy()

    def _forward(self, x: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(start, stop, amplitude, phase) per batch of (N, n, n) inputs, on the host or the device.

        Outputs stay where the model ran; a batch that runs out of device memory is retried
        smaller (or on the CPU, see :meth:`_shrink`).
        """
        start = 0
        while start < len(x):
            chunk = x[start : start + self.batch_size]
            try:
                amp, ph = self._network(self._on_device(chunk))
            except torch.OutOfMemoryError:
                self._shrink()
                continue  # the same frames again, in a smaller batch or on the CPU
            n = len(chunk)
            yield start, start + n, amp[:n].float().squeeze(1), ph[:n].float().squeeze(1)
            start += len(chunk)

    def _on_device(self, chunk: torch.Tensor) -> torch.Tensor:
        """(B, n, n) inputs as the model's (B, 1, n, n) channels-last batch on its device."""
        if chunk.device.type != self.device.type:
            chunk = self.upload(chunk.numpy()) if self.device.type == "cuda" else chunk.to(self.device)
        return chunk.unsqueeze(1).contiguous(memory_format=torch.channels_last)

    def _shrink(self) -> None:
        """Out of device memory (another process took it, a larger model): halve the batch, then fall back to the CPU.

        The change sticks for later batches and is logged once per step; on the CPU an
        out-of-memory error at batch 1 is raised.
        """
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size > 1:
            self.batch_size //= 2
            logger.warning("out of memory on %s: inference batch now %d frames", self.device, self.batch_size)
            return
        if self.device.type == "cpu":
            raise torch.OutOfMemoryError("out of memory on the CPU with one frame per batch")
        logger.warning("out of memory on %s with one frame per batch: inference moves to the CPU", self.device)
        self.device = torch.device("cpu")
        self.precision = resolve_precision("auto", self.device)
        self.model = self._placed(self.model)
        self._graph = None
        self.batch_size = CPU_BATCH


#: Frames per forward pass of an eager network on the CPU, by default: the live engine's micro-batch.
CPU_BATCH = 64

#: Frames per page-locked result block on a GPU (two float32 images each): larger calls go in blocks,
#: so torch's pinned-memory cache never holds more than a few hundred MB.
PINNED_FRAMES = 8192

#: Largest difference from float32 a bf16 image may show (stitched, on a trained model), tested:
#: phase in radians and amplitude relative to its range.
BF16_TOLERANCE = {"phase_rad": 0.05, "amplitude": 0.02}


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"float32"`` or ``"bfloat16"`` for ``precision`` (``"auto"``: bf16 where the device computes it natively)."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision {precision!r}: expected 'auto', 'float32' or 'bfloat16'")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"
