"""Config and targets files as hostile input: each bad file is refused quickly, with bounded
memory, by a ValueError naming the file and what to fix, never echoing the input unbounded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from console import plain
from typer.testing import CliRunner

from flows.cli import app
from tofa_core.config_files import MAX_BYTES, ConfigError, load_section, read_yaml
from tofa_core.data.ingest import IngestConfig
from tofa_core.search.targets import TargetError, load_targets
from tofa_core.training.config import TrainConfig

LAUGHS = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def write(tmp_path, text: str | bytes, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


PEAK = """
import resource, sys
from tofa_core.search.targets import load_targets
from tofa_core.training.config import TrainConfig
for load in (TrainConfig.from_yaml, load_targets):
    try:
        load(sys.argv[1])
    except ValueError as err:
        print(type(err).__name__, err, file=sys.stderr)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _peak_kib(path) -> tuple[int, str]:
    """The peak RSS of a fresh process that loads `path` as a config and as targets: a
    process of its own, since this one's high-water mark was set by earlier tests."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", PEAK, str(path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]), done.stderr


@pytest.mark.timeout(240)
def test_billion_laughs_is_refused_before_it_expands(tmp_path):
    for load in (lambda p: TrainConfig.from_yaml(p), lambda p: load_targets(p)):
        with pytest.raises(ValueError, match="aliases"):
            load(write(tmp_path, LAUGHS))
    laughs, said = _peak_kib(write(tmp_path, LAUGHS, "laughs.yaml"))
    plain, _ = _peak_kib(write(tmp_path, "a: [lol]\n", "plain.yaml"))
    assert said.count("aliases") == 2
    # Expanded, the 9**9 references would be gigabytes; refused, the peak is a plain file's.
    assert laughs - plain < 50_000, (laughs, plain)  # KiB


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train:\n  epochs: 3\n  epochs: 4\n", "duplicate key 'epochs'"),
        ("train:\n  epochs: 3\ntrain:\n  lr: 0.1\n", "duplicate key 'train'"),
        ("ingset:\n  seed: 1\n", "unknown section(s) ['ingset']; a config file has ingest, train"),
        ("train: [1, 2]\n", "'train' must be a mapping"),
        ("- 1\n- 2\n", "a config file is a YAML mapping"),
        ("train:\n  epochs: [\n", "not valid YAML"),
        ("train:\n  resolutions: [100000]\n", "train.resolutions.0: Input should be less than or equal"),
        ("train:\n  epochs: 100000000\n", "train.epochs"),
        ("ingest:\n  workers: 100000\n", None),  # an ingest field: refused by IngestConfig below
    ],
)
def test_bad_config_files_name_the_file_and_the_field(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as err:
        TrainConfig.from_yaml(path) if fragment else IngestConfig.from_yaml(path)
    assert str(path) in str(err.value)
    assert (fragment or "ingest.workers") in str(err.value)


def test_unreadable_config_paths_are_clear_errors(tmp_path):
    os.symlink("loop.yaml", tmp_path / "loop.yaml")
    cases = {
        tmp_path: "is a folder",
        tmp_path / "loop.yaml": "cannot read config file",
        tmp_path / "none.yaml": "does not exist",
        write(tmp_path, b"train:\n  lr: \xff\xfe\n"): "is not UTF-8 text (byte 13)",
        write(tmp_path, b"#" * (MAX_BYTES + 1), "big.yaml"): "is over 1048576 bytes",
    }
    for path, fragment in cases.items():
        with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            read_yaml(path)
    assert load_section(write(tmp_path, "train:\n  lr: 0.1\n"), "ingest") == {}


def test_long_bad_values_are_shown_cut(tmp_path):
    path = write(tmp_path, "train:\n  threshold: " + "x" * 100_000 + "\n")
    with pytest.raises(ValueError) as err:
        TrainConfig.from_yaml(path)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize(
    "budget, fragment",
    [
        ("max_macs: true", "max_macs"),
        ("max_params: '5000'", "max_params"),
        ("max_latency_ms: .inf, device: host-cpu", "max_latency_ms"),
        ("max_latency_ms: .nan, device: host-cpu", "max_latency_ms"),
    ],
)
def test_budgets_that_are_not_numbers_are_refused(tmp_path, budget, fragment):
    path = write(tmp_path, f"- {{name: t, {budget}}}\n", "targets.yaml")
    with pytest.raises(TargetError, match=fragment):
        load_targets(path, devices=["host-cpu"])


def test_the_cli_refuses_absurd_workers_and_a_folder_as_config(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--workers", "100000"])
    assert result.exit_code == 2 and "--workers" in result.output
    env = {"TOFA_STORE": str(tmp_path / "s")}
    result = runner.invoke(app, ["ingest", "digits", "--config", str(tmp_path)], env=env)
    assert result.exit_code == 2 and "is a folder" in plain(result.output)
    assert not (tmp_path / "s").exists()
