"""Up, down, status: the stack as `tofa stack` drives it."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from flows.stack.config import POOL, PROJECT_ROOT, SERVICES, StackConfig, StackError, _load, _save
from flows.stack.processes import _launch, _ours, _stop, _tail, free_port_pairs, port_taken
from flows.stack.services import (
    JWT_KEYS,
    _commands,
    _ensure_bucket,
    _health,
    _write_service_configs,
    client_env,
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
            if port_taken(port):
                raise StackError(
                    f"port {port} on 127.0.0.1 (for {name}) is in use; choose another with --{name}-port"
                )
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


def down(cfg: StackConfig) -> list[str]:
    """Stop every recorded service (worker first); return the names that were running."""
    record = _load(cfg)
    entries = {name: record.get("services", {}).pop(name, None) for name in reversed(SERVICES)}
    stopped = [name for name, entry in entries.items() if _ours(entry)]
    _stop(entries.pop("worker"))  # first: its flow runs end while their servers still answer
    _stop(*entries.values())  # then the servers together
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
