"""MLflow conventions in one place: one experiment per data set, one run per training.

Uses an explicit MlflowClient (no module-level "active run"), so several flows in one
process never log into each other's runs. MLFLOW_TRACKING_URI selects a server; the
default is a SQLite file under .tofa/ with artifacts beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from mlflow.exceptions import MlflowException

from flows import descriptions
from flows.settings import state_dir
from tofa_core import promotion
from tofa_core.export import FILES, MEASURED_KEYS, Evaluation
from tofa_core.specialize import TargetResult
from tofa_core.training.config import TrainConfig


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    state_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state_dir() / 'mlflow.db'}"


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(client, dataset: str) -> str:
    name = f"tofa-{dataset}"
    found = client.get_experiment_by_name(name)
    if found is not None:
        if descriptions.KIND_TAG not in found.tags:  # made before TOFA set it: the right view too
            client.set_experiment_tag(found.experiment_id, descriptions.KIND_TAG, descriptions.KIND)
        return found.experiment_id
    artifacts = None  # a tracking server decides (e.g. its --artifacts-destination)
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):  # a local database: artifacts in a folder beside it
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    tags = {descriptions.KIND_TAG: descriptions.KIND, descriptions.NOTE: descriptions.experiment(dataset)}
    return client.create_experiment(name, artifact_location=artifacts, tags=tags)


def run_url(dataset: str, run_id: str) -> str | None:
    """The run's page in the tracking server's UI, opened in its model-training view (MLflow 3's
    UI picks GenAI or model training with a sidebar toggle kept per browser; the experiment's
    kind tag alone does not switch it). None for a local database, which has no UI of its own."""
    uri = re.sub(r"(?<=://)[^/@\s]+@", "", tracking_uri())  # a link to share: no credentials
    if not uri.startswith(("http://", "https://")):
        return None
    experiment = experiment_id(_client(), dataset)
    return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"


def _flat(prefix: str, data: dict) -> dict[str, str]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(f"{name}.", value)
        else:
            out[name] = str(value)[:500]
    return out


def log_training(
    summary: dict, cfg: TrainConfig, history: list[dict], parent_run: str | None = None, kind: str = "train"
) -> str:
    """One MLflow run for a training (nested under `parent_run` when a pipeline ran it): config
    as params, per-epoch metrics, final accuracies."""
    from mlflow.entities import Metric, Param

    client = _client()
    tags = {
        "tofa.kind": kind,
        "tofa.dataset": summary["dataset"],
        "tofa.data_version": summary["data_version"],
        "tofa.run_dir": summary["run_dir"],
        "tofa.supernet": summary["supernet"],
        descriptions.NOTE: descriptions.training(summary, _epochs_run(history), kind),
    }
    if parent_run:
        tags["mlflow.parentRunId"] = parent_run
    if "arch" in summary:
        tags["tofa.arch"] = json.dumps(summary["arch"])
    run = client.create_run(
        experiment_id(client, summary["dataset"]), run_name=f"{kind}-{summary['run_id']}", tags=tags
    )
    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in _flat("", cfg.model_dump(mode="json")).items()]
    params.append(Param("workers", str(summary["workers"])))
    metrics = []
    for row in history:
        step = int(row.get("epoch", 0))
        for key, value in row.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if numeric and ("/" in key or key in ("lr", "images_per_s", "mask_rate", "fake_quant")):
                metrics.append(Metric(key, float(value), now, step))
    for key in ("test_acc/max", "test_acc/min", "test_acc/arch", "seconds"):
        if isinstance(summary.get(key), (int, float)):
            metrics.append(Metric(key, float(summary[key]), now, cfg.epochs))
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _epochs_run(history: list[dict]) -> int:
    """The epochs a training ran (a time budget may end it before the config's count)."""
    return int(history[-1].get("epoch", len(history))) if history else 0


def log_sweep(summary: dict) -> str:
    """One MLflow run for a Ray Tune sweep: the best settings as params, its score as a metric."""
    from mlflow.entities import Metric, Param

    client = _client()
    run = client.create_run(
        experiment_id(client, summary["dataset"]),
        run_name=f"tune-{summary['sweep_id']}",
        tags={
            "tofa.kind": "tune",
            "tofa.data_version": summary["data_version"],
            "tofa.best_config": summary["best_config"],
        },
    )
    now = int(time.time() * 1000)
    params = [Param(f"best.{k}", str(v)) for k, v in summary["best"].items()]
    params.append(Param("trials", str(summary["trials"])))
    metrics = [Metric("best_val_acc/mean", float(summary["best_val_acc/mean"]), now, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


# ---------------------------------------------------------------- pipeline runs and the registry


def model_name(dataset: str, target: str) -> str:
    """The registered model of one target: a new version per retraining."""
    return f"tofa-{dataset}-{target}"


def git_commit() -> str | None:
    """The commit of the code that ran (a tag on the pipeline run), when it runs from a checkout."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def start_pipeline(dataset: str, name: str, params: dict, tags: dict) -> str:
    """The parent run of one pipeline run; training and target runs nest under it."""
    from mlflow.entities import Param

    client = _client()
    run = client.create_run(
        experiment_id(client, dataset), run_name=name, tags={"tofa.kind": "pipeline", **tags}
    )
    flat = [Param(k, v) for k, v in _flat("", params).items()]
    for start in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[start : start + 100])
    return run.info.run_id


def finish_run(run_id: str, ok: bool, metrics: dict | None = None, note: str | None = None) -> None:
    """End a run (FINISHED or FAILED) with its last metrics and, given one, its description."""
    from mlflow.entities import Metric

    client = _client()
    if note:
        client.set_tag(run_id, descriptions.NOTE, note)
    now = int(time.time() * 1000)
    if metrics:
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def log_artifacts(run_id: str, folder: Path, artifact_path: str) -> None:
    _client().log_artifacts(run_id, str(folder), artifact_path)


def register_target(
    parent_run: str,
    dataset: str,
    row: TargetResult,
    folder: Path,
    example,
    evaluation: Evaluation,
) -> dict:
    """Log one specialized target as a nested run, register it as a new model version, and
    decide its alias.

    `folder` holds the target's model.onnx, model.pt and model.json; `example` is one real
    preprocessed input (the logged input example); `evaluation` holds the labelled images every
    exported model is scored on. The new version becomes `champion` only when it scores at
    least as well as the current champion, both scored here on the same images; otherwise it
    is the `challenger` and the reason is recorded.
    """
    from mlflow.entities import Metric

    client = _client()
    target = row.target
    files = hashlib.sha256((folder / "model.onnx").read_bytes() + (folder / "model.json").read_bytes())
    fingerprint = files.hexdigest()[:32]
    done = _registered_before(client, parent_run, dataset, target, fingerprint)
    if done is not None:  # a retry after these files were registered: the same answer, no new version
        return done
    about = json.loads((folder / "model.json").read_text())
    run_id = _target_run(client, parent_run, dataset, row, about, fingerprint)
    _log_model(client, run_id, folder, example, target)
    name = model_name(dataset, target)
    note = descriptions.target(row, about.get("data_version", "?"))
    version = _new_version(client, name, run_id, dataset, target, note)
    try:
        decision = _promote(client, name, version, folder, about, evaluation)
    except Exception:
        # No orphan version: a registration whose comparison could not be decided is undone
        # (the retry registers it again).
        client.delete_model_version(name, version)
        client.set_terminated(run_id, "FAILED")
        raise
    for key, value in decision.items():
        client.set_model_version_tag(name, version, f"tofa.{key}", str(value))
    client.set_tag(run_id, "tofa.alias", decision["alias"])
    client.set_tag(run_id, "tofa.reason", decision["reason"])
    client.log_batch(run_id, metrics=[Metric("eval_acc", decision["eval_acc"], int(time.time() * 1000), 0)])
    result = {
        "model": name,
        "version": int(version),
        "uri": f"models:/{name}/{version}",
        "mlflow_run_id": run_id,
        **decision,
    }
    client.set_tag(run_id, RESULT_TAG, json.dumps(result))  # last: marks the target as registered
    client.set_terminated(run_id)
    return result


def _target_run(
    client, parent_run: str, dataset: str, row: TargetResult, about: dict, fingerprint: str
) -> str:
    """The target's run nested under the pipeline's, with its budget, arch and metrics."""
    from mlflow.entities import Metric, Param

    target = row.target
    run = client.create_run(
        experiment_id(client, dataset),
        run_name=f"target-{target}",
        tags={
            "mlflow.parentRunId": parent_run,
            "tofa.kind": "target",
            "tofa.target": target,
            "tofa.dataset": dataset,
            "tofa.data_version": about.get("data_version", ""),
            "tofa.supernet": about.get("supernet", ""),
            FILES_TAG: fingerprint,
            descriptions.NOTE: descriptions.target(row, about.get("data_version", "?")),
        },
    )
    params = {f"budget.{k}": v for k, v in row.constraints.items()}
    params |= {"device": row.device or "-", "arch": json.dumps(row.arch), "precision": row.precision}
    params |= {f"arch.{k}": v for k, v in row.arch.items()}
    params |= {f"rejected_by.{check}": n for check, n in row.rejected_by.items()}
    now = int(time.time() * 1000)
    flat = row.to_json()
    metrics = {k: flat[k] for k in METRIC_KEYS if isinstance(flat.get(k), (int, float))}
    client.log_batch(
        run.info.run_id,
        params=[Param(k, str(v)[:500]) for k, v in params.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
    )
    return run.info.run_id


def _log_model(client, run_id: str, folder: Path, example, target: str) -> None:
    """The ONNX model in MLflow's onnx flavour (signature, input example), the other formats, model.json."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    from tofa_core import onnx_runtime

    logits = onnx_runtime.run(onnx_runtime.session(str(folder / "model.onnx")), example)
    with tempfile.TemporaryDirectory(prefix=f"tofa-mlflow-{target}-") as tmp:
        model_dir = Path(tmp) / "model"
        mlflow.onnx.save_model(
            onnx.load(str(folder / "model.onnx")),
            str(model_dir),
            signature=infer_signature(example, logits),
            input_example=example,
            pip_requirements=["onnxruntime", "numpy"],  # explicit: inferring them takes seconds
        )
        for extra in (*FILES.values(), "model.json"):
            if extra != "model.onnx" and (folder / extra).exists():
                shutil.copy2(folder / extra, model_dir / extra)
        client.log_artifacts(run_id, str(model_dir), "model")


def _new_version(client, name: str, run_id: str, dataset: str, target: str, note: str) -> str:
    """A new version of the target's registered model (the model created on first use)."""
    try:
        client.create_registered_model(
            name, description=f"TOFA subnet for target {target!r} on data set {dataset!r}"
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(
        name, f"runs:/{run_id}/model", run_id=run_id, tags={"tofa.target": target}, description=note
    ).version


RESULT_TAG, FILES_TAG = "tofa.registered", "tofa.files_sha256"


def _registered_before(client, parent_run: str, dataset: str, target: str, fingerprint: str) -> dict | None:
    """What an earlier attempt under the same pipeline run registered for `target` from the same
    files, if it got to the end; an attempt that stopped half-way is marked FAILED (its run,
    and a model version it may have created without an alias, stay for inspection)."""
    runs = client.search_runs(
        [experiment_id(client, dataset)],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run}' and tags.`tofa.target` = '{target}' "
        f"and tags.`{FILES_TAG}` = '{fingerprint}'",
    )
    for run in runs:
        if RESULT_TAG in run.data.tags:
            return json.loads(run.data.tags[RESULT_TAG])
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
    return None


# test_acc is the deployed file's (int8 for an int8 target); test_acc_<format> each file's.
METRIC_KEYS = (*MEASURED_KEYS, "predicted_score", "score", "seconds", "rejected_candidates")


def _promote(client, name: str, version: str, folder: Path, about: dict, evaluation: Evaluation) -> dict:
    """Score the new version and the current champion on the same evaluation, decide by
    tofa_core.promotion's rule, and set the aliases it decided."""
    new_file = folder / about.get("deployed", "model.onnx")  # at its precision
    current = client.get_registered_model(name).aliases.get("champion")
    champion = None
    if current is not None:
        current = int(current)  # a str over REST, an int from SQLite
        try:
            champion = _champion(client, name, current, evaluation)
        except Exception as err:  # noqa: BLE001 - whatever broke it, it must not jam every later run
            champion = promotion.Champion(current, unusable=f"{type(err).__name__}: {err}"[:300])
    if champion is not None and champion.classes is not None:  # the new one on the same classes
        new = evaluation.accuracy(new_file, about, champion.classes)
        champion = dataclasses.replace(champion, new_accuracy=new)
    missing = [c for c in evaluation.classes if champion and champion.classes and c not in champion.classes]
    decision = promotion.decide(evaluation.accuracy(new_file, about), evaluation.label, champion, missing)
    if decision["alias"] == "champion":
        client.set_registered_model_alias(name, "champion", version)
        if client.get_registered_model(name).aliases.get("challenger") is not None:
            client.delete_registered_model_alias(name, "challenger")
    else:
        client.set_registered_model_alias(name, "challenger", version)
    return decision


def _champion(client, name: str, version: int, evaluation: Evaluation) -> promotion.Champion:
    """The champion scored on today's evaluation: its artifacts, run on today's images (raises
    when it cannot be: missing or malformed files, another input shape, none of today's
    classes); where it lacks some of today's classes, on those it knows."""
    with tempfile.TemporaryDirectory(prefix="tofa-champion-") as tmp:
        local = Path(client.download_artifacts(client.get_model_version(name, version).run_id, "model", tmp))
        champion = json.loads((local / "model.json").read_text())
        known = set(champion["output"]["classes"])
        shared = [c for c in evaluation.classes if c in known]
        if not shared:
            raise ValueError("it knows none of today's classes")
        if len(shared) == len(evaluation.classes):
            shared = None
        accuracy = evaluation.accuracy(local / champion.get("deployed", "model.onnx"), champion, shared)
    return promotion.Champion(version, accuracy, shared)


def log_dict(run_id: str, data: dict, name: str) -> None:
    _client().log_dict(run_id, data, name)
