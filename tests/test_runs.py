"""The store's run records and warm-start resolution: the one place that finds them."""

from __future__ import annotations

import pytest

from tofa_core import names
from tofa_core.runs import Runs, WarmStart
from tofa_core.storage import open_storage


def test_the_newest_supernet_is_the_last_run_id(tmp_path):
    runs = Runs(open_storage(tmp_path))
    assert runs.latest_supernet("digits") is None and runs.supernets("digits") == []
    for run_id in ("20261130-120000-aaaaaa", "20261130-130000-bbbbbb", "20261129-230000-cccccc"):
        runs.write_supernet("digits", {"run_id": run_id, "supernet": f"s3://b/runs/{run_id}/supernet.pt"})
    assert runs.latest_supernet("digits")["run_id"] == "20261130-130000-bbbbbb"
    assert [r["run_id"] for r in runs.supernets("digits")][0] == "20261129-230000-cccccc"
    assert runs.supernet("digits", "20261130-120000-aaaaaa")["run_id"] == "20261130-120000-aaaaaa"
    with pytest.raises(FileNotFoundError, match="no supernet run 'nope'"):
        runs.supernet("digits", "nope")
    with pytest.raises(names.InvalidName):
        runs.supernet("digits", "../../x")
    runs.write_pipeline("digits", {"pipeline_run": "20261130-140000-dddddd", "status": "completed"})
    assert runs.pipelines("digits") == [{"pipeline_run": "20261130-140000-dddddd", "status": "completed"}]
    assert runs.pipelines("other") == []


def test_warm_start_is_the_last_supernet_a_checkpoint_or_ofa_weights(tmp_path):
    runs = Runs(open_storage(tmp_path))
    assert WarmStart.resolve(None, runs, "digits") is None
    assert WarmStart.resolve("last", runs, "digits") is None  # nothing trained yet: from scratch
    runs.write_supernet("digits", {"run_id": "20261130-120000-aaaaaa", "supernet": "/s/runs/r1/supernet.pt"})
    assert WarmStart.resolve("last", runs, "digits") == WarmStart("last", "/s/runs/r1", "supernet.pt")
    assert WarmStart.resolve("s3://b/x/supernet.pt", runs, "digits") == WarmStart(
        "tofa", "s3://b/x", "supernet.pt"
    )
    assert WarmStart.resolve("/w/my-ckpt.pt", runs, "digits") == WarmStart("tofa", "/w", "my-ckpt.pt")
    assert WarmStart.resolve("/w/ofa_mbv3_d234_e346_k357_w1.0", runs, "d") == WarmStart(
        "ofa", "/w/ofa_mbv3_d234_e346_k357_w1.0"
    )
