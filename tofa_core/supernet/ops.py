"""Elastic operations: the bottom rung of the ladder ops -> blocks -> Supernet.

Each op owns the weights of its largest configuration and computes any smaller one from
a prefix of its channels (and, for depthwise convs, a transformed centre of its kernel).
The active size always arrives as an argument or is read off the input tensor; no op
stores an "active" setting, so one supernet can run different subnets concurrently.
Each op also has `extract(...)`, which returns a static layer from `static.py` holding
copies of exactly the weights that configuration uses.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tofa_core.supernet import quant
from tofa_core.supernet.static import ConvBNAct, SqueezeExcite, activation


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels of the largest BN, C read from the input.

    The sliced running statistics are views into the full buffers, so training any subnet
    updates the shared statistics in place, exactly as the full BN would for C = max.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x,
            self.running_mean[:c],
            self.running_var[:c],
            self.weight[:c],
            self.bias[:c],
            self.training or not self.track_running_stats,
            momentum,
            self.eps,
        )

    def copy_into(self, bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
        c = bn.num_features
        with torch.no_grad():
            bn.weight.copy_(self.weight[:c])
            bn.bias.copy_(self.bias[:c])
            bn.running_mean.copy_(self.running_mean[:c])
            bn.running_var.copy_(self.running_var[:c])
            bn.num_batches_tracked.copy_(self.num_batches_tracked)
        bn.eps, bn.momentum = self.eps, self.momentum
        return bn


class ElasticConvBN(nn.Module):
    """Dense conv (any odd kernel, no bias) + elastic BN + activation; in/out channels elastic."""

    fake_quant = False  # see quant.py; on for quantization-aware training

    def __init__(self, max_in: int, max_out: int, kernel: int = 1, stride: int = 1, act: str = "none"):
        super().__init__()
        self.kernel, self.stride, self.act = kernel, stride, act
        self.conv = nn.Conv2d(max_in, max_out, kernel, stride, kernel // 2, bias=False)
        self.bn = ElasticBatchNorm2d(max_out)

    def forward(self, x: torch.Tensor, out_channels: int) -> torch.Tensor:
        w = quant.weight(self.conv.weight[:out_channels, : x.shape[1]], self.fake_quant)
        y = F.conv2d(x, w, None, self.stride, self.kernel // 2)
        return quant.activate(self.act, self.bn(y), self.fake_quant)

    def extract(self, in_channels: int, out_channels: int) -> ConvBNAct:
        layer = ConvBNAct(in_channels, out_channels, self.kernel, self.stride, act=self.act)
        with torch.no_grad():
            layer.conv.weight.copy_(self.conv.weight[:out_channels, :in_channels])
        self.bn.copy_into(layer.bn)
        return layer


def _centre(w: torch.Tensor, size: int) -> torch.Tensor:
    start = (w.shape[-1] - size) // 2
    return w[..., start : start + size, start : start + size]


# Elastic kernel size: a smaller kernel is the centre of the next larger one passed through a
# learned (s*s x s*s) matrix, largest to smallest (OFA's kernel transformation), so that small
# kernels need not share raw weights with the large kernel's centre. One matrix per size step,
# shared by every filter of the layer (depthwise or dense), held as `transform_{big}to{small}`
# parameters of the conv's own module (the names OFA's weights import to).


def _register_transforms(module: nn.Module, kernels: tuple[int, ...]) -> None:
    for big, small in zip(kernels[:0:-1], kernels[-2::-1]):
        module.register_parameter(f"transform_{big}to{small}", nn.Parameter(torch.eye(small * small)))


def _transformed(module: nn.Module, w: torch.Tensor, kernel: int) -> torch.Tensor:
    """`w` (out, in, K, K) at the largest size K -> the (out, in, kernel, kernel) filter."""
    out, cin = w.shape[:2]
    for big, small in zip(module.kernels[:0:-1], module.kernels[-2::-1]):
        if big <= kernel:
            break
        matrix = getattr(module, f"transform_{big}to{small}")
        w = F.linear(_centre(w, small).reshape(out * cin, small * small), matrix)
        w = w.reshape(out, cin, small, small)
    return w


def _crop_to_map(w: torch.Tensor, kernel: int, h: int, wd: int) -> tuple[torch.Tensor, int]:
    """Drop the taps farther from the centre than the feature map is wide: they only ever
    meet zero padding, so outputs and gradients stay the same at a fraction of the cost,
    which matters on the 1x1..4x4 maps that small inputs produce. Returns (filter, padding)."""
    radius = min(kernel // 2, max(h, wd) - 1)
    if radius < kernel // 2:
        w = _centre(w, 2 * radius + 1)
    return w, radius


class ElasticDepthwiseConvBN(nn.Module):
    """Depthwise conv with elastic channels and kernel size (transformed centres), + elastic BN
    + activation."""

    fake_quant = False

    def __init__(self, max_channels: int, kernel_choices: tuple[int, ...], stride: int, act: str):
        super().__init__()
        self.kernels = tuple(sorted(kernel_choices))
        self.stride, self.act = stride, act
        k = self.kernels[-1]
        self.conv = nn.Conv2d(max_channels, max_channels, k, stride, k // 2, groups=max_channels, bias=False)
        _register_transforms(self, self.kernels)
        self.bn = ElasticBatchNorm2d(max_channels)

    def kernel_weight(self, channels: int, kernel: int) -> torch.Tensor:
        """The (channels, 1, kernel, kernel) filter this configuration uses."""
        return _transformed(self, self.conv.weight[:channels], kernel)

    def forward(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        c, h, wd = x.shape[1], x.shape[2], x.shape[3]
        # quantized at full kernel size, as the deployed file holds it, then cropped
        w = quant.weight(self.kernel_weight(c, kernel), self.fake_quant)
        w, radius = _crop_to_map(w, kernel, h, wd)
        if h * wd <= SMALL_MAP:
            y = depthwise_as_matmul(x, w, self.stride)
        else:
            y = F.conv2d(x, w, None, self.stride, radius, 1, c)
        return quant.activate(self.act, self.bn(y), self.fake_quant)

    def extract(self, channels: int, kernel: int) -> ConvBNAct:
        layer = ConvBNAct(channels, channels, kernel, self.stride, groups=channels, act=self.act)
        with torch.no_grad():
            layer.conv.weight.copy_(self.kernel_weight(channels, kernel))
        self.bn.copy_into(layer.bn)
        return layer


class ElasticKernelConvBN(nn.Module):
    """Dense conv with elastic in/out channels and kernel size (transformed centres), + elastic
    BN + activation: the expansion of a Fused-MBConv block."""

    fake_quant = False

    def __init__(self, max_in: int, max_out: int, kernel_choices: tuple[int, ...], stride: int, act: str):
        super().__init__()
        self.kernels = tuple(sorted(kernel_choices))
        self.stride, self.act = stride, act
        k = self.kernels[-1]
        self.conv = nn.Conv2d(max_in, max_out, k, stride, k // 2, bias=False)
        _register_transforms(self, self.kernels)
        self.bn = ElasticBatchNorm2d(max_out)

    def kernel_weight(self, in_channels: int, out_channels: int, kernel: int) -> torch.Tensor:
        return _transformed(self, self.conv.weight[:out_channels, :in_channels], kernel)

    def forward(self, x: torch.Tensor, out_channels: int, kernel: int) -> torch.Tensor:
        w = quant.weight(self.kernel_weight(x.shape[1], out_channels, kernel), self.fake_quant)
        w, radius = _crop_to_map(w, kernel, x.shape[2], x.shape[3])
        return quant.activate(self.act, self.bn(F.conv2d(x, w, None, self.stride, radius)), self.fake_quant)

    def extract(self, in_channels: int, out_channels: int, kernel: int) -> ConvBNAct:
        layer = ConvBNAct(in_channels, out_channels, kernel, self.stride, act=self.act)
        with torch.no_grad():
            layer.conv.weight.copy_(self.kernel_weight(in_channels, out_channels, kernel))
        self.bn.copy_into(layer.bn)
        return layer


# Depthwise convolutions on maps this small (4x4 and below) run as one batched matmul:
# oneDNN's depthwise backward is slow there (about 4x on the 2-core CPU this was tuned on).
SMALL_MAP = 16


@functools.lru_cache(maxsize=256)
def _tap_matrix(h: int, w: int, k: int, stride: int) -> torch.Tensor:
    """(k*k, out_pixels * in_pixels) 0/1 matrix: which kernel tap links each output to each input."""
    r = k // 2
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    taps = torch.zeros(k * k, ho * wo, h * w)
    for oy in range(ho):
        for ox in range(wo):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    iy, ix = oy * stride + dy, ox * stride + dx
                    if 0 <= iy < h and 0 <= ix < w:
                        taps[(dy + r) * k + dx + r, oy * wo + ox, iy * w + ix] = 1.0
    return taps.reshape(k * k, -1)


def depthwise_as_matmul(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    """Depthwise 'same' convolution of `x` (N, C, H, W) with `w` (C, 1, k, k), as a matmul.

    Each channel's convolution is a (out_pixels x in_pixels) matrix built from its k*k taps;
    the same sums as F.conv2d (up to summation order), and both directions are plain matmuls.
    """
    n, c, h, wd = x.shape
    k = w.shape[-1]
    taps = _tap_matrix(h, wd, k, stride).to(device=x.device, dtype=x.dtype)
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    matrices = (w.reshape(c, k * k) @ taps).reshape(c, ho * wo, h * wd)
    y = torch.bmm(x.reshape(n, c, h * wd).transpose(0, 1), matrices.transpose(1, 2))
    return y.transpose(0, 1).reshape(n, c, ho, wo)


class ElasticSE(nn.Module):
    """Squeeze-and-excite whose channels and hidden size follow the input's channel count."""

    fake_quant = False

    def __init__(self, max_channels: int, max_mid: int, mid_of):
        super().__init__()
        self.mid_of = mid_of  # channels -> hidden size, the space's rounding rule
        self.reduce = nn.Linear(max_channels, max_mid)
        self.expand = nn.Linear(max_mid, max_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        m = self.mid_of(c)
        reduce, expand = self.reduce, self.expand
        return quant.squeeze_excite(
            x, reduce.weight[:m, :c], reduce.bias[:m], expand.weight[:c, :m], expand.bias[:c], self.fake_quant
        )

    def extract(self, channels: int) -> SqueezeExcite:
        m = self.mid_of(channels)
        layer = SqueezeExcite(channels, m)
        with torch.no_grad():
            layer.reduce.weight.copy_(self.reduce.weight[:m, :channels])
            layer.reduce.bias.copy_(self.reduce.bias[:m])
            layer.expand.weight.copy_(self.expand.weight[:channels, :m])
            layer.expand.bias.copy_(self.expand.bias[:channels])
        return layer


def extract_linear(linear: nn.Linear, in_features: int) -> nn.Linear:
    """A Linear over the first `in_features` inputs of `linear` (all of its outputs)."""
    layer = nn.Linear(in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        layer.weight.copy_(linear.weight[:, :in_features])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer


__all__ = [
    "ElasticBatchNorm2d",
    "ElasticConvBN",
    "ElasticDepthwiseConvBN",
    "ElasticKernelConvBN",
    "ElasticSE",
    "activation",
    "extract_linear",
]
