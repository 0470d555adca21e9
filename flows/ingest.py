"""Flow `tofa-ingest`: a source becomes a validated, versioned data set in the store.

One task per stage of tofa_core.data.ingest. Tasks that talk to storage retry on storage
errors (a flaky S3 endpoint), never on bad data: a SourceError fails the run at once with
its message. A run on content already stored is a no-op that says so.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.settings import store_uri
from tofa_core.data import ingest as stages
from tofa_core.data.store import DatasetStore
from tofa_core.storage import NotFound, StorageError, open_storage


def _storage_hiccup(task, task_run, state) -> bool:
    """Retry only errors a second try can fix; a missing object or bad data stays failed."""
    return isinstance(state.data, StorageError) and not isinstance(state.data, NotFound)


# Inputs are large (image bytes) and not worth hashing into cache keys: no caching.
storage_task = task(cache_policy=NONE, retries=2, retry_delay_seconds=2, retry_condition_fn=_storage_hiccup)


@storage_task(name="list-source")
def list_source(source: str, dataset: str, store: DatasetStore, config: stages.IngestConfig) -> stages.Plan:
    plan = stages.plan_ingest(source, dataset, store, config)
    parent = plan.parent.manifest.version if plan.parent else "none"
    get_run_logger().info(
        "%s: %d items, %d new; parent version %s",
        source,
        len(plan.listing.items),
        len(plan.new_items),
        parent,
    )
    return plan


@storage_task(name="decode")
def decode(plan: stages.Plan, config: stages.IngestConfig) -> stages.Staged:
    return stages.decode_items(plan, config)


@task(name="validate", cache_policy=NONE)
def validate(
    plan: stages.Plan, decoded: stages.Staged, config: stages.IngestConfig, store: DatasetStore
) -> stages.Validated:
    validated = stages.validate(plan, decoded, config, store)
    get_run_logger().info(
        "version %s: %d images, %d quarantined",
        validated.version,
        validated.num_images,
        len(validated.quarantine),
    )
    return validated


@storage_task(name="write-shards")
def write_shards(validated: stages.Validated, store: DatasetStore, config: stages.IngestConfig):
    return stages.write_shards(validated, store, config)


@storage_task(name="commit-manifest")
def commit_manifest(validated, shards, store: DatasetStore, config: stages.IngestConfig):
    return stages.commit(validated, shards, store, config)


@storage_task(name="select-existing")
def select_existing(validated: stages.Validated, store: DatasetStore):
    return stages.select_existing(validated, store)


@flow(name="tofa-ingest")
def ingest_flow(
    source: str = "digits",
    dataset: str = "digits",
    store: str | None = None,
    config_file: str | None = None,
) -> dict:
    """Ingest SOURCE (digits, a folder, a Parquet/CSV table, local or s3://) as DATASET."""
    config = stages.IngestConfig.from_yaml(config_file) if config_file else stages.IngestConfig()
    ds = DatasetStore(open_storage(store_uri(store)))
    plan = list_source(source, dataset, ds, config)
    with decode(plan, config) as decoded:  # the spill of decoded pixels goes with it
        validated = validate(plan, decoded, config, ds)
        if validated.exists:
            manifest = select_existing(validated, ds)
            result = stages.IngestResult(manifest, False, len(decoded), 0, 0, validated.quarantine)
        else:
            shards, reused = write_shards(validated, ds, config)
            manifest = commit_manifest(validated, shards, ds, config)
            stages.tidy(ds, dataset)
            result = stages.IngestResult(
                manifest, True, len(decoded), reused, len(shards) - reused, validated.quarantine
            )
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
    }
