"""The pipeline's plots as PNG files (logged to the MLflow pipeline run under plots/).

Plain data in, a file out: each function draws one figure with matplotlib's Agg backend
(no display, safe in worker threads with one figure per call).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto(subnets: list[dict], chosen: list[dict], path: Path, title: str) -> Path:
    """Test accuracy vs MACs of sampled subnets (grey), the front over them (line), each
    target's chosen subnet (marked, named) and its MAC budget (a dashed line of its colour).

    subnets: [{"macs", "test_acc"}]; chosen: [{"target", "macs", "test_acc", "max_macs"?}]."""
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    ax.scatter(
        [s["macs"] for s in subnets],
        [s["test_acc"] for s in subnets],
        s=14,
        c="0.6",
        alpha=0.7,
        label=f"sampled subnets ({len(subnets)})",
    )
    front, best = [], -1.0
    for s in sorted(subnets, key=lambda s: (s["macs"], -s["test_acc"])):
        if s["test_acc"] > best:
            front.append(s)
            best = s["test_acc"]
    ax.step(
        [s["macs"] for s in front], [s["test_acc"] for s in front], where="post", c="0.3", lw=1, label="front"
    )
    colors = plt.get_cmap("tab10")
    merged: dict[tuple, dict] = {}  # targets that chose the same subnet share one mark
    for c in sorted(chosen, key=lambda c: c["macs"]):
        key = (c["macs"], c["test_acc"])
        if key in merged:
            merged[key]["target"] += f", {c['target']}"
        else:
            merged[key] = dict(c)
    budgets = {c["target"]: c.get("max_macs") for c in chosen}
    for i, c in enumerate(merged.values()):
        color = colors(i % 10)
        ax.scatter([c["macs"]], [c["test_acc"]], s=80, marker="*", color=color, edgecolors="k", zorder=3)
        ax.annotate(
            c["target"], (c["macs"], c["test_acc"]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
        for name in c["target"].split(", "):
            if budgets[name]:
                ax.axvline(budgets[name], color=color, ls="--", lw=0.8, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("MACs (log scale); dashed: a target's MAC budget")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save(fig, path)


def training_curves(history: list[dict], path: Path, title: str) -> Path:
    """Per epoch: validation accuracy of the largest and smallest subnet; the losses and the
    share of unlabelled images above the pseudo-label threshold."""
    epochs = [row["epoch"] for row in history]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for key, label in (("val_acc/max", "largest subnet"), ("val_acc/min", "smallest subnet")):
        acc.plot(epochs, [row.get(key) for row in history], marker="o", ms=3, label=label)
    acc.set_xlabel("epoch")
    acc.set_ylabel("validation accuracy (after BN recalibration)")
    acc.grid(True, alpha=0.3)
    acc.legend()
    for key in ("teacher/loss", "student/loss", "mask_rate"):
        if any(key in row for row in history):
            loss.plot(epochs, [row.get(key) for row in history], label=key)
    loss.set_xlabel("epoch")
    loss.set_ylabel("mean over the epoch's steps")
    loss.grid(True, alpha=0.3)
    loss.legend()
    fig.suptitle(title)
    return save(fig, path)


def predictor_scatter(pairs: list[tuple[float, float]], path: Path, title: str, score: str) -> Path:
    """The accuracy predictor on held-out subnets: predicted vs measured score, with y = x."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    predicted, measured = [p for p, _ in pairs], [m for _, m in pairs]
    ax.scatter(measured, predicted, s=16, alpha=0.8)
    low, high = min(predicted + measured), max(predicted + measured)
    ax.plot([low, high], [low, high], c="0.4", lw=1, ls="--", label="y = x")
    ax.set_xlabel(f"measured {score}")
    ax.set_ylabel(f"predicted {score}")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save(fig, path)


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
