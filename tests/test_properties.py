"""Property-based tests (Hypothesis) of the parsers that read untrusted input: names and run
ids, config files, targets files and image folders. Whatever they are given, they return a
valid value or raise the project's own typed error, whose message names the input; never a
KeyError, a TypeError or a traceback from inside a library."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from tofa_core import names
from tofa_core.config_files import ConfigError
from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.sources import SourceError, list_source
from tofa_core.data.store import DatasetStore
from tofa_core.search.targets import Target, TargetError, load_targets
from tofa_core.storage import open_storage
from tofa_core.training.config import TrainConfig

# Files on disk per example: fewer examples than Hypothesis's default, no deadline (disk and
# CPU load vary), and a derandomised run so that CI sees the examples a developer saw.
FILES = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

# YAML keys are not only strings: `{1: 2}` and `{null: x}` load as an int and a None key.
keys = st.text(max_size=12) | st.integers() | st.none() | st.booleans()
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


@given(st.one_of(st.text(max_size=200), st.binary(max_size=40), st.integers(), st.none(), values))
def test_a_name_is_either_a_safe_path_part_or_an_invalid_name(value):
    for check in (names.dataset_name, names.run_id, names.data_version):
        try:
            checked = check(value)
        except names.InvalidName as err:
            assert len(str(err)) < 300  # the input is shown shortened, never unbounded
        else:
            assert checked == value and "/" not in checked and ".." not in checked
            assert "\n" not in checked and "\x00" not in checked


@contextmanager
def _written(text: str | bytes):
    with tempfile.TemporaryDirectory(prefix="tofa-prop-") as folder:
        path = Path(folder) / "file.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        yield path


train_fields = st.sampled_from(sorted(TrainConfig.model_fields) + ["no_such_setting"])
config_docs = st.one_of(
    values,
    st.fixed_dictionaries({"train": st.dictionaries(train_fields | keys, values, max_size=4)}),
    st.fixed_dictionaries({"train": values}),
)


@FILES
@given(st.one_of(config_docs.map(yaml.safe_dump), st.text(max_size=300), st.binary(max_size=100)))
def test_a_config_file_loads_or_raises_a_config_error(text):
    try:
        with _written(text) as path:
            cfg = TrainConfig.from_yaml(path)
    except ConfigError as err:
        assert "file.yaml" in str(err)  # names the file
    else:
        assert isinstance(cfg, TrainConfig)


target_fields = st.sampled_from(sorted(Target.model_fields) + ["max_energy"])
target = st.dictionaries(target_fields | keys, values, max_size=5) | st.fixed_dictionaries(
    {"name": st.text(max_size=20), "max_macs": st.integers() | st.floats() | st.text(max_size=5)}
)
targets_docs = st.one_of(
    values, st.lists(target, max_size=4), st.fixed_dictionaries({"targets": st.lists(target)})
)


@FILES
@given(st.one_of(targets_docs.map(yaml.safe_dump), st.text(max_size=300), st.binary(max_size=100)))
def test_a_targets_file_loads_or_raises_a_target_error(text):
    try:
        with _written(text) as path:
            targets = load_targets(path)
    except TargetError as err:
        assert "file.yaml" in str(err)
    else:
        assert targets and all(isinstance(t, Target) for t in targets)
        assert len({t.name for t in targets}) == len(targets)


# A folder tree: paths of up to 3 parts under a split folder or not, each a PNG, random bytes,
# an empty file, a symlink (to itself, to a missing file, to a file outside) or a folder.
part = st.one_of(
    st.sampled_from(["train", "test", "unlabeled", "a", "b", ".hidden", "..x", " ", "é", "a.png"]),
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=8
    ),
)
laid_out = st.tuples(st.sampled_from(["train", "test", "unlabeled"]), part, part).map(list)
entry = st.tuples(
    laid_out | st.lists(part, min_size=1, max_size=3),
    st.sampled_from(["png"] * 4 + ["bytes", "empty", "loop", "dangling", "outside", "dir"]),
)


def _make(root: Path, entries: list, outside: Path) -> None:
    rng = np.random.default_rng(0)
    for parts, kind in entries:
        path = root.joinpath(*[p if p not in (".", "..") else "_" for p in parts])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                continue
            if kind == "png":
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(path, format="PNG")
            elif kind in ("bytes", "empty"):
                path.write_bytes(rng.bytes(30) if kind == "bytes" else b"")
            elif kind == "dir":
                path.mkdir()
            else:
                os.symlink({"loop": path.name, "dangling": "missing", "outside": str(outside)}[kind], path)
        except (OSError, ValueError):  # a name this file system refuses (too long, a file in the way)
            continue


@FILES
@given(st.lists(entry, max_size=16), st.booleans())
def test_an_image_folder_ingests_or_raises_a_source_error(entries, with_classes):
    if with_classes:  # most folders a user gives have images in two classes, and then some
        entries = [(["train", c, f"{i}.png"], "png") for c in "ab" for i in range(3)] + entries
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        outside = tmp / "secret.png"
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
        _make(tmp / "src", entries, outside)
        (tmp / "src").mkdir(exist_ok=True)
        try:
            listing = list_source(str(tmp / "src"), labelled_fraction=1.0, test_fraction=0.2, seed=0)
        except SourceError as err:
            assert str(tmp / "src") in str(err)
            event("no train/ images")
            return
        listing.close()
        store = DatasetStore(open_storage(tmp / "store"))
        try:
            result = ingest(str(tmp / "src"), "prop", store, IngestConfig(workers=1))
        except SourceError as err:
            assert str(tmp / "src") in str(err)
            assert store.latest("prop") is None  # no version half-made
            event("ingest refused")
            return
        event("ingested")
        m = result.manifest
        assert m.num_images == sum(sum(c.values()) for c in m.counts.values()) > 0
        assert store.latest("prop").version == m.version
