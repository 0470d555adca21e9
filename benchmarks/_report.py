"""Benchmarks log what they print to MLflow too: experiment tofa-<name>, one run per invocation,
numeric results as metrics, settings as params, figures and JSON as artifacts."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from flows.tracking import experiment_id, tracking_uri


def _name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- :/]", "_", key)[:250]


def _numbers(prefix: str, data, out: dict) -> dict:
    if isinstance(data, dict):
        for key, value in data.items():
            _numbers(f"{prefix}{key}.", value, out)
    elif isinstance(data, (list, tuple)) and all(isinstance(v, (int, float)) for v in data):
        for i, value in enumerate(data):
            out[_name(f"{prefix}{i}")] = float(value)
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[_name(prefix.rstrip("."))] = float(data)
    return out


def log_to_mlflow(name: str, params: dict, results: dict, files: list[Path]) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri())
    run = client.create_run(
        experiment_id(client, name), run_name=f"bench-{name}", tags={"tofa.kind": "benchmark"}
    )
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, str(value))
    for key, value in _numbers("", results, {}).items():
        client.log_metric(run_id, key, value)
    for path in files:
        client.log_artifact(run_id, str(path), "figures")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / f"{name}.json").write_text(json.dumps(results, indent=2))
        client.log_artifact(run_id, str(Path(tmp) / f"{name}.json"))
    client.set_terminated(run_id)
    print(f"logged to MLflow {tracking_uri()} experiment tofa-{name}, run {run_id}")
    return run_id
