"""Flow `tofa-baseline`: the linear-cost alternative TOFA is measured against.

One fixed architecture trained from scratch, alone, on the same data version and labels,
with the same semi-supervised recipe restricted to that one network (labelled cross-entropy
+ masked pseudo-labels), the same schedule and the same evaluation as the supernet. One such
training per deployment target is what "train a model per device" costs. The architectures
come from JSON, or from a `tofa run` / `tofa specialize` summary (each target's chosen subnet),
so TOFA's exported subnet and the same network trained alone can be compared directly.
"""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from flows.ingest import ingest_flow
from flows.settings import dataset_name, open_store
from flows.tracking import log_training
from flows.train import new_run_id, run_trainer
from tofa_core.arch import Arch
from tofa_core.storage import Storage
from tofa_core.training.config import TrainConfig


@flow(name="tofa-baseline")
def baseline_flow(
    archs: dict[str, dict],
    source: str = "digits",
    dataset: str | None = None,
    store: str | Storage | None = None,
    config_file: str | None = None,
    epochs: int | None = None,
    workers: int = 1,
    seed: int | None = None,
) -> list[dict]:
    """Train each of `archs` ({label: arch dict}) alone, one Ray Train run each."""
    logger = get_run_logger()
    dataset = dataset_name(source, dataset)
    store = open_store(store)
    version = ingest_flow(source=source, dataset=dataset, store=store, config_file=config_file)["version"]
    cfg = TrainConfig.load(config_file, epochs=epochs, seed=seed)
    results = []
    for label, raw in archs.items():
        arch = Arch.from_dict(raw)
        run_id = new_run_id()
        logger.info("baseline %s: training %s alone (run %s)", label, arch.to_json(), run_id)
        out = run_trainer(cfg, store, dataset, version, run_id, workers, None, fixed=arch.to_dict())
        summary = {
            "run_id": run_id,
            "label": label,
            "arch": arch.to_dict(),
            "dataset": dataset,
            "data_version": version,
            "run_dir": out["run_dir"],
            "supernet": f"{out['run_dir']}/supernet.pt",
            "workers": workers,
            "epochs": cfg.epochs,
            "seed": cfg.seed,
            "test_acc": out["final"]["test_acc/arch"],
            "seconds": out["final"]["seconds"],
        }
        summary["mlflow_run_id"] = log_training(
            summary | {"test_acc/arch": summary["test_acc"]}, cfg, out["history"], kind="baseline"
        )
        store.child(f"baselines/{dataset}").write_bytes(
            f"{run_id}.json", json.dumps(summary, indent=2).encode()
        )
        logger.info(
            "baseline %s: test accuracy %.4f in %.1f s", label, summary["test_acc"], summary["seconds"]
        )
        results.append(summary)
    return results
