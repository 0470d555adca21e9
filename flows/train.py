"""Flow `tofa-train`: data version -> supernet, trained on Ray Train workers.

`tofa_core.training.loop.train_supernet` runs in every Ray Train worker (`flows.train_worker`;
Ray sets up the torch.distributed group: gloo on CPU, nccl on GPU). Checkpoints and the final supernet go to
the store under `runs/<run id>/`, not to any machine's disk, so a worker lost on one node
restarts anywhere (FailureConfig) and resumes from the last epoch. Ray connects to
RAY_ADDRESS when set, else starts a local instance.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import threading
from contextlib import contextmanager
from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from flows.ingest import ingest_flow
from flows.settings import dataset_name, open_store
from flows.tracking import log_training
from flows.train_worker import FATAL_KEY, train_worker
from tofa_core.data.store import DamagedShard
from tofa_core.plan import config_hash
from tofa_core.runs import Runs, WarmStart
from tofa_core.storage import NotFound, S3Storage, Storage, StorageError
from tofa_core.training.checkpoint import CheckpointError, OtherSpaceError
from tofa_core.training.config import TrainConfig


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent runs."""
    return f"{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _ray_storage(storage: Storage):
    """Where Ray keeps its run metadata: beside the data (S3 needs an explicit endpoint)."""
    if isinstance(storage, S3Storage):
        import pyarrow.fs as pafs

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.S3FileSystem(
            endpoint_override=endpoint, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        )
        return f"{storage.bucket}/{storage.prefix}/ray".replace("//", "/"), fs
    return os.path.join(storage.root, "ray"), None


def start_ray():
    """Connect to RAY_ADDRESS when set, else start a local Ray listening on loopback only."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        # "local" always starts a fresh instance: address=None would attach to whatever cluster
        # /tmp/ray last recorded, even a dead one (ray.init then waits on its GCS).
        # One machine is never drained by a cluster manager: Ray Train's preemption watcher would
        # only be one more process starting beside the workers on a small CPU.
        local = {
            "_node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "runtime_env": {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}},
        }
        local = {} if address else local
        ray.init(address=address or "local", log_to_driver=False, **local)
    return ray


def cpus_per_worker(node_cpus: list[int], workers: int) -> int:
    """The most CPUs each worker can have with all `workers` placed on these nodes: a worker
    lives on one node, so the cluster's total over the worker count can ask for too many."""
    for cpus in range(max(node_cpus, default=1), 1, -1):
        if sum(n // cpus for n in node_cpus) >= workers:
            return cpus
    return 1


def _gpus_per_worker(cfg: TrainConfig) -> float:
    """What each Ray worker asks for: the config's GPUs, never the driver's view (a CPU head
    node of a GPU cluster would ask for none, a GPU laptop driving a CPU cluster for some)."""
    if cfg.device == "cuda" and cfg.gpus_per_worker == 0:
        raise ValueError(
            "train.device is cuda but no GPUs are requested: set --gpus-per-worker (or "
            "train.gpus_per_worker) to the GPUs each training worker should get"
        )
    return 0.0 if cfg.device == "cpu" else cfg.gpus_per_worker


@task(name="train-supernet", cache_policy=NONE)
def run_trainer(
    cfg: TrainConfig,
    store: Storage,
    dataset: str,
    version: str,
    run_id: str,
    workers: int,
    warm: WarmStart | None,
    fixed: dict | None = None,
) -> dict:
    """Train on Ray Train workers; `fixed`: one architecture alone (the baseline), else the supernet."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start_ray()
    gpus = _gpus_per_worker(cfg)
    nodes = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    threads = cfg.threads or cpus_per_worker(nodes, workers)
    run_dir = store.child(f"runs/{run_id}")
    storage_path, fs = _ray_storage(store)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train": cfg.model_copy(update={"threads": threads}).model_dump(mode="json"),
            "store": store.root,  # each worker opens it once, in its own process
            "dataset": dataset,
            "version": version,
            "run_dir": run_dir.root,
            "warm": dataclasses.asdict(warm) if warm else None,
            "fixed": fixed,
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": threads, **({"GPU": gpus} if gpus else {})},
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=3),
        ),
    )
    with _progress(run_dir, cfg.epochs):
        trainer.fit()  # raises when the workers fail for good (after FailureConfig's restarts)
    _raise_recurring(run_dir)
    record = json.loads(run_dir.read_bytes("result.json"))
    return {
        "run_dir": run_dir.root,
        "final": {**record["final"], "seconds": record["seconds"]},
        "history": record["history"],
        "warm_start": record.get("warm_start"),
    }


def _raise_recurring(run_dir) -> None:
    """The error the workers stopped on, when it would recur on a restart (see train_worker)."""
    try:
        fatal = json.loads(run_dir.read_bytes(FATAL_KEY))
    except NotFound:
        return
    kinds = {
        "CheckpointError": CheckpointError,
        "OtherSpaceError": OtherSpaceError,
        "DamagedShard": DamagedShard,
    }
    raise kinds.get(fatal["type"], ValueError)(fatal["message"])


@contextmanager
def _progress(run_dir, epochs: int, every: float = 2.0):
    """Log each finished epoch while training runs: rank 0 writes progress.json per epoch."""
    logger = get_run_logger()
    stop = threading.Event()

    def watch():
        shown = 0
        while True:
            stopping = stop.wait(every)
            try:
                history = json.loads(run_dir.read_bytes("progress.json"))
            except (NotFound, StorageError, ValueError):  # not written yet, or mid-replace
                history = []
            for row in history[shown:]:
                logger.info(
                    "epoch %d/%d: val acc largest %.3f, smallest %.3f, %.0f images/s",
                    row["epoch"],
                    epochs,
                    row.get("val_acc/max", float("nan")),
                    row.get("val_acc/min", float("nan")),
                    row.get("images_per_s", 0.0),
                )
            shown = max(shown, len(history))
            if stopping:
                return

    thread = threading.Thread(target=watch, name="train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)


@flow(name="tofa-train")
def train_flow(
    source: str = "digits",
    dataset: str | None = None,
    store: str | Storage | None = None,
    config_file: str | None = None,
    epochs: int | None = None,
    workers: int = 2,
    warm_start: str | None = None,
    version: str | None = None,
    parent_run: str | None = None,
    gpus_per_worker: float | None = None,
    budget_minutes: float | None = None,
    cfg: TrainConfig | None = None,
) -> dict:
    """Ingest SOURCE if needed (a no-op when stored), then train one supernet on it with Ray.

    `version`: train on this stored data version (the caller ingested it); `parent_run`: the
    MLflow run (a pipeline's) this training is nested under; `gpus_per_worker` and
    `budget_minutes` override train.gpus_per_worker and train.budget_minutes. `cfg`: the
    training settings already resolved (a pipeline's plan): the config file is not read."""
    logger = get_run_logger()
    dataset = dataset_name(source, dataset)
    store = open_store(store)
    if version is None:
        version = ingest_flow(source=source, dataset=dataset, store=store, config_file=config_file)["version"]
    data = {"version": version}
    if cfg is None:
        cfg = TrainConfig.load(
            config_file, epochs=epochs, gpus_per_worker=gpus_per_worker, budget_minutes=budget_minutes
        )
    runs = Runs(store)
    warm = WarmStart.resolve(warm_start, runs, dataset)
    run_id = new_run_id()
    logger.info("training run %s on %s %s with %d workers", run_id, dataset, data["version"], workers)
    out = run_trainer(cfg, store, dataset, data["version"], run_id, workers, warm)
    final = {k: v for k, v in out["final"].items() if k.startswith("test_acc/") or k == "seconds"}
    summary = {
        "run_id": run_id,
        "dataset": dataset,
        "data_version": data["version"],
        "run_dir": out["run_dir"],
        "supernet": f"{out['run_dir']}/supernet.pt",
        "workers": workers,
        **final,
        "epochs": cfg.epochs,
        "warm_start": out["warm_start"],
        "config_hash": config_hash(cfg),
    }
    # The record first: an MLflow outage now never orphans a trained supernet (the next run reuses it).
    runs.write_supernet(dataset, summary)
    summary["mlflow_run_id"] = log_training(summary, cfg, out["history"], parent_run=parent_run)
    runs.write_supernet(dataset, summary)
    logger.info("trained: %s", summary)
    return summary
