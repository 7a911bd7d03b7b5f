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


def local_mean(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``image`` averaged around every pixel with ``kernel``'s weights (normalised; zero beyond the edges).

    With the probe's footprint as kernel this is an error map at the scale a trust map resolves,
    the fair thing to correlate it with.
    """
    shape = [s + k for s, k in zip(image.shape, kernel.shape, strict=True)]
    weights = np.asarray(kernel, np.float64) / np.sum(kernel)
    full = np.fft.irfft2(np.fft.rfft2(image, shape) * np.fft.rfft2(weights, shape), shape)
    oy, ox = ((k - 1) // 2 for k in kernel.shape)
    return full[oy : oy + image.shape[0], ox : ox + image.shape[1]]


def frc_resolution_px(image: np.ndarray, reference: np.ndarray) -> float:
    """Resolution (full period, in pixels) where the Fourier ring correlation meets the half-bit threshold.

    Both images are made zero-mean and apodised with a Hann window (so the box's edges do not
    correlate), and their rings of equal spatial frequency compared (van Heel & Schatz 2005).
    The crossing is the first ring whose correlation falls below the half-bit curve, interpolated
    linearly between rings; an image that stays above it to the Nyquist ring gives 2 pixels.
    """
    a, b = (np.asarray(x, np.float64) for x in (image, reference))
    window = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    fa, fb = (np.fft.fftshift(np.fft.fft2((x - x.mean()) * window)) for x in (a, b))
    fy = np.fft.fftshift(np.fft.fftfreq(a.shape[0]))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(a.shape[1]))[None, :]
    step = 1.0 / min(a.shape)  # ring width: the coarser axis's frequency step
    ring = np.round(np.hypot(fy, fx) / step).astype(int).ravel()
    rings = int(0.5 / step)  # up to the Nyquist frequency
    cross = np.bincount(ring, (fa * fb.conj()).real.ravel(), rings + 1)[1 : rings + 1]
    power = (
        np.bincount(ring, (np.abs(fa) ** 2).ravel(), rings + 1)[1 : rings + 1]
        * np.bincount(ring, (np.abs(fb) ** 2).ravel(), rings + 1)[1 : rings + 1]
    )
    count = np.bincount(ring, minlength=rings + 1)[1 : rings + 1]
    frc = cross / np.sqrt(np.maximum(power, 1e-300))
    half_bit = (0.2071 + 1.9102 / np.sqrt(count)) / (1.2071 + 0.9102 / np.sqrt(count))
    below = np.flatnonzero(frc < half_bit)
    if not len(below):
        return 2.0
    k = int(below[0])
    if k == 0:
        return float(min(a.shape))  # uncorrelated already at the lowest ring
    # Linear interpolation of (frc - threshold) between ring k (index k-1 above, k below).
    d0, d1 = frc[k - 1] - half_bit[k - 1], frc[k] - half_bit[k]
    ring_at = k + d0 / (d0 - d1)  # rings are 1-based: index k - 1 is ring k
    return float(1.0 / (ring_at * step))


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def compare(
    amplitude: np.ndarray, phase: np.ndarray, ref_amplitude: np.ndarray, ref_phase: np.ndarray, mask: np.ndarray
) -> dict[str, float]:
    """Amplitude and phase PSNR, SSIM and Pearson correlation against a reference on ``mask``.

    The images are compared on the bounding box of ``mask`` (SSIM needs a rectangle); the
    data range is the reference's range there. Returns keys ``amplitude_psnr``,
    ``amplitude_ssim``, ``amplitude_pearson``, ``amplitude_frc_px`` (:func:`frc_resolution_px`;
    lower is finer) and the same for ``phase``: SSIM alone punishes small offsets on flat
    backgrounds, so the four belong together.
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
        out[f"{name}_frc_px"] = frc_resolution_px(img, ref)
    return out
