"""Multi-node without a shared disk: the training flow on a simulated two-node Ray cluster
(`ray.cluster_utils.Cluster`: a head and one more node, each its own raylet, object store and
CPU, all on 127.0.0.1), with the store on the real S3 server.

Every node is on this machine, so a stray local path would still "work"; the tests prove the
opposite by what they find: data, checkpoints, the supernet, the run's record and Ray's own run
metadata all in the bucket, the two Ray Train workers on different nodes, nothing of the run on
the local disk, and a run that loses a node resuming from its S3 checkpoint on a node that did
not exist when the checkpoint was written.
"""

from __future__ import annotations

import faulthandler
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from quick_config import config
from recompute import assert_reported

pytestmark = pytest.mark.slow  # Ray clusters and multi-worker training

SOFT_LIMIT_S = 300  # a test fails with every thread's stack after this long ...
HARD_LIMIT_S = 340  # ... and the process exits (stacks dumped) if even that cannot interrupt it
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 100 * 1024 * 1024}


@pytest.fixture
def deadline():
    """A hang fails the test within minutes instead of stalling the suite."""

    def expired(signum, frame):
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        raise TimeoutError(f"two-node training did not finish within {SOFT_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(SOFT_LIMIT_S)
    faulthandler.dump_traceback_later(HARD_LIMIT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def two_nodes(deadline, tmp_path, monkeypatch, s3_server, prefect_server):
    """A head node and one worker node, one CPU each, on 127.0.0.1; the driver on the head.

    The S3 endpoint and credentials are in the environment before any raylet starts, so every
    Ray process on either node inherits them, as a real node would get them from its own setup.
    One CPU per node and one per Ray Train worker: two workers must run on two nodes.
    """
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)  # the MLflow database and any stray relative write land here
    for key in ("TOFA_STORE", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    # Ray's folders (sessions, logs, sockets, the recorded cluster address) apart from any other
    # Ray on this machine; short, because unix socket paths are limited to ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="tofa-ray-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    assert not ray.is_initialized()
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={**NODE, "include_dashboard": False, "temp_dir": str(root / "ray")},
        )
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        # ray.init rewrites a loopback address to this host's outward IP, where a loopback-only
        # GCS does not listen: while connecting, "this host" is 127.0.0.1.
        with monkeypatch.context() as patch:
            patch.setattr(ray._private.services, "get_node_ip_address", lambda address=None: "127.0.0.1")
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert alive == {cluster.head_node.node_id, *(n.node_id for n in cluster.worker_nodes)}
        assert len(alive) == 2
        cluster.temp_root = root
        yield cluster
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def bucket_keys(client, bucket: str, prefix: str = "") -> dict[str, str]:
    """Key -> ETag of every object under `prefix`, read with a client of our own (not the code under test)."""
    keys = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys |= {o["Key"]: o["ETag"] for o in page.get("Contents", [])}
    return keys


def train_workers(cluster) -> list[dict]:
    """Every Ray Train worker actor of the session, finished ones too (the GCS keeps them), oldest first."""
    actors = cluster.global_state.actor_table(None).values()
    return sorted(
        (a for a in actors if a["ActorClassName"] == "RayTrainWorker"), key=lambda a: a["StartTime"]
    )


def assert_nothing_local(cluster, tmp_path: Path, run_id: str) -> None:
    """No local store; no checkpoint or run record anywhere in the working folder (where the nodes
    were started) or in Ray's node folders; no file at all in the run's local working folders
    (Ray Train's per-run scratch, the workers' cwd)."""
    assert not (tmp_path / ".tofa" / "store").exists()
    local = [
        p
        for root in (tmp_path, cluster.temp_root)
        for p in root.rglob("*")
        if p.is_file() and (p.suffix == ".pt" or p.name == "result.json" or run_id in p.parts)
    ]
    assert local == []


def test_two_node_cluster_trains_with_everything_in_s3(two_nodes, s3_server, s3_bucket, tmp_path):
    from flows.train import train_flow

    store = f"s3://{s3_bucket}/store"
    summary = train_flow(source="digits", store=store, config_file=config(tmp_path, 2, 2), workers=2)

    run_id = summary["run_id"]
    assert summary["run_dir"] == f"{store}/runs/{run_id}"
    assert summary["supernet"] == f"{store}/runs/{run_id}/supernet.pt"
    assert summary["epochs"] == 2 and summary["workers"] == 2
    assert_reported(summary, store, summary["run_dir"])

    # Everything the run made is in the bucket.
    client = s3_server.client()
    keys = bucket_keys(client, s3_bucket)
    run = f"store/runs/{run_id}/"
    assert {k[len(run) :] for k in keys if k.startswith(run)} == {
        "checkpoints/epoch-0001.pt",
        "checkpoints/epoch-0002.pt",
        "supernet.pt",
        "result.json",
        "progress.json",
    }
    record = json.loads(client.get_object(Bucket=s3_bucket, Key=run + "result.json")["Body"].read())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert record["data_version"] == summary["data_version"]
    assert any(k.startswith("store/datasets/digits/") for k in keys)  # the data the workers read
    assert f"store/supernets/digits/{run_id}.json" in keys
    assert any(k.startswith(f"store/ray/{run_id}/") for k in keys)  # Ray Train's run metadata

    # The two workers ran on the two nodes.
    workers = train_workers(two_nodes)
    assert len(workers) == 2, workers
    nodes = {two_nodes.head_node.node_id, *(n.node_id for n in two_nodes.worker_nodes)}
    assert {a["Address"]["NodeID"] for a in workers} == nodes

    assert_nothing_local(two_nodes, tmp_path, run_id)


def test_a_lost_node_is_replaced_and_the_run_resumes_from_s3(two_nodes, s3_server, s3_bucket, tmp_path):
    """The worker node goes away (its raylet and workers killed) after the first checkpoint; a new
    node joins; Ray Train restarts the workers on the head and the new node, and they resume from
    the checkpoint in S3, which the new node never had locally."""
    from flows.train import train_flow

    store = f"s3://{s3_bucket}/store"
    cfg = config(tmp_path, 4, 6)
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = train_flow(source="digits", store=store, config_file=cfg, workers=2)
        except Exception as err:  # reported to the test thread below
            outcome["error"] = err

    client = s3_server.client()
    head = two_nodes.head_node.node_id
    lost = next(iter(two_nodes.worker_nodes))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    first = None
    until = time.time() + 200
    while time.time() < until and thread.is_alive():
        done = {
            k: e
            for k, e in bucket_keys(client, s3_bucket, "store/runs/").items()
            if k.endswith("/epoch-0001.pt")
        }
        if done:
            first = done
            break
        time.sleep(0.2)
    assert first, outcome.get("error") or "no first checkpoint in time"
    two_nodes.remove_node(lost)  # its raylet, object store and worker processes, gracefully then by force
    ahead = bucket_keys(client, s3_bucket, "store/runs/")
    assert not any(k.endswith("/result.json") for k in ahead), "the run finished before its node was lost"
    new = two_nodes.add_node(**NODE)
    thread.join(timeout=max(1.0, until - time.time()))
    assert not thread.is_alive(), "the run did not finish after the node was replaced"
    assert "error" not in outcome, outcome.get("error")

    summary = outcome["summary"]
    run_id = summary["run_id"]
    run = f"store/runs/{run_id}/"
    keys = bucket_keys(client, s3_bucket, run)
    assert set(keys) == {run + k for k in ("supernet.pt", "result.json", "progress.json")} | {
        f"{run}checkpoints/epoch-{e:04d}.pt" for e in (1, 2, 3, 4)
    }
    # Resumed, not retrained: the first epoch's checkpoint was never written again.
    assert keys[f"{run}checkpoints/epoch-0001.pt"] == first[f"{run}checkpoints/epoch-0001.pt"]
    record = json.loads(client.get_object(Bucket=s3_bucket, Key=run + "result.json")["Body"].read())
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4]

    # The first workers ran on the head and the lost node; the last ones on the head and the new node.
    workers = train_workers(two_nodes)
    assert len(workers) >= 4, workers
    assert {a["Address"]["NodeID"] for a in workers[:2]} == {head, lost.node_id}
    assert {a["Address"]["NodeID"] for a in workers[-2:]} == {head, new.node_id}

    assert_nothing_local(two_nodes, tmp_path, run_id)


@pytest.mark.parametrize(
    "nodes, workers, expected",
    [([2], 2, 1), ([16], 2, 8), ([1, 3], 2, 1), ([4, 4], 2, 4), ([8, 2], 2, 4), ([8, 2], 3, 2), ([], 1, 1)],
)
def test_cpus_per_worker_fits_workers_on_whole_nodes(nodes, workers, expected):
    from flows.train import cpus_per_worker

    assert cpus_per_worker(nodes, workers) == expected
