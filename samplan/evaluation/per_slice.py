"""Per-slice Dice and Jaccard as the lung-CT SAM paper reports them, pooled over all labelled slices.

Conventions: `pred` and `ref` are integer label maps `(Z, Y, X)` in numpy (SimpleITK) axis order, and
slices are taken along axis 0. A label is one label value or a region (a tuple of values whose union is
scored, e.g. `(1, 2)` for both lungs merged), spelled in JSON as `samplan.evaluation.metrics.label_key`
spells it. For every slice on which the *reference* contains the label ("labelled slice"):
Dice = 2TP / (2TP + FP + FN) and Jaccard = TP / (TP + FP + FN); an empty prediction there scores 0.
Slices where only the prediction has the label are not scored by this protocol (the paper's choice; the
per-volume Dice, also returned, does penalise them).

The headline numbers are pooled: the mean over all labelled slices of all cases together, so a case
with many labelled slices weighs more than one with few. The mean of per-case means is reported beside
it, named as such, because the two differ and must not be confused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from samplan.evaluation.metrics import LabelOrRegion, label_key, region_mask

PROTOCOL = "per-labelled-slice Dice/Jaccard along axis 0, pooled over all labelled slices of all cases"


@dataclass(frozen=True)
class SliceScore:
    """Scores of one labelled slice: index along axis 0, Dice and Jaccard in [0, 1], pixel counts."""

    slice: int
    dice: float
    jaccard: float
    tp: int
    n_pred: int
    n_ref: int


def slice_scores(pred: np.ndarray, ref: np.ndarray, label: LabelOrRegion) -> list[SliceScore]:
    """Dice/Jaccard of `label` on every slice (axis 0) of `(Z, Y, X)` `pred`/`ref` where `ref` contains it."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape or ref.ndim != 3:
        raise ValueError(f"pred {pred.shape} and ref {ref.shape} must be (Z, Y, X) arrays of one shape")
    p, r = region_mask(pred, label), region_mask(ref, label)
    tp = np.count_nonzero(p & r, axis=(1, 2))
    n_pred, n_ref = np.count_nonzero(p, axis=(1, 2)), np.count_nonzero(r, axis=(1, 2))
    out = []
    for z in np.flatnonzero(n_ref):
        t, a, b = int(tp[z]), int(n_pred[z]), int(n_ref[z])
        # n_ref > 0, so neither denominator is zero; an empty prediction gives t = 0 -> both scores 0
        out.append(SliceScore(int(z), 2.0 * t / (a + b), t / (a + b - t), t, a, b))
    return out


def _volume_dice(pred: np.ndarray, ref: np.ndarray, label: LabelOrRegion) -> float | None:
    """Dice of `label` over the whole volume; None (JSON null) when both masks are empty."""
    p, r = region_mask(pred, label), region_mask(ref, label)
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    return None if denom == 0 else 2.0 * int(np.count_nonzero(p & r)) / denom


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def case_per_slice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[LabelOrRegion]) -> dict[str, dict]:
    """Per-slice scores of one case `(Z, Y, X)` for each label/region, keyed by `label_key`.

    Each value: {"slices": [SliceScore as dict, ...], "n_slices", "Dice_mean", "Jaccard_mean" (this case's
    means over its labelled slices, None without any), "volume_Dice"} -- all JSON-ready.
    """
    out = {}
    for label in labels:
        scores = slice_scores(pred, ref, label)
        out[label_key(label)] = {
            "slices": [asdict(s) for s in scores],
            "n_slices": len(scores),
            "Dice_mean": _mean([s.dice for s in scores]),
            "Jaccard_mean": _mean([s.jaccard for s in scores]),
            "volume_Dice": _volume_dice(pred, ref, label),
        }
    return out


def aggregate_per_slice(cases: Mapping[str, Mapping[str, dict]], oracle: bool | None = None) -> dict:
    """Pool `{case: case_per_slice(...)}` over cases into a JSON-ready summary.

    Per label key: "Dice_pooled" / "Jaccard_pooled" (mean over all labelled slices of all cases: the
    paper's numbers), "Dice_mean_of_case_means" / "Jaccard_mean_of_case_means" (cases without a labelled
    slice skipped), "volume_Dice_mean" (cases with an undefined volume Dice skipped), "n_slices",
    "n_cases" (cases with at least one labelled slice), "n_empty_prediction_slices". `oracle` records how
    the prompts were obtained (True: from the reference masks), so results cannot be mistaken for
    automatic ones. Means are None when there is nothing to average.
    """
    keys = sorted({k for per_case in cases.values() for k in per_case}, key=lambda k: (k.startswith("("), k))
    labels = {}
    for key in keys:
        dice, jac, case_dice, case_jac, vol, empty = [], [], [], [], [], 0
        for per_case in cases.values():
            entry = per_case.get(key)
            if entry is None:
                continue
            dice += [s["dice"] for s in entry["slices"]]
            jac += [s["jaccard"] for s in entry["slices"]]
            empty += sum(1 for s in entry["slices"] if s["n_pred"] == 0)
            if entry["n_slices"]:
                case_dice.append(entry["Dice_mean"])
                case_jac.append(entry["Jaccard_mean"])
            if entry["volume_Dice"] is not None:
                vol.append(entry["volume_Dice"])
        labels[key] = {
            "Dice_pooled": _mean(dice), "Jaccard_pooled": _mean(jac),
            "Dice_mean_of_case_means": _mean(case_dice), "Jaccard_mean_of_case_means": _mean(case_jac),
            "volume_Dice_mean": _mean(vol),
            "n_slices": len(dice), "n_cases": len(case_dice), "n_empty_prediction_slices": empty,
        }
    return {"protocol": PROTOCOL, "oracle": oracle, "n_cases": len(cases), "labels": labels,
            "per_case": {c: {k: dict(v) for k, v in per_case.items()} for c, per_case in cases.items()}}
