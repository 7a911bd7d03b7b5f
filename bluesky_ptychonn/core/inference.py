"""Inference: raw frames in, amplitude and phase patches out, with the checkpoint's preprocessing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointInfo, load_model
from .device import choose_device
from .network import PtychoNN
from .preprocess import preprocess

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
        Frames per forward pass; by default 16 on the CPU and 256 on a GPU.
    precision : {"auto", "float32", "bfloat16"}
        ``"auto"``: bfloat16 autocast where the device computes bf16 natively (CUDA with bf16, a
        CPU whose oneDNN has AVX-512 BF16 or AMX), float32 elsewhere: emulated bf16 ran the paper
        network 20x slower than float32 on an AVX2-only CPU. bf16 images stay within
        :data:`BF16_TOLERANCE` of float32 (tested).

    Notes
    -----
    Weights and inputs are channels-last in every precision: on a 2-core AVX2 CPU it ran the
    paper network 1.65x and the small one 1.4x faster at batch 16 (oneDNN's NHWC convolutions).
    """

    def __init__(
        self,
        model: PtychoNN,
        info: CheckpointInfo,
        device: str = "auto",
        batch_size: int | None = None,
        precision: str = "auto",
    ) -> None:
        self.device = choose_device(device)
        self.info = info
        # On the CPU small batches stay in cache (`make bench`: batch 16 ran 2x faster than 256 on
        # 2 cores); a GPU wants large ones.
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 16)
        self.precision = resolve_precision(precision, self.device)
        self.model = self._placed(model)
        self._pinned: torch.Tensor | None = None  # page-locked staging buffer for host-to-GPU copies

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", batch_size: int | None = None, precision: str = "auto"
    ) -> Predictor:
        """Load a checkpoint (validated, no pickle) and wrap it."""
        model, info = load_model(path, "cpu")
        return cls(model, info, device=device, batch_size=batch_size, precision=precision)

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
        return model.to(self.device).eval().to(memory_format=torch.channels_last)

    def _to_device(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            # Through one reused page-locked buffer: a DMA copy at full bus speed, without pinning
            # new memory per batch. Safe to reuse: each batch ends with a blocking copy back.
            if self._pinned is None or len(self._pinned) < len(chunk) or self._pinned.shape[1:] != chunk.shape[1:]:
                self._pinned = torch.empty((max(len(chunk), self.batch_size), *chunk.shape[1:])).pin_memory()
            staged = self._pinned[: len(chunk)]
            staged.copy_(chunk)
            chunk = staged.to(self.device, non_blocking=True)
        return chunk.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict_preprocessed(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`predict` for frames already preprocessed with the recipe (N, n, n)."""
        n = self.patch_pixels
        amplitude = np.empty((len(x), n, n), np.float32)
        phase = np.empty((len(x), n, n), np.float32)
        start = 0
        while start < len(x):
            chunk = torch.from_numpy(x[start : start + self.batch_size]).unsqueeze(1)
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    amp, ph = self.model(self._to_device(chunk))
            except torch.OutOfMemoryError:
                self._shrink()
                continue  # the same frames again, in a smaller batch or on the CPU
            stop = start + len(chunk)
            amplitude[start:stop] = amp.float().squeeze(1).cpu().numpy()
            phase[start:stop] = ph.float().squeeze(1).cpu().numpy()
            start = stop
        return amplitude, phase

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
        self.batch_size = 16


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
