"""Storage.at: a folder a record in the store names, derived from the open store."""

from __future__ import annotations

import pytest

from tofa_core.storage import StorageError, open_storage


def test_at_derives_a_local_folder_inside_the_store_and_refuses_one_outside(tmp_path):
    store = open_storage(tmp_path / "store")
    store.child("runs/a").write_bytes("result.json", b"{}")
    run = store.at(f"{tmp_path}/store/runs/a")
    assert run.root == str(tmp_path / "store" / "runs" / "a") and run.read_bytes("result.json") == b"{}"
    assert store.at(str(tmp_path / "store")).root == store.root
    assert (
        store.at(f"{tmp_path}/store/../store/runs/a/").root == run.root
    )  # the same folder, spelled otherwise
    for outside in (str(tmp_path / "store-2"), str(tmp_path), "s3://bucket/store/runs/a"):
        with pytest.raises(StorageError, match="not inside the store"):
            store.at(outside)


def test_at_on_s3_shares_the_stores_client(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")  # a client is made, no request is sent
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = open_storage("s3://bucket/store")
    run = store.at("s3://bucket/store/runs/a")
    assert (run.bucket, run.prefix) == ("bucket", "store/runs/a")
    assert run.client is store.client  # one connection pool, not one per folder
    for outside in ("s3://bucket/store-2/runs", "s3://other/store/runs", "/store/runs"):
        with pytest.raises(StorageError, match="not inside the store"):
            store.at(outside)
