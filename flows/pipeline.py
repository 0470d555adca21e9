"""Flow `tofa-retrain`: new-data gate -> ingest -> train (warm start) -> specialize -> report.

What a scheduled retraining runs. Every stage reuses what an earlier run already made:
ingesting unchanged data is a no-op; a pipeline whose data version, training config, targets
and search settings all match the last completed run ends there (the gate) and says so; a
supernet already trained on this data version with this config (say, by a run that failed
later) is reused rather than retrained. The report stage logs one MLflow parent run with the
training and one run per target nested under it, registers each target's model as a new
version, and moves its `champion` alias only when the new model scores at least as well as
the current champion on the same images. A stage that fails leaves every earlier result and
every champion as it was; running the flow again picks up from what exists.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from flows import descriptions, plots, tracking
from flows.ingest import ingest_flow
from flows.services import ServiceUnavailable, check_mlflow, check_services
from flows.settings import dataset_name, latency_dir, redact, store_uri
from flows.specialize import (
    Specialization,
    SpecializationFailed,
    default_targets,
    specialize_flow,
    task_runner,
)
from flows.train import new_run_id, train_flow
from tofa_core.arch import Arch
from tofa_core.constraints import CONSTRAINTS
from tofa_core.export import MEASURED_KEYS, Evaluation, preprocess
from tofa_core.plan import RunPlan, config_hash
from tofa_core.runlock import RunLock
from tofa_core.runs import Runs
from tofa_core.search.pareto import subnet_points
from tofa_core.search.predictor import predictor_key
from tofa_core.search.targets import table_devices
from tofa_core.specialize import TargetResult, Trained
from tofa_core.storage import Storage
from tofa_core.training.config import TrainConfig

PARETO_SUBNETS = 80  # sampled subnets whose test accuracy the Pareto plot shows


@task(name="new-data-gate", cache_policy=NONE, retries=2, retry_delay_seconds=2)
def last_completed(store: Storage, dataset: str, key: str) -> dict | None:
    """The newest completed pipeline run with this key, if any."""
    done = [r for r in Runs(store).pipelines(dataset) if r.get("status") == "completed"]
    return done[-1] if done and done[-1]["key"] == key else None


@task(name="reusable-supernet", cache_policy=NONE, retries=2, retry_delay_seconds=2)
def reusable_supernet(store: Storage, dataset: str, version: str, cfg: TrainConfig) -> dict | None:
    """A supernet already trained on this data version with this config."""
    wanted = config_hash(cfg)
    same = [r for r in Runs(store).supernets(dataset) if r["data_version"] == version]
    same = [r for r in same if r.get("config_hash") == wanted]
    return same[-1] if same else None


def _evaluation(trained: Trained) -> Evaluation:
    """The images every model of this run is judged on, champions included: the test split
    (the validation split when the data set has no test split)."""
    splits = trained.splits
    part, name = (splits.test, "test") if len(splits.test) else (splits.val, "validation")
    label = f"{name} split of {splits.version} ({len(part)} images)"
    return Evaluation(label, part.images, part.labels, tuple(splits.classes))


def _unless_server_down(task, task_run, state) -> bool:
    """Retry a failed registration, unless the tracking server itself is down: the MLflow client
    already retried each request for minutes, and a retry would wait as long again."""
    try:
        state.result()
    except ServiceUnavailable:
        return False
    except Exception:  # noqa: BLE001 - any other failure: a dropped request, worth a retry
        return True
    return True


# Retried: a tracking server can drop a request; targets registered before the failure are
# returned as they were (tracking.register_target is idempotent per pipeline run and target).
@task(
    name="register-models",
    cache_policy=NONE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_unless_server_down,
)
def register_models(
    parent: str, dataset: str, rows: list[TargetResult], trained: Trained, store: Storage
) -> dict[str, dict]:
    """Each target: a nested MLflow run, a new registered model version, its alias decision.
    A tracking server that stops answering fails it with ServiceUnavailable, naming it."""
    try:
        return _register(parent, dataset, rows, trained, store)
    except ServiceUnavailable:
        raise
    except Exception:
        check_mlflow()  # the server gone: that is the error to report (its URL and the fix)
        raise


def _register(
    parent: str, dataset: str, rows: list[TargetResult], trained: Trained, store: Storage
) -> dict[str, dict]:
    logger = get_run_logger()
    evaluation = _evaluation(trained)
    out = {}
    for row in rows:
        with tempfile.TemporaryDirectory(prefix=f"tofa-{row.target}-") as tmp:
            folder = Path(tmp)
            for name, uri in row.files.items():
                where, _, key = uri.rpartition("/")
                (folder / name).write_bytes(store.at(where).read_bytes(key))
            example = preprocess(evaluation.images[:1], json.loads((folder / "model.json").read_text()))
            done = tracking.register_target(parent, dataset, row, folder, example, evaluation)
        logger.info(
            "%s: %s version %d is %s (%s)",
            row.target,
            done["model"],
            done["version"],
            done["alias"],
            done["reason"],
        )
        out[row.target] = done
    return out


@task(name="plots", cache_policy=NONE)
def draw_plots(
    parent: str, trained: Trained, spec: Specialization, history: list[dict], predictor: dict
) -> list[str]:
    """Pareto front, training curves and the predictor's held-out scatter, logged under plots/."""
    net, data = trained.net, trained.data
    scored = [s["arch"] for s in predictor["scored"]]
    rng = random.Random(0)
    picked = scored[:2] + rng.sample(scored[2:], min(PARETO_SUBNETS, len(scored) - 2))
    subnets = subnet_points(net, [Arch.from_dict(raw) for raw in picked], data)
    chosen = [
        {
            "target": r.target,
            "macs": r.measured["macs"],
            "test_acc": r.measured["test_acc"],
            "max_macs": r.constraints.get("max_macs"),
        }
        for r in spec.targets
        if r.measured.get("test_acc") is not None
    ]
    title = f"{spec.dataset} {spec.data_version}, supernet {spec.supernet_run}"
    with tempfile.TemporaryDirectory(prefix="tofa-plots-") as tmp:
        folder = Path(tmp)
        plots.pareto(subnets, chosen, folder / "pareto.png", f"Subnets and chosen targets: {title}")
        plots.training_curves(history, folder / "training_curves.png", f"Training: {title}")
        if predictor.get("held_out_pairs"):
            plots.predictor_scatter(
                predictor["held_out_pairs"],
                folder / "predictor.png",
                f"Accuracy predictor, {len(predictor['held_out_pairs'])} held-out subnets\n"
                f"Kendall tau {predictor['kendall_tau']:.3f}",
                predictor["score"],
            )
        names = sorted(p.name for p in folder.iterdir())
        tracking.log_artifacts(parent, folder, "plots")
    return [f"plots/{name}" for name in names]


@flow(name="tofa-retrain")
def retrain_flow(
    source: str = "digits",
    dataset: str | None = None,
    targets_file: str | None = None,
    config_file: str | None = None,
    epochs: int | None = None,
    workers: int = 2,
    store: str | None = None,
    samples: int = 300,
    score: str = "agreement",
    force: bool = False,
    lock_wait: float = 0.0,
    gpus_per_worker: float | None = None,
    budget_minutes: float | None = None,
) -> dict:
    """Retrain on SOURCE when anything is new, then specialize and register every target.

    One run per data set at a time: a second one waits `lock_wait` seconds for the first to
    finish, then fails naming it (RunLocked). `gpus_per_worker` and `budget_minutes` override
    the config's train.gpus_per_worker and train.budget_minutes."""
    dataset = dataset_name(source, dataset)
    store = store_uri(store)
    check_services(store, prefect=False)  # the API answered: this flow is running
    plan = RunPlan.resolve(
        source=source,
        dataset=dataset,
        store=store,
        tracking_uri=tracking.tracking_uri(),
        config_file=config_file,
        targets_file=targets_file or default_targets(),
        devices=table_devices(latency_dir()),
        workers=workers,
        samples=samples,
        score=score,
        epochs=epochs,
        gpus_per_worker=gpus_per_worker,
        budget_minutes=budget_minutes,
    )
    owner = f"tofa-retrain flow run {flow_run.get_name() or flow_run.get_id()}"
    with RunLock(plan.store, dataset, owner, wait=lock_wait):
        return _retrain(plan, force)


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    mark = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - mark


def _retrain(p: RunPlan, force: bool) -> dict:
    logger = get_run_logger()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    logger.info("stage 1/4: ingest %s as %s", p.source, p.dataset)
    with _timed(timings, "ingest"):
        data = ingest_flow(
            source=p.source, dataset=p.dataset, store=p.store, config=p.ingest, lock=False
        )  # this run holds the data set's lock
    key = p.key(data["version"])
    if not force and (last := _nothing_new(p, data["version"], key)) is not None:
        return {**last, "noop": True, "timings": {"total": round(time.perf_counter() - started, 2)}}

    pipeline_run = new_run_id()
    parent = _start_parent(p, data["version"], pipeline_run)
    record = {"pipeline_run": pipeline_run, "status": "running", "key": key, "dataset": p.dataset}
    record |= {"data_version": data["version"], "data_created": data["created"]}
    record["mlflow"] = {"tracking_uri": redact(p.tracking_uri), "parent_run_id": parent}
    runs = Runs(p.store)
    ok = False
    try:
        record["mlflow"]["run_url"] = tracking.run_url(p.dataset, parent)
        with _timed(timings, "train"):
            trained_record, reused = _train_stage(p, data["version"], parent)
        with _timed(timings, "specialize"):
            logger.info("stage 3/4: specialize for every target in %s", p.targets_file)
            spec, failed_stage = _specialize_stage(p, trained_record["run_id"])
        with _timed(timings, "report"):
            registered, plot_files = _report_stage(p, parent, spec, trained_record)
        timings["total"] = time.perf_counter() - started
        record |= {
            "splits": spec.splits,
            "supernet_run": trained_record["run_id"],
            "supernet": trained_record["supernet"],
            "training_seconds": trained_record.get("seconds"),
            "supernet_reused": reused,
            "predictor": spec.predictor,
            "targets": [_target_row(row, registered[row.target]) for row in spec.targets],
            "failed": [asdict(f) for f in spec.failed],
            "plots": plot_files,
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "status": "failed" if failed_stage else "completed",
        }
        runs.write_pipeline(p.dataset, record)
        tracking.log_dict(parent, record, "summary.json")
        _artifact(record)
        if failed_stage is not None:
            raise failed_stage
        ok = True
    finally:
        _close(runs, record, parent, ok, timings)
    logger.info("pipeline %s done in %.0f s", pipeline_run, timings["total"])
    return {**record, "noop": False}


def _nothing_new(p: RunPlan, version: str, key: str) -> dict | None:
    """The last completed run with the same data version, config, targets and search settings."""
    last = last_completed(p.store, p.dataset, key)
    if last is not None:
        get_run_logger().info(
            "nothing new: data version %s, training config and targets as in pipeline run %s; no work done",
            version,
            last["pipeline_run"],
        )
    return last


def _start_parent(p: RunPlan, version: str, pipeline_run: str) -> str:
    """The pipeline's MLflow parent run, with what it was asked to do as params and tags."""
    params = {
        "source": p.source,
        "data_version": version,
        "targets_file": p.targets_file,
        "targets_sha256": p.targets_sha256,
        "workers": p.workers,
        "samples": p.samples,
        "score": p.score,
        "train": p.train.model_dump(mode="json"),
    }
    tags = {"tofa.dataset": p.dataset, "tofa.data_version": version, "tofa.pipeline_run": pipeline_run}
    if commit := tracking.git_commit():
        tags["tofa.git_commit"] = commit
    return tracking.start_pipeline(p.dataset, f"pipeline-{pipeline_run}", params, tags)


def _train_stage(p: RunPlan, version: str, parent: str) -> tuple[dict, bool]:
    """The supernet of this data version and config: reused when one exists, else trained."""
    logger = get_run_logger()
    trained = reusable_supernet(p.store, p.dataset, version, p.train)
    if trained is not None:
        logger.info("stage 2/4: reusing supernet %s (same data version and config)", trained["run_id"])
        return trained, True
    logger.info(
        "stage 2/4: train on %s with %d workers (warm start from the last supernet)", version, p.workers
    )
    trained = train_flow(
        source=p.source,
        dataset=p.dataset,
        store=p.store,
        cfg=p.train,
        workers=p.workers,
        warm_start="last",
        version=version,
        parent_run=parent,
    )
    return trained, False


def _specialize_stage(p: RunPlan, run_id: str) -> tuple[Specialization, Exception | None]:
    """Every target in parallel; a failed target's error is kept to raise after registering the rest."""
    try:
        spec = specialize_flow.with_options(task_runner=task_runner())(
            source=p.source,
            dataset=p.dataset,
            targets_file=p.targets_file,
            store=p.store,
            run_id=run_id,
            samples=p.samples,
            score=p.score,
            targets=list(p.targets),
        )
        return spec, None
    except SpecializationFailed as err:  # register what succeeded, then fail
        return err.summary, err


def _report_stage(
    p: RunPlan, parent: str, spec: Specialization, trained_record: dict
) -> tuple[dict, list[str]]:
    get_run_logger().info("stage 4/4: register %d models in MLflow and draw the plots", len(spec.targets))
    trained = spec.trained  # the supernet specialization loaded, not loaded again
    registered = register_models(parent, p.dataset, spec.targets, trained, p.store)
    run_dir = p.store.at(trained_record["run_dir"])
    predictor = json.loads(run_dir.read_bytes(f"{predictor_key(p.score, p.samples, 0)}.json"))
    history = json.loads(run_dir.read_bytes("result.json"))["history"]
    return registered, draw_plots(parent, trained, spec, history, predictor)


def _close(runs: Runs, record: dict, parent: str, ok: bool, timings: dict[str, float]) -> None:
    """Mark a failed run failed in the store, and end its MLflow run."""
    try:
        if not ok and record["status"] == "running":  # a stage raised: say so in the store too
            runs.write_pipeline(record["dataset"], {**record, "status": "failed"})
        seconds = {f"seconds/{k}": v for k, v in timings.items()}
        if not ok:
            check_mlflow()  # seconds; a server that is down would hold this for its client's retries
        tracking.finish_run(parent, ok, seconds, descriptions.pipeline(record, ok))
    except Exception as err:
        if ok:
            raise
        # A stage's error is on its way out: a failure to record it must not replace it.
        logger = get_run_logger()
        if isinstance(err, ServiceUnavailable):  # said in one line: the run's own error follows
            logger.error("could not record the failed pipeline run %s: %s", record["pipeline_run"], err)
        else:
            logger.exception("could not record the failed pipeline run %s", record["pipeline_run"])


def _target_row(result: TargetResult, registration: dict) -> dict:
    keep = (
        *("target", "constraints", "device", "precision", "arch"),
        *MEASURED_KEYS,
        *("rejected_candidates", "rejected_by", "files", "seconds"),
    )
    row = result.to_json()
    out = {k: row.get(k) for k in keep}
    out["registered_model"] = {
        k: registration[k]
        for k in (
            "model",
            "version",
            "uri",
            "alias",
            "reason",
            "eval_acc",
            "champion_version",
            "champion_acc",
        )
    }
    return out


def _artifact(record: dict) -> None:
    """The run's summary as a Markdown table on the Prefect flow run."""
    key = re.sub(r"[^a-z0-9-]+", "-", f"tofa-{record['dataset']}-summary".lower())
    create_markdown_artifact(summary_markdown(record), key=key, description="TOFA pipeline summary")


def summary_markdown(record: dict) -> str:
    """A Markdown table of the targets: a column per registered constraint some target measured."""
    columns = [c for c in CONSTRAINTS if any(r.get(c.key) is not None for r in record["targets"])]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [
        f"# {record['dataset']} {record['data_version']}: supernet {record['supernet_run']}",
        "",
        "| target | budget | " + "".join(f"{c.label} {c.unit}".rstrip() + " | " for c in columns)
        + "val acc | test acc | model | alias |",
        "| --- | --- | " + "---: | " * len(columns) + "---: | ---: | --- | --- |",
    ]  # fmt: skip
    for r in record["targets"]:
        budget = ", ".join(f"{k.removeprefix('max_')} {v:,}" for k, v in r["constraints"].items())
        measured = "".join(f"{fmt(r.get(c.key), ',' if c.kind is int else '.4g')} | " for c in columns)
        reg = r["registered_model"]
        lines.append(
            f"| {r['target']} | {budget} | {measured}{fmt(r.get('val_acc'), '.3f')} "
            f"| {fmt(r.get('test_acc'), '.3f')} | {reg['model']} v{reg['version']} | {reg['alias']} |"
        )
    for f in record["failed"]:
        lines.append(f"\nfailed: **{f['target']}**: {f['error']}")
    return "\n".join(lines)
