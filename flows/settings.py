"""Where things live, from the environment (the DESIGN contract), with local defaults."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tofa_core import names

if TYPE_CHECKING:  # storage imports pyarrow: not for `tofa --help`
    from tofa_core.storage import Storage

DEFAULT_STORE = ".tofa/store"


def store_uri(override: str | None = None) -> str:
    """TOFA_STORE: a local path or s3://bucket/prefix (default: .tofa/store under the cwd)."""
    uri = override or os.environ.get("TOFA_STORE") or DEFAULT_STORE
    # Absolute for local paths: Ray workers run in folders of their own.
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def open_store(store: str | Storage | None = None) -> Storage:
    """The store, opened once per process where a flow starts (each flow also runs alone, as
    a deployment); a Storage the caller already opened (the pipeline's plan) is used as it is.
    Everything below a flow derives its folders from it (`child`, `at`)."""
    from tofa_core.storage import Storage, open_storage

    return store if isinstance(store, Storage) else open_storage(store_uri(store))


def dataset_name(source: str, override: str | None = None) -> str:
    """A data set is named after its source unless told: digits, or the folder/table name.
    Checked here, at every flow's entry, before it becomes a path in the store."""
    if override:
        return names.dataset_name(override)
    return names.dataset_name(
        source if source == "digits" else os.path.basename(source.rstrip("/")).split(".")[0]
    )


def state_dir() -> Path:
    """TOFA_HOME: this machine's own state (host latency table, local databases); default .tofa."""
    return Path(os.environ.get("TOFA_HOME") or ".tofa").expanduser().resolve()


def latency_dir() -> Path:
    """TOFA_LATENCY_DIR: device latency tables (`<device>.json`); default the project's infra/latency."""
    default = Path(__file__).resolve().parents[1] / "infra" / "latency"
    return Path(os.environ.get("TOFA_LATENCY_DIR") or default)


def redact(url: str) -> str:
    """A URL as it may be shown, logged or recorded: `user:token@` in it becomes `***@`."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", url)
