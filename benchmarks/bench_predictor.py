"""Which subnet score ranks subnets closer to their test accuracy, and how good is the predictor?

On a trained supernet (trained here with the default config on digits, 10% labels, unless
--store/--run point at one): score N random subnets by validation accuracy and by agreement
with the largest subnet on unlabelled images, measure their test accuracy, and report Kendall
tau of each score against test accuracy; then fit the predictor on each score and report its
Kendall tau against the measured score and against test accuracy on held-out subnets.

    .venv/bin/python benchmarks/bench_predictor.py [--samples 150] [--store DIR --run RUN]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch
from _trained import default_supernet
from scipy.stats import kendalltau

from tofa_core.search.predictor import AccuracyPredictor, score_subnets
from tofa_core.specialize import load_trained
from tofa_core.training.evaluate import calibrated_subnet, fuse_bn


def tau(a, b) -> float:
    return float(kendalltau(a, b).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=150)
    parser.add_argument("--store")
    parser.add_argument("--run", help="run folder name under <store>/runs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        store, run_dir = default_supernet(args.store, args.run, tmp)
        trained = load_trained(store, run_dir)
        net, data = trained.net, trained.data
        rng = random.Random(7)
        archs = list(dict.fromkeys(net.space.sample(rng) for _ in range(args.samples)))
        start = time.perf_counter()
        scored = score_subnets(net, archs, data)
        score_s = (time.perf_counter() - start) / len(archs)
        with torch.no_grad():
            test = []
            for arch in archs:
                model = fuse_bn(calibrated_subnet(net, arch, data.calib))
                test.append((model(data.test_x).argmax(1) == data.test_y).float().mean().item())
    val = [s.val for s in scored]
    agree = [s.agreement for s in scored]
    print(
        f"{len(archs)} subnets, {score_s:.2f} s each to recalibrate and score; val set {len(data.val_y)} "
        f"images, agreement on {len(data.pool)} unlabelled images, test {len(data.test_y)} images"
    )
    print(f"test accuracy of the subnets: {min(test):.1%} .. {max(test):.1%}")
    print(
        "| score | Kendall tau vs test acc | predictor tau vs score (held out) | predictor tau vs test acc |"
    )
    print("| --- | --- | --- | --- |")
    out = {}
    cut = int(len(archs) * 0.8)
    for name, values in (("val", val), ("agreement", agree)):
        model = AccuracyPredictor(net.space).fit(archs[:cut], values[:cut])
        predicted = model.predict(archs[cut:])
        row = {
            "tau_score_test": tau(values, test),
            "tau_predictor_score": tau(predicted, values[cut:]),
            "tau_predictor_test": tau(predicted, test[cut:]),
        }
        out[name] = {k: round(v, 3) for k, v in row.items()}
        cells = " | ".join(
            f"{row[k]:.3f}" for k in ("tau_score_test", "tau_predictor_score", "tau_predictor_test")
        )
        print(f"| {name} | {cells} |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
