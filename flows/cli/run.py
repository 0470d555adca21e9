"""`tofa run`: the whole pipeline, and its table."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from flows.cli.common import (
    BudgetOpt,
    ConfigOpt,
    DatasetOpt,
    EpochsOpt,
    GpusOpt,
    SamplesOpt,
    StoreOpt,
    SummaryOpt,
    TargetsOpt,
    WorkersOpt,
    _clean_errors,
    _flow,
    app,
    console,
    targets_table,
)


@app.command()
def run(
    data: str = typer.Option(
        "digits", "--data", help="digits, a folder, a .parquet/.csv table, or an s3:// prefix."
    ),
    dataset: str | None = DatasetOpt,
    targets: Path | None = TargetsOpt,
    config: Path | None = ConfigOpt,
    epochs: int | None = EpochsOpt,
    workers: int = WorkersOpt,
    gpus_per_worker: float | None = GpusOpt,
    budget: float | None = BudgetOpt,
    store: str | None = StoreOpt,
    samples: int = SamplesOpt,
    force: bool = typer.Option(False, "--force", help="Run every stage even when nothing is new."),
    wait_lock: float = typer.Option(
        0.0, "--wait-lock", min=0, help="Seconds to wait while another run holds the data set."
    ),
    summary_out: Path | None = SummaryOpt,
) -> None:
    """The whole pipeline: ingest -> train (warm start) -> specialize every target -> register in MLflow."""
    from flows.services import check_services
    from flows.settings import store_uri

    with _clean_errors():
        check_services(store_uri(store))  # seconds, before anything starts
    # Not Ray: with nothing new the run is a no-op in seconds and never trains.
    retrain_flow = _flow("flows.pipeline:retrain_flow")
    from flows.specialize import SpecializationFailed

    failed = None
    try:
        with _clean_errors(FileNotFoundError):
            summary = retrain_flow(
                source=data,
                dataset=dataset,
                targets_file=str(targets) if targets else None,
                config_file=str(config) if config else None,
                epochs=epochs,
                workers=workers,
                store=store,
                samples=samples,
                force=force,
                lock_wait=wait_lock,
                gpus_per_worker=gpus_per_worker,
                budget_minutes=budget,
            )
    except SpecializationFailed as err:
        failed = err
        summary = None
    if failed is not None:
        Console(stderr=True).print(f"[bold red]failed:[/] {escape(str(failed))}", highlight=False)
        raise typer.Exit(code=1)
    _print_run(summary, summary_out)


def _print_run(summary: dict, summary_out: Path | None) -> None:
    """The run's table of targets and where to find it in MLflow (and its summary JSON)."""
    if summary_out:
        summary_out.write_text(json.dumps(summary, indent=2))
    if summary["noop"]:
        console.print(
            f"nothing new for {summary['dataset']} {summary['data_version']}: same data, config and targets "
            f"as pipeline run {summary['pipeline_run']}; no work done (--force runs it anyway)",
            highlight=False,
        )
    console.print(targets_table(summary["targets"], f"{summary['dataset']} {summary['data_version']}"))
    mlflow = summary["mlflow"]
    where = mlflow.get("run_url") or f"{mlflow['tracking_uri']} (parent run {mlflow['parent_run_id']})"
    took = summary["timings"]["total"]
    console.print(f"MLflow: {where}; took {took:.0f} s", highlight=False, soft_wrap=True)
