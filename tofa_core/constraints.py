"""The registry of constraints a target can set: one entry each, read by every stage.

An entry names the target's budget field, the measured value's key (in verification, the
summary, MLflow and the CLI table), how it prints, how search prices it for an `Arch` at a
precision, where verification's value comes from, and what a failed verification does. Targets
build their fields from it, search prices candidates with it, verification checks every
budget with it, and specialization retries and tightens by it. Adding a constraint is one
entry here, its cost model and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tofa_core.arch import Arch, SearchSpace
from tofa_core.costs import (
    ELEMENT_BYTES,
    ELEMENT_PRECISION,
    LatencyModel,
    LayerSpec,
    count_macs,
    count_params,
    deployed_flash_bytes,
    deployed_ram_bytes,
    folded_params,
    layers,
)

KB = 1024  # device memories are sized in KiB: a "32 KB" Cortex-M0+ holds 32,768 bytes


# Where verification's value comes from:
# - analytic: exact from the arch; verification recomputes it unless the file shows it.
# - predicted: search predicts it from the target's device table; verification measures it
#   only where it runs (the host-cpu device).
# - measured: search prices it with a model of the file; verification measures the file.
Source = Literal["analytic", "predicted", "measured"]
Price = Callable[[Arch, SearchSpace, str, "LatencyModel | None"], float]


@dataclass(frozen=True)
class Constraint:
    field: str  # the target's budget, e.g. max_ram_kb
    key: str  # the measured value, e.g. ram_kb
    label: str  # how a person reads it: "RAM"
    unit: str  # "" for counts
    kind: type  # int (counts) or float
    description: str
    source: Source
    price: Price  # arch, space, precision, the device's latency table -> search's value
    # A file measured over the budget may be this candidate's bad luck (a model within a few
    # percent, a noisy host): verification then tries the next candidate instead of failing.
    retry: bool = False
    # When every candidate measured over it: the factor by which each further search tightens
    # the budget search prices against (None: search again would find the same candidates).
    tighten: float | None = None

    @property
    def per_device(self) -> bool:
        """Priced by the target's device table (a target with this budget names a device)."""
        return self.source == "predicted"

    def show(self, value: float) -> str:
        if self.kind is int:
            return f"{self.label} {value:,}"
        return f"{self.label} {value:.4g} {self.unit}".rstrip()

    def excess(self, value: float, budget: float | None) -> str | None:
        """How `value` exceeds `budget`, readable; None when within it (or no budget is set)."""
        if budget is None or value <= budget:
            return None
        limit = f"{budget:,}" if self.kind is int else f"{budget:g} {self.unit}".rstrip()
        return f"{self.show(value)} > {limit}"


def _latency(arch: Arch, space: SearchSpace, precision: str, table: LatencyModel | None) -> float:
    if table is None:
        raise ValueError("max_latency_ms needs a latency table")
    return table.latency_ms(arch, space)


# Energy of one inference: every MAC's arithmetic plus every byte moved through on-chip SRAM
# (the folded weights read once, each layer's input read and output written once), with the
# 45 nm figures of Horowitz, "Computing's energy problem" (ISSCC 2014): a multiply and an add
# cost 0.2 + 0.03 pJ in int8 and 3.7 + 0.9 pJ in float32; an 8 KB SRAM reads 64 bits for
# 10 pJ. Ratios between subnets and precisions hold across processes better than absolutes.
PJ_PER_MAC = {"int8": 0.23, "fp32": 4.6}
PJ_PER_BYTE = 10 / 8


def _moved(spec: LayerSpec) -> int:
    """Elements one layer reads and writes: its input and output maps (vectors for SE, linear)."""
    if spec.kind in ("conv", "dwconv"):
        return spec.cin * spec.in_size**2 + spec.cout * spec.out_size**2
    return spec.cin + spec.cout


def energy_uj(arch: Arch, space: SearchSpace, precision: str = "fp32") -> float:
    """Microjoules per image at batch 1 at `precision` (a format's precision counts as its element's)."""
    element = ELEMENT_PRECISION[precision]
    moved = folded_params(arch, space) + sum(_moved(s) for s in layers(arch, space))
    pj = count_macs(arch, space) * PJ_PER_MAC[element] + moved * ELEMENT_BYTES[element] * PJ_PER_BYTE
    return pj / 1e6


CONSTRAINTS = (
    Constraint(
        "max_macs", "macs", "MACs", "", int, "multiply-accumulates per image", "analytic",
        lambda arch, space, precision, table: count_macs(arch, space),
    ),
    Constraint(
        "max_params", "params", "params", "", int, "parameters", "analytic",
        lambda arch, space, precision, table: count_params(arch, space),
    ),
    Constraint(
        "max_latency_ms", "latency_ms", "latency", "ms", float,
        "milliseconds per image at batch 1 on `device` (its latency table)", "predicted", _latency,
        retry=True, tighten=0.8,  # a table predicts whole networks within ~10% (up to ~30%)
    ),
    Constraint(
        "max_ram_kb", "ram_kb", "RAM", "KB", float,
        "peak activation memory at batch 1 at the target's precision (of the ONNX graph, and of the "
        "LiteRT file when the target ships one), KiB", "analytic",
        lambda arch, space, precision, table: deployed_ram_bytes(arch, space, precision) / KB,
        retry=True,  # exact for both graphs, so never tightened; measured on the files all the same
    ),
    Constraint(
        "max_flash_kb", "flash_kb", "flash", "KB", float,
        "bytes of the deployed model file (ONNX at the target's precision, and the LiteRT file "
        "when the target ships one), KiB", "measured",
        lambda arch, space, precision, table: deployed_flash_bytes(arch, space, precision) / KB,
        retry=True, tighten=0.97,  # the flash model is within ~1.5% of the files
    ),
    Constraint(
        "max_energy_uj", "energy_uj", "energy", "uJ", float,
        "microjoules per image at batch 1 at the target's precision (MACs and bytes moved, 45 nm "
        "figures)", "analytic", lambda arch, space, precision, table: energy_uj(arch, space, precision),
    ),
)  # fmt: skip
BY_FIELD = {c.field: c for c in CONSTRAINTS}
BY_KEY = {c.key: c for c in CONSTRAINTS}
