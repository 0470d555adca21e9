"""One pipeline run per data set at a time: a lease-based lock kept in the store itself, so it
holds across processes, machines and Prefect workers that share the store (local or S3).

The lock is a sequence of generation objects `locks/<data set>/<n>.json`; the live holder is
the newest generation whose lease has not run out. Taking the lock is `put_if_absent` of the
next generation, which exactly one contender wins (a hard link locally, `If-None-Match: *`
on S3), so a stale lock from a killed run is taken over safely after its lease. The holder
renews its lease from a background thread while it runs and deletes its generation when done.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from tofa_core import names
from tofa_core.storage import NotFound, Storage, StorageError

log = logging.getLogger(__name__)

# A killed run blocks the next one at most this long; the holder renews at a third of it.
LEASE_SECONDS = 600.0
# How often a waiting run looks at the lock again.
POLL_SECONDS = 2.0


def _machine() -> str:
    """This boot of this machine and this process's PID namespace: host names repeat (cloned
    VMs, containers), and every host's first PID namespace has the same id; "" where Linux's
    /proc does not say (then no holder is ever judged gone before its lease)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


class RunLocked(RuntimeError):
    """Another run holds the data set's lock; the message names it and when its lease ends."""


@dataclass(frozen=True)
class Holder:
    owner: str  # what holds it: "pipeline <run id>"
    host: str
    pid: int
    started: float  # epoch seconds
    expires: float
    token: str  # tells this holder's generation from a later taker's
    machine: str = ""  # boot id and PID namespace: whether `pid` can be looked up from here

    @classmethod
    def read(cls, data: bytes) -> Holder:
        """A record, whatever fields a newer or older version wrote beside these."""
        record = json.loads(data)
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    def exited_here(self) -> bool:
        """The holder ran on this machine (same host name, boot and PID namespace) and its
        process is gone: a run killed or failed without releasing (its store was down when it
        tried). A reused PID reads as alive, which only makes a run wait for the lease."""
        if self.host != socket.gethostname() or not self.machine or self.machine != _machine():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process: alive
            return False
        return False

    def describe(self, now: float, lease: float) -> str:
        """Who holds it and for how long by `now`; a lease longer than any holder writes
        (`lease`) means the holder's clock runs ahead of ours, which the message says."""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        left = max(0, round(self.expires - now))
        skew = (
            f"; that is more than a lease lasts ({lease:.0f} s): the clock of {self.host} runs "
            f"about {left - lease:.0f} s ahead of this machine's"
            if left > lease + 1
            else ""
        )
        return (
            f"{self.owner} (host {self.host}, pid {self.pid}, since {started}; lease ends in {left} s{skew})"
        )


class RunLock:
    """`with RunLock(store, dataset, owner):` holds the data set's lock for the block."""

    def __init__(
        self,
        store: Storage,
        dataset: str,
        owner: str,
        lease: float = LEASE_SECONDS,
        wait: float = 0.0,
        poll: float = POLL_SECONDS,
        clock: Callable[[], float] = time.time,
        renew_every: float | None = None,
    ):
        """`clock` is the wall clock leases are written and judged in (the same on every host
        that shares the store); `renew_every`: seconds between renewals (a third of the lease)."""
        # Impatient: a renewal that waited out S3's long retries could outlast the lease.
        self.folder = store.impatient().child(f"locks/{names.dataset_name(dataset)}")
        self.dataset, self.owner, self.lease, self.wait, self.poll = dataset, owner, lease, wait, poll
        self.clock, self.renew_every = clock, renew_every if renew_every is not None else lease / 3
        self.token = secrets.token_hex(8)
        self.key: str | None = None
        self.started = 0.0
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _generations(self) -> list[int]:
        return sorted(int(o.key[:-5]) for o in self.folder.list() if o.key[:-5].isdigit())

    def holder(self) -> tuple[int, Holder | None]:
        """The newest generation and its holder while its lease lasts (None: free)."""
        generations = self._generations()
        if not generations:
            return -1, None
        try:
            held = Holder.read(self.folder.read_bytes(f"{generations[-1]:012d}.json"))
        except NotFound:  # released meanwhile
            return generations[-1] - 1, None
        live = held.expires > self.clock() and not held.exited_here()
        return generations[-1], held if live else None

    def _record(self) -> bytes:
        expires = self.clock() + self.lease
        holder = Holder(
            self.owner, socket.gethostname(), os.getpid(), self.started, expires, self.token, _machine()
        )
        return json.dumps(asdict(holder)).encode()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait
        self.started = self.clock()
        while True:
            newest, held = self.holder()
            if held is None and self.folder.put_if_absent(f"{newest + 1:012d}.json", self._record()):
                self.key = f"{newest + 1:012d}.json"
                for old in range(max(0, newest - 8), newest + 1):  # stale generations: tidy up
                    self.folder.delete(f"{old:012d}.json")
                break
            if held is not None and time.monotonic() >= deadline:
                holder = held.describe(self.clock(), self.lease)
                raise RunLocked(
                    f"data set {self.dataset!r} is being processed by {holder}; wait for it, "
                    f"or remove {self.folder.uri(f'{newest:012d}.json')} if that run is gone"
                )
            time.sleep(self.poll if held is not None else 0.0)
        self._renewer = threading.Thread(target=self._renew, name=f"runlock-{self.dataset}", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        """Renew until released. A renewal that fails (the store restarting) is retried at the
        next one: a lease outlives two missed renewals, and a thread that died here would
        let another run take the lock while this one still works."""
        while not self._stop.wait(self.renew_every):
            try:
                self.folder.write_bytes(self.key, self._record())
            except StorageError as err:
                log.warning("could not renew the run lock of %r (retrying): %s", self.dataset, err)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.key is not None:
            self.folder.delete(self.key)
            self.key = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self.release()
        except StorageError as err:
            if error is None:
                raise
            # The block's own error (often the same outage) is the one to report; the lock
            # lapses with its lease, or the next run on this machine sees this process gone.
            log.warning("could not release the run lock of %r: %s", self.dataset, err)
