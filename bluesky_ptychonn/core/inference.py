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
    """

    def __init__(
        self, model: PtychoNN, info: CheckpointInfo, device: str = "auto", batch_size: int | None = None
    ) -> None:
        self.device = choose_device(device)
        self.model = model.to(self.device).eval()
        self.info = info
        # On the CPU small batches stay in cache (`make bench`: batch 16 ran 2x faster than 256 on
        # 2 cores); a GPU wants large ones.
        self.batch_size = batch_size or (256 if self.device.type == "cuda" else 16)
        # bf16 halves the GPU's work; the CPU keeps float32 for exact agreement between paths.
        self._autocast = self.device.type == "cuda"

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", batch_size: int | None = None) -> Predictor:
        """Load a checkpoint (validated, no pickle) and wrap it."""
        model, info = load_model(path, "cpu")
        return cls(model, info, device=device, batch_size=batch_size)

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
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
                    amp, ph = self.model(chunk.to(self.device))
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
        self.model = self.model.to(self.device)
        self._autocast = False
        self.batch_size = 16
