"""Cascades, ensembles, post-processing choice and samplan_find_best end to end on a synthetic dataset: unet (2d,
folds 0 and 1) as the first stage, a tiny medsam (folds 0 and 1) and a tiny samzeroshot (fold all) as second stages."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from samplan.dataset.labels import LabelManager
from samplan.utils import load_json
from synthetic import make_dataset_3d

TINY = {"backbone": "tiny_vit", "checkpoint": "none"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The synthetic 3D dataset (5 cases) planned (2d), the three models trained, SAMPLAN_* set for the module."""
    from conftest import plan_quickly, samplan_dirs

    from samplan.pipeline.train import train_fold

    with samplan_dirs(tmp_path_factory.mktemp("find_best")) as root:
        ds = make_dataset_3d(root / "SAMPLAN_RAW", n_cases=5)
        plan_quickly(ds, ["unet", "medsam", "samzeroshot"], ["2d"])
        common = {"num_workers": 0, "precision": "fp32", "device": "cpu"}
        for fold in (0, 1):
            train_fold(ds.name, "unet", "2d", fold, epochs=3, iters_per_epoch=8, val_iters=1, save_probabilities=True,
                       **common)
            train_fold(ds.name, "medsam", "2d", fold, epochs=1, iters_per_epoch=1, val_iters=1, final_validation=False,
                       method_overrides={**TINY, "batch_size": 2}, **common)
        train_fold(ds.name, "samzeroshot", "2d", "all", method_overrides=TINY, **common)
        yield ds, root


@pytest.fixture(scope="module")
def report(trained):
    from samplan.pipeline.find_best import find_best

    ds, _ = trained
    return find_best(ds.name, device="cpu", progress=False)


def test_find_best_compares_singles_cascades_and_ensembles_on_common_folds(report):
    names = [c["name"] for c in report["candidates"]]
    assert report["folds"] == ["0", "1"]
    base = {"unet 2d", "medsam 2d <- unet 2d", "samzeroshot 2d <- unet 2d"}
    assert base <= set(names)
    ensembles = {n for n in names if n.startswith("ensemble(") and "largest component" not in n}
    assert len(ensembles) == 4  # three pairs and all three
    for c in report["candidates"]:
        assert set(c["per_fold_dice"]) == {"0", "1"} and {r["fold"] for r in c["per_case"]} == {"0", "1"}
    dices = [c["foreground_mean"]["Dice"] or 0.0 for c in report["candidates"]]
    assert dices == sorted(dices, reverse=True) and report["best"] == names[0]


def test_each_candidate_carries_its_paired_difference_from_the_best(report):
    keys = [k for k in report["labels"] if k != "0"]

    def fg(c):  # per-case foreground Dice, computed here independently of find_best's helpers
        out = {}
        for r in c["per_case"]:
            values = [r["metrics"][k]["Dice"] for k in keys if r["metrics"][k]["Dice"] is not None]
            out[(r["fold"], r["case"])] = float(np.mean(values)) if values else np.nan
        return out

    best = fg(report["candidates"][0])
    assert report["candidates"][0]["vs_best"] == {"difference": 0.0, "standard_error": 0.0, "cases": len(best)}
    for c in report["candidates"][1:]:
        mine = fg(c)
        diffs = np.array([mine[k] - best[k] for k in sorted(mine) if not np.isnan(mine[k]) and not np.isnan(best[k])])
        assert c["vs_best"]["cases"] == diffs.size and diffs.size > 1
        assert c["vs_best"]["difference"] == pytest.approx(diffs.mean(), abs=1e-12)
        assert c["vs_best"]["standard_error"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(diffs.size), abs=1e-12)


def test_paired_difference_and_the_within_noise_list():
    from samplan.pipeline.find_best import paired_difference, within_noise

    def cases(dices, fold="0"):
        return [{"fold": fold, "case": f"c{i}", "metrics": {"1": {"Dice": d}, "2": {"Dice": None}}}
                for i, d in enumerate(dices)]

    best = cases([0.9, 0.8, 0.7, 0.6])
    other = cases([0.8, 0.6, 0.7, float("nan")])  # the NaN case has no foreground Dice: not paired
    d = paired_difference(other, best, ["1", "2"])
    assert d["cases"] == 3 and d["difference"] == pytest.approx(-0.1)
    assert d["standard_error"] == pytest.approx(np.std([-0.1, -0.2, 0.0], ddof=1) / np.sqrt(3))
    report = {"candidates": [{"name": "best", "vs_best": paired_difference(best, best, ["1"])},
                             {"name": "close", "vs_best": {"difference": -0.01, "standard_error": 0.006}},
                             {"name": "far", "vs_best": {"difference": -0.05, "standard_error": 0.006}},
                             {"name": "one case", "vs_best": {"difference": 0.0, "standard_error": None}}]}
    assert within_noise(report) == ["close"]


def test_cascade_validation_uses_fold_k_models_on_fold_k_validation_cases(trained, report):
    ds, root = trained
    splits = load_json(root / "SAMPLAN_PREPROCESSED" / ds.name / "splits_final.json")
    for c in (c for c in report["candidates"] if c["kind"] == "cascade" and "largest" not in c["name"]):
        for fold, folder in c["folders"].items():
            record = load_json(f"{folder}/cascade.json")
            assert record["cases"] == sorted(splits[int(fold)]["val"])  # only fold k's validation cases
            untrained = record["second_stage"]["method"] == "samzeroshot"
            assert record["second_stage"]["model_fold"] == ("all" if untrained else fold)
            assert record["first_stage"]["model_fold"] == fold
            assert record["first_stage"]["predictions"].endswith(f"unet__samplanPlans__2d/fold_{fold}/validation")
            prompts = load_json(f"{folder}/summary.json")["prompts"]
            assert prompts["oracle"] is False and prompts["strategy"] == "model"
            assert prompts["model"]["method"] == "unet" and prompts["model"]["folds"] == [fold]


def test_ensembles_average_the_members_probabilities(trained, report):
    ds, root = trained
    dj = load_json(root / "SAMPLAN_PREPROCESSED" / ds.name / "dataset.json")
    lm = LabelManager.from_dataset_json(dj)
    pair = next(c for c in report["candidates"] if c["kind"] == "ensemble" and len(c["members"]) == 2
                and "largest" not in c["name"])
    first_members = [report_member_folder(report, m["name"], "0") for m in pair["members"]]
    case = sorted(p.name[: -len(".npz")] for p in first_members[0].glob("*.npz"))[0]
    mean = sum(np.load(f / f"{case}.npz")["probabilities"].astype(np.float32) for f in first_members) / 2
    got = sitk.GetArrayFromImage(sitk.ReadImage(f"{pair['folders']['0']}/{case}.nii.gz"))
    assert np.array_equal(got, lm.probabilities_to_segmentation(mean))


def report_member_folder(report, name, fold):
    from pathlib import Path

    return Path(next(c for c in report["candidates"] if c["name"] == name)["folders"][fold])


def test_postprocessing_is_kept_only_where_it_does_not_lower_the_dice(tmp_path):
    from samplan.pipeline.find_best import choose_postprocessing

    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    ref = np.zeros((6, 30, 30), np.uint8)
    ref[1:4, 2:8, 2:8] = 1
    ref[1:4, 20:26, 20:26] = 1  # label 1 has two true objects: keeping one loses Dice
    ref[1:4, 12:16, 2:6] = 2
    p = ref.copy()
    p[5, 25:28, 2:4] = 2  # a spurious label-2 speck: removing it gains Dice
    for folder, arr in ((gt, ref), (pred, p)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / "case_a.nii.gz"))
    assert choose_postprocessing({"0": pred}, gt, [1, 2], ".nii.gz") == [2]


def test_instructions_round_trip_and_predict_best(trained, report, tmp_path):
    from samplan.cli.predict import main as predict_main
    from samplan.pipeline.best_prediction import load_instructions

    ds, root = trained
    instructions = load_instructions(ds.name)
    assert instructions["best"]["name"] == report["best"] and instructions["folds"] == ["0", "1"]
    assert instructions["commands"][0].startswith(f"samplan_predict -d {ds.name} --best")
    text = (root / "SAMPLAN_RESULTS" / ds.name / "inference_instructions.txt").read_text()
    assert report["best"][:60] in text and "--best" in text and "vs best (SE)" in text
    images = tmp_path / "in"
    images.mkdir()
    for f in sorted((ds / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(f, images)
    out = tmp_path / "out"
    assert predict_main(["-d", ds.name, "--best", "-i", str(images), "-o", str(out), "--device", "cpu"]) == 0
    for f in sorted(images.glob("*.nii.gz")):
        case = f.name.replace("_0000.nii.gz", "")
        got, ref = sitk.ReadImage(str(out / f"{case}.nii.gz")), sitk.ReadImage(str(f))
        assert got.GetSize() == ref.GetSize() and np.allclose(got.GetSpacing(), ref.GetSpacing())
        assert np.allclose(got.GetOrigin(), ref.GetOrigin()) and np.allclose(got.GetDirection(), ref.GetDirection())
    assert load_json(out / "inference_instructions.json")["best"]["name"] == report["best"]


def test_prompts_from_a_trained_model_on_new_images(trained, tmp_path):
    from samplan.cli.predict import main as predict_main

    ds, _ = trained
    images = tmp_path / "in"
    images.mkdir()
    for f in sorted((ds / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(f, images)
    out = tmp_path / "out"
    assert predict_main(["-i", str(images), "-o", str(out), "-d", ds.name, "-m", "samzeroshot", "-f", "all",
                         "--prompts-from", "unet", "-pc", "2d", "-pf", "0", "--device", "cpu"]) == 0
    record = load_json(out / "prompts_used.json")
    assert record["oracle"] is False and record["strategy"] == "model"
    assert record["model"]["method"] == "unet" and record["model"]["folds"] == ["0"]
    assert len(list((out / "prompts_from_unet__2d").glob("*.nii.gz"))) == 2 and len(list(out.glob("*.nii.gz"))) == 2
    with pytest.raises(SystemExit):
        predict_main(["-h"])


def test_find_best_without_running_leaves_out_what_is_missing(trained, report):
    from samplan.pipeline.find_best import find_best

    ds, root = trained
    cascade = next(c for c in report["candidates"] if c["name"] == "medsam 2d <- unet 2d")
    shutil.rmtree(cascade["folders"]["1"])
    again = find_best(ds.name, run=False, progress=False)
    assert any("medsam 2d <- unet 2d fold 1" in n and "--no-run" in n for n in again["notes"])
    assert any(n.startswith("medsam 2d <- unet 2d: no fold 1") for n in again["notes"])
    assert "medsam 2d <- unet 2d" not in [c["name"] for c in again["candidates"]]


def test_find_best_makes_only_the_folds_asked_for(trained, report, monkeypatch):
    import samplan.pipeline.find_best as fb

    ds, _ = trained
    cascade = next(c for c in report["candidates"] if c["name"] == "samzeroshot 2d <- unet 2d")
    shutil.rmtree(cascade["folders"]["1"])  # fold 1 of the cascade is missing, and not asked for
    made = []
    monkeypatch.setattr(fb, "run_cascade_validation", lambda m, f, *a, **k: made.append((m.name, f)))
    monkeypatch.setattr(fb, "run_single_validation", lambda m, f, *a, **k: made.append((m.name, f)))
    again = fb.find_best(ds.name, folds=["0"], progress=False)
    assert made == [] and again["folds"] == ["0"]
    assert "samzeroshot 2d <- unet 2d" in [c["name"] for c in again["candidates"]]
