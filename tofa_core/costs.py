"""Analytic cost model of a subnet: its layers, MACs and parameter count.

`layers(arch, space)` lists every weighted layer of the extracted network with its shape
and input size; MACs and parameters are sums over it, and a per-device latency table
(`LatencyModel`) sums its measured per-layer latencies over the same list, so all three
costs share one description of the network. Search calls these tens of thousands of
times, so the totals are cached per (arch, space); both are frozen and hashable.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple, Protocol

from tofa_core.arch import Arch, SearchSpace


class LayerSpec(NamedTuple):
    """One weighted layer. `kind` is conv (dense kxk), dwconv (depthwise), se, or linear."""

    name: str
    kind: str
    cin: int
    cout: int
    kernel: int = 1
    stride: int = 1
    in_size: int = 1  # square input feature map side; 1 for layers on pooled vectors
    act: str = "none"
    bias: bool = False  # linears only; convs never carry one (BN follows)

    @property
    def out_size(self) -> int:
        # 'same' padding with odd kernels: ceil(in / stride)
        return (self.in_size - 1) // self.stride + 1

    @property
    def macs(self) -> int:
        if self.kind == "conv":
            return self.cout * self.cin * self.kernel**2 * self.out_size**2
        if self.kind == "dwconv":
            return self.cout * self.kernel**2 * self.out_size**2
        if self.kind == "se":  # reduce (cin -> cout) and expand (cout -> cin) on a pooled vector
            return 2 * self.cin * self.cout
        return self.cin * self.cout  # linear

    @property
    def params(self) -> int:
        bn = 2 * self.cout  # BatchNorm weight and bias
        if self.kind == "conv":
            return self.cout * self.cin * self.kernel**2 + bn
        if self.kind == "dwconv":
            return self.cout * self.kernel**2 + bn
        if self.kind == "se":  # both linears carry a bias
            return 2 * self.cin * self.cout + self.cout + self.cin
        return self.cin * self.cout + (self.cout if self.bias else 0)

    @property
    def key(self) -> str:
        """Lookup key for latency tables: everything that determines a layer's run time."""
        return f"{self.kind}:{self.cin}-{self.cout}:k{self.kernel}:s{self.stride}:r{self.in_size}:{self.act}"


def _mbconv(name, space, size, cin, cout, kernel, expand, stride, act, se, has_expand):
    mid = space.mid_channels(cin, expand) if has_expand else cin
    out = []
    if has_expand:
        out.append(LayerSpec(f"{name}.expand", "conv", cin, mid, 1, 1, size, act))
    out.append(LayerSpec(f"{name}.depthwise", "dwconv", mid, mid, kernel, stride, size, act))
    size = out[-1].out_size
    if se:
        out.append(LayerSpec(f"{name}.se", "se", mid, space.se_channels(mid)))
    out.append(LayerSpec(f"{name}.project", "conv", mid, cout, 1, 1, size))
    return out, size


def layers(arch: Arch, space: SearchSpace) -> list[LayerSpec]:
    """Every weighted layer of `arch` in forward order, as `Supernet.extract(arch)` builds it."""
    space.validate(arch)
    size = arch.resolution
    stem = space.channels(space.stem_width, arch.width)
    out = [LayerSpec("stem", "conv", space.in_channels, stem, 3, space.stem_stride, size, "hswish")]
    size = out[-1].out_size
    block, size = _mbconv(
        "first_block", space, size, stem, stem, 3, 1, 1, space.first_block_act, False, False
    )
    out += block
    cin = stem
    for i, (spec, blocks) in enumerate(zip(space.stages, arch.stage_blocks())):
        cout = space.channels(spec.width, arch.width)
        for j, (k, e) in enumerate(blocks):
            stride = spec.stride if j == 0 else 1
            block, size = _mbconv(
                f"stages.{i}.{j}", space, size, cin, cout, k, e, stride, spec.act, spec.se, True
            )
            out += block
            cin = cout
    final = space.channels(space.final_expand_width, arch.width)
    out.append(LayerSpec("final_expand", "conv", cin, final, 1, 1, size, "hswish"))
    out.append(LayerSpec("feature_mix", "linear", final, space.feature_mix_width, act="hswish"))
    out.append(LayerSpec("classifier", "linear", space.feature_mix_width, space.num_classes, bias=True))
    return out


@lru_cache(maxsize=1 << 16)
def _totals(arch: Arch, space: SearchSpace) -> tuple[int, int]:
    specs = layers(arch, space)
    return sum(s.macs for s in specs), sum(s.params for s in specs)


def count_macs(arch: Arch, space: SearchSpace) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and linears)."""
    return _totals(arch, space)[0]


def count_params(arch: Arch, space: SearchSpace) -> int:
    """Parameters of the extracted network, exactly `sum(p.numel() for p in net.parameters())`."""
    return _totals(arch, space)[1]


class LatencyModel(Protocol):
    """What search needs from a latency predictor; per-device lookup tables implement it."""

    device: str

    def latency_ms(self, specs: Sequence[LayerSpec]) -> float: ...
