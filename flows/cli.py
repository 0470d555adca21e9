"""`tofa`: the command line. Thin: every command calls tofa_core and prints what it got."""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tofa_core import config_files, names

# Prefect's ephemeral API migrates a fresh database on first start, which takes longer than its
# 20 s default on a small loaded machine; its analytics would try the network. Users override.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

app = typer.Typer(
    help="Transfer-Once-For-All: one elastic supernet for small data, one subnet per edge target.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()


def fail(message: str) -> None:
    """Exit non-zero with one paragraph on stderr: what is wrong and how to fix it."""
    # escape(): a message quoting a pattern or a list ("[a-z0-9]", "['a']") is text, not markup.
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code=2)


def _flow(path: str, ray: bool = False):
    """The flow at `path` ("module:function"), imported while Prefect's temporary API server
    comes up (and Ray starts, for a command that trains): seconds each, side by side. Flows
    start after this returns: the server must answer first."""
    from flows.startup import prefect_api_starting

    module, _, name = path.partition(":")
    with prefect_api_starting():
        flow = getattr(importlib.import_module(module), name)
        if ray:
            from flows.train import start_ray

            start_ray()
    return flow


@contextmanager
def _clean_errors(*more: type[Exception]):
    """A recognised error (flows.errors), a bad value or one of `more` ends the command with
    its message (exit 2); anything else keeps its traceback."""
    from flows.errors import recognised

    try:
        yield
    except (*recognised(), ValueError, *more) as err:
        fail(str(err))


def _space(preset: str, num_classes: int, in_channels: int, resolutions: str | None):
    from tofa_core.arch import SearchSpace

    overrides = {}
    if resolutions:
        try:
            overrides["resolutions"] = tuple(int(r) for r in resolutions.split(","))
        except ValueError:
            fail(f"--resolutions must be comma-separated integers such as 16,24,32; got {resolutions!r}")
    try:
        return SearchSpace.preset(preset, num_classes=num_classes, in_channels=in_channels, **overrides)
    except ValueError as err:
        fail(str(err))


PresetArg = typer.Argument("tiny", help="Search space preset: tiny, tiny-fused, small-fused or ofa-mbv3.")
ClassesOpt = typer.Option(10, "--num-classes", min=1, help="Classifier outputs.")
ChannelsOpt = typer.Option(
    None,
    "--in-channels",
    min=1,
    help="Input channels \\[default: 1 for tiny, tiny-fused and small-fused, 3 for ofa-mbv3].",
)
ResOpt = typer.Option(None, "--resolutions", help="Override the input resolutions, e.g. 16,24,32.")


def _name(check):
    """An option callback: a name that becomes a store path is refused before anything starts."""

    def callback(value: str | None) -> str | None:
        try:
            return value if value is None else check(value)
        except names.InvalidName as err:
            raise typer.BadParameter(str(err)) from None

    return callback


def _config(value: Path | None) -> Path | None:
    """An option callback: a config file is read and its sections checked before anything starts."""
    try:
        for section in config_files.SECTIONS if value is not None else ():
            config_files.load_section(value, section)
    except config_files.ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    return value


# Options several commands share (one definition, one help text).
DatasetOpt = typer.Option(
    None, "--dataset", help="Data set name \\[default: from the source].", callback=_name(names.dataset_name)
)
StoreOpt = typer.Option(None, "--store", help="Store root \\[default: $TOFA_STORE or .tofa/store].")
ConfigOpt = typer.Option(
    None, "--config", help="YAML config; its 'ingest:' and 'train:' sections apply.", callback=_config
)
EpochsOpt = typer.Option(None, "--epochs", min=1, help="Override train.epochs.")
BudgetOpt = typer.Option(
    None,
    "--budget",
    min=0.01,
    help="Minutes of training at most: the epochs that fit at the first epoch's pace (train.budget_minutes).",
)
GpusOpt = typer.Option(
    None, "--gpus-per-worker", min=0, help="GPUs Ray gives each training worker (train.gpus_per_worker)."
)
WorkersOpt = typer.Option(2, "--workers", min=1, max=1024, help="Ray Train workers.")
TargetsOpt = typer.Option(None, "--targets", help="Targets YAML \\[default: infra/targets/default.yaml].")
SamplesOpt = typer.Option(300, "--samples", min=10, help="Subnets scored to fit the accuracy predictor.")
SummaryOpt = typer.Option(None, "--summary-out", help="Write the JSON summary here.")


def _channels(preset: str, in_channels: int | None) -> int:
    return in_channels if in_channels is not None else (3 if preset == "ofa-mbv3" else 1)


@app.command()
def space(
    preset: str = PresetArg,
    num_classes: int = ClassesOpt,
    in_channels: int | None = ChannelsOpt,
    resolutions: str | None = ResOpt,
) -> None:
    """Show a search space: its choices and the cost range of its subnets."""
    from tofa_core.costs import count_macs, count_params

    sp = _space(preset, num_classes, _channels(preset, in_channels), resolutions)
    table = Table(title=f"search space {sp.name}")
    table.add_column("setting")
    table.add_column("choices")
    table.add_row("resolution", ", ".join(map(str, sp.resolutions)))
    table.add_row("width", ", ".join(map(str, sp.width_choices)))
    table.add_row("depth per stage", f"{', '.join(map(str, sp.depth_choices))} (x{len(sp.stages)} stages)")
    table.add_row("kernel per block", ", ".join(map(str, sp.kernel_choices)))
    table.add_row("expand per block", ", ".join(map(str, sp.expand_choices)))
    for label, arch in (("smallest", sp.min_arch()), ("largest", sp.max_arch())):
        table.add_row(f"{label} subnet", f"{count_macs(arch, sp):,} MACs, {count_params(arch, sp):,} params")
    console.print(table)


@app.command()
def sample(
    preset: str = PresetArg,
    count: int = typer.Option(
        5, "--count", min=1, help="How many random subnets (plus the largest and smallest)."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    num_classes: int = ClassesOpt,
    in_channels: int | None = ChannelsOpt,
    resolutions: str | None = ResOpt,
    verify: bool = typer.Option(
        True, help="Extract each subnet and check it computes what the supernet does."
    ),
    json_out: Path | None = typer.Option(None, "--json-out", help="Write the subnets and their costs here."),
) -> None:
    """Sample subnets of a fresh supernet, with their costs; extract and verify each one."""
    import torch

    from tofa_core.costs import count_macs, count_params
    from tofa_core.supernet import Supernet

    sp = _space(preset, num_classes, _channels(preset, in_channels), resolutions)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    net = Supernet(sp).eval()
    archs = [sp.max_arch(), sp.min_arch()] + [sp.sample(rng) for _ in range(count)]
    table = Table(title=f"{len(archs)} subnets of {sp.name}")
    for col in ("res", "width", "depths", "MACs", "params") + (("max |diff|",) if verify else ()):
        table.add_column(col, justify="right")
    rows, worst = [], 0.0
    for arch in archs:
        row = {
            "arch": arch.to_dict(),
            "macs": count_macs(arch, sp),
            "params": count_params(arch, sp),
        }
        cells = [
            str(arch.resolution),
            str(arch.width),
            str(list(arch.depths)),
            f"{row['macs']:,}",
            f"{row['params']:,}",
        ]
        if verify:
            x = torch.randn(4, sp.in_channels, arch.resolution, arch.resolution)
            with torch.no_grad():
                diff = (net(x, arch) - net.extract(arch).eval()(x)).abs().max().item()
            row["max_abs_diff"] = diff
            worst = max(worst, diff)
            cells.append(f"{diff:.1e}")
        rows.append(row)
        table.add_row(*cells)
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))
        console.print(f"wrote {json_out}")
    from tofa_core.export import MAX_ABS_DIFF

    if verify and worst > MAX_ABS_DIFF:
        fail(f"an extracted subnet differs from the supernet by {worst:.2e}; this is a bug, please report it")


@app.command()
def costs(
    arch_json: str = typer.Argument(..., help="An Arch as JSON text, or a path to a JSON file holding one."),
    preset: str = typer.Option("tiny", "--space", help="Search space preset the Arch belongs to."),
    num_classes: int = ClassesOpt,
    in_channels: int | None = ChannelsOpt,
    resolutions: str | None = ResOpt,
) -> None:
    """Print the MACs, parameters and layers of one architecture."""
    from tofa_core.arch import Arch
    from tofa_core.costs import count_macs, count_params, layers

    sp = _space(preset, num_classes, _channels(preset, in_channels), resolutions)
    text = (
        Path(arch_json).read_text() if arch_json.endswith(".json") and Path(arch_json).exists() else arch_json
    )
    try:
        arch = sp.validate(Arch.from_json(text))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        fail(f"not a valid Arch for space {sp.name!r}: {err}")
    table = Table(title=f"{count_macs(arch, sp):,} MACs, {count_params(arch, sp):,} params")
    for col in ("layer", "kind", "in", "out", "k", "s", "size", "MACs", "params"):
        table.add_column(col, justify="right")
    for spec in layers(arch, sp):
        table.add_row(
            spec.name,
            spec.kind,
            str(spec.cin),
            str(spec.cout),
            str(spec.kernel),
            str(spec.stride),
            str(spec.in_size),
            f"{spec.macs:,}",
            f"{spec.params:,}",
        )
    console.print(table)


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
    from flows.settings import store_uri
    from tofa_core.data.store import DatasetStore
    from tofa_core.runlock import RunLock
    from tofa_core.storage import open_storage

    root = open_storage(store_uri(store))
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
            source=data, dataset=dataset, store=store, config_file=str(config) if config else None,
            trials=trials, epochs=epochs,
        )  # fmt: skip
    console.print(f"best of {summary['trials']} trials: {summary['best']}", highlight=False)
    console.print(f"mean val accuracy {summary['best_val_acc/mean']:.4f}; config: {summary['best_config']}")


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
            space, device, threads=threads, repeats=repeats, known=known,
            progress=lambda done, total: bar.update(job, completed=done, total=total),
        )  # fmt: skip
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
                source=data, dataset=dataset, targets_file=str(targets) if targets else None, store=store,
                run_id=run, samples=samples, score=score,
            )  # fmt: skip
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
                source=data, dataset=dataset, targets_file=str(targets) if targets else None,
                config_file=str(config) if config else None, epochs=epochs, workers=workers, store=store,
                samples=samples, force=force, lock_wait=wait_lock, gpus_per_worker=gpus_per_worker,
                budget_minutes=budget,
            )  # fmt: skip
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


@app.command()
def baseline(
    data: str = typer.Option(
        "digits", "--data", help="Source to train on (ingested first; a no-op if stored)."
    ),
    dataset: str | None = DatasetOpt,
    arch: str | None = typer.Option(None, "--arch", help="One Arch as JSON text or a .json file."),
    from_summary: Path | None = typer.Option(
        None, "--from-summary", help="A `tofa run`/`tofa specialize` summary: each target's chosen arch."
    ),
    target: list[str] | None = typer.Option(
        None, "--target", help="With --from-summary: only these targets (repeatable) \\[default: all]."
    ),
    store: str | None = StoreOpt,
    config: Path | None = typer.Option(
        None,
        "--config",
        help="YAML config; its 'train:' section applies (use the supernet's).",
        callback=_config,
    ),
    epochs: int | None = EpochsOpt,
    workers: int = typer.Option(1, "--workers", min=1, help="Ray Train workers per training."),
    seed: int | None = typer.Option(None, "--seed", help="Override train.seed."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Write the results here."),
) -> None:
    """The per-target baseline: train an architecture alone (same data, loss, schedule, evaluation)."""
    archs = _baseline_archs(arch, from_summary, target)
    baseline_flow = _flow("flows.baseline:baseline_flow", ray=True)
    with _clean_errors():
        results = baseline_flow(
            archs=archs, source=data, dataset=dataset, store=store,
            config_file=str(config) if config else None, epochs=epochs, workers=workers, seed=seed,
        )  # fmt: skip
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    table = Table(title=f"baselines: each architecture trained alone on {results[0]['dataset']}")
    for col in ("label", "test acc", "seconds", "run"):
        table.add_column(col, justify="left" if col in ("label", "run") else "right")
    for r in results:
        table.add_row(r["label"], f"{r['test_acc']:.1%}", f"{r['seconds']:.0f}", r["run_id"])
    console.print(table)


def _baseline_archs(arch: str | None, from_summary: Path | None, target: list[str] | None) -> dict:
    """label -> Arch dict: the one --arch, or each (chosen) target's arch in a summary."""
    from tofa_core.arch import Arch

    if (arch is None) == (from_summary is None):
        fail("give exactly one of --arch (one architecture) or --from-summary (each target's)")
    if arch is not None:
        text = Path(arch).read_text() if arch.endswith(".json") and Path(arch).exists() else arch
        try:
            return {"arch": Arch.from_json(text).to_dict()}
        except (ValueError, TypeError) as err:
            fail(f"--arch is not a valid Arch: {err}")
    try:
        rows = json.loads(from_summary.read_text())["targets"]
    except (OSError, ValueError, KeyError) as err:
        fail(f"{from_summary} is not a `tofa run` or `tofa specialize` summary: {err}")
    archs = {r["target"]: r["arch"] for r in rows if not target or r["target"] in target}
    if missing := set(target or ()) - set(archs):
        fail(f"{from_summary} has no target(s) {sorted(missing)}; it has {[r['target'] for r in rows]}")
    return archs


stack_app = typer.Typer(
    help="The local service stack: S3 (SeaweedFS), MLflow server, Prefect server and worker.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up(
    s3_port: int = typer.Option(8333, "--s3-port", help="S3 endpoint port on 127.0.0.1."),
    mlflow_port: int = typer.Option(5000, "--mlflow-port", help="MLflow server port on 127.0.0.1."),
    prefect_port: int = typer.Option(4200, "--prefect-port", help="Prefect server (API and UI) port."),
) -> None:
    """Start the stack (what already runs is kept) and print the environment to export."""
    from flows.stack import StackConfig, StackError, up

    cfg = StackConfig(s3_port=s3_port, mlflow_port=mlflow_port, prefect_port=prefect_port)
    try:
        env = up(cfg, progress=lambda message: Console(stderr=True).print(message, highlight=False))
    except StackError as err:
        fail(str(err))
    Console(stderr=True).print(
        f"stack up; data and logs under {cfg.home}. MLflow UI: {env['MLFLOW_TRACKING_URI']}, Prefect UI: "
        f"{env['PREFECT_API_URL'].removesuffix('/api')}. Use it from this shell with "
        f"`source {cfg.home / 'env'}` (the lines below):",
        highlight=False,
    )
    print("".join(f"export {k}={v}\n" for k, v in env.items()), end="")


@stack_app.command("down")
def stack_down() -> None:
    """Stop the stack's processes (by their recorded PIDs); data stays for the next `up`."""
    from flows.stack import StackConfig, down

    stopped = down(StackConfig())
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running", highlight=False)


@stack_app.command("status")
def stack_status() -> None:
    """Each service: running, healthy, PID, URL. Exits 1 when any is not healthy."""
    from flows.stack import StackConfig, status

    rows = status(StackConfig())
    table = Table(title="tofa stack")
    for col in ("service", "state", "pid", "url", "log"):
        table.add_column(col)
    for r in rows:
        state = "healthy" if r["healthy"] else ("running, not answering" if r["running"] else "stopped")
        table.add_row(r["service"], state, str(r["pid"] or "-"), r["url"] or "-", r["log"] or "-")
    console.print(table)
    if not all(r["healthy"] for r in rows):
        raise typer.Exit(code=1)


@stack_app.command("env")
def stack_env() -> None:
    """Print the environment that points tofa, MLflow and Prefect clients at the stack."""
    from flows.stack import StackConfig, StackError, saved_env

    try:
        env = saved_env(StackConfig())
    except StackError as err:
        fail(str(err))
    print("".join(f"export {k}={v}\n" for k, v in env.items()), end="")


def _short(n: int) -> str:
    """1396512 -> 1.40M, 71354 -> 71k: the table has to fit an 80-column terminal."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _budget_cell(field: str, value: float) -> str:
    """160k macs, 75k params, 0.3ms, 32KB RAM: one constraint of the budget column."""
    from tofa_core.constraints import BY_FIELD

    c = BY_FIELD[field]
    if c.kind is int:
        return f"{_short(value)} {c.key}"
    return f"{value:g}{c.unit}" + (f" {c.label}" if c.from_arch is not None else "")


def targets_table(rows: list[dict], title: str) -> Table:
    table = Table(
        title=f"specialized subnets: {title}", box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True
    )
    registered = any("registered_model" in r for r in rows)
    table.add_column("target", no_wrap=True)
    table.add_column("budget", min_width=10)
    for col in ("MACs", "params", "lat ms", "val/test", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    if registered:
        table.add_column("model", no_wrap=True)
    for r in rows:
        budget = " ".join(_budget_cell(k, v) for k, v in r["constraints"].items())
        budget += " int8" if r.get("precision") == "int8" else ""
        latency = f"{r['latency_ms']:.3f}" if r.get("latency_ms") is not None else "-"
        pct = lambda v: f"{100 * v:.1f}" if v is not None else "-"  # noqa: E731
        cells = [
            r["target"], budget, _short(r["macs"]), _short(r["params"]), latency,
            f"{pct(r.get('val_acc'))}/{pct(r.get('test_acc'))}", f"{r['seconds']:.1f}",
        ]  # fmt: skip
        if registered:
            reg = r["registered_model"]
            cells.append(f"v{reg['version']} {reg['alias']}")
        table.add_row(*cells)
    return table


def main() -> None:  # pragma: no cover - `python -m flows.cli`
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
