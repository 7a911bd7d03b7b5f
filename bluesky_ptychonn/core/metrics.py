"""Image quality against a reference: PSNR, SSIM and Pearson correlation on a region.

Phase is compared after removing the global phase offset (the far-field intensity cannot see
it) and wrapping the difference into [-pi, pi).
"""

from __future__ import annotations

import numpy as np


def remove_phase_offset(phase: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``phase`` shifted by the constant that best matches ``reference`` on ``mask``, re-wrapped near it."""
    offset = np.angle(np.sum(np.exp(1j * (reference[mask] - phase[mask]))))
    shifted = phase + offset
    return reference + np.angle(np.exp(1j * (shifted - reference)))


def _box_mean(image: np.ndarray, size: int) -> np.ndarray:
    """Mean over ``size`` x ``size`` windows (valid region only), via cumulative sums."""
    c = np.cumsum(np.cumsum(np.pad(image, ((1, 0), (1, 0))), axis=0), axis=1)
    s = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
    return s / size**2


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float, window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004) with a uniform 7x7 window, as scikit-image's default."""
    x, y = image.astype(np.float64), reference.astype(np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ux, uy = _box_mean(x, window), _box_mean(y, window)
    n = window**2
    cov = n / (n - 1)  # sample covariance, as scikit-image
    vx = cov * (_box_mean(x * x, window) - ux**2)
    vy = cov * (_box_mean(y * y, window) - uy**2)
    vxy = cov * (_box_mean(x * y, window) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB."""
    mse = float(np.mean((image.astype(np.float64) - reference) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def pearson(image: np.ndarray, reference: np.ndarray) -> float:
    """Pearson correlation coefficient of two arrays (0 if either is constant)."""
    a, b = image.ravel() - image.mean(), reference.ravel() - reference.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def compare(
    amplitude: np.ndarray, phase: np.ndarray, ref_amplitude: np.ndarray, ref_phase: np.ndarray, mask: np.ndarray
) -> dict[str, float]:
    """Amplitude and phase PSNR, SSIM and Pearson correlation against a reference on ``mask``.

    The images are compared on the bounding box of ``mask`` (SSIM needs a rectangle); the
    data range is the reference's range there. Returns keys ``amplitude_psnr``,
    ``amplitude_ssim``, ``amplitude_pearson`` and the same for ``phase``.
    """
    if not mask.any():
        raise ValueError("the comparison region is empty")
    box = _bounding_box(mask)
    aligned = remove_phase_offset(phase, ref_phase, mask)
    out: dict[str, float] = {}
    for name, img, ref in (("amplitude", amplitude, ref_amplitude), ("phase", aligned, ref_phase)):
        img, ref = img[box].astype(np.float64), ref[box].astype(np.float64)
        span = float(ref.max() - ref.min()) or 1.0
        out[f"{name}_psnr"] = psnr(img, ref, span)
        out[f"{name}_ssim"] = ssim(img, ref, span)
        out[f"{name}_pearson"] = pearson(img, ref)
    return out
