"""The champion rule (tofa_core.promotion), without a registry: who serves a target and why."""

from __future__ import annotations

from tofa_core.promotion import Champion, decide


def test_the_first_version_is_champion():
    out = decide(0.91, "test", None, [])
    assert out["alias"] == "champion" and out["champion_version"] is None
    assert out["reason"] == "first version; test accuracy 0.9100"


def test_a_new_version_must_score_at_least_as_well_as_the_champion():
    assert decide(0.90, "test", Champion(3, 0.90), [])["alias"] == "champion"  # a tie promotes
    kept = decide(0.8999, "test", Champion(3, 0.90), [])
    assert kept["alias"] == "challenger" and kept["champion_acc"] == 0.90
    assert kept["reason"] == (
        "kept as challenger: test accuracy 0.8999 < champion v3's 0.9000; champion stays v3"
    )


def test_a_champion_lacking_classes_is_compared_on_the_classes_it_knows():
    # overall the new version scores less, but on the champion's own classes it scores more
    champion = Champion(2, accuracy=0.80, classes=["a", "b"], new_accuracy=0.85)
    out = decide(0.70, "test", champion, ["c"])
    assert out["alias"] == "champion" and out["compared_acc"] == 0.85 and out["compared_on_classes"] == 2
    assert "it lacks c" in out["reason"] and out["eval_acc"] == 0.70
    assert decide(0.99, "test", Champion(2, 0.80, ["a", "b"], 0.79), ["c"])["alias"] == "challenger"


def test_a_champion_that_cannot_be_scored_is_replaced_with_the_reason():
    out = decide(0.5, "val", Champion(4, unusable="FileNotFoundError: model.json"), [])
    assert out["alias"] == "champion" and out["replaced_unusable"] == 4
    assert "champion v4 cannot be evaluated on val (FileNotFoundError: model.json)" in out["reason"]
