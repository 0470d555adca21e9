"""A training run's reported test accuracies, recomputed from the supernet file it saved.

A test that only checks `0 <= acc <= 1` passes whatever the run measured. Recomputing the
number from what was stored (the weights, the data version, the calibration images the run's
seed picks) fails when the reported metric is the wrong subnet's, the wrong split's, stale
weights' or a different file's than the one the run saved.
"""

from __future__ import annotations

import pytest

from tofa_core.arch import Arch
from tofa_core.data.store import DatasetStore
from tofa_core.specialize import load_trained
from tofa_core.storage import open_storage
from tofa_core.training.evaluate import accuracy, calibrated_subnet


def assert_reported(
    reported: dict, store: DatasetStore | str, run_dir: str, arch: dict | None = None
) -> None:
    """test_acc/max and test_acc/min of the run's supernet.pt (test_acc/arch for a fixed `arch`)
    equal the reported ones, up to one test image: BN statistics re-estimated on another
    thread count may round differently."""
    store = store if isinstance(store, DatasetStore) else DatasetStore(open_storage(store))
    trained = load_trained(store, open_storage(run_dir))
    space, data = trained.net.space, trained.data
    judged = {"arch": Arch.from_dict(arch)} if arch else {"max": space.max_arch(), "min": space.min_arch()}
    for name, subnet in judged.items():
        value = accuracy(calibrated_subnet(trained.net, subnet, data.calib), data.test_x, data.test_y)
        key = f"test_acc/{name}"
        assert reported[key] == pytest.approx(value, abs=1.01 / len(data.test_y)), (key, reported[key], value)
