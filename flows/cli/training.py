"""One supernet on Ray Train, and a Ray Tune sweep of its loss settings."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from flows.cli.common import (
    BudgetOpt,
    ConfigOpt,
    DatasetOpt,
    EpochsOpt,
    GpusOpt,
    StoreOpt,
    WorkersOpt,
    _clean_errors,
    _config,
    _flow,
    app,
    console,
)


@app.command()
def train(
    data: str = typer.Option(
        "digits", "--data", help="Source to train on (ingested first; a no-op if stored)."
    ),
    dataset: str | None = DatasetOpt,
    store: str | None = StoreOpt,
    config: Path | None = ConfigOpt,
    epochs: int | None = EpochsOpt,
    workers: int = WorkersOpt,
    gpus_per_worker: float | None = GpusOpt,
    budget: float | None = BudgetOpt,
    warm_start: str | None = typer.Option(
        None,
        "--warm-start",
        help="'last' (newest supernet of this data set), a supernet .pt URI, or OFA weights.",
    ),
) -> None:
    """Train one elastic supernet with the unified semi-supervised loss on Ray Train."""
    train_flow = _flow("flows.train:train_flow", ray=True)
    with _clean_errors():
        summary = train_flow(
            source=data,
            dataset=dataset,
            store=store,
            config_file=str(config) if config else None,
            epochs=epochs,
            workers=workers,
            warm_start=warm_start,
            gpus_per_worker=gpus_per_worker,
            budget_minutes=budget,
        )
    table = Table(title=f"supernet {summary['run_id']}")
    table.add_column("")
    table.add_column("value")
    for key in (
        "dataset",
        "data_version",
        "epochs",
        "workers",
        "test_acc/max",
        "test_acc/min",
        "seconds",
        "supernet",
    ):
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
def tune(
    data: str = typer.Option(
        "digits", "--data", help="Source to tune on (ingested first; a no-op if stored)."
    ),
    dataset: str | None = DatasetOpt,
    store: str | None = StoreOpt,
    config: Path | None = typer.Option(
        None, "--config", help="YAML config; its 'train:' section is the base.", callback=_config
    ),
    trials: int = typer.Option(8, "--trials", min=1, help="Number of sampled settings."),
    epochs: int = typer.Option(4, "--epochs", min=1, help="Epochs per trial at most (ASHA stops weak ones)."),
) -> None:
    """Ray Tune sweep (ASHA) over lr, lambda_u, tau and lambda_kd; writes the best config."""
    tune_flow = _flow("flows.tune:tune_flow", ray=True)
    with _clean_errors(RuntimeError):  # RuntimeError: no trial reported a result
        summary = tune_flow(
            source=data,
            dataset=dataset,
            store=store,
            config_file=str(config) if config else None,
            trials=trials,
            epochs=epochs,
        )
    console.print(f"best of {summary['trials']} trials: {summary['best']}", highlight=False)
    console.print(f"mean val accuracy {summary['best_val_acc/mean']:.4f}; config: {summary['best_config']}")
