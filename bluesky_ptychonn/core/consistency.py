"""Physics consistency of predicted patches: does the preview explain the frames it came from?

Each predicted patch times the probe goes through the simulator's forward model
(:func:`~bluesky_ptychonn.sim.physics.far_field`: orthonormal FFT, zero frequency at the frame
centre) on the inference device, and the modelled Fourier magnitudes ``|F|`` are compared with the
square roots of the measured counts ``m = sqrt(I)``:

* ``error``: the normalised error of Fourier magnitudes ``||s |F| - m|| / ||m||`` over the pixels
  with signal (at least one count measured or modelled). This is the trust statistic: 0 is a
  perfect fit; Poisson noise alone leaves about ``sqrt(lit pixels / 4 / photons)`` (~0.03 for
  64x64 frames of 1e6 photons), and a blurred preview scores several times that.
* ``chi2``: the Poisson reduced chi-square ``mean((I - s^2 |F|^2)^2 / max(s^2 |F|^2, 1))`` over
  the same pixels; about 1 for a perfect prediction.

``s`` is the least-squares scale of ``|F|`` onto ``m``: it absorbs the flux and any overall
amplitude scale of the prediction, and the prediction's global phase drops out of ``|F|``, so
neither ambiguity counts as an error. Per-pixel trust maps are these per-frame values stitched
with the probe's footprint ``|probe|^2`` as weight (see
:class:`~bluesky_ptychonn.core.stitching.PatchStitcher`), as ptychodus maps its residuals offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .config import PreprocessRecipe
from .geometry import ObjectGrid, extract_patches
from .preprocess import orientation_only, preprocess
from .stitching import PatchStitcher

__all__ = [
    "live_trust",
    "STATISTIC",
    "ConsistencyModel",
    "FrameConsistency",
    "object_consistency",
    "out_of_domain_threshold",
    "unsupported_reason",
]

#: Name of the trust statistic, stored with every trust map and threshold.
STATISTIC = "fourier_magnitude_error"

#: A frame is out of the model's domain when its error exceeds this multiple of the 95th
#: percentile of the errors on the checkpoint's validation block (held-out rows of its training
#: scans): frames like the training data rarely pass it, frames the model cannot explain do.
OUT_OF_DOMAIN_FACTOR = 1.25


@dataclass
class FrameConsistency:
    """Per-frame consistency of predictions with their measured frames.

    Attributes
    ----------
    error : (N,) float32
        Normalised Fourier-magnitude error (the trust statistic; lower is better).
    chi2 : (N,) float32
        Poisson reduced chi-square (about 1 at the noise level).
    """

    error: np.ndarray
    chi2: np.ndarray

    def summary(self) -> dict[str, float]:
        """Mean, median and 95th percentile of the error, and the median chi-square (for metadata)."""
        return {
            "mean": float(self.error.mean()),
            "median": float(np.median(self.error)),
            "p95": float(np.percentile(self.error, 95)),
            "chi2_median": float(np.median(self.chi2)),
        }


def unsupported_reason(recipe: PreprocessRecipe, probe_shape: tuple[int, ...]) -> str | None:
    """Why a probe cannot model a network's patches under ``recipe``, or None when it can.

    The forward model needs the patch to sample real space as the detector samples the far field:
    a crop, binning or resize changes the field of view or the sampling, and the run's probe (on
    the full frame's grid) no longer describes the patch.
    """
    if recipe.crop_pixels or recipe.bin_factor > 1 or recipe.output_pixels != recipe.binned_pixels:
        return "the preprocessing crops, bins or resizes the frames, so the run's probe does not fit the patches"
    n = recipe.output_pixels
    if tuple(probe_shape) != (n, n):
        return f"the probe has shape {tuple(probe_shape)}, the network's patches are {n}x{n}"
    return None


def out_of_domain_threshold(validation_errors: np.ndarray) -> dict[str, Any]:
    """The checkpoint's record of its validation errors and the out-of-domain threshold they give."""
    errors = np.asarray(validation_errors, np.float64)
    errors = errors[np.isfinite(errors)]
    if not len(errors):
        raise ConfigurationError("no finite consistency errors on the validation block to set a threshold from")
    p95 = float(np.percentile(errors, 95))
    return {
        "statistic": STATISTIC,
        "validation_frames": int(len(errors)),
        "validation_median": float(np.median(errors)),
        "validation_p95": p95,
        "threshold": OUT_OF_DOMAIN_FACTOR * p95,
        "rule": f"{OUT_OF_DOMAIN_FACTOR} x the 95th percentile of the validation block's errors",
    }


class ConsistencyModel:
    """The forward model of one probe, ready to score batches of predictions against their frames.

    Parameters
    ----------
    probe : (n, n) complex
        The probe in the simulator's convention (any overall scale: it is fitted per frame).
    recipe : PreprocessRecipe
        The checkpoint's recipe: its orientation is applied to the measured frames, so they match
        the network's (sample) orientation.
    device : str or torch.device
        Where to compute: the inference device.

    Raises
    ------
    ConfigurationError
        A probe that is not square, finite and non-zero, or that cannot model the patches
        (:func:`unsupported_reason`).
    """

    def __init__(self, probe: np.ndarray, recipe: PreprocessRecipe, device: Any = "cpu") -> None:
        import torch

        probe = np.asarray(probe)
        if probe.ndim != 2 or probe.shape[0] != probe.shape[1]:
            raise ConfigurationError(f"probe must be a square (n, n) array, got shape {probe.shape}")
        if not np.all(np.isfinite(probe)) or not np.any(probe):
            raise ConfigurationError("probe must be finite and not all zero")
        reason = unsupported_reason(recipe, probe.shape)
        if reason:
            raise ConfigurationError(f"no physics consistency: {reason}")
        self.device = torch.device(device)
        self.probe = probe.astype(np.complex64)
        self._probe = torch.from_numpy(self.probe).to(self.device)
        # The probe folded into the forward model: |probe| scales the amplitude and its phase adds to
        # the patch's, so one polar() makes the exit wave (no complex product). For even n a
        # checkerboard of pi does fftshift's work inside the FFT: (-1)^(y+x) moves zero frequency to
        # the centre, and the magnitudes need no shifted copy.
        n = probe.shape[0]
        angle = np.angle(self.probe) + (np.pi * (np.add.outer(np.arange(n), np.arange(n)) % 2) if n % 2 == 0 else 0)
        self._probe_abs = torch.from_numpy(np.abs(self.probe).astype(np.float32)).to(self.device)
        self._probe_angle = torch.from_numpy(angle.astype(np.float32)).to(self.device)
        # Orientation only: counts stay counts.
        self._orient = orientation_only(recipe)

    @property
    def footprint(self) -> np.ndarray:
        """(n, n) float32 probe intensity over its peak: the weight of a frame's value in a trust map."""
        intensity = np.abs(self.probe) ** 2
        return (intensity / intensity.max()).astype(np.float32)

    def model_intensity(self, amplitude: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """Noiseless far-field intensities (N, n, n) of probe x patch, unscaled (for checks and figures)."""
        import torch

        with torch.inference_mode():
            return (self._magnitudes(amplitude, phase) ** 2).cpu().numpy()

    def score(self, amplitude: Any, phase: Any, frames: Any, batch_size: int = 256) -> FrameConsistency:
        """Score (N, n, n) predicted amplitude and phase patches against their raw frames (N, rows, cols).

        Numpy arrays, or torch tensors already on the device (a GPU pipeline's predictions and
        uploaded counts: only the two scores per frame come back). Raises
        :class:`~bluesky_ptychonn.errors.FrameError` for numpy frames of the wrong shape, NaN or
        negative counts (as preprocessing does); tensors are taken as checked.
        """
        import torch

        from .tensor_preprocess import preprocess_tensor

        measured: Any = (
            preprocess_tensor(frames.to(self.device), self._orient)
            if isinstance(frames, torch.Tensor)
            else preprocess(frames, self._orient)
        )
        parts = []
        with torch.inference_mode():
            for s in range(0, len(measured), batch_size):
                b = slice(s, s + batch_size)
                parts.append(self._score(amplitude[b], phase[b], measured[b]))
        if not parts:
            return FrameConsistency(error=np.empty(0, np.float32), chi2=np.empty(0, np.float32))
        error, chi2 = (torch.cat(p).cpu().numpy() for p in zip(*parts, strict=True))  # one copy back
        return FrameConsistency(error=error, chi2=chi2)

    def _on_device(self, array: Any) -> Any:
        import torch

        if isinstance(array, torch.Tensor):
            return array.to(self.device, torch.float32)
        return torch.as_tensor(np.ascontiguousarray(array, np.float32), device=self.device)

    def _magnitudes(self, amplitude: Any, phase: Any) -> Any:
        """|FFT(probe x patch)| as :func:`~bluesky_ptychonn.core.physics_loss.far_field_magnitudes`, probe folded in."""
        import torch

        from .physics_loss import far_field_magnitudes, polar

        amplitude, phase = self._on_device(amplitude), self._on_device(phase)
        if self.probe.shape[0] % 2:
            return far_field_magnitudes(amplitude, phase, self._probe)
        wave = polar(amplitude * self._probe_abs, phase + self._probe_angle)
        return torch.fft.fft2(wave, norm="ortho").abs()

    def _score(self, amplitude: Any, phase: Any, measured: Any) -> tuple[Any, Any]:
        """(error, chi2) tensors (B,) on the device."""
        f = self._magnitudes(amplitude, phase)
        counts = self._on_device(measured)
        m = counts.sqrt()
        dims = (-2, -1)
        scale = (f * m).sum(dims) / (f * f).sum(dims).clamp_min(1e-30)
        model = scale[:, None, None] * f
        signal = ((m >= 1) | (model >= 1)).float()
        residual = ((model - m) ** 2 * signal).sum(dims)
        error = (residual / (m**2 * signal).sum(dims).clamp_min(1e-30)).sqrt()
        modelled = model**2
        chi2 = (((counts - modelled) ** 2 / modelled.clamp_min(1.0)) * signal).sum(dims) / signal.sum(dims).clamp_min(1)
        return error, chi2


def object_consistency(
    obj: np.ndarray, grid: ObjectGrid, frames: np.ndarray, positions_m: np.ndarray, probe: np.ndarray
) -> tuple[np.ndarray, FrameConsistency]:
    """Trust map (H, W) and per-frame scores of a whole object (e.g. an iterative result) against raw frames.

    The patches are cut from ``obj`` at the frames' positions and scored as predictions are, with
    the frames as recorded (no reorientation: the iterative engine modelled them so).
    """
    n = probe.shape[0]
    model = ConsistencyModel(probe, PreprocessRecipe(frame_shape=(n, n)))
    patches = extract_patches(obj, grid.patch_corners(positions_m, n), n)
    amplitude, phase = np.abs(patches).astype(np.float32), np.angle(patches).astype(np.float32)
    scores = model.score(amplitude, phase, frames)
    stitcher = PatchStitcher(grid, n, trust_window=model.footprint)
    stitcher.add(amplitude, phase, positions_m, trust=scores.error)
    trust = stitcher.snapshot().trust
    assert trust is not None  # the stitcher keeps a trust map: it was given a trust window
    return trust, scores


def live_trust(predictor: Any, probe: np.ndarray | None, probe_source: str) -> tuple[ConsistencyModel | None, dict]:
    """A live run's forward model (or None, and why) and the trust section of its result's metadata."""
    if probe is None:
        return None, {"available": False, "reason": probe_source or "no probe, so the preview cannot be checked"}
    try:
        model = ConsistencyModel(probe, predictor.info.recipe, predictor.device)
    except ConfigurationError as err:
        return None, {"available": False, "reason": str(err), "probe_source": probe_source}
    calibration = predictor.info.metrics.get("consistency") or {}
    threshold = calibration.get("threshold")
    return model, {
        "available": True,
        "statistic": STATISTIC,
        "meaning": "normalised error of the preview's Fourier magnitudes against the frames; 0 is perfect",
        "probe_source": probe_source,
        "threshold": threshold,
        "threshold_rule": calibration.get("rule")
        if threshold is not None
        else "none: the checkpoint records no validation consistency, so no frame is flagged",
        "frames_flagged": 0,
        "flagged_ids": [],
    }
