"""Memory of a command's whole process tree, read from /proc (Linux): for the benchmarks that
report peak RSS per process (the decode workers, Ray's workers are children of the command)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    tree, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _status(pid: int) -> tuple[int, int, str] | None:
    """(resident bytes now, peak resident bytes, command line) of one process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    kib = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    return int(kib.get("VmRSS", 0)) * 1024, int(kib.get("VmHWM", 0)) * 1024, cmd.strip()


@dataclass
class Sampled:
    output: str
    tree_peak: int = 0  # the most the tree held at one sample
    peaks: dict[int, tuple[int, str]] = field(default_factory=dict)  # pid -> (peak RSS, command)


def run_sampled(cmd: list[str], env: dict, every: float = 0.1) -> Sampled:
    """Run `cmd` to its end, sampling its tree's memory every `every` seconds."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    result, done = Sampled(""), threading.Event()

    def sample():
        while not done.is_set():
            now = 0
            for pid in descendants(child.pid):
                found = _status(pid)
                if found and found[1]:
                    now += found[0]
                    result.peaks[pid] = (found[1], found[2])
            result.tree_peak = max(result.tree_peak, now)
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result.output, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{result.output[-3000:]}")
    return result


def mib(n: int) -> float:
    return round(n / 2**20, 1)
