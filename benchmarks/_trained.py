"""A trained default supernet for the specialization benchmarks: one given by --store/--run,
or digits (10% labels) trained here with TrainConfig's defaults into `tmp`."""

from __future__ import annotations

import time

from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.store import DatasetStore
from tofa_core.storage import Storage, open_storage
from tofa_core.training.config import TrainConfig
from tofa_core.training.loop import train_supernet


def default_supernet(
    store_root: str | None, run: str | None, tmp: str, seed: int = 0
) -> tuple[DatasetStore, Storage]:
    """(the data store, the run folder holding supernet.pt and result.json)."""
    root = store_root or f"{tmp}/store"
    store = DatasetStore(open_storage(root))
    if run is None:
        ingest("digits", "digits", store, IngestConfig())
        run = "bench"
        start = time.perf_counter()
        train_supernet(TrainConfig(seed=seed), store, "digits", open_storage(root).child(f"runs/{run}"))
        print(f"trained the default supernet in {time.perf_counter() - start:.0f} s", flush=True)
    return store, open_storage(root).child(f"runs/{run}")
