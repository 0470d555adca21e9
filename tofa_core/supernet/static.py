"""Plain static layers that an extracted subnet is made of.

Nothing here knows about the supernet: an extracted model is ordinary torch modules with
ordinary weights, scriptable with TorchScript and exportable to ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tofa_core.supernet import quant


def at_resolution(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize images to a subnet's input side: bilinear, align_corners=False. The one resize
    the supernet, every extracted subnet and every exported model's preprocessing share."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)


def activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "hswish": nn.Hardswish(), "none": nn.Identity()}[name]


class ConvBNAct(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> activation."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: str = "none"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = activation(act)
        self.act_name = act
        self.fake_quant = False  # quant.set_fake_quant; an attribute TorchScript can read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_quant:
            return self._fake_quant_forward(x)
        return self.act(self.bn(self.conv(x)))

    @torch.jit.unused
    def _fake_quant_forward(self, x):  # unannotated: TorchScript stubs it as Tensor -> Tensor
        conv = self.conv
        w = quant.weight(conv.weight, True)
        y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return quant.activate(self.act_name, self.bn(y), True)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> reduce -> ReLU -> expand -> hard sigmoid -> scale."""

    def __init__(self, channels: int, mid: int):
        super().__init__()
        self.reduce = nn.Linear(channels, mid)
        self.expand = nn.Linear(mid, channels)
        self.fake_quant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_quant:
            return self._fake_quant_forward(x)
        y = F.relu(self.reduce(x.mean((2, 3))))
        y = F.hardsigmoid(self.expand(y))
        return x * y[:, :, None, None]

    @torch.jit.unused
    def _fake_quant_forward(self, x):  # unannotated: TorchScript stubs it as Tensor -> Tensor
        r, e = self.reduce, self.expand
        return quant.squeeze_excite(x, r.weight, r.bias, e.weight, e.bias, True)


class MBConv(nn.Module):
    """Inverted residual block: [1x1 expand] -> depthwise kxk -> [SE] -> 1x1 project (+ input),
    or fused: dense kxk expand -> [SE] -> 1x1 project (+ input), `depthwise` an Identity."""

    def __init__(
        self,
        expand: nn.Module,
        depthwise: nn.Module,
        se: nn.Module,
        project: ConvBNAct,
        residual: bool,
    ):
        super().__init__()
        self.expand = expand
        self.depthwise = depthwise
        self.se = se
        self.project = project
        self.residual = residual
        self.fake_quant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        if not self.residual:
            return y
        return self._fake_quant(x + y) if self.fake_quant else x + y

    @torch.jit.unused
    def _fake_quant(self, x):
        return quant.activation(x, True)


class StaticNet(nn.Module):
    """An extracted subnet. Resizes its input to `resolution` like the supernet does."""

    def __init__(
        self,
        resolution: int,
        stem: ConvBNAct,
        blocks: list[nn.Module],
        final_expand: ConvBNAct,
        feature_mix: nn.Linear,
        dropout: float,
        classifier: nn.Linear,
    ):
        super().__init__()
        self.resolution = resolution
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.final_expand = final_expand
        self.feature_mix = feature_mix
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier
        self.fake_quant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_quant:
            return self._fake_quant_forward(x)
        x = self.final_expand(self.blocks(self.stem(at_resolution(x, self.resolution))))
        x = F.hardswish(self.feature_mix(x.mean((2, 3))))
        return self.classifier(self.dropout(x))

    @torch.jit.unused
    def _fake_quant_forward(self, x):  # unannotated: TorchScript stubs it as Tensor -> Tensor
        x = quant.resized(x, self.resolution, at_resolution, True)
        x = self.final_expand(self.blocks(self.stem(x)))
        return quant.head(x, self.feature_mix.weight, self.dropout, self.training, self.classifier, True)
