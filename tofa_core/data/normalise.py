"""The one normalisation of pixels: training, BN recalibration, search, verification and the
`preprocess` that model.json tells a device to run all compute it here, so the floats a model
was scored on are the floats a device feeds it, bit for bit.

Two spellings of 1/255 differ by an ulp for some grey levels (`x / 255` against
`x * float32(1/255)`), and an int8 input whose scale is 2/255 puts every grey level on a
rounding tie: that ulp flips the quantized input of every pixel of the level. So there is one
spelling, the one model.json states: `(pixels * scale - mean) / std` in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# model.json's `normalisation.scale`: uint8 pixels to [0, 1].
PIXEL_SCALE = 1 / 255


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) as float32 in [0, 1]: `pixels * float32(PIXEL_SCALE)`."""
    return images.to(torch.float32) * torch.tensor(PIXEL_SCALE, dtype=torch.float32, device=images.device)


def per_channel(values: Sequence[float] | torch.Tensor, channels: int) -> torch.Tensor:
    """Mean or std as a (1, C, 1, 1) float32 tensor (one value is broadcast to every channel)."""
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if len(t) not in (1, channels):
        raise ValueError(f"{len(t)} normalisation values for images of {channels} channels")
    return t.expand(channels).reshape(1, channels, 1, 1).clone()


def standardise(unit: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (N, C, H, W) -> `(x - mean) / std`, mean and std (1, C, 1, 1)."""
    return (unit - mean.to(unit.device)) / std.to(unit.device)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> the float input of a model: `(pixels * scale - mean) / std`."""
    channels = images.shape[1]
    return standardise(to_unit(images), per_channel(mean, channels), per_channel(std, channels))
