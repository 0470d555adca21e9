"""Which model version serves a target: the champion rule, apart from the registry that records it.

A target's new version becomes `champion` when it scores at least as well as the current
champion, both scored on the same evaluation images; otherwise it is the `challenger`, and
the champion stays. A champion that does not know every class of today's data is compared on
the images of the classes it knows, both models choosing among those classes only (the same
task for both). One that cannot be run on today's images at all (missing or malformed files,
another input shape, none of today's classes) is replaced, with the reason. The registry
(flows/tracking.py, MLflow) scores the models and records the decision; the rule is here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Champion:
    """The current champion as scored on today's evaluation."""

    version: int
    accuracy: float | None = None  # None: it could not be scored (`unusable` says why)
    classes: list[str] | None = None  # the classes both were compared on, where it lacks some
    new_accuracy: float | None = None  # the new version's accuracy on those classes
    unusable: str | None = None


def decide(new_accuracy: float, evaluation: str, champion: Champion | None, missing: list[str]) -> dict:
    """The decision for a new version scoring `new_accuracy` on `evaluation` (its label), against
    `champion` (None: there is none yet); `missing`: today's classes the champion lacks. The dict
    holds `alias` (champion or challenger), `reason`, and the scores that decided it."""
    out = {
        "eval_acc": new_accuracy,
        "evaluation": evaluation,
        "champion_version": None if champion is None else champion.version,
        "champion_acc": None,
    }
    if champion is None:
        return out | {
            "alias": "champion",
            "reason": f"first version; {evaluation} accuracy {new_accuracy:.4f}",
        }
    if champion.accuracy is None:
        reason = (
            f"champion v{champion.version} cannot be evaluated on {evaluation} ({champion.unusable}); "
            f"replaced by this version ({evaluation} accuracy {new_accuracy:.4f})"
        )
        return out | {"alias": "champion", "reason": reason, "replaced_unusable": champion.version}
    out["champion_acc"] = champion.accuracy
    compared, note = new_accuracy, ""
    if champion.classes is not None:
        compared = champion.new_accuracy
        note = (
            f" (both on the images of the {len(champion.classes)} classes the champion knows, choosing "
            f"among them; it lacks {', '.join(missing)[:200]})"
        )
        out |= {"compared_on_classes": len(champion.classes), "compared_acc": compared}
    scores = f"{evaluation} accuracy {compared:.4f}"
    if compared >= champion.accuracy:
        reason = f"{scores} >= champion v{champion.version}'s {champion.accuracy:.4f}{note}"
        return out | {"alias": "champion", "reason": reason}
    reason = (
        f"kept as challenger: {scores} < champion v{champion.version}'s {champion.accuracy:.4f}{note}; "
        f"champion stays v{champion.version}"
    )
    return out | {"alias": "challenger", "reason": reason}
