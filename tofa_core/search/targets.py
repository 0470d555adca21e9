"""The registry of deployment targets: a YAML list, validated into pydantic models.

A target is a name and a budget: any combination of the registered constraints
(`tofa_core.constraints`: MACs, parameters, latency on a named device (a latency table under
`infra/latency/`, or `host-cpu`, this machine, measured on demand), peak RAM and flash at the
target's precision, fp32 or int8). Errors name the file, the target and the field, so a typo
in a registry of a hundred targets is found in one read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from tofa_core import config_files
from tofa_core.constraints import BY_FIELD, CONSTRAINTS, Constraint
from tofa_core.formats import DEFAULT, NAMES, deployed

HOST_DEVICE = "host-cpu"  # the machine a command runs on; its table is built on demand
Format = Literal[NAMES]  # the registry's names (tofa_core.formats)


def _budget(c: Constraint):
    # strict: `true` is not a budget of 1, nor "5" one of 5; allow_inf_nan: `.inf` is no budget
    if c.kind is int:
        return (int | None, Field(None, gt=0, strict=True, description=c.description))
    return (float | None, Field(None, gt=0, strict=True, allow_inf_nan=False, description=c.description))


class _TargetFields(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    device: str | None = Field(None, min_length=1, description="latency table the budget refers to")
    precision: Literal["fp32", "int8"] = Field(
        "fp32", description="the deployed model's numbers: fp32, or int8 (post-training quantized)"
    )
    formats: tuple[Format, ...] = Field(DEFAULT, min_length=1)
    min_int8_agreement: float = Field(
        0.98,
        gt=0,
        le=1,
        description="least share of held-out unlabelled images (never the test split) on which "
        "each int8 file's top-1 equals the float model's; a candidate below it gives way to the next",
    )
    retries: int = Field(1, ge=0, le=10, description="re-runs of a failed specialization")


# One budget field per registered constraint (max_macs, max_params, max_latency_ms, ...).
_Budgets = create_model("_Budgets", __base__=_TargetFields, **{c.field: _budget(c) for c in CONSTRAINTS})


class Target(_Budgets):
    @model_validator(mode="after")
    def _check(self) -> Target:
        if not self.constraints():
            fields = ", ".join(c.field for c in CONSTRAINTS)
            raise ValueError(f"no constraint: give at least one of {fields}")
        if (self.max_latency_ms is None) != (self.device is None):
            raise ValueError("max_latency_ms and device go together (a latency is measured on a device)")
        if "onnx" not in self.formats:
            raise ValueError("formats must include onnx: verification runs the ONNX model")
        shipped = deployed("ONNX Runtime", self.precision)
        if shipped not in self.formats:
            object.__setattr__(self, "formats", (*self.formats, shipped))  # the deployed file
        return self

    @property
    def litert_file(self) -> str | None:
        """The LiteRT format at the target's precision, when it asks for one: its RAM and flash
        are checked against the budget too (that file is what a LiteRT device runs)."""
        wanted = deployed("LiteRT", self.precision)
        return wanted if wanted in self.formats else None

    @property
    def priced_as(self) -> str:
        """What search prices RAM and flash for: the LiteRT file when the target ships one at
        its precision (the larger file), else the ONNX file at its precision."""
        return self.litert_file or self.precision

    def constraints(self) -> dict[str, float]:
        """The budgets that are set, by field name, in registry order."""
        return {c.field: v for c in CONSTRAINTS if (v := getattr(self, c.field)) is not None}

    def describe(self) -> str:
        parts = []
        for field, value in self.constraints().items():
            c = BY_FIELD[field]
            where = f" on {self.device}" if c.per_device else ""
            parts.append(c.show(value).replace(" ", " <= ", 1) + where)
        return ", ".join(parts) + ("" if self.precision == "fp32" else " (int8)")


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
        if bad := [k for k in item if not isinstance(k, str)]:  # YAML keys may be numbers or null
            raise TargetError(f"{where}: {label}: field names are words, got {bad[0]!r}")
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
    return read_targets(path, devices)[1]


def read_targets(path: str | Path, devices: Iterable[str] | None = None) -> tuple[str, list[Target]]:
    """The targets file's text and its targets, parsed from that same text: what a run hashes
    is what it specializes for, even if the file changes meanwhile."""
    try:
        text = config_files.read_text(path, "targets file")
        data = config_files.parse_yaml(text, path)
    except config_files.ConfigError as err:
        raise TargetError(str(err)) from None
    return text, parse_targets(data, str(path), devices)


def table_devices(latency_dir: str | Path) -> dict[str, Path]:
    """Device name -> latency table file, for every `<device>.json` in `latency_dir`."""
    folder = Path(latency_dir)
    return {p.stem: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
