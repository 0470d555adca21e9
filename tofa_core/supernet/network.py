"""The top rung: `Supernet`, every subnet of a `SearchSpace` in one set of shared weights."""

from __future__ import annotations

import torch
from torch import nn

from tofa_core.arch import Arch, SearchSpace
from tofa_core.supernet import quant
from tofa_core.supernet.blocks import ElasticMBConv
from tofa_core.supernet.ops import ElasticConvBN, extract_linear
from tofa_core.supernet.static import StaticNet, at_resolution


class Supernet(nn.Module):
    """Weight-sharing supernet. `forward(x, arch)` runs the subnet `arch` names.

    The architecture is an argument, never module state: two threads may run two archs on
    one supernet (in eval mode; training mode updates the shared BN statistics).
    """

    fake_quant = False  # quant.set_fake_quant: every subnet's int8 rounding, for training

    def __init__(self, space: SearchSpace, channels_last: bool = True):
        super().__init__()
        self.space = space
        # NHWC activations let oneDNN pick much faster depthwise kernels on CPU (about 2x
        # for a training step here); the weights stay as they are.
        self.channels_last = channels_last
        stem = space.stem_width
        self.stem = ElasticConvBN(space.in_channels, stem, 3, space.stem_stride, "hswish")
        self.first_block = ElasticMBConv(space, stem, stem, (3,), 1, 1, space.first_block_act, False)
        stages, cin = [], stem
        for spec in space.stages:
            blocks = []
            for j in range(spec.max_depth):
                blocks.append(
                    ElasticMBConv(
                        space,
                        cin,
                        spec.width,
                        space.kernel_choices,
                        max(space.expand_choices),
                        spec.stride if j == 0 else 1,
                        spec.act,
                        spec.se,
                        fused=spec.block == "fused",
                    )
                )
                cin = spec.width
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.final_expand = ElasticConvBN(cin, space.final_expand_width, 1, 1, "hswish")
        self.feature_mix = nn.Linear(space.final_expand_width, space.feature_mix_width, bias=False)
        self.classifier = nn.Linear(space.feature_mix_width, space.num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum, m.eps = space.bn_momentum, space.bn_eps
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """He init (fan-in) for convs, PyTorch's default for linears, identity kernel transforms."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan-in per output channel: a depthwise filter reads k*k inputs, not C*k*k
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, (nn.Linear, nn.BatchNorm2d)):
                m.reset_parameters()

    def reset_classifier(self, num_classes: int | None = None) -> None:
        """Fresh classifier head (e.g. after importing weights trained on other classes)."""
        num_classes = num_classes or self.space.num_classes
        self.classifier = nn.Linear(self.space.feature_mix_width, num_classes).to(self.classifier.weight)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    # ----------------------------------------------------------------- running subnets

    def _plan(self, arch: Arch):
        """(stage index, block index, kernel, expand, out channels) of every kept block."""
        space = self.space
        plan = []
        for i, (spec, blocks) in enumerate(zip(space.stages, arch.stage_blocks())):
            out = space.channels(spec.width, arch.width)
            plan += [(i, j, k, e, out) for j, (k, e) in enumerate(blocks)]
        return plan

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        space = self.space
        space.validate(arch)
        x = quant.resized(x, arch.resolution, at_resolution, self.fake_quant)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        stem = space.channels(space.stem_width, arch.width)
        x = self.stem(x, stem)
        x = self.first_block(x, 3, 1, stem)
        for i, j, k, e, out in self._plan(arch):
            x = self.stages[i][j](x, k, e, out)
        x = self.final_expand(x, space.channels(space.final_expand_width, arch.width))
        mix = self.feature_mix.weight[:, : x.shape[1]]
        return quant.head(x, mix, space.dropout, self.training, self.classifier, self.fake_quant)

    @torch.no_grad()
    def extract(self, arch: Arch) -> StaticNet:
        """A standalone static network computing `arch` with copies of its weights and BN stats."""
        space = self.space
        space.validate(arch)
        stem = space.channels(space.stem_width, arch.width)
        blocks = [self.first_block.extract(stem, 3, 1, stem)]
        cin = stem
        for i, j, k, e, out in self._plan(arch):
            blocks.append(self.stages[i][j].extract(cin, k, e, out))
            cin = out
        final = space.channels(space.final_expand_width, arch.width)
        net = StaticNet(
            arch.resolution,
            self.stem.extract(space.in_channels, stem),
            blocks,
            self.final_expand.extract(cin, final),
            extract_linear(self.feature_mix, final),
            space.dropout,
            extract_linear(self.classifier, self.classifier.in_features),
        )
        net.train(self.training)
        return net.to(self.classifier.weight.device)

    @torch.no_grad()
    def reorganize_channels(self) -> None:
        """Sort every elastic block's hidden channels by importance (see ElasticMBConv)."""
        for stage in self.stages:
            for block in stage:
                block.reorganize_channels()
