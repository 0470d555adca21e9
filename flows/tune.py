"""Flow `tofa-tune`: a Ray Tune sweep (ASHA) over the unified loss's settings.

Each trial is a short single-worker training (tofa_core's loop, unchanged) that reports
the mean validation accuracy of the largest and smallest subnet after every epoch; ASHA
stops weak trials early. The best settings are written to the store as a config file
(`tune/<sweep id>/best.yaml`, a `train:` section ready for `tofa train --config`) and
logged to MLflow.
"""

from __future__ import annotations

import os

import yaml
from prefect import flow, get_run_logger

from flows.ingest import ingest_flow
from flows.settings import dataset_name, open_store
from flows.tracking import log_sweep
from flows.train import new_run_id, start_ray
from tofa_core.storage import Storage, open_storage
from tofa_core.training.config import TrainConfig

SWEPT = ("lr", "lambda_u", "tau", "lambda_kd")


def _trial(params: dict) -> None:
    """One Ray Tune trial: train briefly, report mean val accuracy of max and min each epoch."""
    from ray import tune

    from tofa_core.data.store import DatasetStore
    from tofa_core.training.loop import train_supernet

    cfg = TrainConfig(**{**params["base"], **{k: params[k] for k in SWEPT}})
    trial = tune.get_context().get_trial_id()

    def report(metrics: dict) -> None:
        score = (metrics["val_acc/max"] + metrics["val_acc/min"]) / 2
        tune.report({"val_acc/mean": score, **{k: v for k, v in metrics.items() if k.startswith("val_acc/")}})

    store = open_storage(params["store"])  # once in this trial's process
    train_supernet(
        cfg,
        DatasetStore(store),
        params["dataset"],
        store.at(params["sweep_dir"]).child(trial),
        version=params["version"],
        report=report,
    )


@flow(name="tofa-tune")
def tune_flow(
    source: str = "digits",
    dataset: str | None = None,
    store: str | Storage | None = None,
    config_file: str | None = None,
    trials: int = 8,
    epochs: int = 4,
    concurrent: int | None = None,
) -> dict:
    """Sweep lr, lambda_u, tau and lambda_kd with ASHA; return and store the best config."""
    from ray import tune

    logger = get_run_logger()
    dataset = dataset_name(source, dataset)
    store = open_store(store)
    data = ingest_flow(source=source, dataset=dataset, store=store, config_file=config_file)
    base = TrainConfig.load(config_file, epochs=epochs)
    sweep_id = new_run_id()
    sweep_dir = store.child(f"tune/{sweep_id}")
    ray = start_ray()
    cpus = int(ray.available_resources().get("CPU", 1))
    parallel = concurrent or max(1, cpus // 2)
    threads = max(1, cpus // parallel)
    param_space = _search_space(tune) | {
        "base": base.model_copy(update={"threads": threads}).model_dump(mode="json"),
        "store": store.root,
        "dataset": dataset,
        "version": data["version"],
        "sweep_dir": sweep_dir.root,
    }
    results = _tuner(param_space, threads, trials, parallel, epochs, sweep_id, store).fit()
    best = results.get_best_result()
    if best.metrics is None or "val_acc/mean" not in best.metrics:
        raise RuntimeError(f"sweep {sweep_id}: no trial reported a result; see the Ray logs")
    best_cfg = base.model_copy(update={k: best.config[k] for k in SWEPT})
    text = yaml.safe_dump({"train": {k: getattr(best_cfg, k) for k in SWEPT} | {"epochs": base.epochs}})
    sweep_dir.write_bytes("best.yaml", text.encode())
    summary = {
        "sweep_id": sweep_id,
        "dataset": dataset,
        "data_version": data["version"],
        "trials": len(results),
        "best": {k: best.config[k] for k in SWEPT},
        "best_val_acc/mean": best.metrics["val_acc/mean"],
        "best_config": sweep_dir.uri("best.yaml"),
    }
    summary["mlflow_run_id"] = log_sweep(summary)
    logger.info("sweep %s: best %s", sweep_id, summary["best"])
    return summary


def _search_space(tune) -> dict:
    """The swept settings and their ranges (SWEPT names them)."""
    return {
        "lr": tune.loguniform(0.01, 0.2),
        "lambda_u": tune.uniform(0.0, 2.0),
        "tau": tune.uniform(0.8, 0.99),
        "lambda_kd": tune.uniform(0.0, 2.0),
    }


def _tuner(
    param_space: dict, threads: int, trials: int, parallel: int, epochs: int, sweep_id: str, store: Storage
):
    """Ray Tune over `param_space` with ASHA stopping weak trials after their first epochs."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    return tune.Tuner(
        tune.with_resources(_trial, {"cpu": threads}),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric="val_acc/mean",
            mode="max",
            num_samples=trials,
            max_concurrent_trials=parallel,
            scheduler=ASHAScheduler(max_t=epochs, grace_period=1, reduction_factor=2),
        ),
        run_config=tune.RunConfig(name=sweep_id, storage_path=os.path.join(_local_ray_dir(store), "tune")),
    )


def _local_ray_dir(store: Storage) -> str:
    """Ray Tune's own bookkeeping: beside a local store, else under .tofa/ (trial data is in the store)."""
    root = store.root
    return root if "://" not in root else os.path.abspath(".tofa")
