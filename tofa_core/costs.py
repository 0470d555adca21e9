"""Analytic cost model of a subnet: its layers, MACs and parameter count.

`layers(arch, space)` lists every weighted layer of the extracted network with its shape
and input size; MACs and parameters are sums over it, and a per-device latency table
(`LatencyTable`) sums measured per-block latencies over the same list grouped into blocks,
so all three costs share one description of the network. Search calls these tens of thousands of
times, so the totals are cached per (arch, space); both are frozen and hashable.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
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


class Block(NamedTuple):
    """Consecutive layers that a latency table times as one unit, with their totals."""

    name: str
    layers: tuple[LayerSpec, ...]
    out_size: int
    macs: int
    params: int
    key: str  # latency-table key: every layer's key


def _block(name: str, specs: list[LayerSpec], out_size: int) -> Block:
    specs = tuple(specs)
    macs, params = sum(s.macs for s in specs), sum(s.params for s in specs)
    return Block(name, specs, out_size, macs, params, "|".join(s.key for s in specs))


# Search prices tens of thousands of archs a second; they share a few hundred distinct blocks,
# so blocks are built once per shape and an arch's costs are sums over ~15 cached blocks.
@lru_cache(maxsize=1 << 14)
def _mbconv(name, space, size, cin, cout, kernel, expand, stride, act, se, has_expand, fused=False) -> Block:
    mid = space.mid_channels(cin, expand) if has_expand or fused else cin
    out = []
    if fused:
        out.append(LayerSpec(f"{name}.expand", "conv", cin, mid, kernel, stride, size, act))
    else:
        if has_expand:
            out.append(LayerSpec(f"{name}.expand", "conv", cin, mid, 1, 1, size, act))
        out.append(LayerSpec(f"{name}.depthwise", "dwconv", mid, mid, kernel, stride, size, act))
    size = out[-1].out_size
    if se:
        out.append(LayerSpec(f"{name}.se", "se", mid, space.se_channels(mid)))
    out.append(LayerSpec(f"{name}.project", "conv", mid, cout, 1, 1, size))
    return _block(name, out, size)


@lru_cache(maxsize=1 << 10)
def _stem(space: SearchSpace, resolution: int, width: float) -> Block:
    """The stem convolution and the fixed first block, timed together as `stem`."""
    stem = space.channels(space.stem_width, width)
    conv = LayerSpec("stem", "conv", space.in_channels, stem, 3, space.stem_stride, resolution, "hswish")
    first = _mbconv(
        "first_block", space, conv.out_size, stem, stem, 3, 1, 1, space.first_block_act, False, False
    )
    return _block("stem", [conv, *first.layers], first.out_size)


@lru_cache(maxsize=1 << 10)
def _head(space: SearchSpace, cin: int, size: int, width: float) -> Block:
    """Final expand, global pooling, feature mix and classifier, timed together as `head`."""
    final = space.channels(space.final_expand_width, width)
    specs = [
        LayerSpec("final_expand", "conv", cin, final, 1, 1, size, "hswish"),
        LayerSpec("feature_mix", "linear", final, space.feature_mix_width, act="hswish"),
        LayerSpec("classifier", "linear", space.feature_mix_width, space.num_classes, bias=True),
    ]
    return _block("head", specs, size)


@lru_cache(maxsize=64)
def _stage_plan(
    space: SearchSpace, width: float
) -> tuple[tuple[int, int, str, bool, bool, tuple[str, ...]], ...]:
    """Per stage: output channels at `width`, stride, activation, SE, fused, and its block names."""
    return tuple(
        (
            space.channels(spec.width, width),
            spec.stride,
            spec.act,
            spec.se,
            spec.block == "fused",
            tuple(f"stages.{i}.{j}" for j in range(spec.max_depth)),
        )
        for i, spec in enumerate(space.stages)
    )


@lru_cache(maxsize=1 << 16)
def arch_blocks(arch: Arch, space: SearchSpace) -> tuple[Block, ...]:
    """The stem, every (Fused-)MBConv block `stages.i.j` and the head of `arch`, in forward order."""
    space.validate(arch)
    out = [_stem(space, arch.resolution, arch.width)]
    size, cin = out[0].out_size, space.channels(space.stem_width, arch.width)
    pos = 0
    for (cout, stride, act, se, fused, names), depth in zip(_stage_plan(space, arch.width), arch.depths):
        for j in range(depth):
            k, e = arch.kernels[pos], arch.expands[pos]
            s = stride if j == 0 else 1
            block = _mbconv(names[j], space, size, cin, cout, k, e, s, act, se, True, fused)
            out.append(block)
            size, cin, pos = block.out_size, cout, pos + 1
    out.append(_head(space, cin, size, arch.width))
    return tuple(out)


def layers(arch: Arch, space: SearchSpace) -> list[LayerSpec]:
    """Every weighted layer of `arch` in forward order, as `Supernet.extract(arch)` builds it."""
    return [spec for block in arch_blocks(arch, space) for spec in block.layers]


@lru_cache(maxsize=1 << 16)
def _totals(arch: Arch, space: SearchSpace) -> tuple[int, int]:
    found = arch_blocks(arch, space)
    return sum(b.macs for b in found), sum(b.params for b in found)


def count_macs(arch: Arch, space: SearchSpace) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and linears)."""
    return _totals(arch, space)[0]


def count_params(arch: Arch, space: SearchSpace) -> int:
    """Parameters of the extracted network, exactly `sum(p.numel() for p in net.parameters())`."""
    return _totals(arch, space)[1]


def blocks(arch: Arch, space: SearchSpace) -> list[tuple[str, str]]:
    """`(block name, latency-table key)` per block of `arch`, in forward order."""
    return [(b.name, b.key) for b in arch_blocks(arch, space)]


class LatencyModel(Protocol):
    """What search needs from a latency predictor; per-device lookup tables implement it."""

    device: str

    def latency_ms(self, arch: Arch, space: SearchSpace) -> float: ...


def profile_command(device: str, space: SearchSpace) -> str:
    """The `tofa profile-latency` command line that covers every block of `space`."""
    resolutions = ",".join(str(r) for r in space.resolutions)
    return (
        f"tofa profile-latency --device {device} --space {space.name} --num-classes {space.num_classes} "
        f"--in-channels {space.in_channels} --resolutions {resolutions}"
    )


def folded_params(arch: Arch, space: SearchSpace) -> int:
    """Parameters once BatchNorm is folded into the convolutions (what an ONNX export holds):
    each conv's BN weight and bias (2 per channel) become one conv bias per channel."""
    return count_params(arch, space) - sum(
        s.cout for s in layers(arch, space) if s.kind in ("conv", "dwconv")
    )


class LatencyTableError(ValueError):
    """A latency table is unreadable or lacks a block an architecture needs."""


class LatencyTable:
    """Measured per-block latencies of one device: an arch's latency is
    `overhead_ms + scale * (sum of its blocks' entries)`.

    Entries are timed block by block; `overhead_ms` (one inference call's fixed cost) and
    `scale` (what whole networks add or save over their blocks timed alone: cache reuse,
    memory arena, fused boundaries) are fitted on a few whole subnets timed end to end.

    Built by `tofa_core.profiler.profile_latency` on the device itself and stored as JSON,
    so a table measured once on a phone or a board serves searches on any machine.
    """

    def __init__(
        self,
        device: str,
        entries: dict[str, float],
        overhead_ms: float,
        meta: dict | None = None,
        scale: float = 1.0,
    ):
        self.device = device
        self.entries = dict(entries)
        self.overhead_ms = overhead_ms
        self.scale = scale
        self.meta = dict(meta or {})
        self._cache: dict[tuple[Arch, SearchSpace], float] = {}

    def latency_ms(self, arch: Arch, space: SearchSpace) -> float:
        hit = self._cache.get((arch, space))
        if hit is None:
            hit = self._cache[(arch, space)] = self.overhead_ms + self.scale * self.block_sum(arch, space)
        return hit

    def block_sum(self, arch: Arch, space: SearchSpace) -> float:
        """The sum of `arch`'s block entries (before overhead and scale)."""
        total = 0.0
        for name, key in blocks(arch, space):
            entry = self.entries.get(key)
            if entry is None:
                raise LatencyTableError(
                    f"latency table {self.device!r} has no entry for block {name} of {arch.to_json()} "
                    f"(key {key}); on that device, run `{profile_command(self.device, space)}`"
                )
            total += entry
        return total

    def missing(self, keys) -> list[str]:
        return sorted(set(keys) - set(self.entries))

    def to_json(self) -> str:
        data = {
            "device": self.device,
            "overhead_ms": self.overhead_ms,
            "scale": self.scale,
            "meta": self.meta,
            "entries": self.entries,
        }
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "latency table") -> LatencyTable:
        try:
            data = json.loads(text)
            entries = {str(k): float(v) for k, v in data["entries"].items()}
            scale = float(data.get("scale", 1.0))
            return cls(str(data["device"]), entries, float(data["overhead_ms"]), data.get("meta"), scale)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LatencyTableError(
                f"{where} is not a latency table (JSON with device, overhead_ms, entries): {err}"
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise LatencyTableError(f"cannot read latency table {path}: {err.strerror}") from None
        return cls.from_json(text, str(path))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)


# ----------------------------------------------------------------- memory: RAM and flash

ELEMENT_BYTES = {"fp32": 4, "int8": 1}
# The memory models price a file: the ONNX file at a precision (fp32, int8), or a LiteRT file
# (tflite, tflite-int8), which a target that ships one must fit too. Its element size:
ELEMENT_PRECISION = {"fp32": "fp32", "int8": "int8", "tflite": "fp32", "tflite-int8": "int8"}


def _residual(block: Block, space: SearchSpace) -> bool:
    """Whether a block adds its input to its output (stride 1 and, at full width, in == out)."""
    if block.name == "stem":
        return True  # the fixed first block: stem width in and out, stride 1
    if not block.name.startswith("stages."):
        return False
    stage, index = (int(p) for p in block.name.split(".")[1:3])
    if index:
        return True
    before = space.stages[stage - 1].width if stage else space.stem_width
    return space.stages[stage].stride == 1 and before == space.stages[stage].width


def _block_peak(block: Block, x: int, residual: bool) -> tuple[int, int]:
    """(peak elements alive inside `block`, its output elements) for an input of `x` elements.

    The runtime model `quantize.peak_activation_bytes` measures on the graph: an op's input and
    output are alive while it runs, activations and the SE's scale work in place, a residual
    block holds its input until the add, which writes in place."""
    specs, peak = list(block.layers), 0
    if block.name == "head":  # final 1x1 conv, global pool, then linears on the pooled vector
        final = specs[0]
        out = final.cout * final.out_size**2
        peak = max([x + out, out + final.cout] + [s.cin + s.cout for s in specs[1:]])
        return peak, specs[-1].cout
    if block.name == "stem":  # the stem conv, then the fixed first block
        stem = specs.pop(0)
        peak = x + stem.cout * stem.out_size**2
        x = stem.cout * stem.out_size**2
    skip, held = (x if residual else 0), 0
    for spec in specs:
        if spec.kind == "se":  # pool (cin) -> reduce (cout) -> expand (cin) -> scale x in place
            peak = max(peak, x + spec.cin + spec.cout + held)
            continue
        out = spec.cout * spec.out_size**2
        peak = max(peak, x + out + held)
        x, held = out, skip  # after the first op the block input is only held for the add
    return max(peak, x + skip), x


def peak_ram_bytes(arch: Arch, space: SearchSpace, precision: str = "fp32") -> int:
    """Peak bytes of activations alive at once for one image, in forward order at `precision`:
    the ONNX graph's (fp32, int8), or the LiteRT file's (tflite, tflite-int8: `_litert_block_peak`)."""
    x = space.in_channels * arch.resolution**2
    peak, litert_file = x, precision.startswith("tflite")
    for block in arch_blocks(arch, space):
        if litert_file:
            inside, x = _litert_block_peak(block, x, _residual(block, space))
        else:
            inside, x = _block_peak(block, x, _residual(block, space))
        peak = max(peak, inside)
    return peak * ELEMENT_BYTES[ELEMENT_PRECISION[precision]]


def deployed_ram_bytes(arch: Arch, space: SearchSpace, precision: str = "fp32") -> int:
    """The most RAM a file the target deploys at `precision` needs: for a LiteRT format, that
    file or the ONNX file at its precision (both are verified against the budget), else the
    ONNX file."""
    return max(peak_ram_bytes(arch, space, p) for p in {precision, ELEMENT_PRECISION[precision]})


# A LiteRT file's RAM is what `litert.peak_activation_bytes` measures on it: the input and every
# op output alive from its producer to its last reader; no op works in place. Over the ONNX graph
# (`_block_peak`) litert-torch's conversion adds, in op order:
#   - RESHAPE (one input channel) or TRANSPOSE of the NCHW input to NHWC, a copy of the input;
#   - PAD before a strided conv whose padding (k // 2 each side) is not TFLite's SAME padding
#     (stride 2 on an even side), the padded input, then a VALID conv;
#   - HARD_SWISH as an op of its own (ReLU fuses into the conv; hard sigmoid into the SE's
#     expand linear, plus a MUL by 1/6);
#   - TRANSPOSE back to NCHW before each global pool (MEAN over the channels-first axes), a
#     copy of the feature map, in every SE and in the head;
#   - the SE's scale (MUL) and the residual ADD into new tensors.
# The int8 file has the same ops on int8 tensors (int8 input and output, no QUANTIZE ops).
# Checked op by op and on the peak against converted files (benchmarks/bench_litert_ram.py).


class _OpOrder:
    """A block's tensors in op order: tensor 0 the block's input, tensor i the output of op i."""

    def __init__(self, x: int):
        self.sizes, self.reads = [x], [()]

    def op(self, size: int, *reads: int) -> int:
        self.sizes.append(size)
        self.reads.append(reads)
        return len(self.sizes) - 1

    def peak(self) -> int:
        """Largest sum of tensors alive at an op: each from its producer (the input: the first
        op) to its last reader (the block's output: read in the next block, counted there)."""
        last = list(range(len(self.sizes)))
        for step, reads in enumerate(self.reads):
            for t in reads:
                last[t] = max(last[t], step)
        return max(
            sum(size for t, size in enumerate(self.sizes) if t <= step <= last[t])
            for step in range(1, len(self.sizes))
        )


def _explicit_pad(spec: LayerSpec) -> bool:
    """Whether the converter writes PAD before this conv: TFLite's SAME padding puts the extra
    pixel after, torch pads k // 2 on both sides; they differ where the stride does not divide
    the padded span evenly (stride 2 on an even side)."""
    total = max((spec.out_size - 1) * spec.stride + spec.kernel - spec.in_size, 0)
    return (total // 2, total - total // 2) != (spec.kernel // 2, spec.kernel // 2)


def _litert_conv(graph: _OpOrder, spec: LayerSpec, t: int) -> int:
    """[PAD to torch's padding], the conv (ReLU fused), [HARD_SWISH]: the tensor it ends in."""
    if _explicit_pad(spec):
        t = graph.op(spec.cin * (spec.in_size + spec.kernel // 2 * 2) ** 2, t)
    t = graph.op(spec.cout * spec.out_size**2, t)
    return graph.op(graph.sizes[t], t) if spec.act == "hswish" else t


def _litert_pool(graph: _OpOrder, t: int, channels: int) -> int:
    """TRANSPOSE to NCHW, MEAN over the spatial axes."""
    return graph.op(channels, graph.op(graph.sizes[t], t))


def _litert_se(graph: _OpOrder, spec: LayerSpec, t: int) -> int:
    """Pool, reduce (ReLU fused), expand (+3, ReLU6 fused), MUL by 1/6, MUL into the input."""
    s = graph.op(spec.cout, _litert_pool(graph, t, spec.cin))
    s = graph.op(spec.cin, graph.op(spec.cin, s))
    return graph.op(graph.sizes[t], t, s)


def _litert_head(graph: _OpOrder, specs: tuple[LayerSpec, ...]) -> int:
    final, mix, classifier = specs
    t = _litert_pool(graph, _litert_conv(graph, final, 0), final.cout)
    t = graph.op(mix.cout, t)
    return graph.op(classifier.cout, graph.op(mix.cout, t))  # HARD_SWISH, classifier


@lru_cache(maxsize=1 << 14)
def _litert_block_peak(block: Block, x: int, residual: bool) -> tuple[int, int]:
    """(peak elements alive inside `block` in the LiteRT file, its output elements) for an
    input of `x` elements."""
    graph, specs = _OpOrder(x), list(block.layers)
    if block.name == "head":
        out = _litert_head(graph, block.layers)
        return graph.peak(), graph.sizes[out]
    t = 0
    if block.name == "stem":  # the NCHW input to NHWC, the stem conv, then the first block
        t = _litert_conv(graph, specs.pop(0), graph.op(x, 0))
    start = t
    for spec in specs:
        t = _litert_se(graph, spec, t) if spec.kind == "se" else _litert_conv(graph, spec, t)
    if residual:
        t = graph.op(graph.sizes[t], start, t)
    return graph.peak(), graph.sizes[t]


# Bytes of an exported ONNX file beyond its weights, fitted on 18 random subnets of tiny-fused,
# small-fused and tiny (worst error 0.6% in fp32, 1.4% in int8; `benchmarks/bench_edge.py`
# prints it for the default targets): per layer the graph's nodes and shapes (in int8 also the
# Quantize/Dequantize pairs), per output channel the int8 bias and the weight's scale and zero
# point. The verifier measures the file itself; this is what search prices candidates with.
# LiteRT files (tensor names stripped), fitted the same way on 18 random subnets of the three
# presets (worst error 0.2% float, 3.0% int8): per layer its tensors' metadata, per output
# channel in int8 an int64 zero point, a float scale and an int32 bias.
FLASH_FIT = {
    "fp32": {"per_param": 4.0, "per_channel": 0.0, "per_layer": 528.0, "constant": -1164.0},
    "int8": {"per_param": 1.0, "per_channel": 20.5, "per_layer": 639.0, "constant": 491.0},
    "tflite": {"per_param": 4.0, "per_channel": -3.5, "per_layer": 368.0, "constant": 2257.0},
    "tflite-int8": {"per_param": 1.0, "per_channel": 35.2, "per_layer": 854.0, "constant": -15256.0},
}


def deployed_flash_bytes(arch: Arch, space: SearchSpace, precision: str = "fp32") -> int:
    """The largest file a target deploys at `precision`: for a LiteRT format, that file or the
    ONNX file at its precision (both ship, both must fit), else the ONNX file."""
    return max(flash_bytes(arch, space, p) for p in {precision, ELEMENT_PRECISION[precision]})


def flash_bytes(arch: Arch, space: SearchSpace, precision: str = "fp32") -> int:
    """Bytes of the exported file at `precision`: the ONNX file (fp32, int8: BatchNorm folded;
    int8 QDQ, compact names), or the LiteRT file (tflite, tflite-int8)."""
    fit, specs = FLASH_FIT[precision], layers(arch, space)
    channels = sum(s.cout for s in specs if s.kind != "se")
    return round(
        fit["per_param"] * folded_params(arch, space)
        + fit["per_channel"] * channels
        + fit["per_layer"] * len(specs)
        + fit["constant"]
    )
