"""Tests for tofa_core.arch: Arch serialisation, SearchSpace presets, validation and operators."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import pytest

from tofa_core.arch import Arch, SearchSpace, StageSpec, make_divisible

TINY = SearchSpace.preset("tiny", num_classes=10, in_channels=1)
OFA = SearchSpace.preset("ofa-mbv3", num_classes=10)
SPACES = {"tiny": TINY, "ofa-mbv3": OFA}


@pytest.fixture(params=sorted(SPACES))
def space(request) -> SearchSpace:
    return SPACES[request.param]


def _samples(space: SearchSpace, n: int, seed: int = 0) -> list[Arch]:
    rng = random.Random(seed)
    return [space.sample(rng) for _ in range(n)]


# ----------------------------------------------------------------- JSON round trip


def test_json_round_trip_random_archs(space):
    archs = _samples(space, 200, seed=1)
    for a in archs:
        text = a.to_json()
        b = Arch.from_json(text)
        assert b == a
        assert hash(b) == hash(a)
        assert b.to_json() == text
        assert isinstance(b.depths, tuple)
        assert isinstance(b.kernels, tuple)
        assert isinstance(b.expands, tuple)
    # The sample is not degenerate: round-tripping really exercised many different archs.
    assert len(set(archs)) > 190


def test_to_dict_uses_lists_and_json_is_sorted():
    a = TINY.max_arch()
    d = a.to_dict()
    assert d == {
        "resolution": 32,
        "depths": [3, 3, 3, 3],
        "kernels": [7] * 12,
        "expands": [4] * 12,
        "width": 1.0,
    }
    assert list(json.loads(a.to_json())) == sorted(d)


def test_lists_become_tuples_and_arch_is_hashable():
    a = Arch(16, [1, 1, 1, 1], [3, 5, 7, 3], [2, 3, 4, 2], 0.5)
    assert a.depths == (1, 1, 1, 1)
    assert a.kernels == (3, 5, 7, 3)
    assert a.expands == (2, 3, 4, 2)
    assert all(isinstance(v, tuple) for v in (a.depths, a.kernels, a.expands))
    b = Arch(16, (1, 1, 1, 1), (3, 5, 7, 3), (2, 3, 4, 2), 0.5)
    assert a == b
    assert len({a, b}) == 1
    assert Arch.from_dict(a.to_dict()) == a


def test_from_dict_width_defaults_to_one():
    d = TINY.min_arch().to_dict()
    del d["width"]
    assert Arch.from_dict(d).width == 1.0


@pytest.mark.parametrize("extra", ["depth", "ks", "bogus_field"])
def test_from_dict_unknown_field_is_named(extra):
    d = TINY.min_arch().to_dict()
    d[extra] = 1
    with pytest.raises(ValueError, match=re.escape(f"unknown fields ['{extra}']")):
        Arch.from_dict(d)


@pytest.mark.parametrize("field", ["resolution", "depths", "kernels", "expands"])
def test_from_dict_missing_field_is_named(field):
    d = TINY.min_arch().to_dict()
    del d[field]
    with pytest.raises(ValueError, match=re.escape(f"missing fields ['{field}']")):
        Arch.from_dict(d)


def test_from_json_rejects_non_json():
    with pytest.raises(ValueError):  # json.JSONDecodeError is a ValueError
        Arch.from_json("{resolution: 16")


# ----------------------------------------------------------------- validate


def _tiny_base() -> Arch:
    # depths (1, 2, 3, 1) keep 7 blocks; every kernel/expand choice appears.
    return Arch(24, (1, 2, 3, 1), (3, 5, 7, 3, 5, 7, 3), (2, 3, 4, 2, 3, 4, 2), 0.75)


INVALID_TINY = {
    "resolution": (
        replace(_tiny_base(), resolution=17),
        ["Arch.resolution=17", "[16, 20, 24, 28, 32]"],
    ),
    "resolution-ofa-value": (
        replace(_tiny_base(), resolution=224),
        ["Arch.resolution=224", "[16, 20, 24, 28, 32]"],
    ),
    "width": (replace(_tiny_base(), width=0.6), ["Arch.width=0.6", "[0.5, 0.75, 1.0]"]),
    "too-few-stages": (
        Arch(24, (1, 2, 3), (3,) * 6, (2,) * 6, 0.75),
        ["Arch.depths has 3 stages", "has 4"],
    ),
    "too-many-stages": (
        Arch(24, (1, 1, 1, 1, 1), (3,) * 5, (2,) * 5, 0.75),
        ["Arch.depths has 5 stages", "has 4"],
    ),
    "depth-too-big": (
        Arch(24, (1, 4, 3, 1), (3,) * 9, (2,) * 9, 0.75),
        ["Arch.depths[1]=4", "[1, 2, 3]"],
    ),
    "depth-zero": (
        Arch(24, (0, 2, 3, 1), (3,) * 6, (2,) * 6, 0.75),
        ["Arch.depths[0]=0", "[1, 2, 3]"],
    ),
    "kernels-too-short": (
        replace(_tiny_base(), kernels=(3,) * 6),
        ["Arch.kernels has 6 entries", "keep 7 blocks"],
    ),
    "kernels-too-long": (
        replace(_tiny_base(), kernels=(3,) * 8),
        ["Arch.kernels has 8 entries", "keep 7 blocks"],
    ),
    "kernel-even": (
        replace(_tiny_base(), kernels=(3, 5, 4, 3, 5, 7, 3)),
        ["Arch.kernels[2]=4", "[3, 5, 7]"],
    ),
    "kernel-too-big": (
        replace(_tiny_base(), kernels=(3, 5, 7, 3, 5, 7, 9)),
        ["Arch.kernels[6]=9", "[3, 5, 7]"],
    ),
    "expands-too-short": (
        replace(_tiny_base(), expands=(2,) * 6),
        ["Arch.expands has 6 entries", "keep 7 blocks"],
    ),
    "expand-value": (
        replace(_tiny_base(), expands=(2, 3, 4, 6, 3, 4, 2)),
        ["Arch.expands[3]=6", "[2, 3, 4]"],
    ),
}


@pytest.mark.parametrize("kind", sorted(INVALID_TINY))
def test_validate_rejects_and_names_field(kind):
    arch, fragments = INVALID_TINY[kind]
    with pytest.raises(ValueError) as info:
        TINY.validate(arch)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_validate_ofa_names_field_and_allowed_values():
    a = OFA.max_arch()
    with pytest.raises(ValueError, match=re.escape("Arch.expands[19]=2")) as info:
        OFA.validate(replace(a, expands=a.expands[:-1] + (2,)))
    assert "[3, 4, 6]" in str(info.value)
    with pytest.raises(ValueError, match=re.escape("Arch.resolution=130")) as info:
        OFA.validate(replace(a, resolution=130))
    assert "128, 132" in str(info.value) and "224]" in str(info.value)
    with pytest.raises(ValueError, match=re.escape("Arch.width=0.5")):
        OFA.validate(replace(a, width=0.5))
    # A tiny arch is not an ofa-mbv3 arch (4 stages instead of 5).
    with pytest.raises(ValueError, match=re.escape("Arch.resolution=32")):
        OFA.validate(TINY.max_arch())
    with pytest.raises(ValueError, match=re.escape("Arch.depths has 4 stages")):
        OFA.validate(replace(TINY.max_arch(), resolution=224))


def test_validate_rejects_non_arch():
    with pytest.raises(ValueError, match="expected an Arch, got dict"):
        TINY.validate(TINY.min_arch().to_dict())


def test_validate_returns_valid_arch(space):
    for a in [space.max_arch(), space.min_arch(), *_samples(space, 50, seed=2)]:
        assert space.validate(a) is a


def test_validate_base_arch_is_valid():
    # Guards the invalid cases above: each differs from a valid arch in one field only.
    assert TINY.validate(_tiny_base()) == _tiny_base()


def test_validate_rejects_float_kernel_and_bool_values():
    a = TINY.min_arch()
    with pytest.raises(ValueError, match=r"Arch\.kernels\[0\]=3\.0"):
        TINY.validate(replace(a, kernels=tuple(float(k) for k in a.kernels)))
    with pytest.raises(ValueError, match=r"Arch\.depths\[0\]=True"):
        TINY.validate(replace(a, depths=(True,) * 4))
    with pytest.raises(ValueError, match=r"Arch\.width=True"):
        TINY.validate(replace(TINY.max_arch(), width=True))
    with pytest.raises(ValueError, match="JSON object"):
        Arch.from_json("5")
    with pytest.raises(ValueError, match=r"Arch\.depths must be a list"):
        Arch.from_dict({"resolution": 16, "depths": 3, "kernels": [], "expands": []})


# ----------------------------------------------------------------- max / min / sample


def test_max_min_arch(space):
    hi, lo = space.max_arch(), space.min_arch()
    n = len(space.stages)
    assert hi.resolution == max(space.resolutions)
    assert hi.width == max(space.width_choices)
    assert hi.depths == (max(space.depth_choices),) * n
    assert hi.kernels == (max(space.kernel_choices),) * sum(hi.depths)
    assert hi.expands == (max(space.expand_choices),) * sum(hi.depths)
    assert lo.resolution == min(space.resolutions)
    assert lo.width == min(space.width_choices)
    assert lo.depths == (min(space.depth_choices),) * n
    assert lo.kernels == (min(space.kernel_choices),) * sum(lo.depths)
    assert lo.expands == (min(space.expand_choices),) * sum(lo.depths)
    assert space.validate(hi) is hi and space.validate(lo) is lo


def test_tiny_max_min_concrete():
    assert TINY.max_arch() == Arch(32, (3, 3, 3, 3), (7,) * 12, (4,) * 12, 1.0)
    assert TINY.min_arch() == Arch(16, (1, 1, 1, 1), (3,) * 4, (2,) * 4, 0.5)


def test_sample_valid_reproducible_and_covering(space):
    archs = _samples(space, 300, seed=0)
    assert archs == _samples(space, 300, seed=0)
    assert archs != _samples(space, 300, seed=1)
    for a in archs:
        space.validate(a)
        assert len(a.kernels) == len(a.expands) == sum(a.depths)
    assert {k for a in archs for k in a.kernels} == set(space.kernel_choices)
    assert {e for a in archs for e in a.expands} == set(space.expand_choices)
    assert {d for a in archs for d in a.depths} == set(space.depth_choices)
    assert {a.resolution for a in archs} == set(space.resolutions)
    assert {a.width for a in archs} == set(space.width_choices)
    assert len(set(archs)) == 300


def test_stage_blocks_groups_by_depth():
    a = _tiny_base()
    assert a.stage_blocks() == [
        [(3, 2)],
        [(5, 3), (7, 4)],
        [(3, 2), (5, 3), (7, 4)],
        [(3, 2)],
    ]


# ----------------------------------------------------------------- mutate / crossover


def test_mutate_prob_zero_is_identity(space):
    rng = random.Random(3)
    for a in [space.min_arch(), space.max_arch(), *_samples(space, 50, seed=4)]:
        b = space.mutate(a, rng, prob=0.0)
        assert b == a


def test_mutate_prob_one_changes_and_stays_valid(space):
    rng = random.Random(5)
    parents = _samples(space, 200, seed=6)
    children = [space.mutate(a, rng, prob=1.0) for a in parents]
    for c in children:
        space.validate(c)
    changed = sum(c != a for a, c in zip(parents, children, strict=True))
    assert changed >= 190
    # Resampling is over the whole space: depths and kernels take every value.
    assert {d for c in children for d in c.depths} == set(space.depth_choices)
    assert {k for c in children for k in c.kernels} == set(space.kernel_choices)


def test_mutate_small_prob_changes_few_genes():
    rng = random.Random(7)
    a = OFA.max_arch()
    children = [OFA.mutate(a, rng, prob=0.1) for _ in range(100)]
    for c in children:
        OFA.validate(c)
    # Per kept slot, about 10% resample and 2/3 of those land on another value.
    slot_changes = [
        sum(x != y for x, y in zip(OFA.to_ofa(c)["ks"], OFA.to_ofa(a)["ks"], strict=True)) for c in children
    ]
    mean = sum(slot_changes) / len(slot_changes)
    assert 0.5 < mean < 3.0
    assert sum(c != a for c in children) > 50


def test_mutate_is_reproducible(space):
    a = space.max_arch()
    r1, r2 = random.Random(11), random.Random(11)
    assert [space.mutate(a, r1, 0.3) for _ in range(20)] == [space.mutate(a, r2, 0.3) for _ in range(20)]


def test_crossover_genes_come_from_parents(space):
    rng = random.Random(8)
    pa = _samples(space, 100, seed=9)
    pb = _samples(space, 100, seed=10)
    res_from_a = res_from_b = 0
    for a, b in zip(pa, pb, strict=True):
        c = space.crossover(a, b, rng)
        space.validate(c)
        assert c.resolution in (a.resolution, b.resolution)
        assert c.width in (a.width, b.width)
        for i, d in enumerate(c.depths):
            assert d in (a.depths[i], b.depths[i])
        oa, ob, oc = space.to_ofa(a), space.to_ofa(b), space.to_ofa(c)
        start = 0
        for spec, d in zip(space.stages, c.depths, strict=True):
            for slot in range(start, start + d):
                assert oc["ks"][slot] in (oa["ks"][slot], ob["ks"][slot])
                assert oc["e"][slot] in (oa["e"][slot], ob["e"][slot])
            start += spec.max_depth
        res_from_a += c.resolution == a.resolution != b.resolution
        res_from_b += c.resolution == b.resolution != a.resolution
    # Both parents contribute; the choice is not stuck on one side.
    assert res_from_a > 10 and res_from_b > 10


def test_crossover_with_itself_is_identity(space):
    rng = random.Random(12)
    for a in [space.min_arch(), space.max_arch(), *_samples(space, 30, seed=13)]:
        assert space.crossover(a, a, rng) == a


def test_crossover_of_min_and_max_mixes():
    rng = random.Random(14)
    lo, hi = TINY.min_arch(), TINY.max_arch()
    children = {TINY.crossover(lo, hi, rng) for _ in range(50)}
    assert len(children) > 40
    assert all(TINY.validate(c) for c in children)


# ----------------------------------------------------------------- OFA preset


def test_ofa_preset_is_ofa_space():
    s = OFA
    assert s.name == "ofa-mbv3"
    assert s.num_classes == 10 and s.in_channels == 3
    assert s.stem_width == 16 and s.stem_stride == 2 and s.first_block_act == "relu"
    assert len(s.stages) == 5
    assert [st.max_depth for st in s.stages] == [4] * 5
    assert tuple(st.width for st in s.stages) == (24, 40, 80, 112, 160)
    assert tuple(st.stride for st in s.stages) == (2, 2, 2, 1, 2)
    assert tuple(st.se for st in s.stages) == (False, True, False, True, True)
    assert tuple(st.act for st in s.stages) == ("relu", "relu", "hswish", "hswish", "hswish")
    assert s.kernel_choices == (3, 5, 7)
    assert s.expand_choices == (3, 4, 6)
    assert s.depth_choices == (2, 3, 4)
    assert s.width_choices == (1.0,)
    assert s.final_expand_width == 960
    assert s.feature_mix_width == 1280
    assert s.resolutions == tuple(range(128, 225, 4))
    assert s.num_blocks_max == 20
    assert s.stage_in_widths(1.0) == [16, 24, 40, 80, 112]


def test_ofa_preset_defaults_to_imagenet():
    s = SearchSpace.preset("ofa-mbv3")
    assert s.num_classes == 1000 and s.in_channels == 3


def test_to_ofa_shapes_and_values():
    hi = OFA.max_arch()
    assert OFA.to_ofa(hi) == {"ks": [7] * 20, "e": [6] * 20, "d": [4] * 5}
    lo = OFA.min_arch()
    o = OFA.to_ofa(lo)
    assert len(o["ks"]) == 20 and len(o["e"]) == 20 and o["d"] == [2] * 5
    for stage in range(5):
        assert o["ks"][4 * stage : 4 * stage + 2] == [3, 3]
        assert o["e"][4 * stage : 4 * stage + 2] == [3, 3]
    for a in _samples(OFA, 50, seed=15):
        o = OFA.to_ofa(a)
        assert len(o["ks"]) == 20 and len(o["e"]) == 20 and len(o["d"]) == 5
        assert o["d"] == list(a.depths)
        for stage, blocks in enumerate(a.stage_blocks()):
            for j, (k, e) in enumerate(blocks):
                assert o["ks"][4 * stage + j] == k
                assert o["e"][4 * stage + j] == e


# ----------------------------------------------------------------- presets and overrides


def test_tiny_preset_values():
    s = TINY
    assert s.in_channels == 1 and s.num_classes == 10
    assert s.stem_stride == 1
    assert s.resolutions == (16, 20, 24, 28, 32)
    assert s.width_choices == (0.5, 0.75, 1.0)
    assert [st.max_depth for st in s.stages] == [3] * 4


def test_tiny_fused_preset_values():
    s = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1)
    assert s.resolutions == (8, 12, 16) and s.stem_stride == 1
    assert [(st.block, st.stride) for st in s.stages] == [
        ("fused", 1),
        ("fused", 2),
        ("mbconv", 2),
        ("mbconv", 1),
    ]
    # Stage strides 1, 2, 2, 1: an 8 px input still has 2x2 maps in the last stage.
    assert s.max_arch().resolution == 16 and s.min_arch().resolution == 8


def test_preset_unknown_name():
    with pytest.raises(ValueError, match="unknown search space preset 'bogus'") as info:
        SearchSpace.preset("bogus")
    assert "ofa-mbv3" in str(info.value) and "tiny" in str(info.value)


def test_preset_unknown_override_named():
    with pytest.raises(ValueError, match=re.escape("unknown SearchSpace fields ['kernels']")):
        SearchSpace.preset("tiny", kernels=(3,))


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}])
def test_preset_rejects_non_positive_sizes(kwargs):
    with pytest.raises(ValueError, match="must be positive"):
        SearchSpace.preset("tiny", **kwargs)


def test_preset_override_resolutions():
    s = SearchSpace.preset("ofa-mbv3", num_classes=10, resolutions=(32,))
    assert s.resolutions == (32,)
    assert s.max_arch().resolution == 32 and s.min_arch().resolution == 32
    assert s.stages == OFA.stages
    with pytest.raises(ValueError, match="Arch.resolution=224"):
        s.validate(OFA.max_arch())
    # Overrides are sorted like every other choice tuple.
    assert SearchSpace.preset("tiny", resolutions=(32, 16, 24)).resolutions == (16, 24, 32)


def test_preset_override_checked():
    with pytest.raises(ValueError, match="kernel sizes must be odd"):
        SearchSpace.preset("tiny", kernel_choices=(3, 4))
    with pytest.raises(ValueError, match="depth choice exceeds"):
        SearchSpace.preset("tiny", depth_choices=(1, 2, 3, 4))
    bad_act = (StageSpec(24, 3, 2, "gelu", False),)
    with pytest.raises(ValueError, match="activation 'gelu'"):
        SearchSpace.preset("tiny", stages=bad_act)
    with pytest.raises(ValueError, match="block kind 'resnet'"):
        SearchSpace.preset("tiny", stages=(StageSpec(24, 3, 2, "relu", False, "resnet"),))


def test_spaces_are_hashable_and_comparable():
    assert SearchSpace.preset("tiny", num_classes=10, in_channels=1) == TINY
    assert hash(SearchSpace.preset("tiny", num_classes=10, in_channels=1)) == hash(TINY)
    assert SearchSpace.preset("tiny", num_classes=11, in_channels=1) != TINY


# ----------------------------------------------------------------- channels


@pytest.mark.parametrize(
    ("value", "divisor", "expected"),
    [
        (16 * 6, 8, 96),
        (40 * 4, 8, 160),
        (12, 8, 16),
        (8, 8, 8),
        (1, 8, 8),
        (0.5, 8, 8),
        (100, 8, 104),
        (24 * 0.75, 8, 24),  # 18 -> 16 would lose over 10%, so 24
        (20, 8, 24),  # a tie rounds up
        (91, 8, 88),  # 88 >= 0.9 * 91: rounding down is allowed
        (10, 16, 16),
        (3, 1, 3),
    ],
)
def test_make_divisible(value, divisor, expected):
    assert make_divisible(value, divisor) == expected


def test_make_divisible_invariants():
    for v in range(1, 2000):
        for div in (4, 8, 16):
            r = make_divisible(v, div)
            assert r % div == 0
            assert r >= div
            assert r >= 0.9 * v


def test_channel_helpers():
    assert TINY.channels(16, 0.5) == 8
    assert TINY.channels(16, 0.75) == 16
    assert TINY.mid_channels(24, 4) == 96
    assert OFA.mid_channels(40, 6) == 240
    assert OFA.se_channels(240) == 64
    assert TINY.stage_in_widths(0.5) == [8, 16, 24, 32]


@pytest.mark.parametrize(
    "override,field",
    [
        ({"width_choices": (0.5, 1.25)}, "widths"),
        ({"stem_width": 12}, "stem_width=12"),
        ({"resolutions": (0, 16)}, "resolutions must be positive"),
    ],
)
def test_preset_rejects_overrides_the_supernet_cannot_honour(override, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        SearchSpace.preset("tiny", num_classes=10, in_channels=1, **override)


def test_preset_accepts_any_space_field_and_numpy_scalars():
    import numpy as np

    space = SearchSpace.preset("ofa-mbv3", num_classes=10, dropout=0.0, bn_eps=1e-3)
    assert space.dropout == 0.0 and space.bn_eps == 1e-3
    arch = space.max_arch()
    as_numpy = replace(
        arch, resolution=np.int64(arch.resolution), kernels=tuple(np.int64(k) for k in arch.kernels)
    )
    assert space.validate(as_numpy) is as_numpy
