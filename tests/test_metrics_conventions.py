"""The HD95/NSD conventions end to end: defaults, summary.json's "metric_conventions", samplan_evaluate --hd95/--nsd,
and bad choices (one clear error, no summary written). Needs neither MONAI nor ../shared."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_dataset_3d

from samplan.cli.evaluate import main as evaluate_main
from samplan.dataset.image_io import read_seg, write_seg
from samplan.errors import SamplanError
from samplan.evaluation.conventions import HD95_CONVENTIONS, NSD_CONVENTIONS
from samplan.evaluation.evaluate import evaluate_folders, load_summary
from samplan.evaluation.metrics import mask_metrics


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """Three anisotropic synthetic cases; the prediction adds a far false-positive cube of label 1 (one-sided
    outliers, where the MONAI and pooled HD95 differ) and grows label 2 by one voxel in-plane."""
    ds = make_dataset_3d(tmp_path / "raw", n_cases=3)
    gt, pred = ds / "labelsTr", tmp_path / "pred"
    pred.mkdir()
    for f in sorted(gt.glob("*.nii.gz")):
        seg, props = read_seg(f)
        out = seg[0].copy()
        out[-4:, :4, :4] = 1
        grown = np.zeros_like(out, bool)
        grown[:, 1:] = out[:, :-1] == 2
        out[grown & (out == 0)] = 2
        write_seg(out, pred / f.name, props)
    return gt, pred


def _expected(entry: dict, key: str, **conventions) -> dict:
    ref, props = read_seg(entry["reference_file"])
    prd, _ = read_seg(entry["prediction_file"])
    return mask_metrics(ref[0] == int(key), prd[0] == int(key), props["spacing"], nsd_tolerance_mm=1.0, **conventions)


def test_default_is_monai_and_summary_says_so(folders):
    gt, pred = folders
    res = evaluate_folders(gt, pred, [1, 2], ".nii.gz", output_file=pred / "summary.json", num_processes=1, progress=False)
    on_disk = json.loads((pred / "summary.json").read_text())
    conv = on_disk["metric_conventions"]
    assert conv["hd95"] == f"monai: {HD95_CONVENTIONS['monai']}" and conv["hd95"].startswith("monai: max of directed 95th")
    assert conv["nsd"] == f"monai: {NSD_CONVENTIONS['monai']}" and conv["nsd_tolerance_mm"] == 1.0
    assert "image diagonal" in conv["empty_masks"]
    assert on_disk["settings"]["hd95_convention"] == "monai" and on_disk["settings"]["nsd_convention"] == "monai"
    assert res["metric_conventions"] == conv
    pooled_lower = 0
    for entry in res["metric_per_case"]:
        for key in ("1", "2"):
            expected = _expected(entry, key, hd95_convention="monai", nsd_convention="monai")
            assert entry["metrics"][key]["HD95"] == pytest.approx(expected["HD95"])
            assert entry["metrics"][key]["NSD"] == pytest.approx(expected["NSD"])
        pooled_lower += _expected(entry, "1", hd95_convention="pooled")["HD95"] < entry["metrics"]["1"]["HD95"]
    assert pooled_lower == 3  # the far false positive: MONAI's HD95 shows it, the pooled one dilutes it


def test_cli_options_choose_the_conventions(folders, capsys):
    gt, pred = folders
    out = pred.parent / "pooled.json"
    assert evaluate_main(["-gt", str(gt), "-pred", str(pred), "-l", "1", "2", "-o", str(out), "-np", "1",
                          "--hd95", "pooled", "--nsd", "area_weighted"]) == 0
    assert "HD95 pooled, NSD area_weighted" in capsys.readouterr().out
    summary = load_summary(out)
    assert summary["metric_conventions"]["hd95"].startswith("pooled: ")
    assert summary["metric_conventions"]["nsd"].startswith("area_weighted: ")
    assert summary["settings"]["hd95_convention"] == "pooled"
    differs = 0
    for entry in summary["metric_per_case"]:
        for key in ("1", "2"):
            expected = _expected(entry, key, hd95_convention="pooled", nsd_convention="area_weighted")
            assert entry["metrics"][key]["HD95"] == pytest.approx(expected["HD95"])
            assert entry["metrics"][key]["NSD"] == pytest.approx(expected["NSD"])
            differs += abs(expected["NSD"] - _expected(entry, key)["NSD"]) > 1e-3
    assert differs > 0  # area weighting changes the NSD on these anisotropic (3 x 0.8 x 0.8 mm) cases

    default = pred.parent / "default.json"
    assert evaluate_main(["-gt", str(gt), "-pred", str(pred), "-l", "1", "2", "-o", str(default), "-np", "1"]) == 0
    assert "HD95 monai, NSD monai" in capsys.readouterr().out
    assert load_summary(default)["metric_conventions"]["hd95"].startswith("monai: ")


def test_unknown_convention_is_one_clear_error_and_writes_nothing(folders, capsys):
    gt, pred = folders
    with pytest.raises(SamplanError, match="unknown hd95 convention 'medpy'; choose one of monai, pooled"):
        evaluate_folders(gt, pred, [1], ".nii.gz", output_file=pred / "summary.json", hd95_convention="medpy",
                         num_processes=1, progress=False)
    with pytest.raises(SamplanError, match="unknown nsd convention 'area'; choose one of monai, area_weighted"):
        evaluate_folders(gt, pred, [1], ".nii.gz", nsd_convention="area", num_processes=1, progress=False)
    assert not (pred / "summary.json").exists()
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["-gt", str(gt), "-pred", str(pred), "--hd95", "medpy"])
    assert exc.value.code == 2 and "invalid choice: 'medpy'" in capsys.readouterr().err
    assert not (pred / "summary.json").exists()
