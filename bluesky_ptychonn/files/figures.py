"""PNG figures of reconstructions: amplitude and phase, beside references where there are any."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.geometry import ObjectGrid


def save_figure(
    path: str | Path,
    panels: list[tuple[str, np.ndarray, np.ndarray]],
    grid: ObjectGrid,
    *,
    mask: np.ndarray | None = None,
    title: str = "",
    maps: list[tuple[str, np.ndarray, str]] | None = None,
) -> Path:
    """Write a figure with one column per (label, amplitude, phase) panel and rows amplitude, phase.

    All panels share ``grid`` and are cropped to the bounding box of ``mask`` (the scanned region)
    when given; axes are in micrometres. ``maps`` adds a third row of single maps (label, image,
    colormap), e.g. a trust map and the preview's error, each with its own colour range.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    box = (slice(None), slice(None))
    extent = np.asarray(grid.extent_m()) * 1e6
    if mask is not None and mask.any():
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        p, (y0, x0) = grid.pixel_size_m * 1e6, np.asarray(grid.origin_m) * 1e6
        extent = np.array(
            [x0 + (cols[0] - 0.5) * p, x0 + (cols[-1] + 0.5) * p, y0 + (rows[-1] + 0.5) * p, y0 + (rows[0] - 0.5) * p]
        )
    amp_range = [np.percentile(np.concatenate([a[box].ravel() for _, a, _ in panels]), q) for q in (1, 99)]
    phase_range = [np.percentile(np.concatenate([ph[box].ravel() for _, _, ph in panels]), q) for q in (1, 99)]
    maps = maps or []
    n_rows, n_cols = (3 if maps else 2), max(len(panels), len(maps))
    # At least 6 inches wide: one column alone clipped its title and colour bar label.
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(max(4.2 * n_cols, 6.0), 3.8 * n_rows), squeeze=False)

    def draw(ax: Any, image: np.ndarray, label: str, cmap: str, lo: float, hi: float) -> None:
        im = ax.imshow(image[box], extent=tuple(extent), vmin=lo, vmax=hi, cmap=cmap)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("x (µm)")
        ax.set_ylabel("y (µm)")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    for col, (label, amplitude, phase) in enumerate(panels):
        draw(axes[0, col], amplitude, f"{label}: amplitude", "gray", *amp_range)
        draw(axes[1, col], phase, f"{label}: phase (rad)", "viridis", *phase_range)
    for col, (label, image, cmap) in enumerate(maps):
        finite = image[box][np.isfinite(image[box])]
        lo, hi = np.percentile(finite, (1, 99)) if len(finite) else (0.0, 1.0)
        draw(axes[2, col], image, label, cmap, lo, hi)
    for ax in axes.ravel():
        if not ax.images:
            ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
