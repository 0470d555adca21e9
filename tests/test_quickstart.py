"""README's "Quickstart on your own images", run as written on a tiny image folder.

Only what cannot run in a test is left out: `make setup && source .venv/bin/activate` (the
test runs in the venv; its bin/ is put first on PATH) and `mlflow ui` (a server that stays
up). `tofa run` gets a quick training config appended, so training takes seconds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Quickstart on your own images"
SKIPPED = ("make setup", "mlflow ui")  # the venv is this one; a UI server would never return
QUICK = (
    "train: {epochs: 1, steps_per_epoch: 2, batch_size: 8, mu: 1, k_random: 1, "
    "resolutions: [8], calib_images: 64}\n"
)
# Services a user's shell might point at: the quickstart uses the local defaults.
UNSET = ("TOFA_STORE", "TOFA_HOME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_API_URL")


def quickstart_lines() -> list[str]:
    """The commands of README's quickstart block, comments and blank lines left out."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert HEADING in readme, f"README.md has no {HEADING!r}"
    section = readme.split(HEADING, 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the quickstart has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def runnable(lines: list[str]) -> list[str]:
    """The lines a test runs: SKIPPED left out, `tofa run` given the quick config."""
    for prefix in SKIPPED:
        assert any(line.startswith(prefix) for line in lines), f"the quickstart no longer has {prefix!r}"
    kept = [line for line in lines if not line.startswith(SKIPPED)]
    assert any(line.startswith("tofa ingest") for line in kept)
    assert sum(line.startswith("tofa run") for line in kept) == 1
    return [
        re.sub(r"^(tofa run\b[^#]*?)(\s+#.*)?$", r"\1 --config quick.yaml\2", line)
        if line.startswith("tofa run")
        else line
        for line in kept
    ]


def image_folder(root: Path) -> None:
    """my-images/: 2 classes x 12 labelled 8x8 grey PNGs (a bright top or bottom half on noise)
    and 16 unlabelled ones; every image distinct, so none is quarantined as a duplicate."""
    rng = np.random.default_rng(0)

    def picture(cls: int) -> np.ndarray:
        img = rng.integers(0, 60, (8, 8), dtype=np.uint8)
        img[(0 if cls == 0 else 4) : (4 if cls == 0 else 8)] += 180
        return img

    for cls, name in enumerate(("boots", "sandals")):
        folder = root / "my-images" / "train" / name
        folder.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(picture(cls)).save(folder / f"{i}.png")  # 2-D uint8: grey
    unlabeled = root / "my-images" / "unlabeled"
    unlabeled.mkdir(parents=True)
    for i in range(16):
        Image.fromarray(picture(i % 2)).save(unlabeled / f"{i}.png")


def test_the_quickstart_lines_are_found_and_only_tofa_run_changes():
    lines = quickstart_lines()
    ran = runnable(lines)
    assert len(ran) == len(lines) - len(SKIPPED)
    changed = [(a, b) for a, b in zip([x for x in lines if not x.startswith(SKIPPED)], ran) if a != b]
    assert len(changed) == 1 and changed[0][1] == changed[0][0] + " --config quick.yaml"


@pytest.mark.slow  # Ray, Prefect's temporary server, training, specialization
@pytest.mark.timeout(1800)
def test_readme_quickstart_runs_as_written(tmp_path):
    image_folder(tmp_path)
    (tmp_path / "quick.yaml").write_text(QUICK)
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for line in runnable(quickstart_lines()):
        done = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200
        )
        shown = (done.stdout + done.stderr)[-6000:]
        assert done.returncode == 0, f"{line}\nexited {done.returncode}:\n{shown}"
    summary = json.loads((tmp_path / "run.json").read_text())
    assert sorted(t["target"] for t in summary["targets"]) == ["phone", "watch"]
    assert summary["failed"] == []
    assert list((tmp_path / ".tofa" / "store" / "exports" / "shoes").glob("*/watch/model.onnx"))
