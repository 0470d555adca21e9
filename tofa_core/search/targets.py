"""The registry of deployment targets: a YAML list, validated into pydantic models.

A target is a name and a budget: any combination of MACs, parameters, and latency on a
named device (a latency table under `infra/latency/`, or `host-cpu`, this machine, measured
on demand). Errors name the file, the target and the field, so a typo in a registry of a
hundred targets is found in one read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tofa_core import config_files

HOST_DEVICE = "host-cpu"  # the machine a command runs on; its table is built on demand
FORMATS = ("onnx", "torchscript")


class Target(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    # strict: `true` is not a budget of 1, nor "5" one of 5; allow_inf_nan: `.inf` is no budget
    max_macs: int | None = Field(None, gt=0, strict=True)
    max_params: int | None = Field(None, gt=0, strict=True)
    max_latency_ms: float | None = Field(None, gt=0, strict=True, allow_inf_nan=False)
    device: str | None = Field(None, min_length=1, description="latency table the budget refers to")
    formats: tuple[Literal["onnx", "torchscript"], ...] = Field(FORMATS, min_length=1)
    retries: int = Field(1, ge=0, le=10, description="re-runs of a failed specialization")

    @model_validator(mode="after")
    def _check(self) -> Target:
        if self.max_macs is None and self.max_params is None and self.max_latency_ms is None:
            raise ValueError("no constraint: give at least one of max_macs, max_params, max_latency_ms")
        if (self.max_latency_ms is None) != (self.device is None):
            raise ValueError("max_latency_ms and device go together (a latency is measured on a device)")
        if "onnx" not in self.formats:
            raise ValueError("formats must include onnx: verification runs the ONNX model")
        return self

    def constraints(self) -> dict[str, float]:
        """The budgets that are set, by name."""
        out = {
            "max_macs": self.max_macs,
            "max_params": self.max_params,
            "max_latency_ms": self.max_latency_ms,
        }
        return {k: v for k, v in out.items() if v is not None}

    def describe(self) -> str:
        parts = []
        if self.max_macs is not None:
            parts.append(f"MACs <= {self.max_macs:,}")
        if self.max_params is not None:
            parts.append(f"params <= {self.max_params:,}")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms on {self.device}")
        return ", ".join(parts)


class TargetError(ValueError):
    """A targets file is unreadable or invalid; the message names file, target and field."""


def parse_targets(data, where: str, devices: Iterable[str] | None = None) -> list[Target]:
    """Targets from already-parsed YAML (a list, or a mapping with a `targets:` list)."""
    if isinstance(data, dict) and set(data) == {"targets"}:
        data = data["targets"]
    if not isinstance(data, list) or not data:
        raise TargetError(f"{where}: a targets file is a non-empty YAML list of targets (name + budgets)")
    targets, seen = [], {}
    known = None if devices is None else sorted(set(devices) | {HOST_DEVICE})
    for i, item in enumerate(data):
        label = f"target #{i + 1}" + (f" ({item.get('name')!r})" if isinstance(item, dict) else "")
        if not isinstance(item, dict):
            raise TargetError(f"{where}: {label} must be a mapping with a name and budgets, got {item!r}")
        try:
            target = Target(**item)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "target"
            msg = first["msg"].removeprefix("Value error, ")
            got = f" (got {first['input']!r})" if first["loc"] else ""
            raise TargetError(f"{where}: {label}: {field}: {msg}{got}") from None
        if target.name in seen:
            raise TargetError(
                f"{where}: {label}: name {target.name!r} is already used by target #{seen[target.name]}"
            )
        seen[target.name] = i + 1
        if known is not None and target.device is not None and target.device not in known:
            raise TargetError(
                f"{where}: {label}: device {target.device!r} has no latency table; known devices: "
                f"{', '.join(known)} (measure one with `tofa profile-latency --device {target.device}`)"
            )
        targets.append(target)
    return targets


def load_targets(path: str | Path, devices: Iterable[str] | None = None) -> list[Target]:
    """Read and validate a targets file; `devices` are the device names that have tables."""
    try:
        data = config_files.read_yaml(path, "targets file")
    except config_files.ConfigError as err:
        raise TargetError(str(err)) from None
    return parse_targets(data, str(path), devices)


def table_devices(latency_dir: str | Path) -> dict[str, Path]:
    """Device name -> latency table file, for every `<device>.json` in `latency_dir`."""
    folder = Path(latency_dir)
    return {p.stem: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
