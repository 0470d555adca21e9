"""Training on real Ray Train workers, through the Prefect flow, tracked in MLflow."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from quick_config import config
from recompute import assert_reported

from tofa_core.storage import open_storage

pytestmark = pytest.mark.slow  # Ray Train runs


@pytest.fixture
def workspace(tmp_path, monkeypatch, prefect_server):
    monkeypatch.chdir(tmp_path)  # .tofa/ (store, MLflow database) lands here
    monkeypatch.delenv("TOFA_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path
    import ray

    ray.shutdown()


def test_two_ray_workers_train_checkpoint_and_log_to_mlflow(workspace):
    from mlflow.tracking import MlflowClient

    from flows.tracking import tracking_uri
    from flows.train import train_flow

    summary = train_flow(source="digits", config_file=config(workspace, 2, 2), workers=2)
    run_dir = open_storage(summary["run_dir"])
    assert [o.key for o in run_dir.list("checkpoints")] == [
        "checkpoints/epoch-0001.pt",
        "checkpoints/epoch-0002.pt",
    ]
    record = json.loads(run_dir.read_bytes("result.json"))
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert_reported(summary, str(workspace / ".tofa" / "store"), summary["run_dir"])

    client = MlflowClient(tracking_uri=tracking_uri())
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["tofa.data_version"] == summary["data_version"]
    assert run.data.params["lambda_u"] == "1.0" and run.data.params["workers"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_acc/max")
    assert [m.step for m in history] == [1, 2]
    assert {"teacher/ce", "mask_rate", "student/kd", "test_acc/max"} <= set(run.data.metrics)

    again = train_flow(source="digits", config_file=config(workspace, 1, 2), workers=1, warm_start="last")
    assert again["warm_start"] == f"{summary['run_dir']}/supernet.pt"
    assert again["data_version"] == summary["data_version"]
    assert (
        json.loads(open_storage(again["run_dir"]).read_bytes("result.json"))["warm_start"]
        == again["warm_start"]
    )

    # The config moved to another search space: `last` (a tiny-fused supernet, what `auto` picks
    # for 8 px digits) cannot fit, so this run starts from scratch instead of failing (a checkpoint named
    # explicitly still fails: tests/test_training.py).
    other = train_flow(
        source="digits", config_file=config(workspace, 1, 2, space="tiny"), workers=1, warm_start="last"
    )
    assert other["warm_start"] is None
    assert_reported(other, str(workspace / ".tofa" / "store"), other["run_dir"])

    # Named explicitly, the same checkpoint is a request that cannot be met: one clear error,
    # not three restarts by Ray's FailureConfig ending in its TrainingFailedError.
    from tofa_core.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="search space|does not fit"):
        train_flow(
            source="digits", config_file=config(workspace, 1, 2, space="tiny"), workers=1,
            warm_start=summary["supernet"],
        )  # fmt: skip


def test_a_killed_worker_resumes_from_the_last_checkpoint(workspace):
    from flows.train import train_flow

    def train_workers() -> list[int]:
        """PIDs of this test's Ray Train worker processes: titled ray::RayTrainWorker, descended
        from this process (Ray's GCS-state API would leave a client behind that aborts at exit)."""

        def parent(pid: int) -> int:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

        found = []
        for entry in Path("/proc").iterdir():
            try:
                if not entry.name.isdigit() or "RayTrainWorker" not in (entry / "cmdline").read_text():
                    continue
                pid = ancestor = int(entry.name)
                while ancestor > 1 and ancestor != os.getpid():
                    ancestor = parent(ancestor)
                if ancestor == os.getpid():
                    found.append(pid)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue  # exited meanwhile
        return sorted(found)

    outcome: dict = {}
    cfg = config(workspace, 4, 6)

    def run():
        try:
            outcome["summary"] = train_flow(source="digits", config_file=cfg, workers=2)
        except Exception as err:  # reported to the test thread below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    runs = workspace / ".tofa" / "store" / "runs"
    deadline = time.time() + 240
    killed = None
    while time.time() < deadline and thread.is_alive():
        done = list(runs.glob("*/checkpoints/epoch-0001.pt"))
        if done:
            workers = train_workers()
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)  # one worker process, by its PID
                break
        time.sleep(0.5)
    thread.join(timeout=400)
    assert killed is not None, "no checkpoint or no worker to kill in time"
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    record = json.loads(open_storage(summary["run_dir"]).read_bytes("result.json"))
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]
    assert killed not in train_workers()


def test_baseline_trains_one_arch_alone_on_ray_and_stays_out_of_the_supernets(workspace):
    """`tofa baseline`'s flow: a real Ray Train run of one architecture, its record under
    baselines/ (never supernets/, which specialization reads), an MLflow run of kind baseline."""
    from mlflow.tracking import MlflowClient

    from flows.baseline import baseline_flow
    from flows.tracking import tracking_uri
    from tofa_core.arch import SearchSpace

    arch = SearchSpace.preset("tiny", num_classes=10, in_channels=1, resolutions=(8,)).min_arch()
    [result] = baseline_flow(archs={"small": arch.to_dict()}, config_file=config(workspace, 1, 2))
    assert result["label"] == "small" and result["arch"] == arch.to_dict()
    store_uri = str(workspace / ".tofa" / "store")
    assert_reported({"test_acc/arch": result["test_acc"]}, store_uri, result["run_dir"], arch.to_dict())
    store = open_storage(workspace / ".tofa" / "store")
    assert store.exists(f"baselines/digits/{result['run_id']}.json")
    assert not store.child("supernets/digits").list()
    state_keys = [o.key for o in open_storage(result["run_dir"]).list()]
    assert "supernet.pt" in state_keys and "result.json" in state_keys
    run = MlflowClient(tracking_uri=tracking_uri()).get_run(result["mlflow_run_id"])
    assert run.data.tags["tofa.kind"] == "baseline"
    assert json.loads(run.data.tags["tofa.arch"]) == arch.to_dict()
    assert run.data.metrics["test_acc/arch"] == pytest.approx(result["test_acc"])


def test_a_value_error_after_the_process_group_is_gone_is_the_machines(monkeypatch):
    """A killed peer tears the process group down mid-call and torch raises a ValueError: that
    one is restarted from the checkpoint, while a bad input (group intact) is not retried."""
    import torch.distributed as dist

    from flows.train_worker import recurring

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    assert recurring(ValueError("batch_size 7 must divide evenly over 2 workers"))
    assert not recurring(RuntimeError("connection reset"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert not recurring(ValueError("Default process group has not been initialized"))
