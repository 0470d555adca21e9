"""Names that become paths in the store (data sets, runs, versions): each is checked whole,
with `fullmatch`, before any path is built from it, so no name can reach outside its folder
(`..`, `/`, a trailing newline)."""

from __future__ import annotations

import re

DATASET = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
VERSION = re.compile(r"v-[0-9a-f]{16}")
# Error messages show at most this much of a bad name: input is never echoed unbounded.
SHOWN = 80


class InvalidName(ValueError):
    """A name that cannot be a store path; the message says the rule."""


def _checked(kind: str, value: object, pattern: re.Pattern, rule: str) -> str:
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    shown = repr(value)
    shown = shown if len(shown) <= SHOWN else shown[: SHOWN - 3] + "..."
    raise InvalidName(f"{kind} {shown} must match {pattern.pattern} ({rule})")


def dataset_name(value: object) -> str:
    return _checked("data set name", value, DATASET, "lower case, digits, - and _; set it with --dataset")


def run_id(value: object) -> str:
    return _checked("run id", value, RUN_ID, "letters, digits, - and _, as `tofa train` prints it")


def data_version(value: object) -> str:
    return _checked("data version", value, VERSION, "as `tofa ingest` prints it")
