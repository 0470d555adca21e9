"""Batched weak/strong augmentation for FixMatch-style semi-supervised training.

Input: uint8 tensors (N, C, H, W) on any device; output: float32 normalised tensors, same shape.
Randomness is drawn per image from an optional ``torch.Generator`` (it must live on ``x.device``);
with ``generator=None`` the global torch RNG is used, so ``torch.manual_seed`` makes runs reproducible.

We do not use ``kornia.augmentation.auto.RandAugment``: in kornia 0.9 it rejects 1-channel images,
applies one sub-policy to the whole batch (not per image) and cannot take a ``torch.Generator``.
Instead each RandAugment round picks an op per image and applies every op once to the images that
chose it, using kornia's deterministic functional ops (enhance / geometry) where they fit.
"""

from __future__ import annotations

import math

import kornia.enhance as ke
import torch
import torch.nn.functional as F
from kornia.geometry.transform import warp_affine
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tofa_core.data.normalise import per_channel, standardise, to_unit

# Op list for the RandAugment rounds. Geometric ops share one affine warp per round.
COLOR_OPS = ("identity", "brightness", "contrast", "sharpness", "posterize", "solarize", "equalize",
             "autocontrast")  # fmt: skip
GEOM_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
OPS = COLOR_OPS + GEOM_OPS


class AugmentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    hflip: bool = True  # False for digits/text: a mirrored digit is a different (or no) class
    pad: int | None = Field(default=None, ge=0)  # None: 12.5% of the image side, at least 1
    strong_ops: int = Field(default=2, ge=0, le=len(OPS))  # RandAugment N
    strong_magnitude: float = Field(default=0.5, ge=0.0, le=1.0)  # RandAugment M (max strength)
    cutout: float = Field(default=0.5, ge=0.0, lt=1.0)  # cutout square side / image side; 0 disables
    mean: tuple[float, ...] = (0.5,)  # one value (broadcast) or one per channel
    std: tuple[float, ...] = (0.5,)

    @model_validator(mode="after")
    def _check_norm(self) -> AugmentConfig:
        if not self.mean or not self.std:
            raise ValueError("mean and std must be non-empty")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0, got {self.std}")
        if len(self.mean) != len(self.std) and 1 not in (len(self.mean), len(self.std)):
            raise ValueError(f"mean ({len(self.mean)} values) and std ({len(self.std)}) lengths differ")
        return self


def _per_channel(name: str, values: tuple[float, ...], channels: int) -> torch.Tensor:
    if len(values) not in (1, channels):
        raise ValueError(f"{name} has {len(values)} values but images have {channels} channels")
    return per_channel(values, channels)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation over 256 levels (CDF mapped onto [0, 1]).

    Not ``kornia.enhance.equalize``: it follows PIL, whose lookup step is (pixels - top bin) // 255, so
    it returns images under 256 pixels (8 and 12 px) unchanged and barely alters 16 px ones.
    """
    lv = (x * 255).round().long().clamp(0, 255).flatten(2)  # (N, C, HW)
    hist = torch.zeros(*lv.shape[:2], 256, device=x.device, dtype=x.dtype).scatter_add_(
        2, lv, torch.ones_like(lv, dtype=x.dtype)
    )
    cdf = hist.cumsum(2)
    c_min, total = cdf.gather(2, lv.amin(2, keepdim=True)), lv.shape[2]
    out = (cdf.gather(2, lv) - c_min) / (total - c_min).clamp_min(1)
    return torch.where(c_min < total, out, x.flatten(2)).view_as(x)  # one-level channel: unchanged


class Augmenter:
    """Weak and strong augmentation for images with ``channels`` channels (config is frozen)."""

    def __init__(self, config: AugmentConfig, channels: int):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.config, self.channels = config, channels
        self._mean = _per_channel("mean", config.mean, channels)
        self._std = _per_channel("std", config.std, channels)

    @property
    def mean(self) -> list[float]:
        """Per-channel normalisation mean (what a deployed model's preprocessing must use)."""
        return self._mean.reshape(-1).tolist()

    @property
    def std(self) -> list[float]:
        return self._std.reshape(-1).tolist()

    def _check(self, x: torch.Tensor) -> None:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected uint8 (N, {self.channels}, H, W), got {x.dtype} {tuple(x.shape)}")

    def _norm01(self, x01: torch.Tensor) -> torch.Tensor:
        return standardise(x01, self._mean, self._std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """What every evaluation and a deployed model's `preprocess` compute (`data.normalise`)."""
        self._check(x)
        return self._norm01(to_unit(x))

    def weak(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check(x)
        return self._norm01(self._weak01(to_unit(x), generator))

    def strong(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check(x)
        x01 = self._weak01(to_unit(x), generator)
        for _ in range(self.config.strong_ops):
            x01 = self._rand_op(x01, generator)
        return self._cutout(self._norm01(x01.clamp(0.0, 1.0)), generator)

    # --- pieces --------------------------------------------------------------------------------------

    def _weak01(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        pad = self.config.pad if self.config.pad is not None else max(1, round(0.125 * min(h, w)))
        if pad > 0:
            # Reflect padding avoids black borders the model could key on; it needs pad < side.
            mode = "reflect" if pad < min(h, w) else "constant"
            xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
            dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=g, device=dev)
            dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=g, device=dev)
            rows = (torch.arange(h, device=dev) + dy)[:, :, None]  # (N, H, 1)
            cols = (torch.arange(w, device=dev) + dx)[:, None, :]  # (N, 1, W)
            # One gather crops every image at its own offset: (N, H, W, C) -> (N, C, H, W).
            x = xp.permute(0, 2, 3, 1)[torch.arange(n, device=dev)[:, None, None], rows, cols]
            x = x.permute(0, 3, 1, 2).contiguous()
        if self.config.hflip:
            flip = torch.rand(n, generator=g, device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    def _rand_op(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, c, h, w = x.shape
        dev = x.device
        op = torch.randint(0, len(OPS), (n,), generator=g, device=dev)
        # FixMatch-style: magnitude uniform in [0, M] per image, random sign for signed ops.
        m = torch.rand(n, generator=g, device=dev) * self.config.strong_magnitude
        signed = m * torch.where(torch.rand(n, generator=g, device=dev) < 0.5, -1.0, 1.0)
        out = x.clone()
        for k, name in enumerate(COLOR_OPS[1:], start=1):
            idx = (op == k).nonzero().squeeze(1)
            if idx.numel():
                out[idx] = self._color(name, x[idx], m[idx], signed[idx]).clamp(0.0, 1.0)
        idx = (op >= len(COLOR_OPS)).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = self._warp(x[idx], op[idx] - len(COLOR_OPS), signed[idx])
        return out

    @staticmethod
    def _color(name: str, x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = s.view(-1, 1, 1, 1)
        if name == "brightness":  # PIL-style: blend with black
            return x * (1 + 0.9 * v)
        if name == "contrast":  # blend with the image's mean grey level
            mu = x.mean(dim=(1, 2, 3), keepdim=True)
            return mu + (x - mu) * (1 + 0.9 * v)
        if name == "sharpness":
            return ke.sharpness(x, 1 + 0.9 * s)
        if name == "posterize":  # keep 8..4 bits
            step = 2.0 ** torch.round(4 * m).view(-1, 1, 1, 1)
            return torch.floor(x * 255 / step) * step / 255
        if name == "solarize":  # invert pixels above a threshold that drops with magnitude
            return torch.where(x >= 1 - m.view(-1, 1, 1, 1), 1 - x, x)
        if name == "equalize":
            return _equalize(x)
        if name == "autocontrast":  # stretch each channel to [0, 1]; flat channels left alone
            lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
            return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
        raise AssertionError(name)

    def _warp(self, x: torch.Tensor, kind: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        a = torch.eye(3, device=x.device).repeat(n, 1, 1)
        ang = torch.where(kind == 0, s * math.radians(30), torch.zeros_like(s))
        cos, sin = torch.cos(ang), torch.sin(ang)
        a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = cos, -sin, sin, cos
        a[:, 0, 1] += torch.where(kind == 1, 0.3 * s, 0.0)
        a[:, 1, 0] += torch.where(kind == 2, 0.3 * s, 0.0)
        a[:, 0, 2] = torch.where(kind == 3, 0.3 * s * w, 0.0)
        a[:, 1, 2] = torch.where(kind == 4, 0.3 * s * h, 0.0)
        # Rotate/shear about the image centre: T(c) @ A @ T(-c).
        ctr = torch.eye(3, device=x.device).repeat(n, 1, 1)
        ctr[:, 0, 2], ctr[:, 1, 2] = (w - 1) / 2, (h - 1) / 2
        mat = (ctr @ a @ torch.linalg.inv(ctr))[:, :2]
        # Warp (x - mean) with zero padding so uncovered pixels take the normalisation mean (0 later).
        fill = self._mean.to(x.device)
        return warp_affine(x - fill, mat, (h, w), mode="bilinear", padding_mode="zeros") + fill

    def _cutout(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.config.cutout <= 0:
            return x
        side = max(1, round(self.config.cutout * min(h, w)))
        dev = x.device
        # Square fully inside the image; filled with 0 in normalised space (the mean colour).
        y0 = torch.randint(0, h - side + 1, (n, 1, 1), generator=g, device=dev)
        x0 = torch.randint(0, w - side + 1, (n, 1, 1), generator=g, device=dev)
        ry = torch.arange(h, device=dev).view(1, h, 1)
        rx = torch.arange(w, device=dev).view(1, 1, w)
        mask = (ry >= y0) & (ry < y0 + side) & (rx >= x0) & (rx < x0 + side)
        return x.masked_fill(mask[:, None], 0.0)
