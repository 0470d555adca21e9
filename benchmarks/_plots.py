"""The benchmarks' own figures (docs/results/): per-target bars, cost and label curves.
Same conventions as flows/plots.py, whose `save` they share."""

from __future__ import annotations

from pathlib import Path

from flows.plots import plt, save


def target_bars(rows: list[dict], path: Path, dataset: str, seeds: int) -> Path:
    """Per target (by MACs): TOFA's subnet vs the same architecture trained alone, mean ± std.

    rows: [{"target", "macs", "tofa": (mean, std), "baseline": (mean, std)}]."""
    rows = sorted(rows, key=lambda r: r["macs"])
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=110)
    xs = range(len(rows))
    for offset, key, label in (
        (-0.2, "tofa", "TOFA subnet (no fine-tuning)"),
        (0.2, "baseline", "same arch trained alone"),
    ):
        ax.bar(
            [x + offset for x in xs],
            [r[key][0] for r in rows],
            width=0.4,
            yerr=[r[key][1] for r in rows],
            capsize=3,
            label=label,
        )
    low = min(min(r["tofa"][0], r["baseline"][0]) for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(list(xs), [f"{r['target']}\n{r['macs'] / 1e6:.2f}M MACs" for r in rows], fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{dataset}: per target, mean ± std over {seeds} seed(s)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize=8)
    return save(fig, path)


def cost_curves(cost: dict, path: Path, dataset: str) -> Path:
    """Total wall seconds vs number of targets: TOFA (one training + N specializations) and the
    baseline (N trainings). cost: {N: {"tofa_wall", "baseline_wall", ...}}."""
    ns = sorted(int(n) for n in cost)
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for key, label in (
        ("tofa_wall", "TOFA: 1 training + N specializations"),
        ("baseline_wall", "baseline: N trainings"),
    ):
        ax.plot(ns, [cost[n][key] / 60 for n in ns], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("number of deployment targets N")
    ax.set_ylabel("total wall time (minutes, this machine)")
    ax.set_title(f"{dataset}: cost vs number of targets")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save(fig, path)


def label_curves(by_share: dict, path: Path, dataset: str, seeds: int) -> Path:
    """Test accuracy vs labelled share, unified loss vs supervised-only, largest and smallest
    subnet. by_share: {share: {"unified/max": (mean, std), "supervised/max": ..., ...}}."""
    shares = sorted(by_share, key=float)
    xs = [float(s) * 100 for s in shares]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for key, style in (
        ("unified/max", "-o"), ("supervised/max", "--o"), ("unified/min", "-s"), ("supervised/min", "--s"),
    ):  # fmt: skip
        means = [by_share[s][key][0] for s in shares]
        stds = [by_share[s][key][1] for s in shares]
        ax.errorbar(
            xs, means, yerr=stds, fmt=style, capsize=3, ms=4, label=key.replace("/", ", ") + " subnet"
        )
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}%" for x in xs])
    ax.set_xlabel("labelled share of the training images")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{dataset}: label efficiency, mean ± std over {seeds} seed(s)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)
