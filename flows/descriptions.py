"""What a person browsing MLflow reads: the descriptions of TOFA's experiments, runs and model
versions (MLflow shows a run's or experiment's `mlflow.note.content` tag as its description).

Each is a few plain sentences built from the records the pipeline already keeps.
"""

from __future__ import annotations

from tofa_core.constraints import BY_FIELD
from tofa_core.specialize import TargetResult

NOTE = "mlflow.note.content"
# MLflow 3 opens an experiment in its GenAI view (traces, judges, prompts) unless told it holds
# model training; TOFA's hold supernet trainings and one exported model per target.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"


def experiment(dataset: str) -> str:
    return (
        f"TOFA on data set `{dataset}`. Each `pipeline-*` run is one retraining: its `train-*` run "
        "trained one elastic supernet on the data version it names, and one `target-*` run per "
        f"deployment target holds the subnet selected, exported and verified for it (registered as "
        f"model `tofa-{dataset}-<target>`)."
    )


def training(summary: dict, epochs: int, kind: str = "train") -> str:
    """A training run: what was trained on which data version, for how many epochs (those
    run: a time budget may stop it early), and how well."""
    accuracies = [
        f"{name} subnet {summary[key]:.1%}"
        for name, key in (("largest", "test_acc/max"), ("smallest", "test_acc/min"))
        if isinstance(summary.get(key), (int, float))
    ]
    what = "Supernet" if kind == "train" else f"{kind.capitalize()} (one fixed network, labels only)"
    text = (
        f"{what} trained on `{summary['dataset']}` data version `{summary['data_version']}`: "
        f"{epochs} epochs on {summary['workers']} worker(s)."
    )
    if accuracies:
        text += f" Test accuracy: {', '.join(accuracies)}."
    elif isinstance(summary.get("test_acc/arch"), (int, float)):
        text += f" Test accuracy: {summary['test_acc/arch']:.1%}."
    return text + f" Checkpoint: `{summary['supernet']}`."


def target(row: TargetResult, data_version: str) -> str:
    """A target's run and model version: its budget, what was measured on its files, its data."""
    budget = ", ".join(BY_FIELD[f].show(v) for f, v in row.constraints.items()) or "none"
    m = row.measured
    shown = [f"{m['macs']:,} MACs", f"{m['params']:,} parameters"]
    shown += [
        f"{label} {m[key]:.1f} KB"
        for key, label in (("ram_kb", "RAM"), ("flash_kb", "flash"))
        if _number(m.get(key))
    ]
    if _number(m.get("latency_ms")):
        shown.append(f"{m['latency_ms']:.3f} ms on {row.device}")
    text = (
        f"Subnet for target `{row.target}` (budget: {budget}; {row.precision}), selected from the "
        f"supernet and exported without retraining, from data version `{data_version}`. Measured on "
        f"the exported files: {', '.join(shown)}."
    )
    if _number(m.get("test_acc")):
        text += f" Test accuracy of the deployed file: {m['test_acc']:.1%}."
    if _number(m.get("tflite_flash_kb")):
        text += f" Its LiteRT file: RAM {m['tflite_ram_kb']:.1f} KB, flash {m['tflite_flash_kb']:.1f} KB."
    litert_acc = m.get("test_acc_tflite_int8" if row.precision == "int8" else "test_acc_tflite")
    if _number(litert_acc):
        text += f" LiteRT test accuracy: {litert_acc:.1%}."
    return text + (f" Files: {', '.join(sorted(row.files))}." if row.files else "")


def _number(value) -> bool:
    return isinstance(value, (int, float))


def pipeline(record: dict, ok: bool) -> str:
    """The pipeline run, once it ended: what it trained or reused, what it registered."""
    text = f"Retraining of `{record['dataset']}` on data version `{record['data_version']}`"
    if "supernet_run" in record:
        how = "reused" if record.get("supernet_reused") else "trained"
        text += f": supernet {how} (`{record['supernet_run']}`)"
    rows = record.get("targets", [])
    aliases: dict[str, list[str]] = {}
    for row in rows:
        aliases.setdefault(row.get("registered_model", {}).get("alias", "?"), []).append(row["target"])
    text += f". {len(rows)} target(s) registered" if rows else ". No target registered"
    text += "".join(f"; {alias}: {', '.join(names)}" for alias, names in sorted(aliases.items()))
    failed = record.get("failed") or []
    if failed:
        text += f". Failed: {', '.join(f['target'] for f in failed)}"
    return text + ("." if ok else ". The run failed; its log names the stage.")
