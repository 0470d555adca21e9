"""The energy constraint (`max_energy_uj`), from its cost model through search to verification."""

import random

import pytest
import torch

from tofa_core.arch import SearchSpace
from tofa_core.constraints import BY_FIELD, energy_uj
from tofa_core.costs import count_macs
from tofa_core.export import MEASURED_KEYS, VerificationError, export_subnet, verify
from tofa_core.search.evolution import CostModel, EvolutionConfig, InfeasibleTarget, evolve
from tofa_core.search.targets import Target
from tofa_core.supernet import Supernet
from tofa_core.training.evaluate import EvalData, calibrated_subnet

SPACE = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))


def test_energy_counts_macs_and_bytes_moved_at_the_precision():
    smallest, largest = SPACE.min_arch(), SPACE.max_arch()
    # by hand from its 18 layers: 151,488 MACs; 61,924 elements moved (52,874 folded weights, and
    # 9,050 in each layer's input and output: 576 for the stem's 1x8x8 in, 8x8x8 out, ...)
    assert count_macs(smallest, SPACE) == 151_488
    assert energy_uj(smallest, SPACE, "fp32") == pytest.approx(
        (151_488 * 4.6 + 4 * 1.25 * 61_924) / 1e6, rel=1e-3
    )
    assert energy_uj(smallest, SPACE, "int8") == pytest.approx(
        (151_488 * 0.23 + 1.25 * 61_924) / 1e6, rel=1e-3
    )
    assert energy_uj(largest, SPACE, "tflite-int8") == energy_uj(largest, SPACE, "int8")  # same elements
    for arch in [SPACE.sample(random.Random(seed)) for seed in range(20)]:
        assert energy_uj(smallest, SPACE) <= energy_uj(arch, SPACE) <= energy_uj(largest, SPACE)
        assert 5 < energy_uj(arch, SPACE, "fp32") / energy_uj(arch, SPACE, "int8") < 20


def test_search_keeps_inside_an_energy_budget_and_names_it_when_none_fits():
    costs, budget = CostModel(SPACE), energy_uj(SPACE.max_arch(), SPACE, "int8") / 4
    target = Target(name="coin-cell", precision="int8", max_energy_uj=budget)
    assert target.describe() == f"energy <= {budget:.4g} uJ (int8)"
    found = evolve(
        target,
        costs,
        lambda archs: [count_macs(a, SPACE) for a in archs],
        EvolutionConfig(population=40, generations=6),
    )
    assert (
        budget / 2 < energy_uj(found.candidates[0][0], SPACE, "int8") <= budget
    )  # the most MACs the budget allows
    with pytest.raises(InfeasibleTarget, match=r"energy 0\.\d+ uJ > 0\.01 uJ"):
        evolve(Target(name="none", precision="int8", max_energy_uj=0.01), costs, lambda a: [0.0] * len(a))


def test_verification_reports_the_energy_and_refuses_a_subnet_over_its_budget(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
    data = EvalData(x, x[:16], y[:16], x, y, x, size=8, channels=1, mean=[0.5], std=[0.25])
    arch = SPACE.max_arch()
    model = calibrated_subnet(Supernet(SPACE), arch, data.calib)
    exported = export_subnet(model, arch, data, tmp_path, classes=[str(i) for i in range(10)])
    spent = energy_uj(arch, SPACE, "fp32")
    verified = verify(exported, model, arch, SPACE, Target(name="ok", max_energy_uj=spent * 1.01), data)
    assert (
        verified.costs["energy_uj"] == spent and "energy_uj" in MEASURED_KEYS
    )  # reaches MLflow and the summary
    with pytest.raises(VerificationError, match=r"needs energy [\d.]+ uJ > [\d.]+ uJ") as err:
        verify(exported, model, arch, SPACE, Target(name="over", max_energy_uj=spent * 0.99), data)
    assert err.value.check == "max_energy_uj" and not BY_FIELD["max_energy_uj"].retry  # a defect, not luck
