"""Unified loss, sandwich step, distributed gradients, checkpoints/resume and warm start."""

from __future__ import annotations

import os
import random
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from recompute import assert_reported

from tofa_core.arch import SearchSpace
from tofa_core.data.ingest import IngestConfig, ingest
from tofa_core.data.loaders import DataSplits, ImageSet, load_splits
from tofa_core.data.store import DatasetStore
from tofa_core.storage import open_storage
from tofa_core.supernet import Supernet
from tofa_core.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, space_dict
from tofa_core.training.config import TrainConfig
from tofa_core.training.evaluate import recalibrate_bn
from tofa_core.training.loop import allreduce_gradients, space_for, train_supernet, warm_start
from tofa_core.training.loss import AdaptiveThreshold, student_loss, teacher_loss
from tofa_core.training.step import sandwich, train_step

SPACE = SearchSpace.preset("tiny", num_classes=10, in_channels=1, resolutions=(8,))


def grads(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def batch(seed: int, n_x: int = 8, n_u: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_x, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n_x,), generator=g)
    u = torch.randn(n_u, 1, 8, 8, generator=g)
    return x, y, u, u + 0.3 * torch.randn(n_u, 1, 8, 8, generator=g)


# ----------------------------------------------------------------- the loss


def test_no_unlabelled_terms_reduce_to_plain_supervised_sandwich():
    cfg = TrainConfig(lambda_u=0, lambda_kd=0, alpha=1.0)
    assert not cfg.semi_supervised
    x, y, u, us = batch(0)
    archs = sandwich(SPACE, random.Random(0), 2)
    torch.manual_seed(0)
    net = Supernet(SPACE)
    ref = Supernet(SPACE)
    ref.load_state_dict(net.state_dict())
    torch.manual_seed(1)
    logs = train_step(net, archs, x, y, u, us, cfg)
    torch.manual_seed(1)  # same dropout masks
    for arch in archs:
        F.cross_entropy(ref(x, arch), y).backward()
    ours, plain = grads(net), grads(ref)
    assert ours.keys() == plain.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], plain[name], atol=1e-6, rtol=1e-5)
    assert "mask_rate" not in logs and "student/kd" not in logs


def test_pseudo_label_mask_follows_the_threshold():
    y = torch.tensor([0, 1])
    # rows: 2 labelled, 3 weak-unlabelled, 3 strong-unlabelled
    logits = torch.tensor(
        [
            [5.0, 0, 0],
            [0, 5.0, 0],
            [9.0, 0, 0],
            [0, 0.2, 0.1],
            [0, 0, 9.0],
            [1.0, 0, 0],
            [0, 1.0, 0],
            [0, 0, 1.0],
        ]
    )
    cfg = TrainConfig(tau=0.95, lambda_u=1.0)
    loss, targets, logs = teacher_loss(logits, y, 3, cfg)
    assert targets.mask.tolist() == [1.0, 0.0, 1.0]
    assert targets.pseudo.tolist() == [0, 1, 2]
    assert logs["mask_rate"] == pytest.approx(2 / 3)
    ce_x = F.cross_entropy(logits[:2], y)
    per = F.cross_entropy(logits[5:], targets.pseudo, reduction="none")
    expected = ce_x + (per[0] + per[2]) / 3  # mean over all unlabelled, masked ones count zero
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    _, none_confident, logs0 = teacher_loss(logits, y, 3, TrainConfig(tau=1.0))
    assert none_confident.mask.sum() == 0 and logs0["teacher/pseudo"] == 0.0


def test_adaptive_threshold_follows_the_teachers_confidence_per_class():
    adaptive = AdaptiveThreshold(3, momentum=0.5)
    torch.testing.assert_close(adaptive.thresholds(), torch.full((3,), 1 / 3))
    # A teacher confident on classes 0 and 1, never predicting class 2.
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]])
    adaptive.update(probs)
    assert adaptive.confidence.item() == pytest.approx(0.5 / 3 + 0.5 * 0.9)
    torch.testing.assert_close(adaptive.class_probs, torch.tensor([0.5 / 3 + 0.25] * 2 + [0.5 / 3]))
    tau = adaptive.thresholds()
    assert tau[0] == tau[1] == pytest.approx(adaptive.confidence.item()) and tau[2] < tau[0] / 2
    # In the loss: rows of the rare class pass a lower bar than a fixed tau would set.
    y = torch.tensor([0])
    logits = torch.tensor([[5.0, 0, 0], [2.0, 0, 0], [0, 0, 0.5], [1.0, 0, 0], [0, 0, 1.0]])
    cfg = TrainConfig(tau=0.95, threshold="adaptive", threshold_momentum=0.5)
    fresh = AdaptiveThreshold(3, momentum=0.5)
    _, targets, logs = teacher_loss(logits, y, 2, cfg, adaptive=fresh)
    conf = logits[1:3].softmax(1).max(1).values  # 0.79 (class 0), 0.45 (class 2)
    assert (fresh.thresholds()[[0, 2]] < conf).tolist() == [True, True]
    assert targets.mask.tolist() == [1.0, 1.0] and logs["threshold"] == pytest.approx(
        fresh.thresholds().mean()
    )
    _, fixed, _ = teacher_loss(logits, y, 2, cfg)  # no thresholds given: the fixed tau
    assert fixed.mask.tolist() == [0.0, 0.0]
    state = fresh.state_dict()
    again = AdaptiveThreshold(3, momentum=0.5)
    again.load_state_dict(state)
    torch.testing.assert_close(again.thresholds(), fresh.thresholds())


def test_student_matching_the_teacher_has_no_distillation_loss():
    logits = torch.randn(8, 10)
    y = torch.randint(0, 10, (2,))
    cfg = TrainConfig(lambda_kd=2.0, lambda_u=0.0, alpha=0.5)
    _, targets, _ = teacher_loss(logits, y, 3, cfg)
    loss, logs = student_loss(logits.clone(), y, 3, targets, cfg)
    assert logs["student/kd"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * F.cross_entropy(logits[:2], y).item(), rel=1e-5)
    other, logs2 = student_loss(torch.randn(8, 10), y, 3, targets, cfg)
    assert logs2["student/kd"] > 0.01


def test_weak_view_label_gives_pseudo_labels_and_trains_on_labelled_and_strong_rows():
    x, y, u, us = batch(0)
    archs = sandwich(SPACE, random.Random(0), 1)
    torch.manual_seed(0)
    net = Supernet(SPACE).eval()  # BN statistics frozen, dropout off: the comparison is exact
    ref = Supernet(SPACE).eval()
    ref.load_state_dict(net.state_dict())
    train_step(net, archs, x, y, u, us, TrainConfig(weak_view="label", tau=0.0))
    with torch.no_grad():
        pseudo = ref(u, archs[0]).argmax(dim=1)
    rows = torch.cat([x, us])
    teacher = ref(rows, archs[0])
    (F.cross_entropy(teacher[:8], y) + F.cross_entropy(teacher[8:], pseudo)).backward()
    probs = teacher.detach().softmax(dim=1)
    for arch in archs[1:]:
        s = ref(rows, arch)
        kd = F.kl_div(s.log_softmax(dim=1), probs, reduction="batchmean")
        (F.cross_entropy(s[:8], y) + kd + F.cross_entropy(s[8:], pseudo)).backward()
    ours, by_hand = grads(net), grads(ref)
    assert ours.keys() == by_hand.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], by_hand[name], atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    shared = Supernet(SPACE).eval()
    train_step(shared, archs, x, y, u, us, TrainConfig(tau=0.0))  # weak_view: train
    # the weak rows' distillation moves the students' gradients beyond the tolerance above
    assert any(not torch.allclose(g, ours[n], atol=1e-6, rtol=1e-5) for n, g in grads(shared).items())


def test_every_sampled_subnet_contributes_and_teacher_first():
    archs = sandwich(SPACE, random.Random(3), 2)
    assert archs[0] == SPACE.max_arch() and archs[1] == SPACE.min_arch() and len(archs) == 4
    again = sandwich(SPACE, random.Random(3), 2)
    assert again == archs  # seeded: every rank samples the same subnets


# ----------------------------------------------------------------- distributed gradients


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adaptive() -> AdaptiveThreshold:
    return AdaptiveThreshold(10, momentum=0.5)


def _rank_grads(rank: int, world: int, port: int, out: str, adaptive: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y, u, us = batch(0)
    n_x, n_u = len(x) // world, len(u) // world
    torch.manual_seed(0)
    net = Supernet(SPACE).eval()  # BN statistics frozen, dropout off: the comparison is exact
    archs = sandwich(SPACE, random.Random(0), 2)
    threshold = _adaptive() if adaptive else None
    train_step(
        net, archs, x[rank * n_x : (rank + 1) * n_x], y[rank * n_x : (rank + 1) * n_x],
        u[rank * n_u : (rank + 1) * n_u], us[rank * n_u : (rank + 1) * n_u], TrainConfig(tau=0.0), 1.0,
        threshold,
    )  # fmt: skip
    allreduce_gradients(net, world)
    if rank == 0:
        torch.save({"grads": grads(net), "tau": threshold.thresholds() if adaptive else None}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-tau", "adaptive-tau"])
def test_two_workers_average_to_the_single_process_gradient(tmp_path, adaptive):
    out = str(tmp_path / "grads.pt")
    args = (2, _free_port(), out, adaptive)
    mp.start_processes(_rank_grads, args=args, nprocs=2, join=True, start_method="spawn")
    saved = torch.load(out, weights_only=True)
    two = saved["grads"]
    x, y, u, us = batch(0)
    torch.manual_seed(0)
    net = Supernet(SPACE).eval()
    threshold = _adaptive() if adaptive else None
    train_step(net, sandwich(SPACE, random.Random(0), 2), x, y, u, us, TrainConfig(tau=0.0), 1.0, threshold)
    one = grads(net)
    if adaptive:  # each rank saw half the batch; the averaged statistics equal the whole batch's
        torch.testing.assert_close(saved["tau"], threshold.thresholds())
        assert threshold.thresholds().std() > 1e-3  # moved off its start (1 / classes for all)
    assert two.keys() == one.keys() and len(one) > 50
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-6, rtol=1e-4)


# ----------------------------------------------------------------- loop, checkpoints, resume


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    store = DatasetStore(open_storage(tmp_path_factory.mktemp("store")))
    ingest("digits", "digits", store, IngestConfig())
    return store


QUICK = TrainConfig(
    epochs=2, steps_per_epoch=2, batch_size=8, mu=1, k_random=1, resolutions=(8,), calib_images=64, threads=1
)


class Crash(RuntimeError):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("threshold", ["fixed", "adaptive"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(digits_store, tmp_path, threshold):
    cfg = QUICK.model_copy(update={"threshold": threshold, "threshold_momentum": 0.5})
    straight = train_supernet(cfg, digits_store, "digits", open_storage(tmp_path / "a"))
    assert len(straight.history) == 2
    assert_reported(straight.final, digits_store, str(tmp_path / "a"))

    def crash_after_first_epoch(metrics):
        if metrics["epoch"] == 1:
            raise Crash

    run_b = open_storage(tmp_path / "b")
    with pytest.raises(Crash):
        train_supernet(cfg, digits_store, "digits", run_b, report=crash_after_first_epoch)
    assert [o.key for o in run_b.list("checkpoints")] == ["checkpoints/epoch-0001.pt"]
    saved = load_checkpoint(run_b, "checkpoints/epoch-0001.pt")
    assert ("threshold" in saved) == (threshold == "adaptive")
    resumed = train_supernet(cfg, digits_store, "digits", run_b)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    a = load_checkpoint(open_storage(tmp_path / "a"), "supernet.pt")["model"]
    b = load_checkpoint(run_b, "supernet.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    assert resumed.final == straight.final
    assert ("threshold" in resumed.history[-1]) == (threshold == "adaptive")
    assert resumed.history[-1] == straight.history[-1] | {"images_per_s": resumed.history[-1]["images_per_s"]}


@pytest.mark.slow
def test_quantization_aware_training_is_the_last_epochs_and_saves_a_float_supernet(digits_store, tmp_path):
    qat = QUICK.model_copy(update={"quantization_aware": True, "qat_fraction": 0.5})
    plain = train_supernet(
        QUICK.model_copy(update={"quantization_aware": False}),
        digits_store,
        "digits",
        open_storage(tmp_path / "float"),
    )
    aware = train_supernet(qat, digits_store, "digits", open_storage(tmp_path / "qat"))
    assert [h["fake_quant"] for h in aware.history] == [0.0, 1.0]
    assert [h["fake_quant"] for h in plain.history] == [0.0, 0.0]

    def weights(run: str, key: str) -> dict:
        return load_checkpoint(open_storage(tmp_path / run), key)["model"]

    first = [weights(r, "checkpoints/epoch-0001.pt") for r in ("float", "qat")]
    last = [weights(r, "supernet.pt") for r in ("float", "qat")]
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0])  # the same float epoch
    assert not torch.equal(last[0]["stem.conv.weight"], last[1]["stem.conv.weight"])  # then not
    assert set(last[1]) == set(last[0])  # nothing of fake quantization is saved: a float supernet
    assert load_checkpoint(open_storage(tmp_path / "qat"), "supernet.pt")["quantization_aware_epochs"] == 1
    assert_reported(aware.final, digits_store, str(tmp_path / "qat"))  # judged as float subnets


def test_quantization_aware_is_on_by_default_over_the_last_fifth_and_reads_yaml_on_off(tmp_path):
    assert TrainConfig().quantization_aware is True and TrainConfig().quantization_aware_epochs(30) == 6
    assert TrainConfig(qat_fraction=0.01).quantization_aware_epochs(30) == 1
    assert TrainConfig(quantization_aware=False).quantization_aware_epochs(30) == 0
    for text, value in (("on", True), ("off", False), ("true", True), ("false", False)):
        (tmp_path / "c.yaml").write_text(f"train:\n  quantization_aware: {text}\n")  # YAML's on is true
        assert TrainConfig.load(tmp_path / "c.yaml").quantization_aware is value


@pytest.mark.slow
def test_unified_loss_logs_every_term(digits_store, tmp_path):
    result = train_supernet(
        QUICK.model_copy(update={"epochs": 1}), digits_store, "digits", open_storage(tmp_path)
    )
    row = result.history[0]
    for key in ("teacher/ce", "teacher/pseudo", "mask_rate", "student/ce", "student/kd", "student/pseudo"):
        assert key in row, key
    assert 0 <= row["mask_rate"] <= 1 and row["images_per_s"] > 0
    assert {"val_acc/max", "val_acc/min"} <= row.keys()


@pytest.mark.slow
def test_a_time_budget_keeps_the_epochs_that_fit_and_ends_the_schedule_there(digits_store, tmp_path):
    cfg = QUICK.model_copy(update={"epochs": 4, "budget_minutes": 1e-6})  # only the first epoch fits
    short = train_supernet(cfg, digits_store, "digits", open_storage(tmp_path / "short"))
    assert short.epochs == 1 and [h["epoch"] for h in short.history] == [1]
    saved = load_checkpoint(open_storage(tmp_path / "short"), "checkpoints/epoch-0001.pt")
    assert saved["epochs_planned"] == 1 and saved["scheduler"]["T_max"] == 2  # 1 epoch x 2 steps
    # A cosine schedule whose end moves mid-run still reaches 0 at its new end.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    for step in range(4):
        if step == 2:
            cosine.T_max = 4
        opt.step()
        cosine.step()
    assert cosine.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)
    roomy = train_supernet(
        cfg.model_copy(update={"budget_minutes": 60.0}),
        digits_store,
        "digits",
        open_storage(tmp_path / "roomy"),
    )
    assert roomy.epochs == 4 and len(roomy.history) == 4 and roomy.history[0]["lr"] > 0.01


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_data_version(digits_store, tmp_path):
    run = open_storage(tmp_path)
    train_supernet(QUICK.model_copy(update={"epochs": 1}), digits_store, "digits", run)
    state = load_checkpoint(run, "checkpoints/epoch-0001.pt")
    state["data_version"] = "v-0000000000000000"
    save_checkpoint(run, "checkpoints/epoch-0001.pt", {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(CheckpointError, match="belongs to data version v-0000000000000000"):
        train_supernet(QUICK, digits_store, "digits", run)


def test_warm_start_keeps_the_body_and_resets_a_foreign_head(tmp_path):
    five = SearchSpace.preset("tiny", num_classes=5, in_channels=1, resolutions=(8,))
    torch.manual_seed(0)
    donor = Supernet(five)
    store = open_storage(tmp_path)
    save_checkpoint(
        store, "s.pt", {"space": space_dict(five), "classes": list("abcde"), "model": donor.state_dict()}
    )
    net = Supernet(SPACE)
    notes = warm_start(net, store, "s.pt")
    assert any("re-initialised" in n for n in notes)
    torch.testing.assert_close(net.stem.conv.weight, donor.stem.conv.weight)
    assert net.classifier.weight.shape == (10, SPACE.feature_mix_width)


def test_checkpoints_from_before_block_kinds_still_load_and_fused_ones_do_not_fit_tiny(tmp_path):
    store = open_storage(tmp_path)
    donor = Supernet(SPACE)
    old = space_dict(SPACE)
    old["stages"] = [{k: v for k, v in stage.items() if k != "block"} for stage in old["stages"]]
    save_checkpoint(store, "old.pt", {"space": old, "classes": [], "model": donor.state_dict()})
    net = Supernet(SPACE)
    warm_start(net, store, "old.pt")
    torch.testing.assert_close(
        net.stages[0][0].depthwise.conv.weight, donor.stages[0][0].depthwise.conv.weight
    )
    fused = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))
    save_checkpoint(
        store, "fused.pt", {"space": space_dict(fused), "classes": [], "model": Supernet(fused).state_dict()}
    )
    with pytest.raises(CheckpointError, match=r"another search space \('tiny-fused'.*stages"):
        warm_start(Supernet(SPACE), store, "fused.pt")


def test_mismatched_and_corrupt_checkpoints_get_clear_errors(tmp_path):
    store = open_storage(tmp_path)
    other = SearchSpace.preset("tiny", num_classes=10, in_channels=3, resolutions=(8,))
    save_checkpoint(
        store, "rgb.pt", {"space": space_dict(other), "classes": [], "model": Supernet(other).state_dict()}
    )
    with pytest.raises(CheckpointError, match=r"another search space .*in_channels"):
        warm_start(Supernet(SPACE), store, "rgb.pt")
    store.write_bytes("junk.pt", b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable TOFA checkpoint"):
        load_checkpoint(store, "junk.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(store, "missing.pt")


def test_bn_recalibration_restores_a_subnets_statistics():
    torch.manual_seed(0)
    net = Supernet(SPACE)
    arch = SPACE.min_arch()
    images = torch.randn(64, 1, 8, 8) * 3 + 1
    static = recalibrate_bn(net.extract(arch), images, batch_size=16)
    bn = static.stem.bn
    with torch.no_grad():
        stem_out = static.stem.conv(images)
    torch.testing.assert_close(bn.running_mean, stem_out.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert bn.momentum == 0.1  # restored after the cumulative pass


@pytest.mark.slow
def test_a_fixed_arch_trains_alone_with_the_teacher_loss(digits_store, tmp_path):
    """The per-target baseline: only the one subnet learns (FixMatch terms, no students), and
    it is the one evaluated. A block the arch does not use keeps its initial weights."""
    space = SearchSpace.preset("tiny-fused", num_classes=10, in_channels=1, resolutions=(8,))  # auto at 8 px
    arch = space.min_arch()  # depth 1 per stage: blocks 2 and 3 of every stage unused
    torch.manual_seed(QUICK.seed)
    initial = Supernet(space).state_dict()
    result = train_supernet(QUICK, digits_store, "digits", open_storage(tmp_path), fixed=arch)
    row = result.history[-1]
    assert {"val_acc/arch", "teacher/ce", "teacher/pseudo"} <= row.keys()
    assert not any(k.startswith("student/") for k in row) and "val_acc/max" not in row
    assert set(result.final) == {"test_acc/arch"}
    state = load_checkpoint(open_storage(tmp_path), "supernet.pt")
    assert state["fixed_arch"] == arch.to_dict()
    trained = state["model"]
    unused = [k for k in initial if re.match(r"stages\.\d+\.[12]\.", k)]
    used = [k for k in initial if k.startswith("stem") and k.endswith("weight")]
    assert unused and used
    for key in unused:
        torch.testing.assert_close(trained[key], initial[key], atol=0, rtol=0)
    assert any(not torch.equal(trained[k], initial[k]) for k in used)


def test_auto_schedule_is_one_pass_over_the_unlabelled_images_with_a_floor():
    cfg = TrainConfig()  # batch 32, mu 3: 96 unlabelled images a step
    assert cfg.steps_per_epoch == "auto"
    assert cfg.epoch_steps(labelled=1_000, unlabelled=9_000) == 94  # ceil(9000 / 96)
    assert cfg.epoch_steps(labelled=1_000, unlabelled=96 * 50) == 50
    # Small sets keep the floor: min_steps (400) over 30 epochs is 14 steps an epoch.
    assert (cfg.epochs, cfg.min_steps) == (30, 400)
    assert cfg.epoch_steps(labelled=144, unlabelled=500) == 14
    assert cfg.epoch_steps(labelled=144, unlabelled=1_300) == 14  # digits: one pass is 14 steps too
    assert TrainConfig(epochs=10).epoch_steps(labelled=144, unlabelled=500) == 40
    # Supervised (no unlabelled terms or images): passes over the labelled images.
    supervised = TrainConfig(lambda_u=0.0, lambda_kd=0.0)
    assert supervised.epoch_steps(labelled=3_200, unlabelled=9_000) == 100
    assert cfg.epoch_steps(labelled=3_200, unlabelled=0) == 100
    # A number is taken as it is, whatever the data.
    assert TrainConfig(steps_per_epoch=7).epoch_steps(labelled=10**6, unlabelled=10**6) == 7
    for wrong in ("often", 0):
        with pytest.raises(ValueError, match="steps_per_epoch"):
            TrainConfig(steps_per_epoch=wrong)


@pytest.mark.parametrize(
    ("side", "preset"),
    [(8, "tiny-fused"), (16, "tiny-fused"), (28, "small-fused"), (32, "small-fused"), (48, "tiny")],
)
def test_auto_space_follows_the_image_side(side, preset):
    empty = ImageSet(torch.zeros(0, 1, side, side, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    splits = DataSplits("d", "v", ["a", "b"], 1, side, empty, empty, empty, empty)
    space = space_for(TrainConfig(), splits)
    assert space.name == preset and space.resolutions == (side,)
    assert space_for(TrainConfig(space="tiny"), splits).name == "tiny"  # an explicit preset wins


@pytest.mark.slow
def test_auto_schedule_trains_as_many_steps_as_the_data_asks(digits_store, tmp_path):
    # QUICK without its step count: epochs of one pass over digits' unlabelled share, floored.
    cfg = QUICK.model_copy(
        update={"steps_per_epoch": "auto", "epochs": 1, "mu": 4, "batch_size": 8, "min_steps": 20}
    )
    result = train_supernet(cfg, digits_store, "digits", open_storage(tmp_path))
    splits = load_splits(digits_store, "digits", val_fraction=cfg.val_fraction, seed=cfg.seed)
    expected = max(cfg.min_steps, -(-len(splits.unlabeled) // 32))
    assert expected > cfg.min_steps  # the test means something: the data sets the count
    assert result.history[0]["images_per_s"] > 0
    state = load_checkpoint(open_storage(tmp_path), "checkpoints/epoch-0001.pt")
    assert state["scheduler"]["last_epoch"] == expected
