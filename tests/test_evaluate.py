"""Folder evaluation into summary.json: schema, per-case values, means, errors, regions, PNG, CLI, real data."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_shared_subset
from scipy.ndimage import binary_dilation
from synthetic import make_dataset_2d_png, make_dataset_3d

from samplan.cli.evaluate import main as evaluate_main
from samplan.dataset.image_io import read_seg, write_seg
from samplan.errors import SamplanError
from samplan.evaluation.evaluate import dataset_settings, evaluate_folders, load_summary
from samplan.evaluation.metrics import case_metrics, mask_metrics

METRICS = {"Dice", "IoU", "TP", "FP", "FN", "TN", "n_pred", "n_ref", "HD95", "NSD"}


def _write_predictions(gt_dir: Path, pred_dir: Path, ending: str, edit) -> None:
    """Write `edit(case_index, label_map (Z, Y, X)) -> label_map` of every reference into pred_dir."""
    pred_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(gt_dir.glob(f"*{ending}"))):
        seg, props = read_seg(f)
        write_seg(edit(i, seg[0].copy()), pred_dir / f.name, props)


def _perturb(i: int, seg: np.ndarray) -> np.ndarray:
    out = seg.copy()
    out[binary_dilation(seg == 1) & (seg == 0)] = 1  # label 1 grows by one voxel
    if i == 1:
        out[out == 2] = 1  # label 2 missed entirely in case 1
    else:
        out = np.where(seg == 2, 2, np.where(out == 2, 0, out))
        out[:, 1:][seg[:, :-1] == 2] = 2  # label 2 shifted by one voxel along y
    return out


@pytest.fixture
def nifti_folders(tmp_path):
    ds = make_dataset_3d(tmp_path / "raw", n_cases=3)
    gt, pred = ds / "labelsTr", tmp_path / "pred"
    _write_predictions(gt, pred, ".nii.gz", _perturb)
    return ds, gt, pred


def _nan_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_nan_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_nan_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_schema_per_case_values_and_means(nifti_folders, tmp_path):
    ds, gt, pred = nifti_folders
    out = tmp_path / "eval" / "summary.json"
    res = evaluate_folders(gt, pred, [1, 2], ".nii.gz", output_file=out, num_processes=1, nsd_tolerance_mm=1.0, progress=False)

    assert {"metric_per_case", "mean", "foreground_mean"} <= set(res)
    assert len(res["metric_per_case"]) == 3
    for entry in res["metric_per_case"]:
        assert set(entry) == {"prediction_file", "reference_file", "metrics"}
        assert Path(entry["prediction_file"]).parent == pred and Path(entry["reference_file"]).parent == gt
        assert set(entry["metrics"]) == {"1", "2"}
        ref, props = read_seg(entry["reference_file"])
        prd, _ = read_seg(entry["prediction_file"])
        expected = case_metrics(ref, prd, [1, 2], props["spacing"])
        for key in ("1", "2"):
            assert set(entry["metrics"][key]) == METRICS
            assert _nan_equal(entry["metrics"][key], expected[key])
    # spacing of the reference is used (anisotropic 3 x 0.8 x 0.8 mm): a y-shift of one voxel gives 0.8 mm
    assert res["metric_per_case"][0]["metrics"]["2"]["HD95"] == pytest.approx(0.8)
    # case 1 missed label 2: Dice 0, HD95 = image diagonal, NSD 0
    missed = res["metric_per_case"][1]["metrics"]["2"]
    assert missed["Dice"] == 0.0 and missed["NSD"] == 0.0 and missed["HD95"] > 30

    for key in ("1", "2"):
        for m in METRICS:
            assert res["mean"][key][m] == pytest.approx(np.mean([c["metrics"][key][m] for c in res["metric_per_case"]]))
    for m in METRICS:
        assert res["foreground_mean"][m] == pytest.approx((res["mean"]["1"][m] + res["mean"]["2"][m]) / 2)
    assert 0.5 < res["foreground_mean"]["Dice"] < 1.0

    on_disk = json.loads(out.read_text())
    assert list(on_disk) == sorted(on_disk)  # nnU-Net writes with sort_keys=True
    assert on_disk["settings"]["nsd_tolerance_mm"] == 1.0
    assert _nan_equal(load_summary(out), res)


def test_nan_is_written_as_null_and_skipped_by_the_means(tmp_path):
    # label 3 appears in case 0 only, so Dice is NaN for the other cases and the mean uses case 0 alone
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    props = {"spacing": [2.0, 1.0, 1.0], "geometry": {"kind": "sitk", "spacing": [1.0, 1.0, 2.0], "origin": [0.0] * 3, "direction": list(np.eye(3).ravel()), "ndim": 3}}
    for i in range(3):
        seg = np.zeros((6, 12, 12), np.uint8)
        seg[1:5, 2:9, 2:9] = 1
        if i == 0:
            seg[2:4, 4:7, 4:7] = 3
        write_seg(seg, gt / f"c{i}.nii.gz", props)
    _write_predictions(gt, pred, ".nii.gz", lambda i, s: np.where(s == 3, 1, s))
    res = evaluate_folders(gt, pred, None, ".nii.gz", output_file=pred / "summary.json", num_processes=1, progress=False)
    assert set(res["mean"]) == {"1", "3"}  # labels found in the files
    assert math.isnan(res["metric_per_case"][1]["metrics"]["3"]["Dice"])
    # NSD is 1 for the two cases where both masks are empty and 0 for the missed one
    assert res["mean"]["3"]["Dice"] == 0.0 and res["mean"]["3"]["NSD"] == pytest.approx(2 / 3)
    raw = json.loads((pred / "summary.json").read_text())
    assert raw["metric_per_case"][1]["metrics"]["3"]["Dice"] is None
    assert "NaN" not in (pred / "summary.json").read_text()


def test_missing_extra_and_misshaped_predictions(nifti_folders, tmp_path):
    ds, gt, pred = nifti_folders
    (pred / "case_001.nii.gz").unlink()
    with pytest.raises(SamplanError, match="case_001"):
        evaluate_folders(gt, pred, [1, 2], ".nii.gz", num_processes=1, progress=False)
    res = evaluate_folders(gt, pred, [1, 2], ".nii.gz", num_processes=1, only_predicted=True, progress=False)
    assert [Path(c["reference_file"]).name for c in res["metric_per_case"]] == ["case_000.nii.gz", "case_002.nii.gz"]

    shutil.copy(gt / "case_000.nii.gz", pred / "stray.nii.gz")
    with pytest.raises(SamplanError, match="stray"):
        evaluate_folders(gt, pred, [1, 2], ".nii.gz", num_processes=1, only_predicted=True, progress=False)
    (pred / "stray.nii.gz").unlink()

    seg, props = read_seg(gt / "case_001.nii.gz")
    write_seg(seg[0, :-1], pred / "case_001.nii.gz", props)
    with pytest.raises(SamplanError, match=r"pred/case_001\.nii\.gz.*labelsTr/case_001\.nii\.gz"):
        evaluate_folders(gt, pred, [1, 2], ".nii.gz", num_processes=1, progress=False)


def test_parallel_equals_sequential(nifti_folders):
    _, gt, pred = nifti_folders
    seq = evaluate_folders(gt, pred, [1, 2], ".nii.gz", num_processes=1, progress=False)
    par = evaluate_folders(gt, pred, [1, 2], ".nii.gz", num_processes=2, progress=False)
    assert _nan_equal(seq, par)


def test_brats_like_regions_from_dataset_json(tmp_path):
    ds = make_dataset_3d(tmp_path / "raw", name="Dataset902_Regions", n_cases=2)
    gt = ds / "labelsTr"
    for f in gt.glob("*.nii.gz"):  # nested labels: 1 outer, 2 inside, 3 a core inside 2
        seg, props = read_seg(f)
        s = seg[0]
        core = np.zeros_like(s, bool)
        zz, yy, xx = np.argwhere(s == 2).mean(0).round().astype(int)
        core[zz, yy - 1 : yy + 2, xx - 1 : xx + 2] = True
        write_seg(np.where(core & (s == 2), 3, s), f, props)
    meta = json.loads((ds / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}
    meta["regions_class_order"] = [1, 2, 3]
    (ds / "dataset.json").write_text(json.dumps(meta))
    targets, ignore, ending = dataset_settings(str(ds))
    assert targets == [(1, 2, 3), (2, 3), (3,)] and ignore is None and ending == ".nii.gz"

    # prediction: labels 2 and 3 swapped, so the regions (1, 2, 3) and (2, 3) stay exact and (3,) is wrong
    _write_predictions(gt, tmp_path / "pred", ending, lambda i, s: np.select([s == 2, s == 3], [3, 2], s))
    res = evaluate_folders(gt, tmp_path / "pred", targets, ending, num_processes=1, progress=False)
    assert set(res["mean"]) == {"(1, 2, 3)", "(2, 3)", "(3,)"}
    for entry in res["metric_per_case"]:
        ref, props = read_seg(entry["reference_file"])
        prd, _ = read_seg(entry["prediction_file"])
        m = entry["metrics"]
        assert m["(1, 2, 3)"]["Dice"] == 1.0 and m["(2, 3)"]["Dice"] == 1.0  # unions are unchanged by the swap
        assert m["(3,)"]["Dice"] < 0.5
        assert _nan_equal(m["(3,)"], mask_metrics(ref[0] == 3, prd[0] == 3, props["spacing"]))


def test_png_label_maps(tmp_path):
    medpy = pytest.importorskip("medpy.metric.binary", reason="medpy is not installed (test-only dependency)")
    ds = make_dataset_2d_png(tmp_path / "raw", n_cases=3)
    gt, pred = ds / "labelsTr", tmp_path / "pred"
    _write_predictions(gt, pred, ".png", lambda i, s: np.roll(s, i + 1, axis=2))
    res = evaluate_folders(gt, pred, [1], ".png", num_processes=1, progress=False)
    for i, entry in enumerate(res["metric_per_case"]):
        ref, _ = read_seg(entry["reference_file"])
        prd, _ = read_seg(entry["prediction_file"])
        m = entry["metrics"]["1"]
        # 2D surfaces in pixel units: a shift by i + 1 pixels
        assert m["HD95"] == pytest.approx(medpy.hd95(prd[0, 0] == 1, ref[0, 0] == 1))
        assert m["HD95"] == pytest.approx(i + 1)
        assert m["Dice"] == pytest.approx(medpy.dc(prd[0, 0] == 1, ref[0, 0] == 1))


def test_cli_default_output_and_errors(nifti_folders, capsys):
    ds, gt, pred = nifti_folders
    assert evaluate_main(["-gt", str(gt), "-pred", str(pred), "-d", str(ds / "dataset.json"), "-np", "1", "--nsd-tol", "2"]) == 0
    printed = capsys.readouterr().out
    assert "foreground mean" in printed and "NSD@2mm" in printed
    summary = load_summary(pred / "summary.json")
    assert set(summary["mean"]) == {"1", "2"} and summary["settings"]["nsd_tolerance_mm"] == 2.0
    for key in ("1", "2"):
        assert f"{summary['mean'][key]['Dice']:.4f}" in printed

    (pred / "case_002.nii.gz").unlink()
    assert evaluate_main(["-gt", str(gt), "-pred", str(pred), "-l", "1", "-np", "1"]) != 0
    assert "case_002" in capsys.readouterr().err


def test_real_hippocampus_labels_against_themselves_and_shifted(tmp_path):
    ds = copy_shared_subset("Dataset004_Hippocampus", tmp_path, n_cases=5)
    gt = ds / "labelsTr"
    same, shifted = tmp_path / "same", tmp_path / "shifted"
    shutil.copytree(gt, same)

    def shift(i, s):  # one voxel (1 mm) along a different axis per case, zero fill
        out = np.zeros_like(s)
        ax = i % 3
        src = [slice(None)] * 3
        dst = [slice(None)] * 3
        src[ax], dst[ax] = slice(0, -1), slice(1, None)
        out[tuple(dst)] = s[tuple(src)]
        return out

    _write_predictions(gt, shifted, ".nii.gz", shift)
    targets, _, ending = dataset_settings(str(ds))
    assert targets == [1, 2]

    ident = evaluate_folders(gt, same, targets, ending, num_processes=1, progress=False)
    assert len(ident["metric_per_case"]) == 5
    for key in ("1", "2"):
        assert ident["mean"][key]["Dice"] == 1.0 and ident["mean"][key]["HD95"] == 0.0 and ident["mean"][key]["NSD"] == 1.0

    res = evaluate_folders(gt, shifted, targets, ending, num_processes=1, nsd_tolerance_mm=1.0, progress=False)
    try:
        from medpy.metric.binary import dc, hd95
    except ImportError:
        dc = hd95 = None
    for entry in res["metric_per_case"]:
        ref, props = read_seg(entry["reference_file"])
        prd, _ = read_seg(entry["prediction_file"])
        assert props["spacing"] == [1.0, 1.0, 1.0]
        for key, label in (("1", 1), ("2", 2)):
            m = entry["metrics"][key]
            # every surface voxel moved by exactly 1 mm, so all distances are 0 or 1 mm
            assert 0.3 < m["Dice"] < 1.0 and 0.0 < m["HD95"] <= 1.0 and m["NSD"] == 1.0
            if hd95 is not None:
                assert m["Dice"] == pytest.approx(dc(prd[0] == label, ref[0] == label))
                assert m["HD95"] == pytest.approx(hd95(prd[0] == label, ref[0] == label, voxelspacing=props["spacing"]))
    assert res["foreground_mean"]["Dice"] < 1.0
