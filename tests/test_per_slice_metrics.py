"""Per-slice Dice/Jaccard (lung-CT protocol): hand-computed slices, pooling over cases, empty predictions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from samplan.evaluation.per_slice import aggregate_per_slice, case_per_slice, slice_scores


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((4, 5, 5), np.int16)
    pred = np.zeros_like(ref)
    ref[0, 0, 0:4] = 1
    pred[0, 0, 2:5] = 1          # columns 2, 3 hit (TP 2), column 4 is a false positive
    pred[0, 1, 0] = 1            # one more FP: n_pred 4, n_ref 4
    pred[1, 2, 2] = 1            # label only in the prediction: slice not scored
    ref[2, 1:3, 1:3] = 1         # labelled slice, empty prediction
    ref[3, 4, :] = 1
    pred[3, 4, :] = 1            # perfect
    return pred, ref


def test_hand_computed_slices():
    pred, ref = _hand_case()
    s = slice_scores(pred, ref, 1)
    assert [x.slice for x in s] == [0, 2, 3]
    assert (s[0].tp, s[0].n_pred, s[0].n_ref) == (2, 4, 4)
    assert s[0].dice == pytest.approx(0.5) and s[0].jaccard == pytest.approx(1 / 3)
    assert s[1].dice == 0.0 and s[1].jaccard == 0.0 and s[1].n_pred == 0  # empty prediction scores 0
    assert s[2].dice == 1.0 and s[2].jaccard == 1.0
    c = case_per_slice(pred, ref, [1])["1"]
    assert c["n_slices"] == 3
    assert c["Dice_mean"] == pytest.approx(0.5) and c["Jaccard_mean"] == pytest.approx((1 / 3 + 1) / 3)
    # volume: TP 2 + 5, n_pred 4 + 1 + 5, n_ref 4 + 4 + 5
    assert c["volume_Dice"] == pytest.approx(2 * 7 / (10 + 13))


def test_merged_foreground_region_and_absent_label():
    ref = np.zeros((1, 4, 6), np.uint8)
    ref[0, :, :3], ref[0, :, 3:] = 1, 2
    pred = np.zeros_like(ref)
    pred[0, :, :4], pred[0, :, 4:] = 1, 2  # boundary off by one column
    c = case_per_slice(pred, ref, [1, 2, (1, 2), 5])
    assert c["1"]["slices"][0]["dice"] == pytest.approx(2 * 12 / (16 + 12))
    assert c["(1, 2)"]["slices"][0]["dice"] == 1.0 and c["(1, 2)"]["slices"][0]["jaccard"] == 1.0
    assert c["5"] == {"slices": [], "n_slices": 0, "Dice_mean": None, "Jaccard_mean": None, "volume_Dice": None}


def test_pooled_mean_differs_from_mean_of_case_means():
    ref_a = np.ones((3, 2, 2), np.int8)
    a = case_per_slice(ref_a.copy(), ref_a, [1])  # three perfect slices
    ref_b = np.ones((1, 2, 2), np.int8)
    b = case_per_slice(np.zeros_like(ref_b), ref_b, [1])  # one slice, empty prediction
    summary = aggregate_per_slice({"a": a, "b": b}, oracle=True)
    lab = summary["labels"]["1"]
    assert lab["Dice_pooled"] == pytest.approx(0.75) and lab["Jaccard_pooled"] == pytest.approx(0.75)
    assert lab["Dice_mean_of_case_means"] == pytest.approx(0.5)
    assert lab["volume_Dice_mean"] == pytest.approx(0.5)
    assert (lab["n_slices"], lab["n_cases"], lab["n_empty_prediction_slices"]) == (4, 2, 1)
    assert summary["oracle"] is True and summary["n_cases"] == 2
    assert summary["per_case"]["b"]["1"]["slices"][0]["dice"] == 0.0
    json.dumps(summary, allow_nan=False)  # JSON-ready: no numpy types, no NaN


def test_aggregate_skips_cases_without_labelled_slices():
    ref = np.zeros((2, 3, 3), np.int8)
    pred = ref.copy()
    pred[0, 0, 0] = 1  # only a false positive: no labelled slice, volume Dice 0
    none = case_per_slice(pred, ref, [1])
    lab = aggregate_per_slice({"x": none})["labels"]["1"]
    assert lab["Dice_pooled"] is None and lab["n_slices"] == 0 and lab["n_cases"] == 0
    assert lab["volume_Dice_mean"] == 0.0
    with pytest.raises(ValueError):
        slice_scores(pred[0], ref[0], 1)


def test_summary_json_carries_pooled_per_slice_scores_and_the_oracle_flag(tmp_path):
    """samplan_evaluate's summary: per-slice pooled numbers as computed here, and prompts_used.json's oracle flag."""
    import SimpleITK as sitk

    from samplan.evaluation.evaluate import evaluate_folders

    pred, ref = _hand_case()
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    for name, (p, r) in {"a": (pred, ref), "b": (ref, ref)}.items():
        for arr, d in ((r, gt_dir), (p, pred_dir)):
            img = sitk.GetImageFromArray(arr.astype(np.uint8))
            img.SetSpacing((0.7, 0.7, 3.0))
            sitk.WriteImage(img, str(d / f"{name}.nii.gz"))
    summary = evaluate_folders(gt_dir, pred_dir, [1], ".nii.gz", output_file=tmp_path / "summary.json", progress=False)
    expected = aggregate_per_slice({"a": case_per_slice(pred, ref, [1]), "b": case_per_slice(ref, ref, [1])})
    got = summary["per_slice"]["labels"]["1"]
    assert got["Dice_pooled"] == pytest.approx(expected["labels"]["1"]["Dice_pooled"])
    assert got["n_slices"] == 6 and got["n_empty_prediction_slices"] == 1
    assert summary["per_slice"]["oracle"] is None and "prompts" not in summary
    assert "per_slice" not in summary["metric_per_case"][0]  # nnU-Net's per-case schema unchanged

    (pred_dir / "prompts_used.json").write_text(json.dumps({"oracle": True, "strategy": "box"}))
    summary = evaluate_folders(gt_dir, pred_dir, [1], ".nii.gz", progress=False)
    assert summary["per_slice"]["oracle"] is True and summary["prompts"]["strategy"] == "box"
