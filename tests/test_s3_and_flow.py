"""The store and the ingest flow on real services: a SeaweedFS S3 server and a Prefect API."""

from __future__ import annotations

import io
import pickle
import time

import numpy as np
import pytest
from console import plain
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.ingest import ingest_flow
from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.loaders import load_splits
from tofa_core.data.sources import SourceError
from tofa_core.data.store import DatasetStore, images_array
from tofa_core.storage import S3Storage, StorageError, TooLarge, open_storage

pytestmark = pytest.mark.slow  # a real S3 server and Prefect flow runs


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def png(label: int, index: int, size: int = 12) -> bytes:
    rng = np.random.default_rng(1000 * label + index)
    img = rng.integers(0, 256, (size, size), dtype=np.uint8)
    img[label, :] = 255
    out = io.BytesIO()
    Image.fromarray(img, "L").save(out, format="PNG")
    return out.getvalue()


def upload_folder(client, bucket: str, prefix: str, classes: int, per_class: int, start: int = 0) -> None:
    for c in range(classes):
        for i in range(start, start + per_class):
            client.put_object(Bucket=bucket, Key=f"{prefix}/train/c{c}/{i:03d}.png", Body=png(c, i))
    client.put_object(Bucket=bucket, Key=f"{prefix}/test/c0/t.png", Body=png(0, 999))
    client.put_object(Bucket=bucket, Key=f"{prefix}/unlabeled/x/u.png", Body=png(1, 998))


def test_s3_storage_round_trip_and_conditional_put(s3_env, s3_bucket):
    st = open_storage(f"s3://{s3_bucket}/root")
    assert isinstance(st, S3Storage)
    st.write_bytes("a/b.bin", b"one")
    assert st.read_bytes("a/b.bin") == b"one" and st.exists("a/b.bin") and not st.exists("a/c.bin")
    assert st.put_if_absent("a/m.json", b"first") is True
    assert st.put_if_absent("a/m.json", b"second") is False
    assert st.read_bytes("a/m.json") == b"first"  # the first commit wins, never overwritten
    assert [o.key for o in st.list()] == ["a/b.bin", "a/m.json"]
    assert [o.key for o in st.child("a").list()] == ["b.bin", "m.json"]
    with pytest.raises(StorageError, match="does not exist"):
        st.read_bytes("nope")
    assert st.read_bytes("a/b.bin", max_bytes=3) == b"one"
    with pytest.raises(TooLarge, match="3 bytes, over the limit of 2"):
        st.read_bytes("a/b.bin", max_bytes=2)
    assert st.stat(["a/m.json", "a/gone.bin"]) == {"a/m.json": st.list()[1]}
    again = pickle.loads(pickle.dumps(st.child("a")))  # to a Ray task: a client of its own
    assert again.read_bytes("m.json") == b"first" and again.client is not st.client
    with st.open_file("a/m.json") as f:  # a local temporary copy, seekable
        assert f.read() == b"first" and f.seek(1) == 1 and f.read(2) == b"ir"
    with pytest.raises(StorageError, match="does not exist"):
        st.open_file("nope")


def test_a_parquet_table_on_s3_is_ingested_from_a_local_copy_a_batch_at_a_time(s3_env, s3_bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tofa_core.data.ingest import IngestConfig, ingest
    from tofa_core.data.store import DatasetStore

    cells = [png(i % 2, i) for i in range(600)]  # over one batch of rows
    labels = [f"c{i % 2}" if i < 40 else None for i in range(600)]
    sink = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(cells, pa.binary()), "label": labels}), sink)
    open_storage(f"s3://{s3_bucket}/src").write_bytes("t.parquet", sink.getvalue())
    store = DatasetStore(open_storage(tmp_path / "store"))
    result = ingest(f"s3://{s3_bucket}/src/t.parquet", "tab", store, IngestConfig(workers=1, min_per_class=1))
    assert result.manifest.counts == {"train": {"c0": 20, "c1": 20}, "unlabeled": {"-": 560}}
    rows = store.read_shards(result.manifest, ["path", "content_hash"]).to_pylist()
    assert sorted(int(r["path"].split()[1]) for r in rows) == list(range(600))


def test_s3_bad_credentials_and_bucket_give_clear_errors_without_secrets(s3_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(StorageError) as err:
        open_storage(f"s3://{s3_bucket}/x").list()
    message = str(err.value)
    assert "access denied" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "wrong-secret-value" not in message and s3_env.secret_key not in message
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        open_storage("s3://no-such-bucket-here/x").write_bytes("k", b"v")
    with pytest.raises(SourceError, match="cannot read source"):
        ingest("s3://no-such-bucket-here/data", "d", DatasetStore(open_storage(f"s3://{s3_bucket}/store")))


def test_ingest_flow_on_s3_source_and_store(s3_env, s3_bucket, prefect_server):
    client = s3_env.client()
    upload_folder(client, s3_bucket, "src", classes=3, per_class=4)
    store_uri = f"s3://{s3_bucket}/store"
    first = ingest_flow(source=f"s3://{s3_bucket}/src", dataset="shapes", store=store_uri)
    assert first["created"] and first["num_images"] == 14
    assert first["counts"] == {"test": {"c0": 1}, "train": {"c0": 4, "c1": 4, "c2": 4}, "unlabeled": {"-": 1}}

    again = ingest_flow(source=f"s3://{s3_bucket}/src", dataset="shapes", store=store_uri)
    assert not again["created"] and again["version"] == first["version"]

    upload_folder(client, s3_bucket, "src", classes=3, per_class=1, start=10)
    child = ingest_flow(source=f"s3://{s3_bucket}/src", dataset="shapes", store=store_uri)
    assert child["created"] and child["parent"] == first["version"] and child["num_images"] == 17

    store = DatasetStore(open_storage(store_uri))
    manifest = store.manifest("shapes")
    parent = store.manifest("shapes", first["version"])
    assert set(s.path for s in parent.shards) <= set(s.path for s in manifest.shards)  # reused, not copied
    pixels = images_array(store.read_shards(manifest))
    assert pixels.shape == (17, 1, 12, 12)
    expected = np.asarray(Image.open(io.BytesIO(png(2, 10))))
    rows = store.read_shards(manifest).column("path").to_pylist()
    assert (pixels[rows.index("train/c2/010.png"), 0] == expected).all()
    splits = load_splits(store, "shapes", val_fraction=0.25)
    assert splits.sizes() == {"train": 12, "val": 3, "unlabeled": 1, "test": 1}

    # An orphan shard of a killed ingest: S3 gives its age, and gc removes only it.
    ds = store.dataset("shapes")
    ds.write_bytes("v-0123456789abcdef/shard-aa.parquet", b"killed before its commit")
    assert store.garbage("shapes", 3600) == []  # young: an ingest may still be writing it
    in_an_hour = time.time() + 3600 + 60
    assert store.garbage("shapes", 3600, at=in_an_hour) == ["v-0123456789abcdef/shard-aa.parquet"]
    ds.delete("v-0123456789abcdef/shard-aa.parquet")
    assert store.garbage("shapes", 0, at=in_an_hour) == []
    assert len(store.read_shards(store.manifest("shapes"))) == 17


def test_ingest_flow_fails_on_bad_source_and_keeps_the_store(tmp_path, prefect_server):
    src = tmp_path / "src"
    (src / "train" / "a").mkdir(parents=True)
    (src / "train" / "a" / "1.png").write_bytes(png(0, 1))
    (src / "train" / "a" / "2.png").write_bytes(png(0, 2))
    store = str(tmp_path / "store")
    ok = ingest_flow(source=str(src), dataset="d", store=store)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*"))
    (src / "train" / "b").mkdir()
    (src / "train" / "b" / "1.png").write_bytes(png(1, 1))  # one image: under min_per_class=2
    with pytest.raises(SourceError, match=r"fewer than min_per_class=2.*'b': 1"):
        ingest_flow(source=str(src), dataset="d", store=store)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "store").rglob("*")) == before
    assert DatasetStore(open_storage(store)).latest("d").version == ok["version"]


def test_cli_ingest_runs_the_flow_and_reports(tmp_path, prefect_server, monkeypatch):
    src = tmp_path / "src"
    for c in range(2):
        (src / "train" / f"k{c}").mkdir(parents=True)
        for i in range(3):
            (src / "train" / f"k{c}" / f"{i}.png").write_bytes(png(c, i))
    (src / "train" / "k0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    monkeypatch.setenv("TOFA_STORE", str(tmp_path / "store"))
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(src), "--dataset", "tiny-set"])
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "created" in text and "6 images" in text and "quarantined 1" in text
    assert (tmp_path / "store" / "datasets" / "tiny-set").is_dir()
    result = runner.invoke(app, ["ingest", str(src), "--dataset", "tiny-set"])
    assert result.exit_code == 0 and "unchanged" in result.output
    result = runner.invoke(app, ["ingest", str(tmp_path / "missing"), "--dataset", "tiny-set"])
    assert result.exit_code == 2 and "no such folder" in plain(result.output)
    from tofa_core.runlock import RunLock

    (src / "train" / "k1" / "new.png").write_bytes(png(1, 7))
    with RunLock(open_storage(tmp_path / "store"), "tiny-set", "a pipeline run"):  # gc must not race it
        result = runner.invoke(app, ["ingest", str(src), "--dataset", "tiny-set"])
    assert result.exit_code == 2 and "a pipeline run" in plain(result.output)
    assert len(DatasetStore(open_storage(tmp_path / "store")).versions("tiny-set")) == 1
    config = tmp_path / "bad.yaml"
    config.write_text("ingest:\n  labelled_fraction: 3\n")
    result = runner.invoke(app, ["ingest", "digits", "--config", str(config)])
    assert result.exit_code == 2 and "ingest.labelled_fraction" in result.output


def test_digits_loader_splits_are_stable_and_stratified(tmp_path):
    store = DatasetStore(open_storage(tmp_path))
    ingest("digits", "digits", store, IngestConfig())
    a = load_splits(store, "digits", seed=0)
    b = load_splits(store, "digits", seed=0)
    assert a.sizes() == {"train": 130, "val": 13, "unlabeled": 1294, "test": 360}
    assert a.channels == 1 and a.size == 8 and a.classes == [str(i) for i in range(10)]
    assert (a.val.labels.bincount(minlength=10) >= 1).all()
    assert (a.val.images == b.val.images).all()
    assert (a.unlabeled.labels == -1).all() and (a.train.labels >= 0).all()
    c = load_splits(store, "digits", seed=1)
    assert not (c.val.images == a.val.images).all()
