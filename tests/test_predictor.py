"""Predictor from a trained-model folder, fold ensembling, the in-memory API, samplan_predict and model selection."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from samplan.cli.predict import main as predict_main
from samplan.dataset.dataset_json import group_images_by_case, load_dataset_json
from samplan.dataset.image_io import read_images, read_seg
from samplan.dataset.labels import LabelManager
from samplan.errors import DatasetError, SamplanError
from samplan.experiment_planning.fingerprint import extract_fingerprint
from samplan.pipeline.planning import plan_experiment
from samplan.inference.export import logits_to_label_map
from samplan.inference.model_selection import list_trained_models, select_model
from samplan.inference.predictor import Predictor
from samplan.methods import METHODS, get_method
from samplan.methods.base import MethodPlan, TrainableMethod
from samplan.preprocessing.preprocessor import preprocess_case_files
from samplan.models.checkpoint import save_checkpoint
from method_plans import bind
from synthetic import make_dataset_2d_png, make_dataset_3d


class PointwiseMethod(TrainableMethod):
    """A test method whose network is a 1x1(x1) convolution: its logits are a fixed function of each voxel."""

    name = "pointnet"
    dimensionality = "3d"

    def plan_section(self, fingerprint, base_plan, budget, dataset_json):
        return {"configurations": list(base_plan["configurations"])}

    def check_plan(self, plans, configuration=None, *, plans_file="plans.json"):
        # a test method without a plan section: bound to any planned configuration
        return MethodPlan(self.name, None, plans, configuration or next(iter(plans["configurations"])), str(plans_file))

    def build_network(self, mp, num_input_channels, num_outputs):
        conv = nn.Conv3d if len(mp.config["patch_size"]) == 3 else nn.Conv2d
        return conv(num_input_channels, num_outputs, 1)

    def training_recipe(self, mp, label_manager):
        raise NotImplementedError


@pytest.fixture(autouse=True)
def pointnet(monkeypatch):
    monkeypatch.setitem(METHODS, "pointnet", PointwiseMethod())


def _plan(raw: Path) -> tuple[dict, dict]:
    dj = load_dataset_json(raw)
    # fewer intensity samples than nnU-Net's 1e8: the percentiles barely move and the test stays fast
    fingerprint = extract_fingerprint(raw, num_processes=1, progress=False, total_intensity_samples=1e5)
    return plan_experiment(raw.name, dj, fingerprint, methods=["unet"]), dj


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A synthetic 3D dataset (1 channel, labels 0/1/2, anisotropic) and its real plans."""
    raw = make_dataset_3d(tmp_path_factory.mktemp("raw"), n_cases=3, shape=(10, 36, 32))
    plans, dj = _plan(raw)
    return raw, plans, dj


def _midpoint(plans, dj, raw, configuration) -> float:
    """Midpoint between the mean background and the mean label intensity (channel sum) of the first case, normalised."""
    files = group_images_by_case(raw / "imagesTr", dj["file_ending"])
    case = sorted(files)[0]
    data, seg, _ = preprocess_case_files(files[case], raw / "labelsTr" / f"{case}{dj['file_ending']}", plans, configuration)
    total = data.sum(0)
    return float(0.5 * (total[seg[0] == 0].mean() + total[seg[0] > 0].mean()))


def _threshold_weights(plans, dj, raw, configuration, a=4.0):
    """Conv weights: class 1 where the normalised intensity exceeds the background/label midpoint, class 2 never."""
    t = _midpoint(plans, dj, raw, configuration)
    w = torch.tensor([0.0, a, 0.0])
    b = torch.tensor([0.0, -a * float(t), -10.0])
    return w, b


def make_model(results: Path, plans, dj, configuration, folds, method="pointnet", n_in=1):
    """A trained-model folder as samplan_train writes it; `folds` maps fold -> (weight, bias) of the 1x1 conv."""
    md = results / plans["dataset_name"] / f"{method}__{plans['plans_name']}__{configuration}"
    md.mkdir(parents=True, exist_ok=True)
    (md / "plans.json").write_text(json.dumps(plans))
    (md / "dataset.json").write_text(json.dumps(dj))
    lm = LabelManager.from_dataset_json(dj)
    for fold, (w, b) in folds.items():
        net = get_method(method).build_network(bind(get_method(method), plans, configuration), n_in, lm.num_outputs)
        if w is not None:
            with torch.no_grad():
                net.weight.zero_()
                net.weight[:, 0].view(-1)[:] = w
                net.bias.copy_(b)
        save_checkpoint({"network_weights": net.state_dict(), "method": method, "configuration": configuration,
                         "fold": fold, "plans_name": plans["plans_name"], "current_epoch": 1,
                         "num_input_channels": n_in, "num_outputs": lm.num_outputs},
                        md / f"fold_{fold}" / "checkpoint_final.pth")
    return md


def _same_geometry(a: Path, b: Path):
    ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
    assert ia.GetSize() == ib.GetSize()
    np.testing.assert_allclose(ia.GetSpacing(), ib.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(ia.GetOrigin(), ib.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(ia.GetDirection(), ib.GetDirection(), atol=1e-6)


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# ------------------------------------------------------------------------------------------------ predictor


def test_predict_folder_matches_the_manual_pipeline_and_keeps_geometry(synth, tmp_path):
    raw, plans, dj = synth
    w, b = _threshold_weights(plans, dj, raw, "3d_fullres")
    md = make_model(tmp_path / "results", plans, dj, "3d_fullres", {0: (w, b)})
    predictor = Predictor.from_model_dir(md, folds=[0], device="cpu", progress=False)
    assert predictor.mirror_axes == (0, 1, 2)
    outs = predictor.predict_folder(raw / "imagesTr", tmp_path / "out", num_processes=0)
    cases = sorted(group_images_by_case(raw / "imagesTr", ".nii.gz"))
    assert [o.name for o in outs] == [f"{c}.nii.gz" for c in cases]
    lm = LabelManager.from_dataset_json(dj)
    net = PointwiseMethod().build_network(bind(PointwiseMethod(), plans, "3d_fullres"), 1, 3)
    net.load_state_dict(predictor.fold_weights[0])
    for c in cases:
        _same_geometry(tmp_path / "out" / f"{c}.nii.gz", raw / "labelsTr" / f"{c}.nii.gz")
        pred, _ = read_seg(tmp_path / "out" / f"{c}.nii.gz")
        gt, _ = read_seg(raw / "labelsTr" / f"{c}.nii.gz")
        assert _dice(pred[0] == 1, gt[0] > 0) > 0.9  # the threshold net finds the labelled blobs, in the right place
        # the same result by hand: preprocess, whole-volume network, export
        data, _, props = preprocess_case_files([raw / "imagesTr" / f"{c}_0000.nii.gz"], None, plans, "3d_fullres")
        with torch.no_grad():
            logits = net(torch.from_numpy(data)[None])[0]
        expected = logits_to_label_map(logits, props, plans, "3d_fullres", lm)
        assert (pred[0] != expected).sum() <= 2  # float rounding of the window blending may flip a tie


def test_folds_are_ensembled_by_averaging_probabilities(synth, tmp_path):
    raw, plans, dj = synth
    w, b = _threshold_weights(plans, dj, raw, "3d_fullres")
    w2, b2 = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.1, 0.3, -0.4])
    md = make_model(tmp_path / "r", plans, dj, "3d_fullres", {0: (w, b), 1: (w2, b2)})
    both = Predictor.from_model_dir(md, device="cpu", progress=False)  # folds found on disk
    assert len(both.fold_weights) == 2
    singles = [Predictor.from_model_dir(md, folds=[f], device="cpu", progress=False) for f in (0, 1)]
    data, _, _ = preprocess_case_files(sorted((raw / "imagesTr").iterdir())[:1], None, plans, "3d_fullres")
    expected = sum(torch.softmax(p.predict_logits(data), 0) for p in singles) / 2
    torch.testing.assert_close(torch.softmax(both.predict_logits(data), 0), expected, rtol=1e-4, atol=1e-5)
    # a case too large for float32 logits is averaged in float16, slab by slab: the same within float16 rounding
    from samplan.engine import dense

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dense, "FLOAT32_LOGITS_MAX_BYTES", 0)
        half = both.predict_logits(data)
    assert half.dtype == torch.float16
    torch.testing.assert_close(torch.softmax(half.float(), 0), expected, rtol=0, atol=2e-3)
    with pytest.raises(SamplanError, match="fold"):
        Predictor.from_model_dir(md, folds=[3], device="cpu")
    with pytest.raises(SamplanError, match="checkpoint_best"):
        Predictor.from_model_dir(md, checkpoint="best", device="cpu")


def test_predict_array_equals_the_file_output(synth, tmp_path):
    raw, plans, dj = synth
    w, b = _threshold_weights(plans, dj, raw, "3d_fullres")
    md = make_model(tmp_path / "results", plans, dj, "3d_fullres", {0: (w, b)})
    predictor = Predictor.from_model_dir(md, device="cpu", tta=False, progress=False)
    assert predictor.mirror_axes == ()
    files = sorted((raw / "imagesTr").iterdir())[:2]
    predictor.predict_cases({f.name[:-12]: [f] for f in files}, tmp_path / "out", save_probabilities=True, num_processes=0)
    for f in files:
        image, props = read_images([f])
        from_file, _ = read_seg(tmp_path / "out" / f"{f.name[:-12]}.nii.gz")
        seg = predictor.predict_array(image[0], spacing=props["spacing"])  # (Z, Y, X) and its spacing
        assert seg.shape == image.shape[1:]
        np.testing.assert_array_equal(seg, from_file[0])
        seg2, probs = predictor.predict_array(image, properties=props, return_probabilities=True)
        np.testing.assert_array_equal(seg2, seg)
        with np.load(tmp_path / "out" / f"{f.name[:-12]}.npz") as z:
            np.testing.assert_array_equal(z["probabilities"], probs)
    with pytest.raises(SamplanError, match="channel"):
        predictor.predict_array(np.zeros((2, 8, 8, 8)), spacing=(1, 1, 1))
    with pytest.raises(SamplanError, match="spacing"):
        predictor.predict_array(np.zeros((8, 8, 8)))


def test_2d_png_model(tmp_path):
    raw = make_dataset_2d_png(tmp_path / "raw", n_cases=3)
    plans, dj = _plan(raw)
    assert list(plans["configurations"]) == ["2d"]
    md = make_model(tmp_path / "results", plans, dj, "2d", {0: (None, None)}, n_in=3)
    # class 1 where the sum of the three normalised colour channels is above the midpoint: the bright disc
    state = torch.load(md / "fold_0" / "checkpoint_final.pth", weights_only=True)
    state["network_weights"]["weight"] = torch.tensor([[0.0] * 3, [1.0] * 3]).reshape(2, 3, 1, 1)
    state["network_weights"]["bias"] = torch.tensor([0.0, -_midpoint(plans, dj, raw, "2d")])
    save_checkpoint(state, md / "fold_0" / "checkpoint_final.pth")
    outs = Predictor.from_model_dir(md, device="cpu", progress=False).predict_folder(raw / "imagesTr", tmp_path / "out")
    for o in outs:
        pred, _ = read_seg(o)
        gt, _ = read_seg(raw / "labelsTr" / o.name)
        assert pred.shape == gt.shape and _dice(pred[0] == 1, gt[0] == 1) > 0.95


def test_worker_process_pipeline_gives_the_same_outputs(synth, tmp_path):
    raw, plans, dj = synth
    w, b = _threshold_weights(plans, dj, raw, "3d_fullres")
    md = make_model(tmp_path / "results", plans, dj, "3d_fullres", {0: (w, b)})
    predictor = Predictor.from_model_dir(md, device="cpu", tta=False, progress=False)
    a = predictor.predict_folder(raw / "imagesTr", tmp_path / "thread", num_processes=0)
    p = predictor.predict_folder(raw / "imagesTr", tmp_path / "proc", num_processes=1)
    for x, y in zip(a, p):
        np.testing.assert_array_equal(read_seg(x)[0], read_seg(y)[0])


@pytest.mark.skipif(not isinstance(get_method("unet"), TrainableMethod), reason="unet has no network builder yet")
def test_unet_checkpoint_predicts_in_the_input_geometry(synth, tmp_path):
    raw, plans, dj = synth
    md = make_model(tmp_path / "results", plans, dj, "3d_fullres", {}, method="unet")
    net = get_method("unet").build_network(bind(get_method("unet"), plans, "3d_fullres"), 1, 3)
    save_checkpoint({"network_weights": net.state_dict(), "method": "unet", "configuration": "3d_fullres", "fold": 0,
                     "plans_name": plans["plans_name"], "current_epoch": 0, "num_input_channels": 1, "num_outputs": 3},
                    md / "fold_0" / "checkpoint_final.pth")
    f = sorted((raw / "imagesTr").iterdir())[0]
    out = Predictor.from_model_dir(md, device="cpu", tta=False, progress=False).predict_cases(
        {"x": [f]}, tmp_path / "out")[0]
    _same_geometry(out, raw / "labelsTr" / f"{f.name[:-12]}.nii.gz")
    assert set(np.unique(read_seg(out)[0])) <= {0, 1, 2}


# ------------------------------------------------------------------------------------------------ CLI and selection


def test_cli_selects_the_only_model_and_continue_skips_done_cases(synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    out = tmp_path / "out"
    assert predict_main(["-i", str(raw / "imagesTr"), "-o", str(out)]) == 1
    assert "no trained model" in capsys.readouterr().err and not out.exists()

    w, b = _threshold_weights(plans, dj, raw, "3d_fullres")
    make_model(samplan_env["SAMPLAN_RESULTS"], plans, dj, "3d_fullres", {0: (w, b), 1: (w, b)})
    assert predict_main(["-i", str(raw / "imagesTr"), "-o", str(out), "--disable-tta", "-np", "0", "--device", "cpu"]) == 0
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert len(done) == 3
    first = sorted(done)[0]
    (out / first).unlink()
    assert predict_main(["-i", str(raw / "imagesTr"), "-o", str(out), "--continue", "--disable-tta", "-np", "0"]) == 0
    again = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(again) == set(done) and all(again[n] == done[n] for n in done if n != first)


def test_cli_parts_split_the_cases_and_together_equal_one_run(synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    w, b = _threshold_weights(plans, dj, raw, "3d_fullres")
    make_model(samplan_env["SAMPLAN_RESULTS"], plans, dj, "3d_fullres", {0: (w, b)})
    common = ["-i", str(raw / "imagesTr"), "--disable-tta", "-np", "0", "--device", "cpu"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert predict_main([*common, "-o", str(whole)]) == 0
    written = []
    for i in range(2):
        before = set(parts.iterdir()) if parts.exists() else set()
        assert predict_main([*common, "-o", str(parts), "--part-id", str(i), "--num-parts", "2"]) == 0
        written.append({p.name for p in set(parts.iterdir()) - before})
    names = sorted(p.name for p in whole.iterdir())
    assert written == [set(names[0::2]), set(names[1::2])]  # nnU-Net's split: sorted cases i, i+n, ...
    for n in names:
        assert np.array_equal(read_seg(whole / n)[0], read_seg(parts / n)[0])
    assert predict_main([*common, "-o", str(tmp_path / "bad"), "--part-id", "2", "--num-parts", "2"]) == 1
    assert "--part-id must be in 0..1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_cli_lists_candidates_when_several_models_fit(synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    results = samplan_env["SAMPLAN_RESULTS"]
    for cfg in ("3d_fullres", "2d"):
        make_model(results, plans, dj, cfg, {0: (None, None)})
    assert len(list_trained_models()) == 2
    out = tmp_path / "out"
    assert predict_main(["-i", str(raw / "imagesTr"), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "-c 3d_fullres" in err and "-c 2d" in err and not out.exists()
    assert select_model(method="pointnet", configuration="2d").configuration == "2d"
    assert select_model(dataset=plans["dataset_name"], configuration="3d_fullres").path.name.endswith("3d_fullres")
    assert predict_main(["-i", str(raw / "imagesTr"), "-o", str(out), "-c", "2d", "-f", "0", "--disable-tta"]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 3
    with pytest.raises(SamplanError, match="no trained model with checkpoint_best"):
        select_model(checkpoint="best")


def make_two_channel_model(results: Path, plans, dj) -> None:
    """A pointnet model of the same dataset declared with two channels: every case needs _0000 and _0001."""
    dj2 = {**dj, "channel_names": {"0": "MR0", "1": "MR1"}}
    plans2 = json.loads(json.dumps(plans))
    for cfg in plans2["configurations"].values():
        cfg["normalization_schemes"] *= 2
        cfg["use_mask_for_norm"] *= 2
    make_model(results, plans2, dj2, "3d_fullres", {0: (None, None)}, n_in=2)


def test_cli_rejects_a_case_with_a_missing_channel(synth, samplan_env, tmp_path, capsys):
    raw, plans, dj = synth
    make_two_channel_model(samplan_env["SAMPLAN_RESULTS"], plans, dj)
    inp = tmp_path / "in"
    inp.mkdir()
    for f in sorted((raw / "imagesTr").iterdir()):
        shutil.copy(f, inp / f.name)
        if "case_001" not in f.name:
            shutil.copy(f, inp / f.name.replace("_0000", "_0001"))
    out = tmp_path / "out"
    assert predict_main(["-i", str(inp), "-o", str(out)]) == DatasetError.exit_code
    err = capsys.readouterr().err
    assert "case_001" in err and "case_001_0000.nii.gz" in err and "2" in err
    # the other cases are still predicted (tests/test_predict_bad_input.py covers the other kinds of bad input)
    assert sorted(p.name for p in out.iterdir()) == ["case_000.nii.gz", "case_002.nii.gz"]
    (inp / "stray.nii.gz").write_bytes(b"")
    assert predict_main(["-i", str(inp), "-o", str(tmp_path / "out2")]) == DatasetError.exit_code
    assert "stray.nii.gz" in capsys.readouterr().err and not (tmp_path / "out2").exists()
