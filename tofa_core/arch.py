"""Architectures (`Arch`) and the search spaces they are drawn from (`SearchSpace`).

An `Arch` names one subnet of a supernet: input resolution, how many blocks each elastic
stage keeps, the kernel size and expand ratio of every kept block, and a width multiplier.
It is canonical: only kept blocks carry a kernel and an expand ratio, so two equal
networks are equal `Arch`es and hash alike (search deduplicates on that).

A `SearchSpace` holds the fixed skeleton (stem, stages, head) and the choices. Everything
that builds or measures networks (supernet, extraction, cost model) reads the skeleton from
here, so a preset is the only place a topology is written down.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import random
from dataclasses import asdict, dataclass
from typing import Any

ACTIVATIONS = ("relu", "hswish")
# mbconv: 1x1 expand -> depthwise kxk -> [SE] -> 1x1 project (MobileNetV2/V3, OFA).
# fused: dense kxk expand -> [SE] -> 1x1 project (EfficientNet-EdgeTPU/V2's Fused-MBConv); dense
# convolutions learn more per MAC than depthwise ones on the few pixels of 8-16 px inputs.
BLOCKS = ("mbconv", "fused")


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never losing more than 10%.

    The rule MobileNet and OFA use; keeping it identical keeps OFA's weights shape-compatible.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class Arch:
    """One subnet. `kernels` and `expands` hold one entry per kept block, stage by stage."""

    resolution: int
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expands: tuple[float, ...]
    width: float = 1.0

    def __post_init__(self) -> None:
        # Lists from JSON or user code become tuples so that an Arch stays hashable.
        for name in ("depths", "kernels", "expands"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def __hash__(self) -> int:  # cached: search hashes every candidate many times
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.resolution, self.depths, self.kernels, self.expands, self.width))
            object.__setattr__(self, "_hash", cached)
        return cached

    def stage_blocks(self) -> list[list[tuple[int, float]]]:
        """(kernel, expand) of each kept block, grouped by stage."""
        out, start = [], 0
        for depth in self.depths:
            out.append(list(zip(self.kernels[start : start + depth], self.expands[start : start + depth])))
            start += depth
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arch:
        if not isinstance(data, dict):
            raise ValueError(
                "an Arch is a JSON object with fields resolution, depths, kernels, expands, width; "
                f"got {data!r}"
            )
        expected = {"resolution", "depths", "kernels", "expands", "width"}
        unknown = set(data) - expected
        missing = {"resolution", "depths", "kernels", "expands"} - set(data)
        if unknown or missing:
            raise ValueError(
                f"Arch: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}; "
                f"an Arch has the fields {sorted(expected)}"
            )
        for name in ("depths", "kernels", "expands"):
            if not isinstance(data[name], (list, tuple)):
                raise ValueError(f"Arch.{name} must be a list, got {data[name]!r}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Arch:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class StageSpec:
    """One elastic stage: up to `max_depth` blocks of kind `block` with `width` output channels at w=1."""

    width: int
    max_depth: int
    stride: int
    act: str
    se: bool
    block: str = "mbconv"


# `space: auto`: the largest image side each preset is for, smallest first; above all, tiny.
# tiny-fused's first stage keeps the input size, so its cost grows with the square of the
# side; small-fused halves the side in its stem.
AUTO_SPACES = ((16, "tiny-fused"), (32, "small-fused"))


@dataclass(frozen=True)
class SearchSpace:
    """The skeleton shared by every subnet, plus the choices an `Arch` picks from.

    Skeleton: stem conv (3x3) -> first block (depthwise 3x3 + pointwise, no expansion) ->
    elastic stages of MBConv or Fused-MBConv blocks -> final 1x1 expand -> global pool ->
    1x1 feature mix -> classifier. Channel counts scale with the width multiplier except the
    feature-mix layer.
    """

    name: str
    num_classes: int
    in_channels: int
    stem_width: int
    stem_stride: int
    first_block_act: str
    stages: tuple[StageSpec, ...]
    final_expand_width: int
    feature_mix_width: int
    kernel_choices: tuple[int, ...]
    expand_choices: tuple[float, ...]
    depth_choices: tuple[int, ...]
    resolutions: tuple[int, ...]
    width_choices: tuple[float, ...] = (1.0,)
    divisor: int = 8
    se_reduction: int = 4
    dropout: float = 0.1
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5

    def __hash__(self) -> int:  # cached: every cost lookup in search hashes the space
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict:
        # String hashes differ between processes: never ship a cached hash to another one.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def __post_init__(self) -> None:
        for name in (
            "kernel_choices",
            "expand_choices",
            "depth_choices",
            "resolutions",
            "width_choices",
        ):
            object.__setattr__(self, name, tuple(sorted(getattr(self, name))))
        object.__setattr__(self, "stages", tuple(self.stages))
        if any(r < 1 for r in self.resolutions) or any(not 0 < w <= 1 for w in self.width_choices):
            raise ValueError(
                f"{self.name}: resolutions must be positive and widths in (0, 1]; "
                f"got resolutions {self.resolutions}, widths {self.width_choices}"
            )
        # The supernet holds weights for width 1.0; a base width the rounding rule would change
        # would make the largest subnet disagree with the weights it slices.
        for label, base in [
            ("stem_width", self.stem_width),
            ("final_expand_width", self.final_expand_width),
        ] + [(f"stages[{i}].width", s.width) for i, s in enumerate(self.stages)]:
            if self.channels(base, 1.0) != base:
                raise ValueError(f"{self.name}: {label}={base} must be a multiple of divisor={self.divisor}")
        if any(k % 2 == 0 for k in self.kernel_choices):
            raise ValueError(f"{self.name}: kernel sizes must be odd, got {self.kernel_choices}")
        if max(self.depth_choices) > min(s.max_depth for s in self.stages):
            raise ValueError(f"{self.name}: a depth choice exceeds a stage's max_depth")
        for s in self.stages:
            if s.act not in ACTIVATIONS:
                raise ValueError(f"{self.name}: activation {s.act!r} not in {ACTIVATIONS}")
            if s.block not in BLOCKS:
                raise ValueError(f"{self.name}: block kind {s.block!r} not in {BLOCKS}")

    # ----------------------------------------------------------------- presets

    @staticmethod
    def for_data(name: str, resolutions: tuple[int, ...], num_classes: int, in_channels: int) -> SearchSpace:
        """The preset `name` for a data set's classes, channels and input sides; `auto` picks
        by the largest side (AUTO_SPACES)."""
        if name == "auto":
            largest = max(resolutions)
            name = next((preset for side, preset in AUTO_SPACES if largest <= side), "tiny")
        return SearchSpace.preset(
            name, num_classes=num_classes, in_channels=in_channels, resolutions=resolutions
        )

    @staticmethod
    def preset(name: str, num_classes: int = 1000, in_channels: int = 3, **overrides: Any) -> SearchSpace:
        """`tiny-fused` (8-16 px inputs), `small-fused` (17-32 px), `tiny` (16-32 px, MBConv only),
        all CPU-trainable, or `ofa-mbv3` (OFA's d234 e346 k357 w1.0).

        `overrides` replace any field, e.g. `resolutions=(32,)` to run OFA's space on 32 px.
        """
        builders = {
            "tiny": _tiny,
            "tiny-fused": _tiny_fused,
            "small-fused": _small_fused,
            "ofa-mbv3": _ofa_mbv3,
        }
        if name not in builders:
            raise ValueError(f"unknown search space preset {name!r}; choose one of {sorted(builders)}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}"
            )
        fields = builders[name](num_classes, in_channels)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(SearchSpace)}
        if unknown:
            raise ValueError(f"unknown SearchSpace fields {sorted(unknown)}")
        fields.update(overrides)
        return SearchSpace(**fields)

    # ----------------------------------------------------------------- channels

    def channels(self, base: int, width: float) -> int:
        return make_divisible(base * width, self.divisor)

    def mid_channels(self, in_ch: int, expand: float) -> int:
        return make_divisible(round(in_ch * expand), self.divisor)

    def se_channels(self, mid: int) -> int:
        return make_divisible(mid // self.se_reduction, self.divisor)

    def stage_in_widths(self, width: float) -> list[int]:
        """Input channels of each stage's first block at this width."""
        widths = [self.channels(self.stem_width, width)]
        widths += [self.channels(s.width, width) for s in self.stages[:-1]]
        return widths

    # ----------------------------------------------------------------- arch helpers

    @property
    def num_blocks_max(self) -> int:
        return sum(s.max_depth for s in self.stages)

    def _build(self, rng_pick, resolution=None, width=None) -> Arch:
        depths = tuple(rng_pick(self.depth_choices) for _ in self.stages)
        n = sum(depths)
        return Arch(
            resolution=resolution if resolution is not None else rng_pick(self.resolutions),
            depths=depths,
            kernels=tuple(rng_pick(self.kernel_choices) for _ in range(n)),
            expands=tuple(rng_pick(self.expand_choices) for _ in range(n)),
            width=width if width is not None else rng_pick(self.width_choices),
        )

    def sample(self, rng: random.Random) -> Arch:
        """Uniform over each choice independently (OFA's sampler)."""
        return self._build(rng.choice)

    def max_arch(self) -> Arch:
        return self._build(max)

    def min_arch(self) -> Arch:
        return self._build(min)

    def validate(self, arch: Arch) -> Arch:
        """Raise ValueError naming the offending field and the allowed values; return `arch`."""
        if not isinstance(arch, Arch):
            raise ValueError(f"expected an Arch, got {type(arch).__name__}")
        if self._plainly_valid(arch):  # search validates tens of thousands of archs a second
            return arch

        def check(field_name: str, value: Any, allowed: tuple, integer: bool) -> None:
            # `in` alone would let 3.0 or True through (they compare equal to 3 and 1), and a
            # float kernel or depth breaks extraction far from here.
            kind = numbers.Integral if integer else numbers.Real  # numpy scalars included
            wrong_type = isinstance(value, bool) or not isinstance(value, kind)
            if wrong_type or value not in allowed:
                raise ValueError(
                    f"Arch.{field_name}={value!r} not allowed in space {self.name!r}; "
                    f"allowed: {list(allowed)}"
                )

        check("resolution", arch.resolution, self.resolutions, True)
        check("width", arch.width, self.width_choices, False)
        if len(arch.depths) != len(self.stages):
            raise ValueError(
                f"Arch.depths has {len(arch.depths)} stages; space {self.name!r} has {len(self.stages)}"
            )
        for i, d in enumerate(arch.depths):
            check(f"depths[{i}]", d, self.depth_choices, True)
        n = sum(arch.depths)
        for name, values, allowed, integer in (
            ("kernels", arch.kernels, self.kernel_choices, True),
            ("expands", arch.expands, self.expand_choices, False),
        ):
            if len(values) != n:
                raise ValueError(
                    f"Arch.{name} has {len(values)} entries; depths {list(arch.depths)} keep {n} blocks"
                )
            for i, v in enumerate(values):
                check(f"{name}[{i}]", v, allowed, integer)
        return arch

    def _plainly_valid(self, arch: Arch) -> bool:
        """Fast check for the common case: built-in ints/floats, all allowed, lengths right."""
        n = sum(arch.depths) if all(type(d) is int for d in arch.depths) else -1
        return (
            type(arch.resolution) is int
            and arch.resolution in self.resolutions
            and type(arch.width) in (int, float)
            and arch.width in self.width_choices
            and len(arch.depths) == len(self.stages)
            and all(d in self.depth_choices for d in arch.depths)
            and len(arch.kernels) == n == len(arch.expands)
            and all(type(k) is int and k in self.kernel_choices for k in arch.kernels)
            and all(type(e) in (int, float) and e in self.expand_choices for e in arch.expands)
        )

    # ----------------------------------------------------------------- evolution operators

    def _slots(self, arch: Arch) -> tuple[list[int], list[float]]:
        """Per-slot kernel/expand lists over all max-depth slots (dropped slots get max values)."""
        ks = [max(self.kernel_choices)] * self.num_blocks_max
        es = [max(self.expand_choices)] * self.num_blocks_max
        pos, start = 0, 0
        for spec, d in zip(self.stages, arch.depths):
            for j in range(d):
                ks[start + j], es[start + j] = arch.kernels[pos], arch.expands[pos]
                pos += 1
            start += spec.max_depth
        return ks, es

    def _from_slots(self, resolution: int, depths, ks, es, width: float) -> Arch:
        kernels, expands, start = [], [], 0
        for spec, d in zip(self.stages, depths):
            kernels += ks[start : start + d]
            expands += es[start : start + d]
            start += spec.max_depth
        return Arch(resolution, tuple(depths), tuple(kernels), tuple(expands), width)

    def mutate(self, arch: Arch, rng: random.Random, prob: float = 0.1) -> Arch:
        """Resample each gene (resolution, width, each depth, each slot's kernel/expand) with `prob`."""
        ks, es = self._slots(arch)
        pick = lambda cur, choices: rng.choice(choices) if rng.random() < prob else cur  # noqa: E731
        res = pick(arch.resolution, self.resolutions)
        width = pick(arch.width, self.width_choices)
        depths = [pick(d, self.depth_choices) for d in arch.depths]
        ks = [pick(k, self.kernel_choices) for k in ks]
        es = [pick(e, self.expand_choices) for e in es]
        return self._from_slots(res, depths, ks, es, width)

    def crossover(self, a: Arch, b: Arch, rng: random.Random) -> Arch:
        """Each gene from either parent with equal probability."""
        ka, ea = self._slots(a)
        kb, eb = self._slots(b)
        pick = lambda x, y: x if rng.random() < 0.5 else y  # noqa: E731
        return self._from_slots(
            pick(a.resolution, b.resolution),
            [pick(x, y) for x, y in zip(a.depths, b.depths)],
            [pick(x, y) for x, y in zip(ka, kb)],
            [pick(x, y) for x, y in zip(ea, eb)],
            pick(a.width, b.width),
        )

    def to_ofa(self, arch: Arch) -> dict[str, list]:
        """`ks`/`e`/`d` lists as OFA's `set_active_subnet` takes them (for comparison and import)."""
        ks, es = self._slots(arch)
        return {"ks": ks, "e": es, "d": list(arch.depths)}


def _tiny(num_classes: int, in_channels: int) -> dict[str, Any]:
    # Stem at stride 1: 8-32 px inputs cannot afford OFA's early downsampling.
    return dict(
        name="tiny",
        num_classes=num_classes,
        in_channels=in_channels,
        stem_width=16,
        stem_stride=1,
        first_block_act="relu",
        stages=(
            StageSpec(24, 3, 2, "relu", False),
            StageSpec(40, 3, 2, "relu", True),
            StageSpec(64, 3, 2, "hswish", False),
            StageSpec(96, 3, 1, "hswish", True),
        ),
        final_expand_width=288,
        feature_mix_width=256,
        kernel_choices=(3, 5, 7),
        expand_choices=(2, 3, 4),
        depth_choices=(1, 2, 3),
        resolutions=(16, 20, 24, 28, 32),
        width_choices=(0.5, 0.75, 1.0),
    )


def _tiny_fused(num_classes: int, in_channels: int) -> dict[str, Any]:
    # tiny for 8-16 px inputs: the first stage keeps the full input size (tiny halves it four
    # times, leaving 1x1 maps at 8 px where no kernel has neighbours to read), and Fused-MBConv
    # blocks in the first two stages, whose dense convs also train ~3x faster per MAC on a CPU.
    return _tiny(num_classes, in_channels) | dict(
        name="tiny-fused",
        stages=(
            StageSpec(16, 3, 1, "relu", False, "fused"),
            StageSpec(32, 3, 2, "relu", False, "fused"),
            StageSpec(64, 3, 2, "hswish", True, "mbconv"),
            StageSpec(96, 3, 1, "hswish", True, "mbconv"),
        ),
        kernel_choices=(3, 5),
        expand_choices=(1, 2, 3),
        resolutions=(8, 12, 16),
    )


def _small_fused(num_classes: int, in_channels: int) -> dict[str, Any]:
    # tiny-fused behind a stride-2 stem, for 17-32 px inputs: the stem's 3x3 conv reads the full
    # image, every block after it works at half the side, where tiny-fused's dense convs cost what
    # they do at 8-16 px. At 28 px a training step runs ~4x faster than tiny's (depthwise convs
    # at full size) with a largest subnet of ~25M MACs and a smallest of ~0.4M.
    return _tiny_fused(num_classes, in_channels) | dict(
        name="small-fused", stem_stride=2, resolutions=(20, 24, 28, 32)
    )


def _ofa_mbv3(num_classes: int, in_channels: int) -> dict[str, Any]:
    # OFA's MobileNetV3 space ofa_mbv3_d234_e346_k357_w1.0, layer for layer.
    return dict(
        name="ofa-mbv3",
        num_classes=num_classes,
        in_channels=in_channels,
        stem_width=16,
        stem_stride=2,
        first_block_act="relu",
        stages=(
            StageSpec(24, 4, 2, "relu", False),
            StageSpec(40, 4, 2, "relu", True),
            StageSpec(80, 4, 2, "hswish", False),
            StageSpec(112, 4, 1, "hswish", True),
            StageSpec(160, 4, 2, "hswish", True),
        ),
        final_expand_width=960,
        feature_mix_width=1280,
        kernel_choices=(3, 5, 7),
        expand_choices=(3, 4, 6),
        depth_choices=(2, 3, 4),
        resolutions=tuple(range(128, 225, 4)),
        width_choices=(1.0,),
    )
