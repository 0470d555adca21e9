"""Faults of the real services during a real `tofa run` on the local stack (`tofa stack up`).

Each case injects one fault into a run (a service killed by its recorded PID, a Ray worker
killed, a full disk, a damaged shard, another run's lease) and must end one of two ways:

  resumed   the run rode the fault out and completed;
  refused   it failed with a clear error (no traceback) naming what failed and the fix, and
            the store's committed data versions, the supernets, the registered model
            versions and the champions are exactly as before.

Then the fault ends (the service restarted, space freed, the byte put back, the lease
gone) and a plain `tofa run` must complete with no manual cleaning. Anything else is
FAILED. The table gives per case what happened, the seconds from the fault to a completed
run, and what was lost.

Every case shares one stack, one image folder (8x8 digits PNGs; each case adds new images,
so each run has a new data version to ingest, train and register) and a quick training
config, so a case takes a minute or two.

    .venv/bin/python benchmarks/bench_faults.py [--cases s3-ingest,lease-expired,...] [--timeout 600]

Writes docs/results/faults.md and faults.json. Run it alone: it starts the stack's four
services and `tofa run`s that use both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = ROOT / "docs" / "results"
DATASET = "faults"
TARGETS = "- {name: small, max_macs: 200000}\n- {name: lean, max_params: 150000}\n"
QUICK = (
    "train: {epochs: 2, steps_per_epoch: 5, batch_size: 8, mu: 1, k_random: 1, resolutions: [8],"
    " calib_images: 64}\n"
)
RUN_ARGS = ["--workers", "1", "--samples", "20"]
# What a clear error names, per kind of fault: the service (or the thing) and a fix.
NAMES = {
    "s3": ("S3", "s3://"),
    "mlflow": ("MLflow",),
    "prefect": ("Prefect",),
    "disk": ("No space", "disk", "space"),
    "shard": ("SHA-256", "damaged"),
    "lease": ("being processed by", "remove"),
}


def sh(args: list[str], env: dict, timeout: float = 300) -> str:
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


# ----------------------------------------------------------------- the stack and the data


class Stack:
    """The local stack in its own TOFA_HOME, on free ports; services killed and restarted by PID."""

    def __init__(self, home: Path):
        from flows.stack import free_port_pairs

        self.home = home
        s3, mlflow, prefect = free_port_pairs(3, low=31000)
        ours = ("AWS_", "MLFLOW_", "PREFECT_API", "TOFA_")
        base = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
        self.base = base | {"TOFA_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        self.ports = ["--s3-port", str(s3), "--mlflow-port", str(mlflow), "--prefect-port", str(prefect)]
        self.env: dict = {}

    def up(self) -> None:
        exports = sh([str(BIN / "tofa"), "stack", "up", *self.ports], self.base, timeout=400)
        self.env = self.base | dict(
            line.removeprefix("export ").split("=", 1) for line in exports.splitlines() if "=" in line
        )

    def down(self) -> None:
        sh([str(BIN / "tofa"), "stack", "down"], self.base, timeout=120)

    def kill(self, service: str) -> None:
        """SIGKILL the service's process group (what a crash or an OOM kill does)."""
        entry = json.loads((self.home / "stack" / "stack.json").read_text())["services"][service]
        os.killpg(entry["pid"], signal.SIGKILL)


class Images:
    """A folder source of 8x8 digits PNGs; `grow` adds images never seen before."""

    def __init__(self, root: Path):
        self.root, self.digits, self.made = root, load_digits(), 0

    def grow(self, labelled: int, unlabelled: int) -> None:
        rng = np.random.default_rng(self.made)
        for n, split in ((labelled, "train"), (unlabelled, "unlabeled")):
            for i in rng.integers(0, len(self.digits.images), n):
                pixels = self.digits.images[i] * (255 / 16) + rng.normal(0, 8, (8, 8))  # new bytes each time
                folder = self.root / split / (str(self.digits.target[i]) if split == "train" else "")
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L").save(
                    folder / f"{self.made}.png"
                )
                self.made += 1


# ----------------------------------------------------------------- what must not change


def committed(env: dict, dataset: str = DATASET) -> dict:
    """The store's committed state and the registry: data versions and the latest one, the
    supernet records, every registered model's versions and aliases."""
    from mlflow.tracking import MlflowClient

    from tofa_core.data.store import DatasetStore
    from tofa_core.runs import Runs
    from tofa_core.storage import open_storage

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        storage = open_storage(env["TOFA_STORE"])
        store = DatasetStore(storage)
        latest = store.latest(dataset)
        state = {
            "versions": sorted(m.version for m in store.versions(dataset)),
            "latest": latest.version if latest else None,
            "supernets": sorted(r["run_id"] for r in Runs(storage).supernets(dataset)),
        }
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        for model in client.search_registered_models(f"name LIKE 'tofa-{dataset}-%'"):
            versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{model.name}'"))
            state[model.name] = {
                "versions": versions,
                "aliases": {k: int(v) for k, v in model.aliases.items()},
            }
        return state
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


# ----------------------------------------------------------------- one run, one fault


@dataclass
class Run:
    rc: int
    output: str
    fault_at: float | None  # time.monotonic() of the fault, None if its trigger never came
    ended: float


def tofa_run(
    env: dict, work: Path, trigger: str | None = None, fault: Callable[[], None] | None = None,
    extra: tuple[str, ...] = (), timeout: float = 600, dataset: str = DATASET,
) -> Run:  # fmt: skip
    """`tofa run` on the folder; `fault` runs (in a thread) when a line containing `trigger` appears."""
    command = [str(BIN / "tofa"), "run", "--data", str(work / "images"), "--dataset", dataset]
    command += [
        "--targets",
        str(work / "targets.yaml"),
        "--config",
        str(work / "quick.yaml"),
        *RUN_ARGS,
        *extra,
    ]
    env = env | {"COLUMNS": "400"}  # the CLI's error on one line, not wrapped mid-word for 80 columns
    proc = subprocess.Popen(
        command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )  # fmt: skip
    lines, fault_at, threads = [], None, []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if fault is not None and fault_at is None and trigger is not None and trigger in line:
                fault_at = time.monotonic()
                threads.append(threading.Thread(target=fault, daemon=True))
                threads[-1].start()
        proc.wait()
    finally:
        timer.cancel()
    for t in threads:
        t.join(timeout=300)
    return Run(proc.returncode, "".join(lines), fault_at, time.monotonic())


def verdict(run: Run, before: dict, after: dict, names: tuple[str, ...]) -> tuple[str, str]:
    """(resumed | refused | FAILED, why). A refused run may leave what it completed before the
    fault (a data version, a supernet: whole, and reused by the next run), never less than
    before, and never another champion."""
    if run.rc == 0:
        return "resumed", "completed"
    tail = run.output[-3000:]
    error = tail[tail.rfind("error:") :] if "error:" in tail else tail[-600:]
    if "Traceback" in run.output:
        return "FAILED", "a traceback: " + " ".join(error.split())[:300]
    if not any(n.lower() in error.lower() for n in names):
        return "FAILED", "the error does not name what failed: " + " ".join(error.split())[:300]
    champions = {k: v["aliases"] for k, v in before.items() if k.startswith("tofa-")}
    if champions != {k: v["aliases"] for k, v in after.items() if k.startswith("tofa-")}:
        return "FAILED", f"the champions changed: {champions} -> {after}"
    kept = [f"data version {v}" for v in after["versions"] if v not in before["versions"]]
    kept += [f"supernet {r}" for r in after["supernets"] if r not in before["supernets"]]
    said = " ".join(error.removeprefix("error:").split())[:240]
    return "refused", said + (f" (kept: {', '.join(kept)})" if kept else "")


@dataclass
class Case:
    name: str
    fault: str  # what is injected, for the table
    names: tuple[str, ...]  # what its clear error must name
    trigger: str | None  # the log line of `tofa run` that starts the fault
    inject: Callable  # (ctx) -> None: the fault, in a thread beside the run
    heal: Callable  # (ctx) -> None: the fault ends
    new: tuple[int, int] = (20, 200)  # new images before the run: labelled, unlabelled
    extra: tuple[str, ...] = ()
    dataset: str = DATASET
    env: Callable = lambda ctx: ctx["stack"].env  # noqa: E731 - the environment its runs get


def run_case(case: Case, ctx: dict, timeout: float) -> dict:
    work, env, ds = ctx["work"], case.env(ctx), case.dataset
    ctx["images"].grow(*case.new)
    ctx["fired"] = case.trigger is None  # a fault without a trigger is set up before the run
    before = committed(env, ds)
    started = time.monotonic()
    faulted = tofa_run(env, work, case.trigger, lambda: case.inject(ctx), case.extra, timeout, ds)
    fault_at = faulted.fault_at or started  # no trigger: the fault was there before the run
    case.heal(ctx)
    after = committed(env, ds)
    outcome, why = verdict(faulted, before, after, case.names)
    if case.trigger is not None and faulted.fault_at is None:
        outcome, why = "FAILED", f"the trigger {case.trigger!r} never came (rc {faulted.rc})"
    elif not ctx["fired"]:
        outcome, why = "FAILED", f"the fault was never injected (rc {faulted.rc}): nothing to kill in time"
    again = tofa_run(env, work, extra=case.extra, timeout=timeout, dataset=ds)
    recovered = None
    if again.rc != 0:
        outcome, why = "FAILED", f"the run after the fault failed: {again.output[-600:]}"
    else:
        recovered = round((again.ended if faulted.rc != 0 else faulted.ended) - fault_at, 1)
    lost = _lost(before, committed(env, ds))
    if lost:
        outcome = "FAILED"
    row = {"case": case.name, "fault": case.fault, "outcome": outcome, "what happened": why}
    row |= {"recovered_s": recovered, "lost": lost or "nothing", "faulted_rc": faulted.rc}
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{case.name}.log").write_text(faulted.output)
    print(json.dumps(row), flush=True)
    return row


def _lost(before: dict, after: dict) -> list[str]:
    """What was committed before and is gone (or changed where it may not) after."""
    lost = [f"data version {v}" for v in before["versions"] if v not in after["versions"]]
    lost += [f"supernet {r}" for r in before["supernets"] if r not in after["supernets"]]
    for name, model in before.items():
        if not name.startswith("tofa-"):
            continue
        now = after.get(name, {"versions": [], "aliases": {}})
        lost += [f"{name} v{v}" for v in model["versions"] if v not in now["versions"]]
        if "champion" in model["aliases"] and "champion" not in now["aliases"]:
            lost.append(f"{name}: its champion")
    return lost


# ----------------------------------------------------------------- the cases


def _restart(ctx: dict) -> None:
    ctx["stack"].up()  # starts whatever is not running


def _kill_after(service: str, delay: float, down_for: float | None):
    """Kill `service` `delay` s after the trigger; restart it `down_for` s later (None: at heal)."""

    def inject(ctx: dict) -> None:
        time.sleep(delay)
        ctx["stack"].kill(service)
        ctx["fired"] = True
        if down_for is not None:
            time.sleep(down_for)
            ctx["stack"].up()

    return inject


def _ray_workers(root_pid: int) -> list[int]:
    """Ray worker processes (their title starts with ray::) running a task under `root_pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if not cmdline.startswith("ray::") or cmdline.startswith("ray::IDLE"):
                continue
            pid = int(entry.name)
            ancestor = pid
            while ancestor > 1:
                ancestor = int(
                    (Path("/proc") / str(ancestor) / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
                if ancestor == root_pid:
                    found.append(pid)
                    break
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
    return found


def _kill_a_specialization_worker(ctx: dict) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = _ray_workers(os.getpid())  # the bench's descendants: `tofa run` and its Ray
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            ctx["fired"] = True
            return
        time.sleep(0.2)


def _damage_shard(ctx: dict, flip: bool = True) -> None:
    """Flip one byte in the middle of the latest version's first shard, in the S3 store."""
    from tofa_core.data.store import DatasetStore
    from tofa_core.storage import open_storage

    os.environ.update(ctx["stack"].env)
    store = DatasetStore(open_storage(ctx["stack"].env["TOFA_STORE"]))
    manifest = store.latest(DATASET)
    ds = store.dataset(DATASET)
    key = manifest.shards[0].path
    data = bytearray(ds.read_bytes(key))
    data[len(data) // 2] ^= 0xFF
    ds.write_bytes(key, bytes(data))


def _lease(ctx: dict, skew: float) -> None:
    """Another host's run holding the lock: its lease ends `skew` s from now by our clock."""
    from tofa_core.runlock import Holder
    from tofa_core.storage import open_storage

    os.environ.update(ctx["stack"].env)
    folder = open_storage(ctx["stack"].env["TOFA_STORE"]).child(f"locks/{DATASET}")
    now = time.time()
    holder = Holder("pipeline other-host-run", "other-host", 4242, now - 900, now + skew, "0123456789abcdef")
    folder.write_bytes("000000000001.json", json.dumps(holder.__dict__).encode())
    ctx["lease_key"] = folder.uri("000000000001.json")


def _drop_lease(ctx: dict) -> None:
    from tofa_core.storage import open_storage

    folder = open_storage(ctx["stack"].env["TOFA_STORE"]).child(f"locks/{DATASET}")
    for o in folder.list():
        folder.delete(o.key)


def _nothing(ctx: dict) -> None:
    return None


# The disk cases keep their store on a small tmpfs of its own (a data set of its own too).
DISK_DATASET = "faults-disk"


def _disk_env(ctx: dict) -> dict:
    return ctx["stack"].env | {"TOFA_STORE": str(ctx["work"] / "disk" / "store")}


def _mount_disk(work: Path, size_mb: int = 96) -> bool:
    """A tmpfs at work/disk; False (the disk cases are skipped) where this machine cannot mount."""
    (work / "disk").mkdir(exist_ok=True)
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(work / "disk")]
    return subprocess.run(command, capture_output=True).returncode == 0


def _fill_disk(ctx: dict) -> None:
    """Write a file until the disk is full (ENOSPC): every later write there fails."""
    with open(ctx["work"] / "disk" / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 2**16)
        except OSError:
            ctx["fired"] = True


def _free_disk(ctx: dict) -> None:
    (ctx["work"] / "disk" / "filler").unlink(missing_ok=True)


def cases() -> list[Case]:
    return [
        Case(
            "s3-ingest",
            "S3 server killed 1 s into ingest, restarted 5 s later",
            NAMES["s3"],
            "stage 1/4: ingest",
            _kill_after("s3", 1.0, 5.0),
            _restart,
            new=(40, 3000),
        ),
        Case(
            "s3-ingest-down",
            "S3 server killed 1 s into ingest, down until the run ends",
            NAMES["s3"],
            "stage 1/4: ingest",
            _kill_after("s3", 1.0, None),
            _restart,
            new=(40, 3000),
        ),
        Case(
            "s3-export",
            "S3 server killed 2 s into specialization, restarted 5 s later",
            NAMES["s3"],
            "stage 3/4: specialize",
            _kill_after("s3", 2.0, 5.0),
            _restart,
        ),
        Case(
            "mlflow-register",
            "MLflow server killed when specialization ends, down until the run ends",
            NAMES["mlflow"],
            "specialized ",
            _kill_after("mlflow", 0.0, None),
            _restart,
        ),
        Case(
            "ray-worker-specialize",
            "a Ray worker killed while it specialises a target",
            ("Ray",),
            "stage 3/4: specialize",
            _kill_a_specialization_worker,
            _nothing,
        ),
        Case(
            "disk-full-ingest",
            "the store's disk fills up as ingest starts",
            NAMES["disk"],
            "stage 1/4: ingest",
            _fill_disk,
            _free_disk,
            new=(40, 3000),
            dataset=DISK_DATASET,
            env=_disk_env,
        ),
        Case(
            "disk-full-export",
            "the store's disk fills up as specialization starts",
            NAMES["disk"],
            "stage 3/4: specialize",
            _fill_disk,
            _free_disk,
            dataset=DISK_DATASET,
            env=_disk_env,
        ),
        Case(
            "shard-flipped",
            "one byte flipped in a stored shard, then `tofa run --force`",
            NAMES["shard"],
            None,
            _nothing,
            lambda ctx: _damage_shard(ctx),
            new=(0, 0),
            extra=("--force",),
        ),
        Case(
            "lease-expired",
            "another host's run left a lease that ran out 60 s ago",
            NAMES["lease"],
            None,
            _nothing,
            _drop_lease,
        ),
        Case(
            "lease-skewed",
            "another host's lease ends in 3,600 s by our clock (its clock runs ahead)",
            NAMES["lease"],
            None,
            _nothing,
            _drop_lease,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated case names [default: all]")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args = parser.parse_args()
    # `kill PID` stops the bench the way Ctrl-C does: through the finally that stops the stack.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    wanted = args.cases.split(",") if args.cases else None
    chosen = [c for c in cases() if not wanted or c.name in wanted]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tofa-faults-") as tmp:
        work = Path(tmp)
        (work / "targets.yaml").write_text(TARGETS)
        (work / "quick.yaml").write_text(QUICK)
        stack = Stack(work / "home")
        ctx = {"stack": stack, "work": work, "images": Images(work / "images")}
        stack.up()
        disk = any(c.dataset == DISK_DATASET for c in chosen) and _mount_disk(work)
        try:
            ctx["images"].grow(100, 300)
            for env, dataset in (
                (stack.env, DATASET),
                (_disk_env(ctx), DISK_DATASET) if disk else (None, None),
            ):
                first = tofa_run(env, work, timeout=args.timeout, dataset=dataset) if env else None
                if first is not None and first.rc != 0:  # every case starts from registered champions
                    raise SystemExit(f"the first run failed:\n{first.output[-3000:]}")
            for case in chosen:
                if case.dataset == DISK_DATASET and not disk:
                    rows.append(_skipped(case, "this machine cannot mount a tmpfs (mount -t tmpfs)"))
                    continue
                setup = {"lease-expired": -60.0, "lease-skewed": 3600.0}.get(case.name)
                if setup is not None:
                    _lease(ctx, setup)
                if case.name == "shard-flipped":
                    _damage_shard(ctx)
                rows.append(run_case(case, ctx, args.timeout))
                report(rows)  # as it goes: a bench stopped half-way keeps its table
            if not wanted or "prefect-restart" in wanted:
                rows.append(prefect_case(ctx, args.timeout))
                report(rows)
        finally:
            stack.down()
            if disk:
                subprocess.run(["umount", str(work / "disk")], check=False)
    print((OUT / "faults.md").read_text() if rows else "no case ran")
    if any(r["outcome"] == "FAILED" for r in rows):
        raise SystemExit(1)


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def _flow_run(stack: Stack, run_id: str, until: Callable[[str], bool], timeout: float) -> dict:
    """The deployment run's state once `until(state type)` holds (or the last one seen)."""
    from flows.stack import prefect_request

    deadline, state = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        record = json.loads((stack.home / "stack" / "stack.json").read_text())
        try:
            state = prefect_request(record, f"/flow_runs/{run_id}")["state"]
        except Exception:  # noqa: BLE001 - the server is restarting: ask again
            time.sleep(2)
            continue
        if until(state["type"]):
            return state
        time.sleep(2)
    return state


def _deployment_run(ctx: dict) -> str:
    work = ctx["work"]
    params = {
        "source": work / "images", "dataset": DATASET, "config_file": work / "quick.yaml",
        "targets_file": work / "targets.yaml", "workers": 1, "samples": 20,
    }  # fmt: skip
    command = [str(BIN / "prefect"), "deployment", "run", "tofa-retrain/scheduled"]
    for key, value in params.items():
        command += ["--param", f"{key}={value}"]
    out = sh(command, ctx["stack"].env)
    return next(line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line)


def prefect_case(ctx: dict, timeout: float) -> dict:
    """The Prefect server killed 20 s into a deployment run (training), restarted 3 s later."""
    stack = ctx["stack"]
    name, fault = "prefect-restart", "Prefect server killed 20 s into a deployment run, restarted 3 s later"
    sh([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], stack.env)
    ctx["images"].grow(20, 200)
    before = committed(stack.env)
    run_id = _deployment_run(ctx)
    state = _flow_run(stack, run_id, lambda t: t == "RUNNING" or t in FINAL, timeout)
    if state.get("type") != "RUNNING":
        return {"case": name, "fault": fault, "outcome": "FAILED", "what happened": f"never ran: {state}",
                "recovered_s": None, "lost": "nothing", "faulted_rc": None}  # fmt: skip
    time.sleep(20)
    if _flow_run(stack, run_id, lambda t: True, 30).get("type") != "RUNNING":
        return {"case": name, "fault": fault, "outcome": "FAILED", "what happened": "ended before the fault",
                "recovered_s": None, "lost": "nothing", "faulted_rc": None}  # fmt: skip
    fault_at = time.monotonic()
    stack.kill("prefect")
    time.sleep(3)
    stack.up()
    state = _flow_run(stack, run_id, lambda t: t in FINAL, timeout)
    after = committed(stack.env)
    if state.get("type") == "COMPLETED":
        outcome, why, recovered = "resumed", "the flow run completed", round(time.monotonic() - fault_at, 1)
    else:
        run = Run(1, f"error: {state.get('type')}: {state.get('message')}", fault_at, time.monotonic())
        outcome, why = verdict(run, before, after, ("Prefect", "crash", "heartbeat"))
        again = _flow_run(stack, _deployment_run(ctx), lambda t: t in FINAL, timeout)
        recovered = round(time.monotonic() - fault_at, 1) if again.get("type") == "COMPLETED" else None
        if recovered is None:
            outcome, why = "FAILED", f"the deployment run after the fault ended {again}"
    lost = _lost(before, committed(stack.env))
    row = {"case": name, "fault": fault, "outcome": "FAILED" if lost else outcome, "what happened": why}
    row |= {"recovered_s": recovered, "lost": lost or "nothing", "faulted_rc": None}
    print(json.dumps(row), flush=True)
    return row


def _skipped(case: Case, why: str) -> dict:
    return {"case": case.name, "fault": case.fault, "outcome": "skipped", "what happened": why,
            "recovered_s": None, "lost": "nothing", "faulted_rc": None}  # fmt: skip


def report(rows: list[dict]) -> None:
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    lines = [
        "# Faults of the services",
        "",
        f"Faults of the real services during `tofa run` ({stamp};"
        " `.venv/bin/python benchmarks/bench_faults.py`, alone on 2 cores). resumed: the run"
        " completed; refused: it failed with the error shown, and a plain `tofa run` after the"
        " fault ended completed; kept: what the refused run had completed before the fault (whole,"
        " reused by the next run). Lost compares the data versions, supernets, registered"
        " versions and champions before and after.",
        "",
        "| case | fault | outcome | what happened | fault to a completed run (s) | lost |",
        "| --- | --- | --- | --- | ---: | --- |",
    ]
    for r in rows:
        lost = r["lost"] if isinstance(r["lost"], str) else "; ".join(r["lost"])
        what = re.sub(r"\s+", " ", r["what happened"]).replace("|", "/")
        lines.append(
            f"| {r['case']} | {r['fault']} | {r['outcome']} | {what} | {r['recovered_s']} | {lost} |"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "faults.md").write_text("\n".join(lines) + "\n")
    (OUT / "faults.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
