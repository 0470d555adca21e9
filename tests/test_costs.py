"""Tests for tofa_core.costs: the analytic layer list, MACs and parameter counts."""

from __future__ import annotations

import random
from dataclasses import replace
from itertools import pairwise

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tofa_core.arch import Arch, SearchSpace
from tofa_core.costs import LayerSpec, count_macs, count_params, layers
from tofa_core.supernet import Supernet

TINY = SearchSpace.preset("tiny", num_classes=10, in_channels=1)
OFA = SearchSpace.preset("ofa-mbv3", num_classes=10)
FUSED = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1)
SMALL = SearchSpace.preset("small-fused", num_classes=10, in_channels=1)
SPACES = {"tiny": TINY, "ofa-mbv3": OFA, "tiny-fused": FUSED, "small-fused": SMALL}


def _archs(space: SearchSpace, n_random: int = 6, seed: int = 0) -> list[Arch]:
    rng = random.Random(seed)
    return [space.max_arch(), space.min_arch(), *(space.sample(rng) for _ in range(n_random))]


def _measured_archs(space: SearchSpace) -> list[Arch]:
    """max, min and 6 random archs; random ofa-mbv3 archs keep to 128..176 px for speed
    (the max arch still covers 224 px)."""
    archs = _archs(space, 6, seed=0)
    if space.name != "ofa-mbv3":
        return archs
    rng = random.Random(100)
    low = [r for r in space.resolutions if r <= 176]
    return archs[:2] + [replace(a, resolution=rng.choice(low)) for a in archs[2:]]


@pytest.fixture(scope="module")
def supernets() -> dict[str, Supernet]:
    torch.manual_seed(0)
    return {name: Supernet(sp).eval() for name, sp in SPACES.items()}


def _measured_macs(model: torch.nn.Module, space: SearchSpace, arch: Arch) -> float:
    x = torch.zeros(1, space.in_channels, arch.resolution, arch.resolution)
    # NHWC, as the supernet runs: oneDNN's depthwise kernels are much faster in it.
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2


CASES = [(name, i) for name in sorted(SPACES) for i in range(8)]


@pytest.mark.parametrize(("name", "index"), CASES)
def test_costs_match_extracted_model(supernets, name, index):
    space = SPACES[name]
    arch = _measured_archs(space)[index]
    model = supernets[name].extract(arch).eval()
    assert count_params(arch, space) == sum(p.numel() for p in model.parameters())
    macs = count_macs(arch, space)
    measured = _measured_macs(model, space, arch)
    assert measured > 0
    assert abs(macs - measured) <= 0.01 * measured, (macs, measured)
    # In fact the two agree exactly (FlopCounterMode counts 2 FLOPs per MAC of convs and
    # linears and nothing else); 1% alone would miss e.g. a miscounted SE (~1% of MACs).
    assert macs == measured, (macs, measured)


def test_known_totals():
    # Pinned values: a change here means the cost model (or a preset) changed.
    assert count_macs(TINY.min_arch(), TINY) == 280_000
    assert count_params(TINY.min_arch(), TINY) == 61_362
    assert count_macs(TINY.max_arch(), TINY) == 18_043_392
    assert count_params(TINY.max_arch(), TINY) == 758_354
    # small-fused (what `space: auto` trains at 28 px): the fmnist targets' 3-14M MACs lie inside.
    small28 = SearchSpace.preset("small-fused", num_classes=10, in_channels=1, resolutions=(28,))
    assert count_macs(small28.min_arch(), small28) == 420_096
    assert count_params(small28.min_arch(), small28) == 53_258
    assert count_macs(small28.max_arch(), small28) == 25_148_288
    assert count_params(small28.max_arch(), small28) == 727_842


def test_totals_are_sums_over_layers():
    for space in SPACES.values():
        for arch in _archs(space, 3, seed=1):
            specs = layers(arch, space)
            assert count_macs(arch, space) == sum(s.macs for s in specs)
            assert count_params(arch, space) == sum(s.params for s in specs)
            assert isinstance(count_macs(arch, space), int)
            assert isinstance(count_params(arch, space), int)


def test_ofa_max_arch_close_to_published():
    # OFA's largest MobileNetV3 subnet at 224 px: about 7.7M parameters with 1000 classes.
    space = SearchSpace.preset("ofa-mbv3")
    params = count_params(space.max_arch(), space)
    assert 7.4e6 < params < 7.9e6
    # The classifier is the only part that depends on num_classes.
    assert params - count_params(OFA.max_arch(), OFA) == 1280 * 990 + 990


# ----------------------------------------------------------------- layer list


@pytest.mark.parametrize("name", sorted(SPACES))
def test_layers_in_forward_order(name):
    space = SPACES[name]
    for arch in _archs(space, 4, seed=2):
        specs = layers(arch, space)
        assert specs[0].name == "stem"
        assert specs[0].kind == "conv"
        assert specs[0].cin == space.in_channels
        assert specs[0].in_size == arch.resolution
        assert specs[-1].name == "classifier"
        assert specs[-1].cout == space.num_classes and specs[-1].bias
        assert specs[-2].name == "feature_mix" and specs[-3].name == "final_expand"
        # The kxk conv of each block: depthwise in MBConv blocks, the dense expand in fused ones.
        fused = {i for i, st in enumerate(space.stages) if st.block == "fused"}
        kxk = [
            s
            for s in specs
            if s.kind == "dwconv" or (s.name.endswith(".expand") and int(s.name.split(".")[1]) in fused)
        ]
        assert len(kxk) == 1 + sum(arch.depths)
        assert tuple(s.kernel for s in kxk) == (3, *arch.kernels)
        n_fused = sum(arch.depths[i] for i in fused)
        assert sum(s.kind == "dwconv" for s in specs) == 1 + sum(arch.depths) - n_fused
        # Channels chain: every layer's input is the previous non-SE layer's output.
        chain = [s for s in specs if s.kind != "se"]
        for prev, cur in pairwise(chain):
            assert cur.cin == prev.cout, (prev.name, cur.name)
        # Spatial sizes chain through the convolutions.
        convs = [s for s in specs if s.kind in ("conv", "dwconv")]
        for prev, cur in pairwise(convs):
            assert cur.in_size == prev.out_size, (prev.name, cur.name)
        se_stages = [i for i, st in enumerate(space.stages) if st.se]
        assert sum(s.kind == "se" for s in specs) == sum(arch.depths[i] for i in se_stages)
        names = [s.name for s in specs]
        assert len(names) == len(set(names))


def test_layers_block_names_and_strides():
    arch = Arch(24, (1, 2, 3, 1), (3, 5, 7, 3, 5, 7, 3), (2, 3, 4, 2, 3, 4, 2), 0.75)
    specs = {s.name: s for s in layers(arch, TINY)}
    for i, depth in enumerate(arch.depths):
        for j in range(depth):
            stride = TINY.stages[i].stride if j == 0 else 1
            assert specs[f"stages.{i}.{j}.depthwise"].stride == stride
        assert f"stages.{i}.{depth}.depthwise" not in specs
    assert specs["stages.1.1.depthwise"].kernel == 7
    assert specs["stages.1.1.expand"].cout == TINY.mid_channels(specs["stages.1.1.expand"].cin, 4)
    # 24 px, stride-1 stem, then strides 2, 2, 2, 1.
    assert specs["final_expand"].in_size == 3
    assert "first_block.expand" not in specs


def test_layer_key_depends_on_kernel():
    a = TINY.max_arch()
    keys = set()
    for k in TINY.kernel_choices:
        b = replace(a, kernels=(k,) + a.kernels[1:])
        spec = next(s for s in layers(b, TINY) if s.name == "stages.0.0.depthwise")
        keys.add(spec.key)
    assert len(keys) == 3
    s = LayerSpec("x", "dwconv", 96, 96, 5, 2, 16, "relu")
    assert s.key == "dwconv:96-96:k5:s2:r16:relu"
    assert s.key != s._replace(stride=1).key != s._replace(in_size=8).key


def test_layer_spec_arithmetic():
    conv = LayerSpec("c", "conv", 3, 16, 3, 2, 32)
    assert conv.out_size == 16
    assert conv.macs == 16 * 3 * 9 * 16 * 16
    assert conv.params == 16 * 3 * 9 + 32
    dw = LayerSpec("d", "dwconv", 48, 48, 5, 1, 7)
    assert dw.out_size == 7
    assert dw.macs == 48 * 25 * 49
    assert dw.params == 48 * 25 + 96
    assert LayerSpec("o", "conv", 8, 8, 1, 2, 7).out_size == 4  # ceil(7 / 2)
    se = LayerSpec("s", "se", 96, 24)
    assert se.macs == 2 * 96 * 24
    assert se.params == 2 * 96 * 24 + 24 + 96
    lin = LayerSpec("l", "linear", 1280, 10, bias=True)
    assert lin.macs == 12800 and lin.params == 12810
    assert lin._replace(bias=False).params == 12800


# ----------------------------------------------------------------- monotonicity and errors


@pytest.mark.parametrize("name", sorted(SPACES))
def test_macs_grow_from_min_to_max(name):
    space = SPACES[name]
    lo, hi = space.min_arch(), space.max_arch()
    assert count_macs(lo, space) < count_macs(hi, space)
    assert count_params(lo, space) < count_params(hi, space)
    for arch in _archs(space, 20, seed=3):
        assert count_macs(lo, space) <= count_macs(arch, space) <= count_macs(hi, space)


def test_macs_grow_with_each_gene():
    base = Arch(20, (2, 2, 2, 2), (5,) * 8, (3,) * 8, 0.75)
    macs = count_macs(base, TINY)
    bigger = [
        replace(base, resolution=24),
        replace(base, width=1.0),
        replace(base, kernels=(7,) + base.kernels[1:]),
        replace(base, expands=base.expands[:-1] + (4,)),
        Arch(20, (2, 3, 2, 2), (5,) * 9, (3,) * 9, 0.75),
    ]
    for arch in bigger:
        assert count_macs(arch, TINY) > macs, arch
    smaller = [
        replace(base, resolution=16),
        replace(base, width=0.5),
        replace(base, kernels=(3,) + base.kernels[1:]),
        replace(base, expands=(2,) + base.expands[1:]),
    ]
    for arch in smaller:
        assert count_macs(arch, TINY) < macs, arch


def test_num_classes_changes_only_classifier():
    other = SearchSpace.preset("tiny", num_classes=100, in_channels=1)
    arch = TINY.max_arch()
    assert count_macs(arch, other) - count_macs(arch, TINY) == 256 * 90
    assert count_params(arch, other) - count_params(arch, TINY) == 256 * 90 + 90


INVALID = [
    replace(TINY.max_arch(), resolution=33),
    replace(TINY.max_arch(), width=2.0),
    replace(TINY.max_arch(), kernels=(9,) * 12),
    replace(TINY.max_arch(), expands=(4,) * 11),
    OFA.max_arch(),
]


@pytest.mark.parametrize("arch", INVALID)
@pytest.mark.parametrize("fn", [count_macs, count_params, layers])
def test_invalid_arch_raises(fn, arch):
    with pytest.raises(ValueError, match="Arch"):
        fn(arch, TINY)
