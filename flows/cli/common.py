"""What every command shares: the app, its options, the start of a flow, its errors, the table
of targets."""

from __future__ import annotations

import importlib
import os
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
    its message (exit 2); anything else keeps its traceback. Failed targets are the caller's
    to report (a table, exit 1)."""
    from flows.errors import recognised

    try:
        yield
    except (*recognised(), ValueError, *more) as err:
        from flows.specialize import SpecializationFailed

        if isinstance(err, SpecializationFailed):
            raise
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
        if value is not None:
            config_files.load_sections(value)
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


def _short(n: int) -> str:
    """1396512 -> 1.40M, 71354 -> 71k: the table has to fit an 80-column terminal."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _columns(rows: list[dict]):
    """The registered constraints shown as columns: the counts every subnet has (MACs,
    params), then each other constraint that some row's target budgets."""
    from tofa_core.constraints import CONSTRAINTS

    budgeted = {f for r in rows for f in r["constraints"]}
    return [c for c in CONSTRAINTS if c.kind is int or c.field in budgeted]


def _header(c) -> str:
    """MACs, params, lat/ms, RAM/KB: labels over 5 letters cut to 3 (the table fits 80 columns)."""
    return f"{c.label if len(c.label) <= 5 else c.label[:3]}\n{c.unit}".strip()


def _cell(c, value) -> str:
    """A measured value: counts as 151k or 1.40M, others to 3 digits (1820, not 1.82e+03)."""
    if value is None:
        return "-"
    if c.kind is int:
        return _short(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def targets_table(rows: list[dict], title: str) -> Table:
    """One target a row: what its subnet measured and, dim beneath each value, the target's
    budget for it (a column per constraint, so 80 columns hold every kind of budget)."""
    table = Table(
        title=f"specialized subnets: {title}",
        caption="under each target: its precision and (dim) budgets",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    registered = any("registered_model" in r for r in rows)
    columns = _columns(rows)
    table.add_column("target", no_wrap=True)
    for col in (*(_header(c) for c in columns), "test\n%", "s"):
        table.add_column(col, justify="right", no_wrap=True)
    if registered:
        table.add_column("model", no_wrap=True)
    for r in rows:
        budgets = r["constraints"]
        precision = r.get("precision") or "fp32"
        cells = [f"{escape(r['target'])}\n[dim]{precision}[/]"]
        for c in columns:
            cell = _cell(c, r.get(c.key))
            if c.field in budgets:
                cell += f"\n[dim]≤{_cell(c, budgets[c.field])}[/]"
            cells.append(cell)
        test = r.get("test_acc")
        cells += [f"{100 * test:.1f}" if test is not None else "-", f"{r['seconds']:.1f}"]
        if registered:
            reg = r["registered_model"]
            cells.append(f"v{reg['version']} {reg['alias']}")
        table.add_row(*cells)
    return table
