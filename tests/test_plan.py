"""A pipeline run resolved once (tofa_core.plan.RunPlan): each file read once, bad files
refused before any work, and the "nothing new" key derived from what the run will use."""

from __future__ import annotations

from pathlib import Path

import pytest

from tofa_core import config_files
from tofa_core.config_files import ConfigError
from tofa_core.plan import RunPlan, config_hash
from tofa_core.search.targets import TargetError


def resolve(tmp_path: Path, config: str | None, targets: str, **overrides) -> RunPlan:
    config_file = None
    if config is not None:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(config)
    targets_file = tmp_path / "targets.yaml"
    targets_file.write_text(targets)
    return RunPlan.resolve(
        source="digits", dataset="digits", store=str(tmp_path / "store"), tracking_uri="sqlite:///x.db",
        config_file=str(config_file) if config_file else None, targets_file=str(targets_file),
        devices=[], workers=2, samples=300, score="agreement", **overrides,
    )  # fmt: skip


TARGETS = "- {name: small, max_macs: 200000}\n"


def test_both_sections_come_from_one_read_of_the_config_file(tmp_path, monkeypatch):
    reads = []
    read = config_files._read_text
    monkeypatch.setattr(config_files, "_read_text", lambda path, what: reads.append(what) or read(path, what))
    plan = resolve(tmp_path, "ingest:\n  seed: 7\ntrain:\n  epochs: 3\n  lr: 0.01\n", TARGETS)
    assert reads == ["config file", "targets file"]
    assert plan.ingest.seed == 7 and plan.train.epochs == 3 and plan.train.lr == 0.01
    assert [t.name for t in plan.targets] == ["small"] and plan.targets_text == TARGETS


def test_options_override_the_file_and_none_leaves_it(tmp_path):
    plan = resolve(
        tmp_path, "train:\n  epochs: 3\n  budget_minutes: 5\n", TARGETS, epochs=9, budget_minutes=None
    )
    assert plan.train.epochs == 9 and plan.train.budget_minutes == 5
    defaults = resolve(tmp_path, None, TARGETS, epochs=2)
    assert defaults.train.epochs == 2 and defaults.config_file is None


def test_the_key_changes_with_what_the_run_uses_and_only_with_that(tmp_path):
    plan = resolve(tmp_path, "train:\n  epochs: 3\n", TARGETS)
    same = resolve(tmp_path, "train:\n  epochs: 3\n", TARGETS)
    assert plan.key("v-1") == same.key("v-1") != plan.key("v-2")
    assert plan.key("v-1") != resolve(tmp_path, "train:\n  epochs: 4\n", TARGETS).key("v-1")
    # the text the targets were parsed from: a comment is a change a user made to the file
    assert plan.key("v-1") != resolve(tmp_path, "train:\n  epochs: 3\n", TARGETS + "# new\n").key("v-1")
    assert config_hash(plan.train) == config_hash(same.train)


def test_a_bad_config_or_targets_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml: train.epochs"):
        resolve(tmp_path, "train:\n  epochs: -1\n", TARGETS)
    with pytest.raises(ConfigError, match=r"config.yaml: unknown section\(s\) \['trian'\]"):
        resolve(tmp_path, "trian:\n  epochs: 3\n", TARGETS)
    with pytest.raises(TargetError, match=r"targets.yaml.*max_macs"):
        resolve(tmp_path, None, "- {name: small, max_macs: -5}\n")


def test_a_litert_format_without_the_converter_fails_at_resolution(tmp_path, monkeypatch):
    from tofa_core import litert

    monkeypatch.setenv(litert.PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(litert.LiteRTUnavailable, match="make litert"):
        resolve(tmp_path, None, "- {name: m, max_macs: 200000, formats: [onnx, tflite]}\n")
