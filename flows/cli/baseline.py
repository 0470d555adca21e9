"""`tofa baseline`: each target's architecture trained alone, the comparison TOFA answers to."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from flows.cli.common import (
    DatasetOpt,
    EpochsOpt,
    StoreOpt,
    _clean_errors,
    _config,
    _flow,
    app,
    console,
    fail,
)


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
            archs=archs,
            source=data,
            dataset=dataset,
            store=store,
            config_file=str(config) if config else None,
            epochs=epochs,
            workers=workers,
            seed=seed,
        )
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
