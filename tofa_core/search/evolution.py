"""Constrained evolutionary search: the subnet with the best predicted score inside a budget.

Every candidate is made feasible by repair: shrink one gene at a time (resolution, width,
a stage's depth, a block's kernel or expand ratio, each one choice down) until it fits.
Every step lowers the sum of choice indices, so repair ends after at most that many steps,
at worst at the smallest subnet, which is checked to fit before the search starts. No
unbounded "sample until it fits" loop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tofa_core.arch import Arch, SearchSpace
from tofa_core.constraints import BY_FIELD, BY_KEY, CONSTRAINTS, Constraint
from tofa_core.costs import LatencyModel
from tofa_core.search.targets import Target


class InfeasibleTarget(ValueError):
    """No subnet of the space meets the target; the message gives the smallest achievable values."""


class CostModel:
    """The costs a target can constrain (`tofa_core.constraints`), for any arch of one space."""

    def __init__(self, space: SearchSpace, latency: LatencyModel | None = None):
        self.space, self.latency = space, latency

    def value(self, c: Constraint, arch: Arch, precision: str = "fp32") -> float:
        return c.price(arch, self.space, precision, self.latency)

    def costs(self, arch: Arch, precision: str = "fp32") -> dict[str, float]:
        """Every constraint's value of `arch` that can be priced here, by measured key."""
        return {
            c.key: self.value(c, arch, precision)
            for c in CONSTRAINTS
            if not c.per_device or self.latency is not None
        }

    def violations(self, arch: Arch, target: Target) -> list[str]:
        """Which of the target's budgets `arch` exceeds, as readable phrases (empty = fits)."""
        out = []
        for name, budget in target.constraints().items():
            c = BY_FIELD[name]
            if c.per_device and (self.latency is None or self.latency.device != target.device):
                raise ValueError(f"target {target.name} needs the latency table of {target.device!r}")
            if over := c.excess(self.value(c, arch, target.priced_as), budget):
                out.append(f"predicted {over} on {target.device}" if c.per_device else over)
        return out

    def fits(self, arch: Arch, target: Target) -> bool:
        return not self.violations(arch, target)


def check_feasible(target: Target, costs: CostModel) -> None:
    """Fail fast when even the smallest subnet exceeds the budget, naming what is achievable."""
    smallest = costs.space.min_arch()
    broken = costs.violations(smallest, target)
    if broken:
        achievable = ", ".join(BY_KEY[k].show(v) for k, v in costs.costs(smallest, target.priced_as).items())
        raise InfeasibleTarget(
            f"target {target.name}: no subnet fits ({target.describe()}); the smallest subnet already has "
            f"{'; '.join(broken)}. Smallest achievable: {achievable}. Relax the budget or use a "
            "smaller space."
        )


def _genes(space: SearchSpace, arch: Arch) -> list[tuple[str, int]]:
    """(gene, block position or stage index) pairs that can still go one choice down."""
    out = []
    if arch.resolution != space.resolutions[0]:
        out.append(("resolution", -1))
    if arch.width != space.width_choices[0]:
        out.append(("width", -1))
    out += [("depth", i) for i, d in enumerate(arch.depths) if d != space.depth_choices[0]]
    out += [("kernel", i) for i, k in enumerate(arch.kernels) if k != space.kernel_choices[0]]
    out += [("expand", i) for i, e in enumerate(arch.expands) if e != space.expand_choices[0]]
    return out


def _down(choices: Sequence, value):
    i = choices.index(value)
    if i == 0:
        raise ValueError(f"{value} is already the smallest choice of {list(choices)}")
    return choices[i - 1]


def shrink(space: SearchSpace, arch: Arch, gene: str, i: int) -> Arch:
    """`arch` with one gene one choice smaller (a shallower stage drops its last block)."""
    if gene == "resolution":
        return Arch(
            _down(space.resolutions, arch.resolution), arch.depths, arch.kernels, arch.expands, arch.width
        )
    if gene == "width":
        return Arch(
            arch.resolution, arch.depths, arch.kernels, arch.expands, _down(space.width_choices, arch.width)
        )
    if gene == "depth":
        depths = list(arch.depths)
        depths[i] = _down(space.depth_choices, depths[i])
        last = sum(arch.depths[: i + 1]) - 1  # the stage's last block goes
        drop = arch.depths[i] - depths[i]
        keep = [j for j in range(len(arch.kernels)) if not last - drop < j <= last]
        return Arch(
            arch.resolution,
            tuple(depths),
            tuple(arch.kernels[j] for j in keep),
            tuple(arch.expands[j] for j in keep),
            arch.width,
        )
    seq = list(arch.kernels if gene == "kernel" else arch.expands)
    seq[i] = _down(space.kernel_choices if gene == "kernel" else space.expand_choices, seq[i])
    if gene == "kernel":
        return Arch(arch.resolution, arch.depths, tuple(seq), arch.expands, arch.width)
    return Arch(arch.resolution, arch.depths, arch.kernels, tuple(seq), arch.width)


def repair(arch: Arch, target: Target, costs: CostModel, rng: random.Random) -> Arch:
    """Shrink random genes one choice at a time until `arch` fits (bounded; see module doc)."""
    space = costs.space
    while not costs.fits(arch, target):
        genes = _genes(space, arch)
        if not genes:  # the smallest subnet: check_feasible guarantees it fits
            raise InfeasibleTarget(f"target {target.name}: the smallest subnet does not fit")
        arch = shrink(space, arch, *rng.choice(genes))
    return arch


@dataclass
class SearchResult:
    target: str
    candidates: list[tuple[Arch, float]]  # best first: (arch, predicted score)
    evaluated: int  # candidates scored by predictor + cost model
    seconds: float
    history: list[float] = field(default_factory=list)  # best predicted score per generation

    @property
    def per_second(self) -> float:
        return self.evaluated / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 100
    generations: int = 30
    parent_ratio: float = 0.25
    mutation_ratio: float = 0.5
    mutate_prob: float = 0.1
    top: int = 3  # distinct best candidates returned for re-ranking


def evolve(
    target: Target,
    costs: CostModel,
    predict: Callable[[list[Arch]], Sequence[float]],
    cfg: EvolutionConfig = EvolutionConfig(),
    seed: int = 0,
) -> SearchResult:
    """OFA-style evolution (mutation + crossover of the best quarter) inside the target's budget."""
    check_feasible(target, costs)
    space = costs.space
    rng = random.Random(seed)
    started = time.perf_counter()
    known: dict[Arch, float] = {}

    def score(archs: list[Arch]) -> None:
        fresh = [a for a in dict.fromkeys(archs) if a not in known]
        for a, s in zip(fresh, predict(fresh)):
            known[a] = float(s)

    population = [repair(space.sample(rng), target, costs, rng) for _ in range(cfg.population)]
    population.append(space.min_arch())
    score(population)
    evaluated = len(population)
    n_parents = max(2, int(cfg.population * cfg.parent_ratio))
    n_mutants = int(cfg.population * cfg.mutation_ratio)
    history = []
    for _ in range(cfg.generations):
        parents = sorted(set(population), key=known.__getitem__, reverse=True)[:n_parents]
        history.append(known[parents[0]])
        children = [
            repair(space.mutate(rng.choice(parents), rng, cfg.mutate_prob), target, costs, rng)
            for _ in range(n_mutants)
        ]
        children += [
            repair(space.crossover(rng.choice(parents), rng.choice(parents), rng), target, costs, rng)
            for _ in range(cfg.population - n_parents - n_mutants)
        ]
        score(children)
        evaluated += len(children)
        population = parents + children
    best = sorted(known, key=known.__getitem__, reverse=True)[: cfg.top]
    return SearchResult(
        target.name, [(a, known[a]) for a in best], evaluated, time.perf_counter() - started, history
    )
