"""Flow `tofa-specialize`: a trained supernet -> one verified model per registered target.

Shared work happens once: load the supernet and its data version, build (or reuse) the
accuracy predictor, load every device's latency table (profiling `host-cpu` on demand).
Then one task per target runs in parallel: on the Ray cluster through prefect-ray when Ray
is in use, in local threads otherwise; targets whose latency budget is measured on this host
(`host-cpu`) run afterwards in this process, one at a time, so nothing else skews the timing.
A target that fails (after its retries) does not stop the others; the flow publishes what
succeeded and then fails naming the targets that did not.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.settings import dataset_name, latency_dir, open_store, state_dir
from tofa_core import litert
from tofa_core.costs import LatencyTable, LatencyTableError
from tofa_core.data.store import DatasetStore
from tofa_core.export import FILES, VerificationError
from tofa_core.runs import Runs
from tofa_core.search.evolution import CostModel, InfeasibleTarget
from tofa_core.search.predictor import Scored, cached_predictor, predictor_key
from tofa_core.search.targets import HOST_DEVICE, Target, TargetError, load_targets, table_devices
from tofa_core.specialize import TargetResult, Trained, load_trained, specialize
from tofa_core.storage import Storage
from tofa_core.training.checkpoint import CheckpointError


@dataclass(frozen=True)
class FailedTarget:
    target: str
    error: str


@dataclass(frozen=True)
class Specialization:
    """What one specialize run did: each published target and each failure, from which supernet
    and data version. `to_json` is the run's summary.json."""

    dataset: str
    data_version: str
    splits: dict[str, int]
    supernet_run: str
    supernet_dir: str
    predictor: dict  # the predictor's report (score, Kendall tau, samples)
    targets: list[TargetResult]
    failed: list[FailedTarget]
    seconds: float
    # The supernet this run loaded, for its caller (a pipeline registers and plots with it):
    # not in summary.json, and not pickled with a flow's state.
    trained: Trained | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "trained"} | {"trained": None}

    def to_json(self) -> dict:
        head = ("dataset", "data_version", "splits", "supernet_run", "supernet_dir", "predictor")
        return {k: getattr(self, k) for k in head} | {
            "targets": [t.to_json() for t in self.targets],
            "failed": [asdict(f) for f in self.failed],
            "seconds": self.seconds,
        }


class SpecializationFailed(RuntimeError):
    """Some targets failed; `summary` still lists every target's outcome."""

    def __init__(self, summary: Specialization):
        failed = summary.failed
        super().__init__(
            f"{len(failed)} of {len(summary.targets) + len(failed)} targets failed: "
            + "; ".join(f"{f.target}: {f.error}" for f in failed)
        )
        self.summary = summary

    def __reduce__(self):  # pickled with flow states: rebuilt from its summary
        return SpecializationFailed, (self.summary,)


def last_supernet(store: Storage, dataset: str) -> dict:
    """The newest training record of `dataset` (written by tofa-train)."""
    latest = Runs(store).latest_supernet(dataset)
    if latest is None:
        raise FileNotFoundError(
            f"no trained supernet for data set {dataset!r} in {store.uri()}; "
            f"run `tofa train --data {dataset}` (or `tofa run`) first"
        )
    return latest


@task(name="load-supernet", cache_policy=NONE)
def load_supernet(store: Storage, run_dir: str) -> Trained:
    return load_trained(DatasetStore(store), store.at(run_dir))


@task(name="accuracy-predictor", cache_policy=NONE)
def accuracy_predictor(trained: Trained, folder: Storage, samples: int, score: str, seed: int = 0):
    """Built once per trained supernet and kept beside it (in its run `folder`); later runs reuse it."""
    model, report, reused = cached_predictor(
        trained.net, trained.data, folder, samples=samples, score=score, seed=seed
    )
    where = folder.uri(predictor_key(score, samples, seed))
    what = "reusing predictor" if reused else f"built predictor from {report['samples']} subnets,"
    get_run_logger().info("%s %s (Kendall tau %.3f)", what, where, report["kendall_tau"])
    return model, report


@task(name="latency-tables", cache_policy=NONE)
def latency_tables(targets: list[Target], trained: Trained, tables_dir: str) -> dict[str, LatencyTable]:
    """The table of every device a target names; this host's is measured when missing or short."""
    from tofa_core.profiler import host_table, needed_blocks

    logger = get_run_logger()
    files = table_devices(tables_dir)
    space = trained.net.space
    needed = needed_blocks(space)
    tables = {}
    for device in sorted({t.device for t in targets if t.device}):
        if device == HOST_DEVICE:
            path = files.get(HOST_DEVICE) or state_dir() / "latency" / f"{HOST_DEVICE}.json"
            table, measured = host_table(space, path, HOST_DEVICE)
            if measured:
                logger.info("measured the %s latency table (once per search space; kept at %s)", device, path)
        else:
            table = LatencyTable.load(files[device])
            if missing := table.missing(needed):
                logger.warning(
                    "%s lacks %d block shapes of this space; targets on it may fail", device, len(missing)
                )
        tables[device] = table
    return tables


@dataclass(frozen=True)
class Shared:
    """What every target's task shares: the supernet, the predictor and the subnets it scored
    (they compete with search's candidates), the latency tables by device, and where the
    exports go (`store`, under `prefix`)."""

    trained: Trained
    predictor: object
    measured: list[Scored]
    tables: dict[str, LatencyTable]
    store: Storage
    prefix: str
    score: str
    seed: int


@task(name="specialize-target", cache_policy=NONE)
def specialize_target(target: Target, shared: Shared) -> TargetResult:
    """Search, export and verify one target, then publish its files to the store."""
    trained, prefix = shared.trained, shared.prefix
    costs = CostModel(trained.net.space, shared.tables.get(target.device))
    about = {
        "dataset": trained.state["dataset"],
        "data_version": trained.state["data_version"],
        "supernet": prefix,
        # the last epochs trained every subnet on its int8 grid (train.quantization_aware); 0 for
        # a supernet trained without, or before the option existed
        "quantization_aware_epochs": trained.state.get("quantization_aware_epochs", 0),
    }
    with tempfile.TemporaryDirectory(prefix=f"tofa-{target.name}-") as tmp:
        done = specialize(
            trained.net,
            target,
            shared.predictor,
            trained.data,
            costs,
            tmp,
            classes=list(trained.state["classes"]),
            about=about,
            score=shared.score,
            seed=shared.seed,
            reference=trained.reference,
            measured=shared.measured,
        )
        files = publish(done.exported.files, shared.store.child(f"{prefix}/{target.name}"))
    return done.result(files)


def publish(files: dict[str, Path], out) -> dict[str, str]:
    """Replace a target's folder in the store; `model.json` goes first out and last in, so a
    folder with a model.json always holds one complete, verified export."""
    if out.exists("model.json"):
        out.delete("model.json")
    for stale in FILES.values():
        if stale not in files and out.exists(stale):
            out.delete(stale)
    uris = {}
    for name in sorted(files, key=lambda n: n == "model.json"):
        out.write_bytes(name, Path(files[name]).read_bytes())
        uris[name] = out.uri(name)
    return uris


def _worth_retrying(task, task_run, state) -> bool:
    """Retry what the world can break (storage, a noisy latency measurement), not a target
    that cannot be met or an export that does not match."""
    error = state.result(raise_on_failure=False)
    never = (InfeasibleTarget, TargetError, LatencyTableError, CheckpointError)
    if isinstance(error, never + (litert.LiteRTUnavailable, litert.ConversionError)):
        return False
    if isinstance(error, VerificationError):
        return error.check == "max_latency_ms"
    return True


def task_runner(workers: int | None = None):
    """prefect-ray's runner when Ray is in use (RAY_ADDRESS set, or this process already
    connected, e.g. after training), else local threads."""
    import ray

    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=os.environ.get("RAY_ADDRESS") or None)
    return ThreadPoolTaskRunner(max_workers=workers or os.cpu_count() or 2)


@flow(name="tofa-specialize")
def specialize_flow(
    source: str = "digits",
    dataset: str | None = None,
    targets_file: str | None = None,
    store: str | Storage | None = None,
    run_id: str | None = None,
    samples: int = 300,
    score: str = "agreement",
    seed: int = 0,
    targets: list[Target] | None = None,
) -> Specialization:
    """Specialize the newest supernet of `dataset` (or run `run_id`) for every target in the file
    (or `targets`, already parsed: the pipeline passes the ones it read and hashed)."""
    logger = get_run_logger()
    started = time.perf_counter()
    dataset = dataset_name(source, dataset)
    store = open_store(store)
    tables_dir = str(latency_dir())
    if targets is None:
        targets = load_targets(targets_file or default_targets(), devices=table_devices(tables_dir))
        litert.require_for(targets)
    runs = Runs(store)
    record = last_supernet(store, dataset) if run_id is None else runs.supernet(dataset, run_id)
    run_dir = record["run_dir"]
    trained = load_supernet(store, run_dir)
    predictor, report = accuracy_predictor(trained, store.at(run_dir), samples, score, seed)
    tables = latency_tables(targets, trained, tables_dir)
    prefix = f"exports/{dataset}/{record['run_id']}"

    measured = [Scored.from_dict(s) for s in report["scored"]]
    states = _run_targets(targets, Shared(trained, predictor, measured, tables, store, prefix, score, seed))
    done, failed = [], []
    for target in targets:
        state = states[target.name]
        if state.is_completed():
            done.append(state.result())
        else:
            error = state.result(raise_on_failure=False)
            failed.append(FailedTarget(target.name, str(error) or type(error).__name__))
            logger.error("target %s failed: %s", target.name, error)
    summary = Specialization(
        dataset=dataset,
        data_version=record["data_version"],
        splits=trained.splits.sizes(),
        supernet_run=record["run_id"],
        supernet_dir=run_dir,
        predictor={k: v for k, v in report.items() if k not in ("scored", "held_out_pairs")},
        targets=done,
        failed=failed,
        seconds=round(time.perf_counter() - started, 2),
        trained=trained,
    )
    summary_json = json.dumps(summary.to_json(), indent=2).encode()
    store.child(prefix).write_bytes("summary.json", summary_json)
    logger.info("specialized %d targets (%d failed) in %.1f s", len(done), len(failed), summary.seconds)
    if failed:
        raise SpecializationFailed(summary)
    return summary


def _run_targets(targets: list[Target], shared: Shared) -> dict:
    """Each target's final Prefect state, by name: in parallel on the task runner, except the
    targets whose latency is measured on this host, which run here one at a time after the
    others (timed beside parallel work, or on another Ray node, the figure would be wrong)."""

    def task_for(target: Target):
        options = {"retries": target.retries, "task_run_name": f"specialize-{target.name}"}
        return specialize_target.with_options(**options, retry_condition_fn=_worth_retrying)

    here = [t for t in targets if t.device == HOST_DEVICE]
    futures = {t.name: task_for(t).submit(t, shared) for t in targets if t not in here}
    for future in futures.values():
        future.wait()
    states = {name: future.state for name, future in futures.items()}
    for target in here:
        states[target.name] = task_for(target)(target, shared, return_state=True)
    return states


def default_targets() -> str:
    return str(Path(__file__).resolve().parents[1] / "infra" / "targets" / "default.yaml")
