"""Elastic blocks: the middle rung. An elastic (Fused-)MBConv block built from elastic ops."""

from __future__ import annotations

import torch
from torch import nn

from tofa_core.arch import SearchSpace
from tofa_core.supernet import quant
from tofa_core.supernet.ops import ElasticConvBN, ElasticDepthwiseConvBN, ElasticKernelConvBN, ElasticSE
from tofa_core.supernet.static import MBConv


class ElasticMBConv(nn.Module):
    """Inverted residual block with elastic kernel, expand ratio and in/out channels.

    The hidden width follows the *active* input channels (`space.mid_channels(in, e)`), as
    in OFA. A block without expansion (`max_expand == 1`) has no 1x1 expand conv. A `fused`
    block (Fused-MBConv) expands with one dense kxk conv instead of 1x1 expand + depthwise kxk.
    """

    fake_quant = False

    def __init__(
        self,
        space: SearchSpace,
        max_in: int,
        max_out: int,
        kernel_choices: tuple[int, ...],
        max_expand: float,
        stride: int,
        act: str,
        se: bool,
        fused: bool = False,
    ):
        super().__init__()
        self.space = space
        self.stride = stride
        self.fused = fused
        self.has_expand = max_expand != 1 or fused
        max_mid = space.mid_channels(max_in, max_expand) if self.has_expand else max_in
        if fused:
            self.expand = ElasticKernelConvBN(max_in, max_mid, kernel_choices, stride, act)
            self.depthwise = None
        else:
            self.expand = ElasticConvBN(max_in, max_mid, 1, 1, act) if self.has_expand else None
            self.depthwise = ElasticDepthwiseConvBN(max_mid, kernel_choices, stride, act)
        self.se = ElasticSE(max_mid, space.se_channels(max_mid), space.se_channels) if se else None
        self.project = ElasticConvBN(max_mid, max_out, 1, 1, "none")
        # The residual exists iff it exists at full size; elastic width keeps in == out then.
        self.residual = stride == 1 and max_in == max_out

    def mid_channels(self, in_channels: int, expand: float) -> int:
        return self.space.mid_channels(in_channels, expand) if self.has_expand else in_channels

    def forward(self, x: torch.Tensor, kernel: int, expand: float, out_channels: int) -> torch.Tensor:
        mid = self.mid_channels(x.shape[1], expand)
        if self.fused:
            y = self.expand(x, mid, kernel)
        else:
            y = self.expand(x, mid) if self.expand is not None else x
            y = self.depthwise(y, kernel)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y, out_channels)
        return quant.activation(x + y, self.fake_quant) if self.residual else y

    def extract(self, in_channels: int, kernel: int, expand: float, out_channels: int) -> MBConv:
        mid = self.mid_channels(in_channels, expand)
        if self.fused:
            expand_layer, depthwise = self.expand.extract(in_channels, mid, kernel), nn.Identity()
        else:
            expand_layer = self.expand.extract(in_channels, mid) if self.expand is not None else nn.Identity()
            depthwise = self.depthwise.extract(mid, kernel)
        return MBConv(
            expand_layer,
            depthwise,
            self.se.extract(mid) if self.se is not None else nn.Identity(),
            self.project.extract(mid, out_channels),
            self.residual,
        )

    @torch.no_grad()
    def reorganize_channels(self) -> None:
        """Sort hidden channels by importance (L1 norm of the project weights reading them).

        Smaller expand ratios keep a channel prefix, so after this they keep the channels
        that matter most. Permuting hidden channels leaves the full block's function intact.
        """
        importance = self.project.conv.weight.abs().sum(dim=(0, 2, 3))
        order = torch.argsort(importance, descending=True)
        if self.depthwise is not None:
            _permute_out(self.depthwise.conv.weight, self.depthwise.bn, order)
        self.project.conv.weight.copy_(self.project.conv.weight[:, order])
        if self.expand is not None:
            _permute_out(self.expand.conv.weight, self.expand.bn, order)
        if self.se is not None:
            se = self.se
            se.reduce.weight.copy_(se.reduce.weight[:, order])
            se.expand.weight.copy_(se.expand.weight[order])
            se.expand.bias.copy_(se.expand.bias[order])
            # The SE hidden layer is elastic too: sort it by the expand weights reading it.
            se_order = torch.argsort(se.expand.weight.abs().sum(dim=0), descending=True)
            se.expand.weight.copy_(se.expand.weight[:, se_order])
            se.reduce.weight.copy_(se.reduce.weight[se_order])
            se.reduce.bias.copy_(se.reduce.bias[se_order])


def _permute_out(weight: torch.Tensor, bn: nn.BatchNorm2d, order: torch.Tensor) -> None:
    weight.copy_(weight[order])
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        t.copy_(t[order])
