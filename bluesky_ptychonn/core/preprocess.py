"""Apply a :class:`~bluesky_ptychonn.core.config.PreprocessRecipe` to raw frames (numpy only).

Also the frame checks that every entry point shares: shape, NaN, negative counts.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import FrameError
from .config import PreprocessRecipe


def bad_frames(frames: np.ndarray) -> np.ndarray:
    """Boolean mask (N,) of frames holding a NaN, an infinity or a negative count."""
    flat = np.asarray(frames).reshape(len(frames), -1)
    if flat.dtype.kind in "ui":
        return np.zeros(len(flat), bool)
    return ~np.all(np.isfinite(flat), axis=1) | np.any(flat < 0, axis=1)


def check_frames(frames: np.ndarray, frame_shape: tuple[int, int]) -> np.ndarray:
    """Return ``frames`` as an (N, rows, cols) array, or raise :class:`FrameError` naming the problem."""
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or tuple(arr.shape[1:]) != tuple(frame_shape):
        raise FrameError(f"expected frames of shape (N, {frame_shape[0]}, {frame_shape[1]}), got {np.shape(frames)}")
    if arr.dtype.kind not in "uif":
        raise FrameError(f"frames must be numeric counts, got dtype {arr.dtype}")
    bad = bad_frames(arr)
    if bad.any():
        raise FrameError(
            f"{int(bad.sum())} frame(s) hold NaN, infinite or negative counts, first at batch index "
            f"{int(np.flatnonzero(bad)[0])}"
        )
    return arr


@lru_cache(maxsize=16)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix averaging input pixels by their overlap with each output pixel."""
    edges_in = np.arange(n_in + 1) / n_in
    edges_out = np.arange(n_out + 1) / n_out
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    weights = np.clip(hi - lo, 0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def preprocess(frames: np.ndarray, recipe: PreprocessRecipe) -> np.ndarray:
    """Raw counts (N, rows, cols) -> float32 network input (N, n, n), following ``recipe``."""
    x = check_frames(frames, recipe.frame_shape).astype(np.float32, copy=False)
    if recipe.transpose:
        x = x.transpose(0, 2, 1)
    if recipe.flip_rows:
        x = x[:, ::-1, :]
    if recipe.flip_cols:
        x = x[:, :, ::-1]
    if recipe.crop_pixels:
        c = recipe.crop_pixels
        # Centre the crop on the zero-frequency pixel (rows // 2, cols // 2).
        r0, c0 = x.shape[1] // 2 - c // 2, x.shape[2] // 2 - c // 2
        x = x[:, r0 : r0 + c, c0 : c0 + c]
    if recipe.bin_factor > 1:
        b, m = recipe.bin_factor, x.shape[1] // recipe.bin_factor
        x = x.reshape(len(x), m, b, m, b).mean(axis=(2, 4))
    if recipe.resize_pixels and recipe.resize_pixels != x.shape[1]:
        a = area_matrix(x.shape[1], recipe.resize_pixels)
        x = a @ x @ a.T
    if recipe.threshold_counts:
        x = np.where(x < recipe.threshold_counts, 0, x)
    if recipe.normalize == "total":
        totals = x.sum(axis=(1, 2), keepdims=True)
        x = x * (x.shape[1] * x.shape[2] / np.maximum(totals, 1.0))
    if recipe.transform == "sqrt":
        x = np.sqrt(x)
    elif recipe.transform == "log1p":
        x = np.log1p(x)
    return np.ascontiguousarray(x * recipe.scale, dtype=np.float32)


def orientation_only(recipe: PreprocessRecipe) -> PreprocessRecipe:
    """``recipe`` with only its orientation and geometry steps: counts stay counts (for forward models)."""
    return recipe.model_copy(update={"transform": "none", "threshold_counts": 0.0, "scale": 1.0, "normalize": "none"})


def fitted_scale(frames: np.ndarray, recipe: PreprocessRecipe) -> float:
    """The ``scale`` that brings the transformed training frames to a mean pixel value of 0.1.

    Keeps the network's input in a range where its default initialisation trains well, whatever
    the photon count.
    """
    x = preprocess(frames, recipe.model_copy(update={"scale": 1.0}))
    mean = float(x.mean())
    return 0.1 / mean if mean > 0 else 1.0


def malformed_submission(ids: np.ndarray, frames: np.ndarray, positions: np.ndarray, frame_shape: tuple) -> str:
    """What is wrong with frames submitted with their ids and positions ('' if nothing): shapes, dtypes, lengths."""
    n = len(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        return f"frame ids must be integers, got {ids.dtype} of shape {ids.shape}"
    if frames.ndim not in (2, 3) or frames.shape[-2:] != frame_shape:
        return f"frames of shape {frames.shape}, the model expects {frame_shape}"
    if frames.dtype.kind not in "uif":
        return f"frames of dtype {frames.dtype}, not real numbers"
    if positions.dtype.kind not in "uif" or positions.reshape(-1).size != 2 * n:
        return f"positions of dtype {positions.dtype} and shape {positions.shape} for {n} frames"
    if (frames.shape[0] if frames.ndim == 3 else 1) != n:
        return f"{n} frame ids for frames of shape {frames.shape}"
    return ""
