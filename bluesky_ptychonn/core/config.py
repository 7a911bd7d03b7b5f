"""Validated configuration objects, with units in the field names.

They are frozen pydantic models: validated once at the edge, then passed around freely. The
:class:`PreprocessRecipe` and :class:`NetworkConfig` travel inside every checkpoint, so inference
always applies what training applied.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigurationError
from .geometry import real_space_pixel_m

__all__ = ["DetectorGeometry", "Frozen", "NetworkConfig", "PreprocessRecipe", "TrainConfig", "validated"]


class Frozen(BaseModel):
    """Base of every configuration model: validated once at construction, immutable, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def validated(model: type[BaseModel], data: dict) -> BaseModel:
    """Build ``model`` from ``data``, turning pydantic's error into a :class:`ConfigurationError`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigurationError(f"invalid {model.__name__}: {err}") from err


class DetectorGeometry(Frozen):
    """Beam energy and detector geometry of a far-field (Fraunhofer) measurement."""

    energy_ev: float = Field(10_000.0, gt=0, description="Photon energy in eV.")
    distance_m: float = Field(2.0, gt=0, description="Sample to detector distance in metres.")
    detector_pixel_m: float = Field(75e-6, gt=0, description="Detector pixel pitch in metres.")
    frame_pixels: int = Field(64, gt=0, description="Frame side in detector pixels (frames are square).")

    def pixel_size_m(self, crop_pixels: int | None = None, bin_factor: int = 1) -> float:
        """Real-space pixel size as seen through a central crop and a binning."""
        n = crop_pixels or self.frame_pixels
        return real_space_pixel_m(self.energy_ev, self.distance_m, n // bin_factor, self.detector_pixel_m * bin_factor)


class PreprocessRecipe(Frozen):
    """How raw detector counts become network input; applied identically in training and inference.

    Steps, in order: orientation, central crop, binning (or area resize), threshold, normalisation, transform,
    scale.
    """

    frame_shape: tuple[int, int] = Field((64, 64), description="Raw detector frame shape (rows, columns) accepted.")
    transpose: bool = Field(False, description="Swap detector rows and columns before anything else.")
    flip_rows: bool = Field(False, description="Reverse the row order (after transpose).")
    flip_cols: bool = Field(False, description="Reverse the column order (after transpose).")
    crop_pixels: int | None = Field(None, gt=0, description="Side of a central square crop; None keeps the frame.")
    bin_factor: int = Field(1, ge=1, description="Mean-bin the (cropped) frame by this factor.")
    resize_pixels: int | None = Field(
        None, gt=0, description="Area-resample to this side after binning; None keeps it."
    )
    threshold_counts: float = Field(0.0, ge=0, description="Counts below this become zero (the paper used 3).")
    normalize: Literal["none", "total"] = Field(
        "none",
        description=(
            "'total' rescales each frame to one count per pixel on average before the transform, so the input "
            "does not depend on the flux (pretrained base models are trained over 1e4 to 1e7 photons per frame)."
        ),
    )
    transform: Literal["none", "sqrt", "log1p"] = Field("sqrt", description="Pointwise transform of the counts.")
    scale: float = Field(1.0, gt=0, description="Multiplier after the transform, fitted on the training frames.")

    @model_validator(mode="after")
    def _check_sizes(self) -> PreprocessRecipe:
        rows, cols = self.frame_shape
        if self.transpose:
            rows, cols = cols, rows
        side = self.crop_pixels or min(rows, cols)
        if rows != cols and self.crop_pixels is None:
            raise ValueError(f"frames of shape {self.frame_shape} are not square: set crop_pixels")
        if side > min(rows, cols):
            raise ValueError(f"crop_pixels={side} exceeds the frame shape {self.frame_shape}")
        if side % self.bin_factor:
            raise ValueError(f"crop side {side} is not divisible by bin_factor={self.bin_factor}")
        return self

    @property
    def binned_pixels(self) -> int:
        """Frame side after crop and binning, before any resize."""
        return (self.crop_pixels or self.frame_shape[0]) // self.bin_factor

    @property
    def output_pixels(self) -> int:
        """Frame side that the network sees."""
        return self.resize_pixels or self.binned_pixels

    def pixel_size_m(self, geometry: DetectorGeometry) -> float:
        """Real-space pixel size of the network's input and output, for a detector geometry.

        Area resizing keeps the field of view (the crop's angular range) and changes the sampling.
        """
        fov_pixel = geometry.pixel_size_m(self.crop_pixels, self.bin_factor)
        return fov_pixel * self.binned_pixels / self.output_pixels


class NetworkConfig(Frozen):
    """PtychoNN encoder with two decoders (amplitude, phase).

    The defaults reproduce the paper: 32 base channels, three down blocks, 64x64 input.
    ``small()`` is the 16-channel, four-block variant of the streaming follow-up.
    """

    input_pixels: int = Field(64, gt=0, description="Side of the square input and output.")
    base_channels: int = Field(32, gt=0, description="Channels of the first encoder block; doubled per block.")
    depth: int = Field(3, ge=1, le=6, description="Number of down (and up) blocks.")
    heads: Literal["bounded", "linear"] = Field(
        "bounded", description="'bounded': sigmoid amplitude and pi*tanh phase; 'linear': no output activation."
    )
    upsample: Literal["nearest", "bilinear"] = Field("bilinear", description="Decoder upsampling mode.")
    batch_norm: bool = Field(
        False, description="BatchNorm after every convolution (the APS ptychonn package's default; not in the paper)."
    )

    @model_validator(mode="after")
    def _check_depth(self) -> NetworkConfig:
        if self.input_pixels % (2**self.depth):
            raise ValueError(f"input_pixels={self.input_pixels} must be divisible by 2**depth={2**self.depth}")
        return self

    @classmethod
    def paper(cls, input_pixels: int = 64) -> NetworkConfig:
        """The paper's network (Cherukara et al. 2020)."""
        return cls(input_pixels=input_pixels)

    @classmethod
    def small(cls, input_pixels: int = 64) -> NetworkConfig:
        """The 16-channel network of the edge/streaming follow-up (Babu et al. 2023), both heads kept."""
        return cls(input_pixels=input_pixels, base_channels=16, depth=4)

    @classmethod
    def preset(cls, name: str, input_pixels: int = 64) -> NetworkConfig:
        """``'paper'`` or ``'small'``."""
        if name not in ("paper", "small"):
            raise ConfigurationError(f"unknown network preset {name!r}; expected 'paper' or 'small'")
        return getattr(cls, name)(input_pixels)


class TrainConfig(Frozen):
    """The training recipe; defaults follow the paper's text (MAE, Adam 1e-3, halve on plateau)."""

    epochs: int = Field(60, ge=1, description="Maximum number of epochs.")
    batch_size: int = Field(32, ge=1, description="Frames per optimisation step.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam's initial learning rate.")
    plateau_patience: int = Field(5, ge=0, description="Epochs without validation improvement before the rate halves.")
    min_learning_rate: float = Field(1e-5, ge=0, description="The rate is never halved below this.")
    early_stop_patience: int = Field(12, ge=1, description="Epochs without validation improvement before stopping.")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Fraction of each scan held out as a block.")
    loss_window: Literal["uniform", "gaussian"] = Field(
        "gaussian",
        description=(
            "Per-pixel weight of the MAE. 'uniform' is the paper's loss; 'gaussian' (sigma 0.15 of the "
            "patch) concentrates it on the lit centre, which is what the diffraction pattern determines and "
            "what stitching keeps; outside the probe the label cannot be inferred and only adds noise."
        ),
    )
    seed: int = Field(0, description="Seed of weights, shuffling and any random choice.")
    mixed_precision: bool = Field(True, description="Use autocast on CUDA (ignored on the CPU).")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default.")


class StreamConfig(Frozen):
    """Budget, schedule and loss mix of :func:`~bluesky_ptychonn.core.pretrain.fit_stream`.

    Here, not beside it, so that the command line reads its defaults without importing torch.
    """

    steps: int = Field(100_000, ge=1, description="Most optimisation steps.")
    budget_s: float | None = Field(None, gt=0, description="Wall-clock budget in seconds; None: steps only.")
    learning_rate: float = Field(1e-3, gt=0)
    min_learning_rate: float = Field(1e-5, ge=0)
    supervised_weight: float = Field(1.0, ge=0, description="Weight of the label MAE (ignored without labels).")
    physics_weight: float = Field(0.1, ge=0, description="Weight of the Poisson deviance of the forward model.")
    overlap_weight: float = Field(0.1, ge=0, description="Weight of the overlap constraint.")
    loss_window: Literal["uniform", "gaussian"] = Field("gaussian", description="Per-pixel weight of the MAE.")
    validate_every: int = Field(100, ge=1, description="Steps between validations.")
    checkpoint_every_s: float = Field(300.0, gt=0, description="Seconds between checkpoint writes to ``out``.")
    mixed_precision: bool = Field(
        True,
        description="bfloat16 autocast on CUDA. Never on the CPU: its bf16 backward measured 15x slower than fp32.",
    )
    seed: int = 0
