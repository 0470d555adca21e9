"""Flow `tofa-ingest`: a source becomes a validated, versioned data set in the store.

One task per stage of tofa_core.data.ingest. Tasks that talk to storage retry on storage
errors (a flaky S3 endpoint), never on bad data: a SourceError fails the run at once with
its message. A run on content already stored is a no-op that says so.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.settings import open_store
from tofa_core.data import ingest as stages
from tofa_core.data.store import DatasetStore
from tofa_core.runlock import RunLock
from tofa_core.storage import NotFound, Storage, StorageError


def _storage_hiccup(task, task_run, state) -> bool:
    """Retry only errors a second try can fix; a missing object or bad data stays failed."""
    return isinstance(state.data, StorageError) and not isinstance(state.data, NotFound)


# Inputs are large (image bytes) and not worth hashing into cache keys: no caching.
storage_task = task(cache_policy=NONE, retries=2, retry_delay_seconds=2, retry_condition_fn=_storage_hiccup)


# One task per stage of tofa_core.data.ingest.ingest, which chains them.
STAGES = {
    "plan": storage_task(name="list-source")(stages.plan_ingest),
    "decode": storage_task(name="decode")(stages.decode_items),
    "validate": task(name="validate", cache_policy=NONE)(stages.validate),
    "write": storage_task(name="write-shards")(stages.write_shards),
    "commit": storage_task(name="commit-manifest")(stages.commit),
    "select": storage_task(name="select-existing")(stages.select_existing),
}


def _as_task(stage: str, fn, *args):
    return STAGES[stage](*args)


@flow(name="tofa-ingest")
def ingest_flow(
    source: str = "digits",
    dataset: str = "digits",
    store: str | Storage | None = None,
    config_file: str | None = None,
    lock: bool = True,
    config: stages.IngestConfig | None = None,
) -> dict:
    """Ingest SOURCE (digits, a folder, a Parquet/CSV table, local or s3://) as DATASET.

    Holds the data set's run lock while it runs (`lock=False`: the caller holds it), so
    `tofa gc` never removes the shards of an ingest still writing them; a pipeline run on the
    same data set makes it fail at once with RunLocked, naming the holder. `config`: the
    ingest settings already resolved (a pipeline's plan): `config_file` is not read."""
    if config is None:
        config = stages.IngestConfig.from_yaml(config_file) if config_file else stages.IngestConfig()
    root = open_store(store)
    ds = DatasetStore(root)
    with RunLock(root, dataset, f"ingest (pid {os.getpid()})") if lock else nullcontext():
        result = stages.ingest(source, dataset, ds, config, run=_as_task)
    manifest = result.manifest
    get_run_logger().info(result.summary())
    return {
        "dataset": dataset,
        "version": manifest.version,
        "created": result.created,
        "parent": manifest.parent,
        "store": ds.storage.root,
        "num_images": manifest.num_images,
        "counts": manifest.counts,
        "classes": manifest.classes,
        "quarantined": len(result.quarantine),
        "quarantine_reasons": result.reasons(),
        "summary": result.summary(),
        "seconds": result.seconds,
    }
