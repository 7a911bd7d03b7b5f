"""Physics-informed losses: the forward model with the known probe, and the overlap of neighbours.

* :func:`poisson_deviance`: predicted patch x probe -> far field (orthonormal FFT, zero frequency
  at the frame centre, as :func:`~bluesky_ptychonn.sim.physics.far_field`) -> intensities scaled
  to the flux -> Poisson deviance ``2 sum[I log(I / lam) - (I - lam)]`` against the measured counts
  ``I``, over the frame's total counts. The deviance is the Poisson log-likelihood ratio against a
  perfect model: zero when the model explains the counts exactly, about ``4 eps^2`` for a relative
  Fourier-magnitude error ``eps``, and, divided by the counts, comparable across fluxes from 1e4
  to 1e7 photons. It needs no label.
* :func:`overlap_loss`: two frames whose patches overlap see the same object pixels; the complex
  transmissions predicted for those pixels must agree. Each pixel counts by how well both probes
  light it. This ties neighbouring predictions together (and their phase offsets), the constraint
  that iterative ptychography lives on.

Both work on (B, n, n) torch tensors on any device and are differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class OverlapPairs:
    """Pairs of frames ``(first[k], second[k])`` whose patch corners differ by ``shift_px[k]`` (dy, dx)."""

    first: np.ndarray
    second: np.ndarray
    shift_px: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    @classmethod
    def neighbours(cls, corners_px: np.ndarray, max_shift_px: float) -> OverlapPairs:
        """Every pair of frames whose patch corners lie within ``max_shift_px`` of each other, once."""
        d = corners_px[None, :, :] - corners_px[:, None, :]
        close = np.triu(np.hypot(d[..., 0], d[..., 1]) <= max_shift_px, k=1)
        i, j = np.nonzero(close)
        return cls(i, j, d[i, j].astype(np.float32))


@dataclass
class PhysicsBatch:
    """Frames with what the physics-informed loss needs, and labels where there are any.

    Attributes
    ----------
    frames : (B, n, n) counts, oriented as the network sees them (no crop, binning or resize).
    amplitude, phase : (B, n, n) float32 label patches, or None (self-supervised).
    probes : (S, n, n) complex64; ``probe_index`` (B,) says which one lit each frame.
    pairs : OverlapPairs of frames in the batch whose patches overlap.
    photons : (B,) flux of each frame where known (simulations), for the record.
    flux : (B,) photons per frame through free space, the forward model's absolute scale; None fits
        the scale per frame (the network then answers for the amplitude's shape, not its level).
    """

    frames: np.ndarray
    amplitude: np.ndarray | None
    phase: np.ndarray | None
    probes: np.ndarray
    probe_index: np.ndarray
    pairs: OverlapPairs
    photons: np.ndarray | None = None
    flux: np.ndarray | None = None

    @classmethod
    def concatenate(cls, parts: list[PhysicsBatch]) -> PhysicsBatch:
        """One batch of several labelled ones, renumbering their pairs and probes."""
        frames = np.cumsum([0] + [len(p.frames) for p in parts])
        probes = np.cumsum([0] + [len(p.probes) for p in parts])

        def joined(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in parts])

        return cls(
            frames=joined("frames"),
            amplitude=joined("amplitude"),
            phase=joined("phase"),
            probes=joined("probes"),
            probe_index=np.concatenate([p.probe_index + o for p, o in zip(parts, probes, strict=False)]),
            pairs=OverlapPairs(
                np.concatenate([p.pairs.first + o for p, o in zip(parts, frames, strict=False)]),
                np.concatenate([p.pairs.second + o for p, o in zip(parts, frames, strict=False)]),
                np.concatenate([p.pairs.shift_px for p in parts]),
            ),
            photons=joined("photons"),
        )


def polar(magnitude: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``torch.polar``, broadcast: on the CPU 2.5x faster (0.39 against 0.98 ms for 64 64x64 patches, 2 threads)."""
    return torch.complex(magnitude * torch.cos(angle), magnitude * torch.sin(angle))


def far_field_magnitudes(amplitude: torch.Tensor, phase: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """|FFT(probe x amplitude e^{i phase})| of (B, n, n) patches; ``probe`` is (n, n) or (B, n, n).

    The simulator's convention (orthonormal FFT, zero frequency at the frame centre); the trust
    maps of :mod:`~bluesky_ptychonn.core.consistency` use the same model.
    """
    wave = polar(amplitude.float(), phase.float()) * probe
    return torch.fft.fftshift(torch.fft.fft2(wave, norm="ortho"), dim=(-2, -1)).abs()


def model_intensity(amplitude: torch.Tensor, phase: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Noiseless far-field intensities of (B, n, n) patches: :func:`far_field_magnitudes` squared."""
    return far_field_magnitudes(amplitude, phase, probe).square()


def poisson_deviance(
    amplitude: torch.Tensor,
    phase: torch.Tensor,
    probe: torch.Tensor,
    counts: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-frame Poisson deviance over total counts, (B,), of predicted patches against oriented counts.

    ``scale`` (B,) turns modelled intensities into expected counts; None fits it per frame by
    maximum likelihood (``sum I / sum model``), which absorbs the unknown flux and the overall
    amplitude scale of the prediction.
    """
    model = model_intensity(amplitude, phase, probe)
    counts = counts.float()
    total = counts.sum(dim=(-2, -1))
    if scale is None:
        scale = total / model.sum(dim=(-2, -1)).clamp_min(1e-30)
    lam = (scale[:, None, None] * model).clamp_min(1e-8)
    log_ratio = torch.where(counts > 0, counts * (counts.clamp_min(1e-30).log() - lam.log()), torch.zeros_like(lam))
    deviance = 2 * (log_ratio - (counts - lam)).sum(dim=(-2, -1))
    return deviance / total.clamp_min(1.0)


def _shifted(image: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """``image(r - shift)`` of (P, C, n, n) images, bilinear, zero outside."""
    n = image.shape[-1]
    r = torch.arange(n, device=image.device, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    y = yy[None] - shift_px[:, 0, None, None]
    x = xx[None] - shift_px[:, 1, None, None]
    grid = torch.stack([2 * x / (n - 1) - 1, 2 * y / (n - 1) - 1], dim=-1)
    return torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def overlap_loss(
    amplitude: torch.Tensor, phase: torch.Tensor, probe_intensity: torch.Tensor, pairs: OverlapPairs
) -> torch.Tensor:
    """Mean over pairs of the lit-weighted squared difference of the two complex predictions, (scalar).

    ``probe_intensity`` is (n, n) or (B, n, n) (one per frame), any scale: it is normalised to peak 1.
    """
    if len(pairs) == 0:
        return amplitude.new_zeros(())
    dev = amplitude.device
    i = torch.as_tensor(pairs.first, device=dev, dtype=torch.long)
    j = torch.as_tensor(pairs.second, device=dev, dtype=torch.long)
    shift = torch.as_tensor(pairs.shift_px, device=dev, dtype=torch.float32)
    a, p = amplitude.float(), phase.float()
    wave = torch.stack([a * torch.cos(p), a * torch.sin(p)], dim=1)  # (B, 2, n, n)
    light = probe_intensity.float() / probe_intensity.float().amax(dim=(-2, -1), keepdim=True)
    light = light.expand_as(a) if light.dim() == 2 else light
    moved = _shifted(torch.cat([wave[j], light[j, None]], dim=1), shift)
    weight = light[i] * moved[:, 2]
    diff = (wave[i] - moved[:, :2]).square().sum(dim=1)
    per_pair = (weight * diff).sum(dim=(-2, -1)) / weight.sum(dim=(-2, -1)).clamp_min(1e-12)
    return per_pair.mean()
