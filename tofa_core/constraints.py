"""The registry of constraints a target can set: one entry each, read by every stage.

An entry names the target's budget field, the measured value's key (in verification, the
summary, MLflow and the CLI table), how it prints, and how to compute it from an `Arch` at a
precision. Targets build their fields from it, search prices candidates with it, verification
checks the measured files against it. Adding a constraint is one entry here plus, when the
exported file can show it, its measurement in `export.verify`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tofa_core.arch import Arch, SearchSpace
from tofa_core.costs import count_macs, count_params, deployed_flash_bytes, deployed_ram_bytes

KB = 1024  # device memories are sized in KiB: a "32 KB" Cortex-M0+ holds 32,768 bytes


@dataclass(frozen=True)
class Constraint:
    field: str  # the target's budget, e.g. max_ram_kb
    key: str  # the measured value, e.g. ram_kb
    label: str  # how a person reads it: "RAM"
    unit: str  # "" for counts
    kind: type  # int (counts) or float
    description: str
    # arch, space, precision -> value; None where it needs more than the arch (latency: a device table)
    from_arch: Callable[[Arch, SearchSpace, str], float] | None

    def show(self, value: float) -> str:
        if self.kind is int:
            return f"{self.label} {value:,}"
        return f"{self.label} {value:.4g} {self.unit}".rstrip()


CONSTRAINTS = (
    Constraint(
        "max_macs", "macs", "MACs", "", int, "multiply-accumulates per image",
        lambda arch, space, precision: count_macs(arch, space),
    ),
    Constraint(
        "max_params", "params", "params", "", int, "parameters",
        lambda arch, space, precision: count_params(arch, space),
    ),
    Constraint(
        "max_latency_ms", "latency_ms", "latency", "ms", float,
        "milliseconds per image at batch 1 on `device` (its latency table)", None,
    ),
    Constraint(
        "max_ram_kb", "ram_kb", "RAM", "KB", float,
        "peak activation memory at batch 1 at the target's precision (of the ONNX graph, and of the "
        "LiteRT file when the target ships one), KiB",
        lambda arch, space, precision: deployed_ram_bytes(arch, space, precision) / KB,
    ),
    Constraint(
        "max_flash_kb", "flash_kb", "flash", "KB", float,
        "bytes of the deployed model file (ONNX at the target's precision, and the LiteRT file "
        "when the target ships one), KiB",
        lambda arch, space, precision: deployed_flash_bytes(arch, space, precision) / KB,
    ),
)  # fmt: skip
BY_FIELD = {c.field: c for c in CONSTRAINTS}
BY_KEY = {c.key: c for c in CONSTRAINTS}
