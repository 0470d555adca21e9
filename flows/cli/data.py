"""Data sets: ingest a source as a version, collect what no version refers to."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from flows.cli.common import (
    StoreOpt,
    _clean_errors,
    _config,
    _flow,
    _name,
    app,
    console,
)
from tofa_core import names


@app.command()
def ingest(
    source: str = typer.Argument(
        "digits",
        help="digits, a folder (train/<class>/*, test/, unlabeled/), a .parquet/.csv table, or s3://...",
    ),
    dataset: str = typer.Option(
        "digits", "--dataset", help="Data set name in the store.", callback=_name(names.dataset_name)
    ),
    store: str | None = StoreOpt,
    config: Path | None = typer.Option(
        None, "--config", help="YAML config file; its 'ingest:' section applies.", callback=_config
    ),
) -> None:
    """Ingest a source as a new version of a data set (a no-op when nothing is new)."""
    ingest_flow = _flow("flows.ingest:ingest_flow")
    with _clean_errors():
        result = ingest_flow(
            source=source, dataset=dataset, store=store, config_file=str(config) if config else None
        )
    console.print(result["summary"], highlight=False)
    console.print(f"store: {result['store']}", highlight=False)


@app.command()
def gc(
    dataset: str = typer.Option(
        ..., "--dataset", help="Data set name in the store.", callback=_name(names.dataset_name)
    ),
    store: str | None = StoreOpt,
    older_than: float = typer.Option(
        24.0,
        "--older-than",
        min=0,
        help="Hours: files younger than this are kept (an ingest may be writing).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; remove nothing."),
) -> None:
    """Remove a data set's files that no committed version refers to: shards of ingests killed
    before their commit, temp files of interrupted writes. Holds the data set's run lock."""
    from flows.settings import open_store
    from tofa_core.data.store import DatasetStore
    from tofa_core.runlock import RunLock

    root = open_store(store)
    ds = DatasetStore(root)
    with _clean_errors(), RunLock(root, dataset, f"tofa gc (pid {os.getpid()})"):
        if dry_run:
            keys = ds.garbage(dataset, older_than * 3600)
        else:
            keys = ds.collect_garbage(dataset, older_than * 3600)
    for key in keys:
        console.print(f"  {ds.dataset(dataset).uri(key)}", highlight=False)
    what = "would be removed" if dry_run else "removed"
    console.print(f"data set {dataset!r}: {len(keys)} unreferenced file(s) {what}", highlight=False)
