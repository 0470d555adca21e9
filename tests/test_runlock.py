"""One pipeline run per data set: the store's lease lock, raced by real processes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tofa_core.runlock import RunLock, RunLocked
from tofa_core.storage import open_storage


def test_a_second_run_is_refused_naming_the_holder_until_the_first_ends(tmp_path):
    store = open_storage(tmp_path)
    with RunLock(store, "digits", "pipeline A"):
        with pytest.raises(RunLocked) as err:
            RunLock(store, "digits", "pipeline B").acquire()
        message = str(err.value)
        assert "pipeline A" in message and "pid" in message and "lease ends in" in message
        with RunLock(store, "other", "pipeline C"):  # another data set is not blocked
            pass
    with RunLock(store, "digits", "pipeline B"):
        pass
    assert [o.key for o in store.list("locks")] == []  # released: nothing left behind


class Clock:
    """A wall clock the test moves: leases expire when it says, however loaded the machine."""

    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_killed_runs_lock_is_taken_over_after_its_lease(tmp_path):
    store, clock = open_storage(tmp_path), Clock()
    dead = RunLock(store, "digits", "killed run", lease=30, clock=clock)
    dead.acquire()
    dead._stop.set()  # as if killed: the lease is no longer renewed and nothing is released
    clock.now += 29
    with pytest.raises(RunLocked):
        RunLock(store, "digits", "next run", clock=clock).acquire()
    clock.now += 2  # past the lease
    with RunLock(store, "digits", "next run", clock=clock) as taker:
        keys = [o.key for o in store.child("locks/digits").list()]
        assert keys == [taker.key] and taker.key > dead.key  # the stale generation is tidied away


def test_the_holder_renews_its_lease_while_it_runs(tmp_path):
    store, clock = open_storage(tmp_path), Clock()
    record = store.child("locks/digits")
    with RunLock(store, "digits", "long run", lease=30, clock=clock, renew_every=0.02) as holder:
        first = json.loads(record.read_bytes(holder.key))["expires"]
        clock.now += 100  # well past one lease: only a renewal keeps it
        deadline = time.monotonic() + 30  # a renewal is due every 0.02 s; a loaded machine gets 30 s
        while (
            json.loads(record.read_bytes(holder.key))["expires"] < clock.now and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        assert json.loads(record.read_bytes(holder.key))["expires"] == clock.now + 30 > first + 30
        with pytest.raises(RunLocked, match="long run"):
            RunLock(store, "digits", "second", clock=clock).acquire()
    clock.now += 100
    with RunLock(store, "digits", "second", clock=clock):  # released, not merely expired
        pass


def test_a_waiting_run_starts_when_the_holder_ends(tmp_path):
    store = open_storage(tmp_path)
    first = RunLock(store, "digits", "first")
    first.acquire()
    started = time.monotonic()
    mp.get_context("spawn").Process(target=_release_later, args=(str(tmp_path),)).start()
    with RunLock(store, "digits", "second", wait=30, poll=0.05):
        assert time.monotonic() - started >= 0.3
    first._stop.set()


def _release_later(root: str) -> None:
    time.sleep(0.5)
    folder = open_storage(root).child("locks/digits")
    for o in folder.list():
        folder.delete(o.key)  # what the first holder's release does


def _contend(root: str, i: int, out: str) -> None:
    with RunLock(open_storage(root), "digits", f"worker {i}", wait=60, poll=0.02):
        start = time.time()
        time.sleep(0.05)
        end = time.time()
    with open(out, "a") as f:
        f.write(json.dumps([start, end]) + "\n")


def test_racing_processes_hold_the_lock_one_at_a_time(tmp_path):
    ctx = mp.get_context("spawn")
    out = tmp_path / "intervals.jsonl"
    procs = [ctx.Process(target=_contend, args=(str(tmp_path / "store"), i, str(out))) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    intervals = sorted(json.loads(line) for line in out.read_text().splitlines())
    assert len(intervals) == 6
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert start >= end, intervals  # no two holders at once


def test_a_lease_from_a_clock_running_ahead_is_refused_saying_so(tmp_path):
    store, clock = open_storage(tmp_path), Clock()
    ahead = Clock()
    ahead.now = clock.now + 3600  # another host whose clock is an hour ahead
    other = RunLock(store, "digits", "pipeline on a fast clock", lease=600, clock=ahead)
    other.acquire()
    other._stop.set()  # its host renews it, not this test
    with pytest.raises(RunLocked) as err:
        RunLock(store, "digits", "next run", lease=600, clock=clock).acquire()
    message = str(err.value)
    assert "lease ends in 4200 s" in message and "about 3600 s ahead" in message
    assert "locks/digits/000000000000.json if that run is gone" in message
    clock.now += 4201  # its lease, judged by our clock, has run out
    with RunLock(store, "digits", "next run", lease=600, clock=clock):
        pass


def test_a_failed_renewal_is_retried_and_the_lease_kept(tmp_path, monkeypatch):
    from tofa_core.storage import StorageError

    store, clock = open_storage(tmp_path), Clock()
    record = store.child("locks/digits")
    with RunLock(store, "digits", "long run", lease=30, clock=clock, renew_every=0.02) as holder:
        folder, failures = holder.folder, []
        real = type(folder).write_bytes

        def flaky(self, key, data):  # the store is down for the first two renewals
            if len(failures) < 2:
                failures.append(key)
                raise StorageError("cannot write: S3 endpoint unreachable")
            real(self, key, data)

        monkeypatch.setattr(type(folder), "write_bytes", flaky)
        clock.now += 100  # after the patch: a lease valid at the new time comes after 2 failures
        deadline = time.monotonic() + 30

        def renewed() -> bool:
            return json.loads(record.read_bytes(holder.key))["expires"] >= clock.now and len(failures) == 2

        while time.monotonic() < deadline and not renewed():
            time.sleep(0.01)
        assert len(failures) == 2 and holder._renewer.is_alive()
        assert json.loads(record.read_bytes(holder.key))["expires"] >= clock.now + 30


HOLD = """
import sys, time
from tofa_core.runlock import RunLock
from tofa_core.storage import open_storage
lock = RunLock(open_storage(sys.argv[1]), "digits", "run in another process")
lock.acquire()
lock._stop.set()  # no renewals; and it never releases
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(tmp_path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), str(seconds)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_left_by_a_process_gone_from_this_machine_is_taken_at_once(tmp_path):
    store = open_storage(tmp_path)
    alive = _holder(tmp_path, 60)
    try:
        with pytest.raises(RunLocked, match="run in another process"):  # alive: it holds
            RunLock(store, "digits", "next run").acquire()
    finally:
        alive.kill()
        alive.wait()
    # Gone without releasing (killed, or its store was down when it tried): not 600 s of waiting.
    with RunLock(store, "digits", "next run") as taker:
        assert [o.key for o in store.child("locks/digits").list()] == [taker.key]


def test_a_failed_release_never_hides_the_error_that_ended_the_run(tmp_path, monkeypatch):
    from tofa_core.storage import StorageError

    store = open_storage(tmp_path)
    lock = RunLock(store, "digits", "run")

    def down(self, key):
        raise StorageError("cannot delete: S3 endpoint unreachable")

    with pytest.raises(ValueError, match="the stage's own error"):
        with lock:
            monkeypatch.setattr(type(lock.folder), "delete", down)
            raise ValueError("the stage's own error")
    with pytest.raises(StorageError):  # with no error in flight, a failed release is the error
        with RunLock(store, "other", "run") as other:
            assert other.key is not None
