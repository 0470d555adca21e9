"""The local stack for real: `tofa stack up` (SeaweedFS S3, MLflow server with S3 artifacts,
Prefect server, a process worker), `prefect deploy --all` from prefect.yaml, and a
`prefect deployment run` of tofa-retrain picked up by the worker and run to completion. What
it produced is then read back as users would: MLflow over HTTP, the model's ONNX file from
MLflow's artifact store (S3 behind the server) run in ONNX Runtime, the store in the bucket.
`tofa stack down` stops every process it started, by PID.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import onnxruntime as ort
import pytest
from quick_config import config as quick_config

from flows.stack import free_port_pairs, prefect_request
from tofa_core.data.loaders import load_splits
from tofa_core.data.store import DatasetStore
from tofa_core.export import preprocess
from tofa_core.storage import open_storage

pytestmark = pytest.mark.slow  # a real stack: S3, MLflow, Prefect server and worker

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(args: list[str], env: dict, timeout: float = 300) -> str:
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{args} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("stack-home")
    s3, mlflow, prefect = free_port_pairs(3, low=30000)
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_API", "TOFA_"))
    }
    base |= {"TOFA_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    ports = ["--s3-port", str(s3), "--mlflow-port", str(mlflow), "--prefect-port", str(prefect)]
    try:
        exports = sh([str(BIN / "tofa"), "stack", "up", *ports], base, timeout=400)
        env = base | dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines())
        record = json.loads((home / "stack" / "stack.json").read_text())
        yield {"env": env, "home": home, "pids": {k: v["pid"] for k, v in record["services"].items()}}
    finally:
        sh([str(BIN / "tofa"), "stack", "down"], base, timeout=120)


def test_stack_reports_healthy_services_on_loopback(stack):
    out = sh([str(BIN / "tofa"), "stack", "status"], stack["env"])
    assert out.count("healthy") == 4
    env = stack["env"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:")
    assert env["TOFA_STORE"] == "s3://tofa/store"
    for pid in stack["pids"].values():
        assert alive(pid)


def _status(url: str, auth: str | None = None, method: str = "GET", data: bytes | None = None) -> int:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(
            # a hang guard, not a deadline: MLflow checks each request's password hash (CPU),
            # which took over 10 s under make test beside a CPU-bound benchmark
            urllib.request.Request(url, data, headers, method=method),
            timeout=120,
        ) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_every_service_refuses_callers_without_credentials(stack):
    """A local process without the stack's credentials can neither read nor plant anything:
    not through S3, not through SeaweedFS's own filer port, not in MLflow or Prefect."""
    import boto3
    from botocore.exceptions import ClientError

    env, home = stack["env"], stack["home"] / "stack"
    record = json.loads((home / "stack.json").read_text())
    s3 = {"endpoint_url": env["AWS_ENDPOINT_URL_S3"], "region_name": "us-east-1"}
    right = boto3.client(
        "s3",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        **s3,
    )
    right.put_object(Bucket="tofa", Key="probe.txt", Body=b"ours")
    wrong = boto3.client(
        "s3", aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key="guess", **s3
    )
    with pytest.raises(ClientError):
        wrong.get_object(Bucket="tofa", Key="probe.txt")

    filer = f"http://127.0.0.1:{record['ports']['weed_internal'][2]}"
    assert _status(f"{filer}/buckets/tofa/probe.txt") == 401
    assert _status(f"{filer}/buckets/tofa/planted.txt", method="PUT", data=b"theirs") == 401
    keys = [o["Key"] for o in right.list_objects_v2(Bucket="tofa").get("Contents", [])]
    assert (
        "planted.txt" not in keys
        and right.get_object(Bucket="tofa", Key="probe.txt")["Body"].read() == b"ours"
    )

    mlflow = env["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(mlflow) == 401 and _status(mlflow, "tofa:guess") == 401
    assert _status(mlflow, f"tofa:{env['MLFLOW_TRACKING_PASSWORD']}") == 200
    prefect = env["PREFECT_API_URL"] + "/admin/version"
    assert _status(prefect) == 401 and _status(prefect, "tofa:guess") == 401
    assert _status(prefect, env["PREFECT_API_AUTH_STRING"]) == 200
    assert isinstance(prefect_request(record, "/flows/filter", b"{}"), list)  # a POST with its CSRF token

    assert home.stat().st_mode & 0o777 == 0o700
    for name in ("stack.json", "env", "mlflow-auth.ini", "s3/security.toml"):
        assert (home / name).stat().st_mode & 0o777 == 0o600, name


def test_deployment_run_through_the_worker(stack, tmp_path, monkeypatch):
    env = stack["env"]
    targets = tmp_path / "targets.yaml"
    targets.write_text("- {name: tiny, max_macs: 200000}\n- {name: lean, max_params: 150000}\n")
    config = quick_config(tmp_path, 2, 5)
    sh([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)
    out = sh(
        [
            str(BIN / "prefect"), "deployment", "run", "tofa-retrain/scheduled",
            "--param", f"config_file={config}", "--param", f"targets_file={targets}",
            "--param", "workers=1", "--param", "samples=20",
        ],
        env,
    )  # fmt: skip
    run_id = next(line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line)
    deadline, state = time.monotonic() + 600, None
    record = json.loads((stack["home"] / "stack" / "stack.json").read_text())
    while time.monotonic() < deadline:
        state = prefect_request(record, f"/flow_runs/{run_id}")["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(3)
    log = (stack["home"] / "stack" / "logs" / "worker.log").read_text()[-4000:]
    assert state and state["type"] == "COMPLETED", f"{state}\n{log}"

    # MLflow as a user's tool sees it: over HTTP, artifacts through the server from S3.
    from mlflow.tracking import MlflowClient

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the server asks for them
        monkeypatch.setenv(key, env[key])
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("tofa-digits")
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("tofa.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["tofa.kind"] for r in nested) == ["target", "target", "train"]
    # the link TOFA prints opens the run in MLflow's model-training view, not its GenAI one
    from flows import tracking

    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    parent = parents[0].info.run_id
    assert tracking.run_url("digits", parent) == (
        f"{env['MLFLOW_TRACKING_URI']}/#/experiments/{exp.experiment_id}/runs/{parent}"
        "?workflowType=machine_learning"
    )
    for key in [k for k in os.environ if k.startswith("AWS_")]:  # the stack's S3, nobody else's
        monkeypatch.delenv(key)
    for key in [k for k in env if k.startswith("AWS_")]:
        monkeypatch.setenv(key, env[key])
    store = DatasetStore(open_storage(env["TOFA_STORE"]))
    for target in ("tiny", "lean"):
        name = f"tofa-digits-{target}"
        aliases = client.get_registered_model(name).aliases  # str over REST, int from SQLite
        assert {k: int(v) for k, v in aliases.items()} == {"champion": 1}
        version = client.get_model_version(name, "1")
        local = Path(client.download_artifacts(version.run_id, "model", str(tmp_path / target)))
        about = json.loads((local / "model.json").read_text())
        # The downloaded file, fed the data version's test images as model.json says, scores
        # what the registry says it scores.
        test = load_splits(store, about["dataset"], about["data_version"]).test
        sess = ort.InferenceSession(str(local / about["deployed"]), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"input": preprocess(test.images, about)})[0]
        scored = float((logits.argmax(1) == test.labels.numpy()).mean())
        registered = client.get_run(version.run_id).data.metrics["test_acc"]
        assert registered == pytest.approx(scored, abs=1e-9), (target, registered, scored)

    # The artifacts really sit in the S3 bucket (MLflow's and the store's).
    keys = bucket_keys(env)
    assert any(k.startswith("mlflow/") and k.endswith("model.onnx") for k in keys)
    assert any(k.startswith("store/exports/digits/") and k.endswith("model.onnx") for k in keys)


def bucket_keys(env: dict) -> list[str]:
    """Every key in the stack's bucket, through S3 with the stack's credentials."""
    import boto3

    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="tofa")
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def test_missing_services_fail_fast_with_the_variable_to_set(stack):
    dead = free_port_pairs(1, low=40000)[0]
    env = stack["env"] | {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{dead}"}
    before = bucket_keys(env)
    out = subprocess.run(
        [str(BIN / "tofa"), "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    # fast: it stopped before its first stage, so nothing reached the store
    assert out.returncode == 2 and bucket_keys(env) == before
    assert "MLflow tracking server" in out.stderr and "MLFLOW_TRACKING_URI" in out.stderr
    assert "Traceback" not in out.stderr
    env = stack["env"] | {"TOFA_STORE": "s3://no-such-bucket/store"}
    out = subprocess.run(
        [str(BIN / "tofa"), "run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "no-such-bucket" in out.stderr and "create the bucket" in out.stderr


def test_down_stops_every_process_by_pid(stack):
    pids = stack["pids"]
    sh([str(BIN / "tofa"), "stack", "down"], stack["env"], timeout=120)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in pids.values()):
        time.sleep(0.5)
    assert not any(alive(p) for p in pids.values())
    out = subprocess.run(
        [str(BIN / "tofa"), "stack", "status"], cwd=ROOT, env=stack["env"], capture_output=True, text=True
    )
    assert out.returncode == 1 and out.stdout.count("stopped") == 4
