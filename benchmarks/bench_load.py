"""Load on the stack: many ingests into one store at once, and many deployment runs at once.

  ingests  50 `tofa ingest` processes of small image folders into one store (a local store,
           or the stack's S3 with --s3), 8 at a time, over 5 data sets: no version is lost
           (each ingest's version is listed, with its image count), every manifest reads
           back, and nothing is left half-written. Each process imports torch and Prefect, so
           the peak memory of the 8 together is what a machine must hold.
  runs     8 `prefect deployment run tofa-retrain/scheduled` at once over 3 data sets through
           the stack's worker (quick config, `lock_wait` long enough): each data set's runs
           take its lock one after another, different data sets run side by side, all end
           COMPLETED, and every target's champion scores at least as well as each of its
           other versions (the promotion rule held under concurrency).

Reports the wall time and the peak resident memory (the sum over the processes, sampled every
0.5 s) of each part: a table on stdout, the rows in docs/results/load.json (the page that explains
them is docs/results/load.md).

    .venv/bin/python benchmarks/bench_load.py [--part ingests|runs|both] [--s3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_faults import BIN, DATASET, QUICK, TARGETS, Stack, sh  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "load.json"


class PeakRSS:
    """The peak of the summed resident memory of a set of process trees, sampled in a thread."""

    def __init__(self):
        self.roots: set[int] = set()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, sum(_tree_rss(pid) for pid in list(self.roots)))


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            pid = int(entry.name)
            children.setdefault(int(fields[1]), []).append(pid)
            rss[pid] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def _folder(root: Path, seed: int, n: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{seed}-{i}.png")
    return root


def ingests(work: Path, env: dict, store: str, count: int = 50, parallel: int = 8) -> dict:
    """`count` ingests, `parallel` at a time, over 5 data sets; each folder new content."""
    from tofa_core.data.store import DatasetStore
    from tofa_core.storage import open_storage

    jobs = [(f"load{i % 5}", _folder(work / f"src{i}", i)) for i in range(count)]
    results, running, refused, started = [], [], 0, time.perf_counter()
    with PeakRSS() as peak:
        while jobs or running:
            while jobs and len(running) < parallel:
                job = jobs.pop(0)
                command = [str(BIN / "tofa"), "ingest", str(job[1]), "--dataset", job[0], "--store", store]
                proc = subprocess.Popen(
                    command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                running.append((job, proc))
                peak.roots.add(proc.pid)
            for job, proc in list(running):
                if proc.poll() is None:
                    continue
                out = proc.stdout.read()
                running.remove((job, proc))
                peak.roots.discard(proc.pid)
                if proc.returncode == 2 and "is being processed by" in out:  # its data set's lock
                    jobs.append(job)  # as a scheduler would: again, later
                    refused += 1
                else:
                    results.append((job[0], proc.returncode, out))
            time.sleep(0.2)
    wall = time.perf_counter() - started
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    ds = DatasetStore(open_storage(store))
    versions = {d: ds.versions(d) for d in {r[0] for r in results}}
    problems = [f"{d}: rc {rc}: {out[-300:]}" for d, rc, out in results if rc != 0]
    # every ingest made its own version (each folder is new content): 10 per data set
    for d, found in versions.items():
        if len(found) != count // 5:
            problems.append(f"{d}: {len(found)} versions, expected {count // 5}")
        for m in found:
            ds.manifest(d, m.version)  # reads and validates it
    return {"part": "ingests", "count": count, "parallel": parallel, "wall_s": round(wall, 1),
            "peak_rss_mib": round(peak.peak / 2**20), "problems": problems, "refused": refused}  # fmt: skip


def runs(work: Path, stack: Stack, count: int = 8, datasets: int = 3) -> dict:
    """`count` deployment runs at once over `datasets` data sets, through the stack's worker."""
    from flows.stack import prefect_request

    (work / "targets.yaml").write_text(TARGETS)
    (work / "quick.yaml").write_text(QUICK)
    sh([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], stack.env)
    ids, started = [], time.perf_counter()
    for i in range(count):
        dataset = f"{DATASET}-load{i % datasets}"
        params = {"source": "digits", "dataset": dataset, "config_file": work / "quick.yaml",
                  "targets_file": work / "targets.yaml", "workers": 1, "samples": 20, "force": True,
                  "lock_wait": 3000}  # fmt: skip
        command = [str(BIN / "prefect"), "deployment", "run", "tofa-retrain/scheduled"]
        for key, value in params.items():
            command += ["--param", f"{key}={json.dumps(value) if isinstance(value, bool) else value}"]
        out = sh(command, stack.env)
        ids.append(
            (dataset, next(line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line))
        )
    record = json.loads((stack.home / "stack" / "stack.json").read_text())
    worker = record["services"]["worker"]["pid"]
    states = {}
    with PeakRSS() as peak:
        peak.roots.add(worker)
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline and len(states) < count:
            for _, run_id in ids:
                state = prefect_request(record, f"/flow_runs/{run_id}")["state"]["type"]
                if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    states[run_id] = state
            time.sleep(3)
    wall = time.perf_counter() - started
    problems = [f"{run_id}: {s}" for run_id, s in states.items() if s != "COMPLETED"]
    problems += [f"{run_id}: not finished" for _, run_id in ids if run_id not in states]
    problems += _champions_hold(stack.env, sorted({d for d, _ in ids}))
    return {"part": "runs", "count": count, "datasets": datasets, "wall_s": round(wall, 1),
            "peak_rss_mib": round(peak.peak / 2**20), "problems": problems}  # fmt: skip


def _champions_hold(env: dict, datasets: list[str]) -> list[str]:
    """Each target's champion has the best evaluation score among its versions (ties: any)."""
    from mlflow.tracking import MlflowClient

    os.environ.update(env)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    problems = []
    for dataset in datasets:
        for model in client.search_registered_models(f"name LIKE 'tofa-{dataset}-%'"):
            versions = client.search_model_versions(f"name='{model.name}'")
            scores = {int(v.version): float(v.tags.get("tofa.eval_acc", "nan")) for v in versions}
            champion = int(model.aliases.get("champion", -1))
            if champion not in scores or scores[champion] < max(scores.values()) - 1e-9:
                best = max(scores.values())
                problems.append(
                    f"{model.name}: champion v{champion} scores {scores.get(champion)}, best {best}"
                )
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ingests", "runs", "both"), default="both")
    parser.add_argument("--s3", action="store_true", help="ingest into the stack's S3 (else a local store)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tofa-load-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOFA_STORE", "MLFLOW_"))}
        stack = Stack(work / "home") if args.s3 or args.part != "ingests" else None
        try:
            if stack:
                stack.up()
            if args.part in ("ingests", "both"):
                store = stack.env["TOFA_STORE"] if args.s3 else str(work / "store")
                rows.append(ingests(work, stack.env if stack else env, store))
                print(json.dumps(rows[-1]), flush=True)
            if args.part in ("runs", "both"):
                rows.append(runs(work, stack))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            if stack:
                stack.down()
    lines = [
        f"Load on the stack ({time.strftime('%Y-%m-%d')}; `.venv/bin/python benchmarks/bench_load.py`)",
        "",
        "| part | what | wall s | peak RSS MiB (all its processes) | problems |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        what = (f"{r['count']} ingests over 5 data sets, {r['parallel']} at a time ({r['refused']} refused"
                " by their data set's lock, run again)" if r["part"] == "ingests"
                else f"{r['count']} deployment runs at once over {r['datasets']} data sets")  # fmt: skip
        problems = "; ".join(r["problems"]) or "none"
        lines.append(f"| {r['part']} | {what} | {r['wall_s']} | {r['peak_rss_mib']} | {problems} |")
    OUT.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    if any(r["problems"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
