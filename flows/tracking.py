"""MLflow conventions in one place: one experiment per data set, one run per training.

Uses an explicit MlflowClient (no module-level "active run"), so several flows in one
process never log into each other's runs. MLFLOW_TRACKING_URI selects a server; the
default is a SQLite file under .tofa/ with artifacts beside it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from tofa_core.training.config import TrainConfig


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    Path(".tofa").mkdir(exist_ok=True)
    return f"sqlite:///{Path('.tofa/mlflow.db').resolve()}"


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(client, dataset: str) -> str:
    name = f"tofa-{dataset}"
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    artifacts = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        artifacts = (Path(".tofa") / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifacts)


def _flat(prefix: str, data: dict) -> dict[str, str]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(f"{name}.", value)
        else:
            out[name] = str(value)[:500]
    return out


def log_training(summary: dict, cfg: TrainConfig, history: list[dict]) -> str:
    """One MLflow run for a training: config as params, per-epoch metrics, final accuracies."""
    from mlflow.entities import Metric, Param

    client = _client()
    run = client.create_run(
        experiment_id(client, summary["dataset"]),
        run_name=f"train-{summary['run_id']}",
        tags={
            "tofa.kind": "train",
            "tofa.dataset": summary["dataset"],
            "tofa.data_version": summary["data_version"],
            "tofa.run_dir": summary["run_dir"],
            "tofa.supernet": summary["supernet"],
        },
    )
    now = int(time.time() * 1000)
    params = [Param(k, v) for k, v in _flat("", cfg.model_dump(mode="json")).items()]
    params.append(Param("workers", str(summary["workers"])))
    metrics = []
    for row in history:
        step = int(row.get("epoch", 0))
        for key, value in row.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if numeric and ("/" in key or key in ("lr", "images_per_s", "mask_rate")):
                metrics.append(Metric(key, float(value), now, step))
    for key in ("test_acc/max", "test_acc/min", "seconds"):
        if isinstance(summary.get(key), (int, float)):
            metrics.append(Metric(key, float(summary[key]), now, cfg.epochs))
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


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
