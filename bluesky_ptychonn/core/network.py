"""The PtychoNN network: one convolutional encoder, two decoders (amplitude and phase).

Layer by layer as in Cherukara et al. (2020) for the defaults (see
``shared/reference/method-notes.md``): each encoder block is Conv3x3-ReLU, Conv3x3-ReLU,
MaxPool 2x2 with channels ``base * 2**k``; each decoder mirrors it with upsampling; the heads are
a 3x3 convolution to one channel, then sigmoid (amplitude) and pi*tanh (phase), or linear.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import nn

from .config import NetworkConfig

M = TypeVar("M", bound=nn.Module)


def _conv_pair(c_in: int, c_out: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in ((c_in, c_out), (c_out, c_out)):
        layers.append(nn.Conv2d(a, b, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(b))
        layers.append(nn.ReLU(inplace=True))
    return layers


class PtychoNN(nn.Module):
    """Diffraction pattern (B, 1, n, n) -> amplitude and phase (B, 1, n, n) each."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        channels = [config.base_channels * 2**k for k in range(config.depth)]
        encoder: list[nn.Module] = []
        c_in = 1
        for c in channels:
            encoder += [*_conv_pair(c_in, c, config.batch_norm), nn.MaxPool2d(2)]
            c_in = c
        self.encoder = nn.Sequential(*encoder)
        self.amplitude_decoder = self._decoder(channels)
        self.phase_decoder = self._decoder(channels)
        # He initialisation keeps activations alive through ~20 ReLU layers without normalisation;
        # torch's default (variance 1/(3 fan_in)) shrinks them until the output is a constant.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _decoder(self, channels: list[int]) -> nn.Sequential:
        layers: list[nn.Module] = []
        c_in = channels[-1]
        for c in reversed(channels):
            layers += [
                *_conv_pair(c_in, c, self.config.batch_norm),
                nn.Upsample(scale_factor=2, mode=self.config.upsample),
            ]
            c_in = c
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (amplitude, phase), each (B, 1, n, n)."""
        features = self.encoder(x)
        amplitude = self.amplitude_decoder(features)
        phase = self.phase_decoder(features)
        if self.config.heads == "bounded":
            amplitude = torch.sigmoid(amplitude)
            phase = math.pi * torch.tanh(phase)
        return amplitude, phase


def fold_batch_norm(model: M) -> M:
    """A copy of ``model`` for inference with every BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is a per-channel scale and shift, which the convolution's weights and
    bias can carry: one pass over the activations less per layer. On the 2-core benchmark machine
    the batch-norm small network (the shipped base model's) spent 16 % of its forward in
    ``native_batch_norm``; folded, the forward took 1.18 s instead of 1.40 s for the same 480
    frames (torch profiler), with outputs within 5e-6 of the unfolded ones. ``model`` itself is
    left as it is (it may still be trained); a model without BatchNorm comes back unchanged.
    """
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return model
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, norm = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(conv, norm)
                seq[i + 1] = nn.Identity()
    return folded


def flops_per_frame(config: NetworkConfig) -> int:
    """Multiply-adds x 2 of the convolutions for one frame (activations and pooling ignored)."""
    n = config.input_pixels
    channels = [config.base_channels * 2**k for k in range(config.depth)]
    total = 0
    c_in, side = 1, n
    for c in channels:  # encoder: two convs at this side, then pool
        total += side * side * 9 * (c_in * c + c * c)
        c_in, side = c, side // 2
    decoder = 0
    for c in reversed(channels):  # decoder: two convs at this side, then upsample
        decoder += side * side * 9 * (c_in * c + c * c)
        c_in, side = c, side * 2
    decoder += side * side * 9 * c_in  # head
    return 2 * (total + 2 * decoder)
