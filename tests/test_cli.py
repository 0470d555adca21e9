"""Tests for the `tofa` command line (flows.cli)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from console import plain
from typer.testing import CliRunner

from flows.cli import app
from tofa_core.arch import Arch, SearchSpace
from tofa_core.costs import count_macs, count_params, layers

TINY = SearchSpace.preset("tiny", num_classes=10, in_channels=1)
runner = CliRunner()


def _flat(text: str) -> str:
    """Output with rich's line wrapping undone (it wraps at 80 columns under the runner)."""
    return " ".join(text.split())


def invoke(*args: str):
    return runner.invoke(app, list(args))


# ----------------------------------------------------------------- space


def test_space_tiny_prints_choices():
    result = invoke("space", "tiny")
    assert result.exit_code == 0, result.output
    out = _flat(result.output)
    assert "search space tiny" in out
    assert "16, 20, 24, 28, 32" in out
    assert "0.5, 0.75, 1.0" in out
    assert "1, 2, 3 (x4 stages)" in out
    assert "3, 5, 7" in out
    assert "2, 3, 4" in out
    lo, hi = TINY.min_arch(), TINY.max_arch()
    assert f"{count_macs(lo, TINY):,} MACs, {count_params(lo, TINY):,} params" in out
    assert f"{count_macs(hi, TINY):,} MACs, {count_params(hi, TINY):,} params" in out


def test_space_ofa_and_overrides():
    result = invoke("space", "ofa-mbv3", "--resolutions", "32,64", "--num-classes", "5")
    assert result.exit_code == 0, result.output
    out = _flat(result.output)
    assert "search space ofa-mbv3" in out
    assert "32, 64" in out and "128" not in out
    assert "2, 3, 4 (x5 stages)" in out
    sp = SearchSpace.preset("ofa-mbv3", num_classes=5, resolutions=(32, 64))
    assert f"{count_macs(sp.max_arch(), sp):,} MACs" in out


def test_space_in_channels_default_and_override():
    # tiny defaults to 1 input channel; 3 channels adds stem weights.
    base = _flat(invoke("space", "tiny").output)
    rgb = invoke("space", "tiny", "--in-channels", "3")
    assert rgb.exit_code == 0
    sp3 = SearchSpace.preset("tiny", num_classes=10, in_channels=3)
    assert f"{count_params(sp3.max_arch(), sp3):,} params" in _flat(rgb.output)
    assert f"{count_params(sp3.max_arch(), sp3):,} params" not in base


def test_space_unknown_preset():
    result = invoke("space", "bogus")
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "error:" in out and "'bogus'" in out and "ofa-mbv3" in out


@pytest.mark.parametrize("value", ["16,x", "abc", "16;24"])
def test_bad_resolutions_option(value):
    result = invoke("space", "tiny", "--resolutions", value)
    assert result.exit_code == 2
    assert "--resolutions must be comma-separated integers" in _flat(result.output)
    assert repr(value) in _flat(result.output)


# ----------------------------------------------------------------- sample


def test_sample_writes_json(tmp_path):
    out_file = tmp_path / "subnets.json"
    result = invoke("sample", "tiny", "--count", "2", "--json-out", str(out_file))
    assert result.exit_code == 0, result.output
    assert "wrote" in _flat(result.output)
    rows = json.loads(out_file.read_text())
    assert len(rows) == 4
    archs = [Arch.from_dict(row["arch"]) for row in rows]
    assert archs[0] == TINY.max_arch()
    assert archs[1] == TINY.min_arch()
    for row, arch in zip(rows, archs, strict=True):
        assert set(row) == {"arch", "macs", "params", "max_abs_diff"}
        TINY.validate(arch)
        assert row["macs"] == count_macs(arch, TINY)
        assert row["params"] == count_params(arch, TINY)
        assert 0.0 <= row["max_abs_diff"] < 1e-4
    assert "4 subnets of tiny" in _flat(result.output)


def test_sample_is_reproducible_and_seeded(tmp_path):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    common = ("sample", "tiny", "--count", "3", "--no-verify")
    assert invoke(*common, "--seed", "7", "--json-out", str(a)).exit_code == 0
    assert invoke(*common, "--seed", "7", "--json-out", str(b)).exit_code == 0
    assert invoke(*common, "--seed", "8", "--json-out", str(c)).exit_code == 0
    rows_a, rows_c = json.loads(a.read_text()), json.loads(c.read_text())
    assert rows_a == json.loads(b.read_text())
    assert len(rows_a) == 5
    assert all("max_abs_diff" not in row for row in rows_a)
    # max and min are the same for every seed; the random ones are not.
    assert rows_a[:2] == rows_c[:2]
    assert [r["arch"] for r in rows_a[2:]] != [r["arch"] for r in rows_c[2:]]


def test_sample_bogus_preset():
    result = invoke("sample", "bogus")
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "unknown search space preset 'bogus'" in out
    assert "tiny" in out


def test_sample_count_must_be_positive():
    result = invoke("sample", "tiny", "--count", "0")
    assert result.exit_code == 2
    assert "--count" in result.output


# ----------------------------------------------------------------- costs


VALID = Arch(24, (1, 2, 3, 1), (3, 5, 7, 3, 5, 7, 3), (2, 3, 4, 2, 3, 4, 2), 0.75)


def test_costs_valid_arch_json():
    result = invoke("costs", VALID.to_json())
    assert result.exit_code == 0, result.output
    out = _flat(result.output)
    macs, params = count_macs(VALID, TINY), count_params(VALID, TINY)
    assert f"{macs:,} MACs, {params:,} params" in out
    # One row per layer: every layer name is printed (possibly truncated by rich at 80
    # columns, so compare on the stem and classifier which are short).
    assert "stem" in out and "classifier" in out
    assert len(layers(VALID, TINY)) > 20


def test_costs_from_file(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(TINY.max_arch().to_json())
    result = invoke("costs", str(path))
    assert result.exit_code == 0, result.output
    assert f"{count_macs(TINY.max_arch(), TINY):,} MACs" in _flat(result.output)


def test_costs_other_space():
    sp = SearchSpace.preset("ofa-mbv3", num_classes=10)
    arch = sp.min_arch()
    result = invoke("costs", arch.to_json(), "--space", "ofa-mbv3")
    assert result.exit_code == 0, result.output
    assert f"{count_macs(arch, sp):,} MACs, {count_params(arch, sp):,} params" in _flat(result.output)
    # The same arch is not a tiny arch.
    assert invoke("costs", arch.to_json()).exit_code == 2


@pytest.mark.parametrize(
    ("arch", "fragments"),
    [
        (replace(VALID, kernels=(3, 5, 4, 3, 5, 7, 3)), ["Arch.kernels[2]=4", "[3, 5, 7]"]),
        (replace(VALID, resolution=17), ["Arch.resolution=17", "[16, 20, 24, 28, 32]"]),
        (replace(VALID, width=0.6), ["Arch.width=0.6"]),
        (Arch(24, (1, 4, 3, 1), (3,) * 9, (2,) * 9, 0.75), ["Arch.depths[1]=4"]),
        (replace(VALID, expands=(2,) * 6), ["Arch.expands has 6 entries"]),
    ],
)
def test_costs_invalid_arch(arch, fragments):
    result = invoke("costs", arch.to_json())
    assert result.exit_code == 2
    out = _flat(result.output)
    assert "not a valid Arch for space 'tiny'" in out
    for fragment in fragments:
        assert fragment in out, (fragment, out)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not a valid Arch"),
        ('{"resolution": 16}', "missing fields ['depths', 'expands', 'kernels']"),
        ('{"resolution": 16, "depths": [1], "kernels": [], "expands": [], "x": 1}', "['x']"),
        ("5", "not a valid Arch"),
        ("missing-file.json", "not a valid Arch"),
    ],
)
def test_costs_malformed_input(text, fragment):
    result = invoke("costs", text)
    assert result.exit_code == 2
    assert fragment in _flat(result.output)


# ----------------------------------------------------------------- help and console script


@pytest.mark.parametrize("command", [[], ["space"], ["sample"], ["costs"], ["run"], ["baseline"], ["stack"]])
def test_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if command:
        assert command[0] in result.output
    else:
        for name in ("space", "sample", "costs"):
            assert name in result.output


def test_costs_requires_argument():
    result = invoke("costs")
    assert result.exit_code == 2
    assert "Missing argument 'arch_json'" in result.output


def test_console_script():
    script = Path(sys.executable).parent / "tofa"
    assert script.exists(), script
    proc = subprocess.run([str(script), "space", "tiny"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "search space tiny" in proc.stdout
    assert f"{count_macs(TINY.max_arch(), TINY):,} MACs" in " ".join(proc.stdout.split())
    bad = subprocess.run([str(script), "space", "bogus"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "bogus" in bad.stderr and bad.stdout == ""


def test_non_positive_resolution_is_a_clean_error():
    result = runner.invoke(app, ["sample", "tiny", "--resolutions", "0", "--count", "1"])
    assert result.exit_code == 2
    assert "resolutions must be positive" in plain(result.output)


# ----------------------------------------------------------------- baseline, run, stack


@pytest.mark.parametrize(
    "args, fragment",
    [
        ((), "exactly one of --arch"),
        (("--arch", "{}", "--from-summary", "x.json"), "exactly one of --arch"),
        (("--arch", "{not json"), "--arch is not a valid Arch"),
        (("--from-summary", "missing.json"), "is not a `tofa run` or `tofa specialize` summary"),
    ],
)
def test_baseline_bad_input_is_a_clean_error(args, fragment):
    result = invoke("baseline", *args)
    assert result.exit_code == 2, result.output
    assert fragment in _flat(result.output)


def test_baseline_unknown_target_in_summary(tmp_path):
    summary = tmp_path / "run.json"
    summary.write_text(json.dumps({"targets": [{"target": "mcu-m0", "arch": TINY.min_arch().to_dict()}]}))
    result = invoke("baseline", "--from-summary", str(summary), "--target", "nope")
    assert result.exit_code == 2 and "no target(s) ['nope']" in _flat(result.output)


def test_stack_env_without_a_stack(tmp_path, monkeypatch):
    monkeypatch.setenv("TOFA_HOME", str(tmp_path))
    result = invoke("stack", "env")
    assert result.exit_code == 2 and "run `tofa stack up` first" in _flat(result.output)
    result = invoke("stack", "status")
    assert result.exit_code == 1 and _flat(result.output).count("stopped") == 4


def test_help_shows_bracketed_defaults():
    """Rich markup would swallow "[default: ...]" in help texts unless escaped."""
    out = _flat(invoke("run", "--help").output)
    assert "Data set name [default:" in out and "Store root [default:" in out


def test_targets_table_fits_80_columns():
    """The default targets file's mix of budgets (MACs, params, latency, RAM, flash) on an
    80-column terminal: nothing cut, each budget under its measured value."""
    from rich.console import Console

    from flows.cli import targets_table

    rows = [
        {"target": "host-cpu-fast", "constraints": {"max_latency_ms": 0.3, "max_macs": 700_000},
         "macs": 698_928, "params": 302_322, "latency_ms": 0.2912, "val_acc": 0.93, "test_acc": 0.9027,
         "seconds": 2.2, "registered_model": {"version": 12, "alias": "champion"}},
        {"target": "mcu-m0", "constraints": {"max_macs": 1_500_000, "max_params": 80_000},
         "macs": 1_396_512, "params": 71_354, "latency_ms": None, "val_acc": None, "test_acc": 0.9083,
         "seconds": 1.5, "registered_model": {"version": 1, "alias": "challenger"}},
        {"target": "mcu-m7", "precision": "int8", "seconds": 16.8, "test_acc": 0.9611,
         "constraints": {"max_macs": 1_000_000, "max_params": 200_000, "max_ram_kb": 256.0,
                         "max_flash_kb": 1024.0},
         "macs": 910_000, "params": 128_000, "ram_kb": 4.0, "flash_kb": 1820.4,
         "registered_model": {"version": 1, "alias": "champion"}},
    ]  # fmt: skip
    console = Console(width=80, record=True)
    console.print(targets_table(rows, "digits v-76a420d77b7dbc36"))
    text = console.export_text()
    assert "…" not in text and max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    lines = text.splitlines()
    for cell in ("host-cpu-fast", "mcu-m7", "v12 champion", "v1 challenger", "0.291", "90.3"):
        assert cell in text
    assert "699k" in text and "1.40M" in text and "71k" in text
    assert "1820" in text and "e+03" not in text  # a value over 100 has no exponent
    budget = lines[lines.index(next(x for x in lines if "mcu-m7" in x)) + 1]
    assert budget.split() == ["int8", "≤1.00M", "≤200k", "≤256", "≤1024"]
    assert lines[lines.index(next(x for x in lines if "host-cpu-fast" in x)) + 1].split() == [
        "fp32", "≤700k", "≤0.3"
    ]  # fmt: skip


def test_targets_table_columns_derive_from_the_constraint_registry():
    from rich.console import Console

    from flows.cli import targets_table

    row = {"target": "coin", "constraints": {"max_energy_uj": 0.2, "max_ram_kb": 32}, "macs": 151_488,
           "params": 60_000, "ram_kb": 12.25, "energy_uj": 0.1122, "flash_kb": 60.0, "test_acc": 0.9,
           "seconds": 1.0}  # fmt: skip
    console = Console(width=80, record=True)
    console.print(targets_table([row], "digits v-1"))
    lines = console.export_text().splitlines()
    head = " ".join(lines[1:3])
    assert "MACs" in head and "RAM" in head and "ene" in head and "uJ" in head  # budgeted ones only:
    assert "lat" not in head and "fla" not in head  # no row budgets latency or flash
    assert "0.112" in lines[4] and "12.2" in lines[4] and lines[5].split() == ["fp32", "≤32", "≤0.2"]


@pytest.mark.parametrize(
    "args, option, shown",
    [
        (("specialize", "--run", "../../etc/passwd"), "--run", "run id '../../etc/passwd'"),
        (("specialize", "--dataset", "../x"), "--dataset", "data set name '../x'"),
        (("train", "--dataset", "digits\n"), "--dataset", "data set name 'digits\\n'"),
        (("ingest", "digits", "--dataset", "a/b"), "--dataset", "data set name 'a/b'"),
    ],
)
def test_names_that_would_leave_the_store_are_refused_before_anything_starts(tmp_path, args, option, shown):
    result = runner.invoke(app, list(args), env={"TOFA_STORE": str(tmp_path / "store")})
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and shown in result.output
    assert not (tmp_path / "store").exists()


def test_credentials_in_a_service_url_are_never_shown(monkeypatch):
    from flows.services import ServiceUnavailable, check_mlflow
    from flows.settings import redact

    assert redact("http://alice:s3cret@127.0.0.1:1/x") == "http://***@127.0.0.1:1/x"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret@127.0.0.1:9")  # nothing listens on 9
    with pytest.raises(ServiceUnavailable) as err:
        check_mlflow()
    assert "s3cret" not in str(err.value) and "***@127.0.0.1:9" in str(err.value)


@pytest.mark.slow  # starts Prefect's temporary server
def test_a_tflite_target_without_the_converter_is_a_clean_error_before_any_work(tmp_path):
    targets = tmp_path / "targets.yaml"
    targets.write_text("- {name: mcu, max_macs: 200000, formats: [onnx, tflite-int8]}\n")
    env = {"TOFA_STORE": str(tmp_path / "store"), "TOFA_LITERT_PYTHON": str(tmp_path / "no-python")}
    result = runner.invoke(app, ["specialize", "--targets", str(targets)], env=env)
    assert result.exit_code == 2, result.output
    shown = plain(result.output)  # the message, after Prefect's own log of the failed flow
    assert "error: the tflite formats need the LiteRT converter" in shown and "make litert" in shown


@pytest.mark.slow  # starts Prefect's temporary server
def test_a_recognised_error_ends_the_flow_run_with_its_message_and_no_traceback(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "loop").symlink_to("loop")  # the folder's only entry: a symlink loop
    command = [str(Path(sys.executable).parent / "tofa"), "ingest", str(tmp_path / "src")]
    out = subprocess.run(
        [*command, "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=300
    )
    shown = out.stdout + out.stderr
    assert out.returncode == 2, shown
    assert "Finished in state Failed" in shown  # the flow run failed, and Prefect says so
    assert _flat(shown).count("no train/ folder with images") >= 2  # in the run's log, then the CLI's
    assert "Traceback" not in shown
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []  # nothing stored


def test_only_recognised_errors_lose_their_traceback():
    import logging

    from flows.errors import MessageOnly
    from tofa_core.data.sources import SourceError

    def logged(error: BaseException) -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            record = logging.LogRecord(
                "prefect.flow_runs", logging.ERROR, __file__, 1, "m", (), sys.exc_info()
            )
        assert MessageOnly().filter(record)  # kept either way
        return record

    assert logged(SourceError("no train/ folder")).exc_info is None
    assert logged(ValueError("a bug")).exc_info[0] is ValueError
    for name in ("prefect.flow_runs", "prefect.task_runs"):  # installed by importing flows
        assert any(isinstance(f, MessageOnly) for f in logging.getLogger(name).filters), name


def test_registration_is_not_retried_while_the_tracking_server_is_down():
    """The MLflow client already retried every request for minutes; a task retry would wait
    as long again. A failure of anything else is retried."""
    from prefect.states import Failed

    from flows.pipeline import _unless_server_down
    from flows.services import ServiceUnavailable

    assert _unless_server_down(None, None, Failed(data=ServiceUnavailable("MLflow does not answer"))) is False
    assert _unless_server_down(None, None, Failed(data=ConnectionResetError("dropped"))) is True


def test_the_flow_runs_summary_table_has_a_column_per_measured_constraint():
    from flows.pipeline import summary_markdown

    reg = {"model": "tofa-digits-coin", "version": 2, "alias": "champion"}
    row = {"target": "coin", "constraints": {"max_energy_uj": 0.2}, "macs": 151_488, "params": 60_000,
           "ram_kb": 12.25, "flash_kb": 60.0, "energy_uj": 0.1122, "latency_ms": None, "val_acc": 0.91,
           "test_acc": 0.9, "registered_model": reg}  # fmt: skip
    record = {"dataset": "digits", "data_version": "v1", "supernet_run": "r1", "targets": [row], "failed": []}
    head, rule, line = summary_markdown(record).splitlines()[2:5]
    columns = "target | budget | MACs | params | RAM KB | flash KB | energy uJ | val acc | test acc"
    assert head == f"| {columns} | model | alias |"
    assert rule.count("|") == head.count("|")
    cells = "coin | energy_uj 0.2 | 151,488 | 60,000 | 12.25 | 60 | 0.1122 | 0.910 | 0.900"
    assert line == f"| {cells} | tofa-digits-coin v2 | champion |"
