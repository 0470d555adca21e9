"""A config file for tiny, fast training runs in tests (Ray, cluster): a few steps at 8 px."""

from pathlib import Path

QUICK = """
train:
  epochs: {epochs}
  steps_per_epoch: {steps}
  batch_size: 8
  mu: 1
  k_random: 1
  resolutions: [8]
  calib_images: 64
"""


def config(tmp_path: Path, epochs: int, steps: int, space: str = "auto") -> str:
    """Write the quick config with `epochs` x `steps` into tmp_path; return its path."""
    path = tmp_path / f"quick-{epochs}-{steps}-{space}.yaml"
    path.write_text(QUICK.format(epochs=epochs, steps=steps) + f"  space: {space}\n")
    return str(path)
