"""The store's records of runs, and the one place that finds them.

`supernets/<data set>/<run id>.json` is written per training (by `tofa train`, or the
pipeline's training stage) and `pipelines/<data set>/<run id>.json` per pipeline run. Run
ids start with their UTC start time, so the newest record of a data set is its last key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from tofa_core import names
from tofa_core.storage import NotFound, Storage


class Runs:
    """Records of supernet trainings and pipeline runs in one store."""

    def __init__(self, store: Storage):
        self.store = store

    def _folder(self, kind: str, dataset: str) -> Storage:
        return self.store.child(f"{kind}/{names.dataset_name(dataset)}")

    def _all(self, kind: str, dataset: str) -> list[dict]:
        folder = self._folder(kind, dataset)
        return [json.loads(folder.read_bytes(o.key)) for o in folder.list() if o.key.endswith(".json")]

    def _write(self, kind: str, dataset: str, run_id: str, record: dict) -> None:
        data = json.dumps(record, indent=2, default=str).encode()
        self._folder(kind, dataset).write_bytes(f"{names.run_id(run_id)}.json", data)

    def supernets(self, dataset: str) -> list[dict]:
        """Every training record of `dataset`, oldest first."""
        return self._all("supernets", dataset)

    def latest_supernet(self, dataset: str) -> dict | None:
        folder = self._folder("supernets", dataset)
        keys = [o.key for o in folder.list() if o.key.endswith(".json")]
        return json.loads(folder.read_bytes(keys[-1])) if keys else None

    def supernet(self, dataset: str, run_id: str) -> dict:
        """One training record; FileNotFoundError naming the run and data set when absent."""
        try:
            return json.loads(self._folder("supernets", dataset).read_bytes(f"{names.run_id(run_id)}.json"))
        except NotFound:
            raise FileNotFoundError(
                f"no supernet run {run_id!r} of data set {dataset!r} in {self.store.uri()}"
            ) from None

    def write_supernet(self, dataset: str, record: dict) -> None:
        self._write("supernets", dataset, record["run_id"], record)

    def pipelines(self, dataset: str) -> list[dict]:
        """Every pipeline run record of `dataset`, oldest first."""
        return self._all("pipelines", dataset)

    def write_pipeline(self, dataset: str, record: dict) -> None:
        self._write("pipelines", dataset, record["pipeline_run"], record)


@dataclass(frozen=True)
class WarmStart:
    """Where a training starts from.

    `last`: the newest supernet of the data set (a default, not a request: skipped when it
    does not fit the configured space); `tofa`: a supernet checkpoint, `where` its folder and
    `key` the file (what `tofa train` writes as `supernet.pt`); `ofa`: OFA's published
    weights, `where` the file."""

    kind: Literal["last", "tofa", "ofa"]
    where: str
    key: str | None = None

    @classmethod
    def resolve(cls, text: str | None, runs: Runs, dataset: str) -> WarmStart | None:
        """`last`, a `.pt` checkpoint URI (TOFA's), or any other file (OFA's weights)."""
        if text is None:
            return None
        if text == "last":
            latest = runs.latest_supernet(dataset)
            if latest is None:
                return None
            folder, _, key = latest["supernet"].rpartition("/")
            return cls("last", folder, key)
        if text.endswith(".pt"):
            folder, _, key = text.rpartition("/")
            return cls("tofa", folder, key)
        return cls("ofa", text)
