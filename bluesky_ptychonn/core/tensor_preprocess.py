"""The preprocessing recipe on torch tensors, where the frames already are (the inference device).

The same steps as :func:`~bluesky_ptychonn.core.preprocess.preprocess`, in the same order, so a
GPU pipeline uploads raw counts once and never brings frames back to the host; the two agree to
float32 rounding (tested). Frame checks (shape, NaN, negative counts) stay on the host, before upload.
"""

from __future__ import annotations

import torch

from .config import PreprocessRecipe
from .preprocess import area_matrix


def preprocess_tensor(counts: torch.Tensor, recipe: PreprocessRecipe) -> torch.Tensor:
    """Raw counts (N, rows, cols), float32 on any device -> network input (N, n, n), contiguous."""
    x = counts.float()
    if recipe.transpose:
        x = x.transpose(1, 2)
    if recipe.flip_rows:
        x = x.flip(1)
    if recipe.flip_cols:
        x = x.flip(2)
    if recipe.crop_pixels:
        c = recipe.crop_pixels
        r0, c0 = x.shape[1] // 2 - c // 2, x.shape[2] // 2 - c // 2
        x = x[:, r0 : r0 + c, c0 : c0 + c]
    if recipe.bin_factor > 1:
        b, m = recipe.bin_factor, x.shape[1] // recipe.bin_factor
        x = x.reshape(len(x), m, b, m, b).mean(dim=(2, 4))
    if recipe.resize_pixels and recipe.resize_pixels != x.shape[1]:
        a = torch.from_numpy(area_matrix(x.shape[1], recipe.resize_pixels)).to(x.device)
        x = a @ x @ a.T
    if recipe.threshold_counts:
        x = torch.where(x < recipe.threshold_counts, 0.0, x)
    if recipe.normalize == "total":
        totals = x.sum(dim=(1, 2), keepdim=True)
        x = x * (x.shape[1] * x.shape[2] / totals.clamp_min(1.0))
    if recipe.transform == "sqrt":
        x = x.sqrt()
    elif recipe.transform == "log1p":
        x = x.log1p()
    return (x * recipe.scale).contiguous()
