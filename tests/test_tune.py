"""The Ray Tune sweep: real trials on a local Ray, best config written to the store and MLflow."""

from __future__ import annotations

import json

import pytest
import yaml

from tofa_core.storage import open_storage
from tofa_core.training.checkpoint import load_checkpoint
from tofa_core.training.config import TrainConfig

pytestmark = pytest.mark.slow  # Ray Tune trials

BASE = """
train:
  steps_per_epoch: 2
  batch_size: 8
  mu: 1
  k_random: 1
  resolutions: [8]
  calib_images: 64
"""


@pytest.fixture
def workspace(tmp_path, monkeypatch, prefect_server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOFA_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    import ray

    ray.shutdown()


def test_sweep_writes_a_usable_best_config(workspace):
    from mlflow.tracking import MlflowClient

    from flows.tracking import tracking_uri
    from flows.tune import tune_flow

    base = workspace / "base.yaml"
    base.write_text(BASE)
    summary = tune_flow(source="digits", config_file=str(base), trials=3, epochs=2)
    assert summary["trials"] == 3
    assert set(summary["best"]) == {"lr", "lambda_u", "tau", "lambda_kd"}
    assert 0.01 <= summary["best"]["lr"] <= 0.2 and 0.8 <= summary["best"]["tau"] <= 0.99
    # The best settings and the best score are one trial's: the trial trained with those settings
    # (its checkpoint's config) recorded that score at one of its epochs.
    sweep = open_storage(workspace / ".tofa" / "store").child(f"tune/{summary['sweep_id']}")
    trials = sorted({o.key.split("/")[0] for o in sweep.list() if o.key.endswith("/progress.json")})
    assert len(trials) == 3
    lr = {t: load_checkpoint(sweep.child(t), "checkpoints/epoch-0001.pt")["config"]["lr"] for t in trials}
    [best_trial] = [t for t in trials if lr[t] == summary["best"]["lr"]]
    scores = [
        (r["val_acc/max"] + r["val_acc/min"]) / 2
        for r in json.loads(sweep.read_bytes(f"{best_trial}/progress.json"))
    ]
    assert any(summary["best_val_acc/mean"] == pytest.approx(score) for score in scores), (summary, scores)
    folder, _, key = summary["best_config"].rpartition("/")
    best = yaml.safe_load(open_storage(folder).read_bytes(key))
    cfg = TrainConfig(**best["train"])  # loads as a train: section
    assert cfg.lr == pytest.approx(summary["best"]["lr"]) and cfg.epochs == 2
    run = MlflowClient(tracking_uri=tracking_uri()).get_run(summary["mlflow_run_id"])
    assert run.data.params["trials"] == "3" and "best_val_acc/mean" in run.data.metrics
