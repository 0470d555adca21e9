"""Training on a CUDA device: a few bf16 steps on the GPU, then the run resumed on the CPU from
its checkpoint. Skipped (with the reason) where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage
from tofa_core.training.checkpoint import load_checkpoint
from tofa_core.training.config import TrainConfig
from tofa_core.training.loop import train_supernet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available())"),
]

CFG = TrainConfig(
    epochs=2, steps_per_epoch=3, batch_size=8, mu=1, k_random=1, resolutions=(8,), calib_images=64
)


def test_bf16_steps_on_cuda_then_resume_on_cpu(tmp_path):
    store = DatasetStore(open_storage(tmp_path / "store"))
    ingest("digits", "digits", store, IngestConfig())
    run_dir = open_storage(tmp_path / "run")
    gpu = train_supernet(CFG.model_copy(update={"epochs": 1}), store, "digits", run_dir, device="cuda")
    state = load_checkpoint(run_dir, "checkpoints/epoch-0001.pt")
    assert state["rng"][0]["device"] == "cuda"
    assert all(t.device.type == "cpu" for t in state["model"].values())  # device-free on disk
    assert gpu.history[0]["teacher/loss"] > 0
    # The same run folder, continued on the CPU: epoch 2 trains there from the GPU's weights.
    cpu = train_supernet(CFG.model_copy(update={"device": "cpu"}), store, "digits", run_dir)
    assert [h["epoch"] for h in cpu.history] == [1, 2]
    assert cpu.history[0] == gpu.history[0] and 0 <= cpu.final["test_acc/max"] <= 1
