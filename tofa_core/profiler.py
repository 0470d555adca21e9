"""Build a device's latency table: every block shape of a search space, timed by ONNX Runtime.

Run it once on the device (`tofa profile-latency --device NAME`); the JSON it writes lets a
search on any machine predict that device's latency as a sum of table entries. Each block is
exported on its own with random weights (run time does not depend on the values), run at
batch 1 after warm-up in several fresh sessions, and the median of their medians minus one
call's fixed overhead is its entry.
A whole network's latency is then an offset plus a scale times the sum of its entries, both
fitted on a dozen whole subnets timed end to end (see `fit_whole_networks`).

Timing is interleaved (`interleaved_latency_ms`): a round opens one session per model, so a
model's sessions are spread over the whole measurement. On a shared machine load comes in
bursts; timed back to back, all of one block's sessions fell in the same burst and its entry
came out 3-5x too large, an error every subnet using that block then carried.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


# Blocks are exported and timed in groups of at most this many bytes of ONNX: a group's models
# are held at once so their sessions can take turns (memory stays bounded on large spaces).
GROUP_BYTES = 64 << 20


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """torch on one thread while the block (exports, shape passes) runs; restored after.

    The profiler's torch work is tiny batch-1 tensors: a second OpenMP thread gains nothing,
    and on a loaded 2-core machine each parallel region waits for a descheduled peer (a 16x8x8
    conv took 6-8 ms on 2 threads against 0.03 ms on one), while its spinning worker would
    take the core from the timing that follows."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved_latency_ms(
    models: list[tuple[bytes, np.ndarray]], threads: int = 1, sessions: int = 5, repeats: int = 30
) -> list[float]:
    """Per (model, input): the median over `sessions` rounds of one fresh session's median run
    time (`onnx_runtime.model_latency_ms`), each round timing every model once in turn; so
    a burst of load lands in one round of several models, and the median drops it."""

    def once(model: bytes, x: np.ndarray) -> float:
        return onnx_runtime.latency_ms(onnx_runtime.session(model, threads), x, repeats=repeats)

    with onnx_runtime.TIMING_LOCK:
        rounds = [[once(m, x) for m, x in models] for _ in range(sessions)]
    return [statistics.median(times) for times in zip(*rounds)]


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
    # random weights (latency does not depend on them) and inputs; the caller's RNG untouched
    with torch.random.fork_rng(), single_threaded_torch():
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
        started = time.perf_counter()
        measured, overhead = time_blocks(todo, space, threads, sessions, repeats, progress)
        entries.update(measured)
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


def time_blocks(
    todo: list[tuple[str, nn.Module, tuple]],
    space: SearchSpace,
    threads: int,
    sessions: int,
    repeats: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, float], float]:
    """({key: entry}, one call's overhead) for (key, block, input shape)s, in groups of up to
    GROUP_BYTES of ONNX timed together with the trivial model: an entry is its block's time
    minus the overhead measured in the same rounds (not below 0)."""
    side = min(space.resolutions)
    smallest = (1, space.in_channels, side, side)
    trivial = (onnx_runtime.trivial_model(smallest), np.zeros(smallest, np.float32))
    entries, overheads, done = {}, [], 0
    while done < len(todo) or not overheads:
        keys, models, size = [], [], 0
        while done < len(todo) and size < GROUP_BYTES:
            key, module, shape = todo[done]
            x = torch.randn(shape)
            models.append((onnx_runtime.onnx_bytes(module, x, dynamic_batch=False), x.numpy()))
            keys.append(key)
            size += len(models[-1][0])
            done += 1
        *times, overhead = interleaved_latency_ms([*models, trivial], threads, sessions, repeats)
        overheads.append(overhead)
        entries.update((key, max(t - overhead, 0.0)) for key, t in zip(keys, times))
        if progress is not None:
            progress(done, len(todo))
    return entries, statistics.median(overheads)


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
    """Fit overhead and scale so that table sums match whole subnets timed end to end; blocks
    timed alone miss what a whole network's run shares or adds.

    Theil-Sen (the median of the pairwise slopes), not least squares: on a shared machine a
    burst of load inflates a subnet's time now and then, and with a dozen points least
    squares let one such time (the largest subnet's most of all) set the line; a fitted 0.045
    ms + 0.78 x sum then missed other subnets by a median 42%, their sums alone by 12%.
    Under load one timing each still left the fit a median 20% off once; each subnet now
    takes the faster of two.
    """
    rng = random.Random(12345)
    picks = [space.min_arch(), space.max_arch(), *(space.sample(rng) for _ in range(max(archs - 2, 0)))]
    sums = np.array([table.block_sum(a, space) for a in picks])
    # each subnet's faster of two interleaved timings: one burst of load on a shared machine
    # inflates a timing, rarely both
    first, second = (measure_archs_latency(net, picks, threads) for _ in range(2))
    measured = np.minimum(first, second)
    fit = {"overhead_ms": table.overhead_ms, "scale": 1.0, "archs": len(picks)}
    if len(picks) >= 3 and np.ptp(sums) > 0:
        scale, offset = theil_sen(sums, measured)
        if scale > 0 and offset + scale * sums.min() > 0:  # a sane fit; otherwise the plain sum
            fit.update(overhead_ms=float(offset), scale=float(scale))
    predicted = fit["overhead_ms"] + fit["scale"] * sums
    fit["median_abs_error_on_fit"] = float(np.median(np.abs(predicted - measured) / measured))
    return fit


def theil_sen(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the line through (x, y) that outliers cannot pull: the median of
    the slopes between all pairs of points with different x, then the median intercept."""
    i, j = np.triu_indices(len(x), 1)
    apart = x[j] != x[i]
    slope = float(np.median((y[j] - y[i])[apart] / (x[j] - x[i])[apart]))
    return slope, float(np.median(y - slope * x))


def measure_arch_latency(net: Supernet, arch: Arch, threads: int = 1, repeats: int = 50) -> float:
    """End-to-end ONNX Runtime latency of one extracted subnet at batch 1 (to check a table)."""
    return measure_archs_latency(net, [arch], threads, repeats)[0]


def measure_archs_latency(
    net: Supernet, archs: list[Arch], threads: int = 1, repeats: int = 50, sessions: int = 5
) -> list[float]:
    """End-to-end ONNX Runtime latencies of extracted subnets at batch 1, timed interleaved
    (`interleaved_latency_ms`): on a loaded machine their order is what stays comparable."""
    models = []
    with single_threaded_torch():
        for arch in archs:
            static = net.extract(arch).eval()
            x = torch.randn(1, net.space.in_channels, arch.resolution, arch.resolution)
            models.append((onnx_runtime.onnx_bytes(static, x, dynamic_batch=False), x.numpy()))
    return interleaved_latency_ms(models, threads, sessions, repeats)
