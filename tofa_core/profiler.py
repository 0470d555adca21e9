"""Build a device's latency table: every block shape of a search space, timed by ONNX Runtime.

Run it once on the device (`tofa profile-latency --device NAME`); the JSON it writes lets a
search on any machine predict that device's latency as a sum of table entries. Each block is
exported on its own with random weights (run time does not depend on the values), run at
batch 1 after warm-up in several fresh sessions, and the median of their medians minus one
call's fixed overhead is its entry.
A whole network's latency is then an offset plus a scale times the sum of its entries, both
fitted on a dozen whole subnets timed end to end (see `fit_whole_networks`).
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tofa_core import onnx_runtime
from tofa_core.arch import Arch, SearchSpace
from tofa_core.costs import LatencyTable, blocks
from tofa_core.supernet import Supernet
from tofa_core.supernet.static import StaticNet

log = logging.getLogger(__name__)


class Head(nn.Module):
    """The network after the last block: final expand, global pool, feature mix, classifier."""

    def __init__(self, net: StaticNet):
        super().__init__()
        self.final_expand, self.feature_mix, self.classifier = (
            net.final_expand,
            net.feature_mix,
            net.classifier,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.hardswish(self.feature_mix(self.final_expand(x).mean((2, 3))))
        return self.classifier(x)


def block_modules(net: StaticNet, arch: Arch, space: SearchSpace) -> list[tuple[str, str, nn.Module, tuple]]:
    """(name, key, module, input shape) per block of an extracted subnet, in forward order."""
    named = blocks(arch, space)
    stage_blocks = list(net.blocks)[1:]
    modules = [nn.Sequential(net.stem, net.blocks[0]), *stage_blocks, Head(net)]
    out = []
    x = torch.zeros(1, space.in_channels, arch.resolution, arch.resolution)
    with torch.no_grad():
        for (name, key), module in zip(named, modules, strict=True):
            out.append((name, key, module.eval(), tuple(x.shape)))
            x = module(x)
    return out


def covering_archs(space: SearchSpace) -> list[Arch]:
    """Archs that together contain every block shape of the space.

    A block's shape depends on resolution and width (through its input size and channels),
    its kernel and expand ratio, and whether it opens its stage; so the deepest arch with one
    kernel and expand everywhere, for every (resolution, width, kernel, expand), covers all.
    """
    n = space.num_blocks_max
    depths = tuple(s.max_depth for s in space.stages)
    return [
        Arch(r, depths, (k,) * n, (e,) * n, w)
        for r, w, k, e in itertools.product(
            space.resolutions, space.width_choices, space.kernel_choices, space.expand_choices
        )
    ]


def profile_latency(
    space: SearchSpace,
    device: str,
    *,
    threads: int = 1,
    sessions: int = 5,
    repeats: int = 30,
    known: LatencyTable | None = None,
    fit_archs: int = 12,
    progress: Callable[[int, int], None] | None = None,
) -> LatencyTable:
    """Measure every block of `space` on this machine; entries already in `known` are kept."""
    with torch.random.fork_rng():  # random weights (latency does not depend on them), caller's RNG untouched
        torch.manual_seed(0)
        net = Supernet(space, channels_last=False)
    entries = dict(known.entries) if known else {}
    todo: list[tuple[str, nn.Module, tuple]] = []
    seen = set(entries)
    for arch in covering_archs(space):
        static = net.extract(arch)
        for _, key, module, shape in block_modules(static, arch, space):
            if key not in seen:
                seen.add(key)
                todo.append((key, module, shape))
    overhead_shape = (1, space.in_channels, min(space.resolutions), min(space.resolutions))
    overhead_x = np.zeros(overhead_shape, np.float32)
    overhead = onnx_runtime.model_latency_ms(
        onnx_runtime.trivial_model(overhead_shape), overhead_x, threads, sessions, repeats
    )
    started = time.perf_counter()
    for i, (key, module, shape) in enumerate(todo):
        x = torch.randn(shape)
        model = onnx_runtime.onnx_bytes(module, x, dynamic_batch=False)
        measured = onnx_runtime.model_latency_ms(model, x.numpy(), threads, sessions, repeats)
        entries[key] = max(measured - overhead, 0.0)
        if progress is not None:
            progress(i + 1, len(todo))
    log.info("profiled %d blocks in %.1f s", len(todo), time.perf_counter() - started)
    table = LatencyTable(device, entries, overhead)
    fit = fit_whole_networks(table, net, space, threads=threads, archs=fit_archs)
    meta = {
        "threads": threads,
        "repeats": repeats,
        "sessions": sessions,
        "host": platform.node(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "onnxruntime": onnx_runtime.ort.__version__,
        "space": space.name,
        "resolutions": list(space.resolutions),
        "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fit": fit,
    }
    return LatencyTable(device, entries, fit["overhead_ms"], meta, fit["scale"])


def needed_blocks(space: SearchSpace) -> set:
    """The block shapes a latency table must hold to price every subnet of `space`."""
    return {key for arch in covering_archs(space) for _, key in blocks(arch, space)}


def host_table(space: SearchSpace, path: str | os.PathLike, device: str) -> tuple[LatencyTable, bool]:
    """This machine's latency table for `space`, kept at `path`: measured (and saved) when it
    is missing or lacks some of the space's blocks. Returns it and whether it was measured."""
    from pathlib import Path

    table = LatencyTable.load(path) if Path(path).exists() else None
    if table is not None and not table.missing(needed_blocks(space)):
        return table, False
    table = profile_latency(space, device, known=table)
    table.save(path)
    return table, True


def fit_whole_networks(
    table: LatencyTable, net: Supernet, space: SearchSpace, *, threads: int, archs: int
) -> dict:
    """Fit overhead and scale (least squares) so that table sums match whole subnets timed
    end to end; blocks timed alone miss what a whole network's run shares or adds."""
    rng = random.Random(12345)
    picks = [space.min_arch(), space.max_arch(), *(space.sample(rng) for _ in range(max(archs - 2, 0)))]
    sums = np.array([table.block_sum(a, space) for a in picks])
    measured = np.array([measure_arch_latency(net, a, threads) for a in picks])
    fit = {"overhead_ms": table.overhead_ms, "scale": 1.0, "archs": len(picks)}
    if len(picks) >= 3 and np.ptp(sums) > 0:
        scale, offset = np.polyfit(sums, measured, 1)
        if scale > 0 and offset + scale * sums.min() > 0:  # a sane fit; otherwise the plain sum
            fit.update(overhead_ms=float(offset), scale=float(scale))
    predicted = fit["overhead_ms"] + fit["scale"] * sums
    fit["median_abs_error_on_fit"] = float(np.median(np.abs(predicted - measured) / measured))
    return fit


def measure_arch_latency(net: Supernet, arch: Arch, threads: int = 1, repeats: int = 50) -> float:
    """End-to-end ONNX Runtime latency of one extracted subnet at batch 1 (to check a table)."""
    static = net.extract(arch).eval()
    x = torch.randn(1, net.space.in_channels, arch.resolution, arch.resolution)
    model = onnx_runtime.onnx_bytes(static, x, dynamic_batch=False)
    return onnx_runtime.model_latency_ms(model, x.numpy(), threads, repeats=repeats)
