"""Targets: validate a file, measure a device's latency table, specialize for every target."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from flows.cli.common import (
    ChannelsOpt,
    DatasetOpt,
    SamplesOpt,
    StoreOpt,
    SummaryOpt,
    TargetsOpt,
    _channels,
    _clean_errors,
    _flow,
    _name,
    _space,
    app,
    console,
    fail,
    targets_table,
)
from tofa_core import names

targets_app = typer.Typer(help="The registry of deployment targets.", no_args_is_help=True)
app.add_typer(targets_app, name="targets")


@targets_app.command("validate")
def targets_validate(
    file: Path = typer.Argument(
        ..., help="Targets YAML: a list of name + max_macs/max_params/max_latency_ms+device."
    ),
) -> None:
    """Check a targets file: names, budgets, devices with latency tables. Prints the targets."""
    from flows.settings import latency_dir
    from tofa_core.search.targets import TargetError, load_targets, table_devices

    try:
        targets = load_targets(file, devices=table_devices(latency_dir()))
    except TargetError as err:
        fail(str(err))
    table = Table(title=f"{len(targets)} targets in {file}")
    for col in ("target", "budget", "formats", "retries"):
        table.add_column(col)
    for t in targets:
        table.add_row(t.name, t.describe(), ", ".join(t.formats), str(t.retries))
    console.print(table)


@app.command("profile-latency")
def profile_latency(
    device: str = typer.Option(..., "--device", help="Name of the device this command runs on, e.g. rpi4."),
    # tiny-fused: what `space: auto` trains on the default 8-16 px data, which the resolutions match
    preset: str = typer.Option("tiny-fused", "--space", help="Search space preset."),
    num_classes: int = typer.Option(10, "--num-classes", min=1),
    in_channels: int | None = ChannelsOpt,
    resolutions: str | None = typer.Option(
        "8,12,16", "--resolutions", help="Input resolutions to cover (the digits default: 8,12,16)."
    ),
    threads: int = typer.Option(1, "--threads", min=1, help="ONNX Runtime intra-op threads."),
    repeats: int = typer.Option(30, "--repeats", min=3, help="Timed runs per block (median)."),
    out: Path | None = typer.Option(
        None, "--out", help="Output JSON \\[default: infra/latency/DEVICE.json]."
    ),
) -> None:
    """Measure a latency table on THIS machine: every block shape of the space, with ONNX Runtime."""
    from rich.progress import Progress

    from flows.settings import latency_dir
    from tofa_core.costs import LatencyTable, LatencyTableError
    from tofa_core.profiler import profile_latency as measure

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", device):
        fail(f"--device must match [a-z0-9][a-z0-9-]{{0,62}} (it names the table file); got {device!r}")
    space = _space(preset, num_classes, _channels(preset, in_channels), resolutions)
    path = out or latency_dir() / f"{device}.json"
    known = None
    if path.exists():
        try:
            known = LatencyTable.load(path)
        except LatencyTableError as err:
            fail(f"{err}; remove it or choose another --out")
        if known.device != device:
            fail(f"{path} holds the table of {known.device!r}, not {device!r}; choose another --out")
    with Progress(console=console, transient=True) as bar:
        job = bar.add_task("profiling blocks", total=None)
        table = measure(
            space,
            device,
            threads=threads,
            repeats=repeats,
            known=known,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
        )
    table.save(path)
    console.print(
        f"{device}: {len(table.entries)} block entries, call overhead {table.overhead_ms:.4f} ms -> {path}",
        highlight=False,
    )


@app.command()
def specialize(
    data: str = typer.Option(
        "digits", "--data", help="Source the supernet was trained on (names the data set)."
    ),
    dataset: str | None = DatasetOpt,
    targets: Path | None = TargetsOpt,
    store: str | None = StoreOpt,
    run: str | None = typer.Option(
        None,
        "--run",
        help="Supernet run id \\[default: the newest of the data set].",
        callback=_name(names.run_id),
    ),
    samples: int = SamplesOpt,
    score: str = typer.Option("agreement", "--score", help="Predictor score: agreement or val."),
    summary_out: Path | None = SummaryOpt,
) -> None:
    """Select, export (ONNX + TorchScript) and verify one subnet per target; no retraining."""
    if score not in ("agreement", "val"):
        fail(f"--score must be agreement or val, got {score!r}")
    specialize_flow = _flow("flows.specialize:specialize_flow")
    from flows.specialize import SpecializationFailed, task_runner

    failed = None
    try:
        with _clean_errors(FileNotFoundError):  # FileNotFoundError: no supernet (or --run) to specialize
            summary = specialize_flow.with_options(task_runner=task_runner())(
                source=data,
                dataset=dataset,
                targets_file=str(targets) if targets else None,
                store=store,
                run_id=run,
                samples=samples,
                score=score,
            )
    except SpecializationFailed as err:
        summary, failed = err.summary, err
    summary = summary.to_json()
    if summary_out:
        summary_out.write_text(json.dumps(summary, indent=2))
    console.print(targets_table(summary["targets"], f"{summary['dataset']} {summary['data_version']}"))
    for f in summary["failed"]:
        Console(stderr=True).print(f"[bold red]failed:[/] {f['target']}: {f['error']}", highlight=False)
    if failed is not None:
        raise typer.Exit(code=1)
