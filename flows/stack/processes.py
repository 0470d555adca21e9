"""Processes of the stack: free ports, launching in a session of its own, recognising ours by
PID and start time, stopping a process group."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from flows.stack.config import GRPC_OFFSET, StackConfig, StackError


def _try_bind(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def port_taken(port: int) -> bool:
    """Something on 127.0.0.1 listens on or holds `port`. Connections a stopped server left in
    TIME_WAIT (for a minute after `tofa stack down`) do not count: the services bind with
    SO_REUSEADDR, as this check does, so they start on the port all the same."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return True
    finally:
        sock.close()
    return False


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


def _launch(name: str, cmd: list[str], env: dict, cfg: StackConfig, cwd: Path) -> dict:
    log = cfg.home / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return {"pid": proc.pid, "started": _start_time(proc.pid), "log": str(log), "cmd": cmd[:3]}


def _stop(*entries: dict, timeout: float = 20.0) -> None:
    """SIGTERM the recorded process groups together, SIGKILL what is left after `timeout`:
    services that each take seconds to shut down gracefully stop in the time of the slowest."""
    ours = [e for e in entries if _ours(e)]
    for entry in ours:
        os.killpg(entry["pid"], signal.SIGTERM)  # start_new_session: the group id is the PID
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_start_time(e["pid"]) == e["started"] for e in ours):
        for entry in ours:
            _reap(entry["pid"])
        time.sleep(0.2)
    for entry in ours:
        with contextlib.suppress(ProcessLookupError):  # the whole group has already exited
            os.killpg(entry["pid"], signal.SIGKILL)  # the leader's leftovers too (uvicorn workers, flow runs)
        _reap(entry["pid"])


def _reap(pid: int) -> None:
    """Collect our own child's exit status, so it does not linger as a zombie (same start time)."""
    with contextlib.suppress(ChildProcessError):  # started by another `tofa` process: not ours to reap
        os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------- the stack
