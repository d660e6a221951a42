"""promise (ProMISe): plan, frozen SAM, gradient flow into APM/IPS only, modes, feature cache, opening, training and
prediction through the CLI on 2D PNGs and 3D volumes."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.methods import get_method
from samplan.methods.promise import plan as promise_plan
from samplan.methods.promise.data import SliceLoader
from samplan.methods.promise.decoder import decode_shifted
from samplan.methods.promise.features import FeatureStore, encode_slices
from samplan.methods.promise.network import build_promise
from samplan.methods.promise.predict import ABSENT_LOGIT, opening, predict_case
from samplan.methods.promise.plan import WEIGHTS_BUFFER
from samplan.models.specs import backbone_spec
from samplan.pipeline.train import train_fold
from samplan.training.trainer import merge_overrides
from samplan.utils import load_json
from method_plans import bind
from ddp_check import check_two_process_training
from synthetic import make_dataset_2d_png, make_dataset_3d

# tiny random SAM and a narrow APM: the same code paths as LiteMedSAM / ViT-B, in well under a second per step
TINY = {"backbone": "tiny_vit", "checkpoint": "none", "apm": {"conv_channels": 16, "resnet_layers": [1, 1, 1, 1]},
        "ips": {"hidden": 32}, "batch_size": 2, "encoder_batch_size": 2}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Synthetic 3D MR (two labels) and 2D RGB PNG (one label) datasets, planned for promise and preprocessed (2d)."""
    from conftest import plan_quickly, samplan_dirs

    with samplan_dirs(tmp_path_factory.mktemp("promise")) as root:
        out = {"root": root}
        for key, ds in (("3d", make_dataset_3d(root / "SAMPLAN_RAW", n_cases=5)),
                        ("png", make_dataset_2d_png(root / "SAMPLAN_RAW", n_cases=5))):
            out[key] = ds
            out[f"plans_{key}"] = load_json(plan_quickly(ds, ["promise"], ["2d"]) / "plans.json")
        yield out


def tiny_plans(plans: dict, **overrides) -> dict:
    """A copy of `plans` whose promise section uses the tiny backbone and APM (plus `overrides`)."""
    p = copy.deepcopy(plans)
    p["methods"]["promise"] = merge_overrides(p["methods"]["promise"], {**TINY, **overrides})
    return p


def _network(plans: dict, num_outputs: int = 2, seed: int = 0):
    mp = bind(get_method("promise"), plans)
    torch.manual_seed(seed)
    return mp, build_promise(mp.section, num_outputs)


def _whole_slice_batch(prepared, key: str, n: int = 2) -> dict:
    ds = prepared[key]
    cache = prepared["root"] / "SAMPLAN_PREPROCESSED" / ds.name / prepared[f"plans_{key}"]["configurations"]["2d"][
        "data_identifier"]
    cases = sorted(p.name[:-len(".json")] for p in cache.glob("*.json"))
    loader = SliceLoader(cache, cases, n, 1.0, train=True, seed=1)
    return next(iter(loader.epoch(0, 1)))


def test_plan_follows_the_paper_and_chooses_the_prompt_from_the_backbone(prepared):
    s = prepared["plans_png"]["methods"]["promise"]
    assert s["mode"] == "apm_ips" and s["backbone"] == "litemedsam" and s["input_size"] == 256
    # CPU budget: the APM at 1e-3, the IPS at the paper's 1e-5; a GPU plan keeps the paper's 1e-5 for both
    assert s["recipe"]["optimizer"] == {"name": "Adam", "lr": 1e-3, "weight_decay": 0.0}
    assert s["recipe"]["ips_lr_scale"] == 0.01 and "collapsed" in s["recipe"]["ips_lr_reason"]
    assert s["batch_size"] == 8 and s["postprocessing"]["opening_kernel_px"] == 5
    assert s["apm"]["conv_channels"] == 256 and s["apm"]["resnet_layers"] == [3, 4, 6, 3]
    assert s["prompt"]["output"] == "box" and "answers points poorly" in s["prompt"]["output_reason"]
    assert s["image_augmentation"] is False and "cached" in s["image_augmentation_reason"]  # CPU default
    assert promise_plan.feature_blocks(backbone_spec("vit_b"))[0] == [5, 8, 11]  # blocks 6/9/12
    assert promise_plan.feature_blocks(backbone_spec("vit_l"))[0] == [11, 17, 23]
    assert promise_plan.feature_blocks(backbone_spec("litemedsam"))[0] == [1, 2, 3]
    assert promise_plan.prompt_output(backbone_spec("vit_b"))[0] == "points"
    fp = load_json(prepared["root"] / "SAMPLAN_PREPROCESSED" / prepared["png"].name / "fingerprint.json")
    base = {k: v for k, v in prepared["plans_png"].items() if k != "methods"}
    gpu = promise_plan.plan_section(fp, base, ComputeBudget.for_device("cuda"), load_json(prepared["png"] / "dataset.json"))
    assert gpu.image_augmentation is True
    assert gpu.recipe.optimizer.lr == 1e-5 and gpu.recipe.ips_lr_scale == 1.0
    # another backbone than the planned one gets its own blocks and prompt type
    mp = bind(get_method("promise"), tiny_plans(prepared["plans_png"]))
    assert mp.section.apm.feature_blocks == [1, 2, 3] and mp.section.prompt.output == "points"


def test_sam_is_frozen_and_one_step_changes_only_apm_and_ips(prepared):
    plans = tiny_plans(prepared["plans_png"], recipe={"optimizer": {"lr": 1e-3}})
    mp, net = _network(plans)
    method = get_method("promise")
    assert all(not p.requires_grad for p in net.sam.parameters())
    recipe = method.training_recipe(mp, None)
    opt = recipe.make_optimizer(recipe.param_groups(net))  # as the trainer builds it
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    new = {id(p) for m in (net.apm, net.ips) for p in m.parameters()}
    ids = {m: {id(p) for p in getattr(net, m).parameters()} for m in ("apm", "ips")}
    lrs = {m: [g["lr"] for g in opt.param_groups if {id(p) for p in g["params"]} <= ids[m]] for m in ids}
    assert lrs == {"apm": [1e-3], "ips": [pytest.approx(1e-5)]}  # the IPS at the planned share of the APM's rate
    assert in_opt == new and not in_opt & {id(p) for p in net.sam.parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    assert not net.sam.training  # the frozen SAM stays in eval mode
    out = method.train_step(net, _whole_slice_batch(prepared, "png"), recipe, opt, CPU, mp)
    assert np.isfinite(out["loss"])
    after = net.state_dict()
    changed = {k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])}
    assert any(k.startswith("apm.head.") for k in changed) and any(k.startswith("apm.reduce.") for k in changed)
    assert any(k.startswith("ips.") for k in changed)
    assert not [k for k in changed if k.startswith("sam.")]


def test_decoding_with_zero_shift_equals_sams_decoder(prepared):
    _, net = _network(tiny_plans(prepared["plans_png"]))
    torch.manual_seed(3)
    pe = net.sam.prompt_encoder
    emb = torch.randn(2, pe.embed_dim, *pe.image_embedding_size)
    boxes = torch.tensor([[10.0, 20.0, 120.0, 200.0], [50.0, 5.0, 90.0, 60.0]])
    sparse, dense = pe(points=None, boxes=boxes, masks=None)
    with torch.no_grad():
        ours, iou = decode_shifted(net.sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense, None)
        for i in range(2):
            ref, ref_iou = net.sam.mask_decoder.predict_masks(emb[i:i + 1], pe.get_dense_pe(), sparse[i:i + 1],
                                                              dense[i:i + 1])
            assert torch.allclose(ours[i:i + 1], ref, atol=1e-4) and torch.allclose(iou[i:i + 1], ref_iou, atol=1e-5)
        shifted, _ = decode_shifted(net.sam.mask_decoder, emb, pe.get_dense_pe(), sparse, dense,
                                    torch.ones(2, net.sam.mask_decoder.num_mask_tokens, pe.embed_dim))
    assert not torch.allclose(shifted, ours, atol=1e-3)


@pytest.mark.parametrize("mode", ["apm", "apm_ips", "ips_oracle"])
def test_each_mode_builds_its_modules_and_predicts(prepared, mode):
    plans = tiny_plans(prepared["plans_3d"], mode=mode)
    mp, net = _network(plans, num_outputs=3)
    method = get_method("promise")
    assert (net.apm is None) == (mode == "ips_oracle") and (net.ips is None) == (mode == "apm")
    assert (method.missing_prompts_error(mp) is not None) == (mode == "ips_oracle")
    assert method.validation_prompt_strategy(mp) == ("oracle" if mode == "ips_oracle" else None)
    data = torch.randn(1, 4, 30, 26)
    reference = np.zeros((4, 30, 26), np.uint8)
    reference[1, 8:20, 6:18] = 1
    reference[2, 10:14, 10:14] = 2
    if mode == "ips_oracle":
        with pytest.raises(SamplanError, match="reference-dir"):
            predict_case(net, data, mp.section, CPU)
    out = predict_case(net, data, mp.section, CPU, reference=reference)
    assert out.shape == (3, 4, 30, 26) and bool((out[0] == 0).all())
    if mode == "ips_oracle":  # the oracle knows where each label is absent
        assert bool((out[1, [0, 3]] == ABSENT_LOGIT).all()) and bool((out[2, [0, 1, 3]] == ABSENT_LOGIT).all())


def test_feature_cache_encodes_each_slice_once_and_keys_on_the_weights(prepared, tmp_path):
    mp, net = _network(tiny_plans(prepared["plans_png"]))
    getattr(net, WEIGHTS_BUFFER).copy_(torch.arange(32, dtype=torch.uint8))
    slices = _whole_slice_batch(prepared, "png", n=3)["data"]
    store = FeatureStore(tmp_path / "features")
    emb, feat = store.get(net, slices, mp.section, CPU)
    assert store.encoded == 3 and len(list((tmp_path / "features").glob("*.pt"))) == len({s.numpy().tobytes() for s in slices})
    live_emb, live_feat = encode_slices(net, slices, mp.section, CPU)
    assert feat.shape == live_feat.shape and feat.shape[1] == 3 * 64  # three tiny-ViT blocks of width 64
    assert torch.allclose(emb, live_emb, atol=2e-3, rtol=1e-3) and torch.allclose(feat, live_feat, atol=2e-3, rtol=1e-3)
    again = FeatureStore(tmp_path / "features")
    emb2, feat2 = again.get(net, slices, mp.section, CPU)
    assert again.encoded == 0 and again.cache.hits == 3 and torch.equal(emb2, emb) and torch.equal(feat2, feat)
    getattr(net, WEIGHTS_BUFFER).copy_(torch.arange(32, 64, dtype=torch.uint8))  # other SAM weights: no reuse
    other = FeatureStore(tmp_path / "features")
    other.get(net, slices[:1], mp.section, CPU)
    assert other.encoded == 1


def test_opening_removes_specks_and_thin_lines_and_keeps_blobs():
    m = np.zeros((40, 40), bool)
    m[5:20, 5:20] = True  # a blob
    m[30, 5:35] = True  # a one-pixel line
    m[35:37, 35:37] = True  # a 2x2 speck
    out = opening(m, 5)
    assert out[5:20, 5:20].all() and not out[30].any() and not out[35:37, 35:37].any()
    assert np.array_equal(opening(m, 1), m)


def test_training_and_prediction_on_pngs_and_volumes_need_no_prompt(prepared, tmp_path):
    import SimpleITK as sitk
    from PIL import Image

    from samplan.cli import predict as predict_cli

    ds = prepared["png"]
    features = prepared["root"] / "SAMPLAN_PREPROCESSED" / ds.name / "promise_features"
    earlier = set(features.glob("*.pt"))  # other tests' networks
    fold_dir = train_fold(ds.name, "promise", "2d", 0, epochs=2, iters_per_epoch=2, val_iters=1, num_workers=0,
                          precision="fp32", method_overrides={**TINY, "recipe": {"optimizer": {"lr": 1e-3}}})
    log = (fold_dir / "training_log.txt").read_text()
    assert "SAM parameters frozen" in log and "trainable (apm, ips)" in log
    assert load_json(fold_dir / "progress.json")["train_loss"]
    assert len(set(features.glob("*.pt")) - earlier) == 5  # every training and validation image encoded once
    summary = load_json(fold_dir / "validation" / "summary.json")
    assert summary["metric_per_case"] and not (summary.get("prompts") or {}).get("oracle")
    out = tmp_path / "png"
    assert predict_cli.main(["-i", str(ds / "imagesTr"), "-o", str(out), "-d", ds.name, "-m", "promise", "-f", "0",
                             "--device", "cpu"]) == 0
    for lab in sorted((ds / "labelsTr").glob("*.png")):
        pred = np.asarray(Image.open(out / lab.name))
        assert pred.shape == np.asarray(Image.open(lab)).shape and set(np.unique(pred)) <= {0, 1}

    vol = prepared["3d"]
    train_fold(vol.name, "promise", "2d", 0, epochs=1, iters_per_epoch=1, val_iters=1, num_workers=0,
               precision="fp32", method_overrides=TINY, final_validation=False)
    out = tmp_path / "vol"
    assert predict_cli.main(["-i", str(vol / "imagesTr"), "-o", str(out), "-d", vol.name, "-m", "promise", "-f", "0",
                             "--device", "cpu"]) == 0
    for lab in sorted((vol / "labelsTr").glob("*.nii.gz")):
        ref, pred = sitk.ReadImage(str(lab)), sitk.ReadImage(str(out / lab.name))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert np.allclose(pred.GetOrigin(), ref.GetOrigin()) and np.allclose(pred.GetDirection(), ref.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def test_two_gloo_processes_train_promise(prepared):
    # 2 slices per rank: the APM head's BatchNorm needs more than one (SyncBatchNorm, on CUDA only, would not)
    check_two_process_training(prepared["png"].name, "promise", "2d", {**TINY, "batch_size": 4})


def test_ips_oracle_validation_is_marked_as_an_oracle(prepared):
    vol = prepared["3d"]
    fold_dir = train_fold(vol.name, "promise", "2d", 1, epochs=1, iters_per_epoch=1, val_iters=1, num_workers=0,
                          precision="fp32", method_overrides={**TINY, "mode": "ips_oracle"})
    summary = load_json(fold_dir / "validation" / "summary.json")
    assert summary["prompts"]["oracle"] is True and summary["metric_per_case"]


def test_mode_flag_reaches_the_method_overrides_and_is_refused_elsewhere(monkeypatch, capsys):
    import samplan.pipeline.train as trainer
    from samplan.cli import train as cli

    seen = {}
    monkeypatch.setattr(trainer, "train_fold", lambda *a, **k: seen.update(k))
    assert cli.main(["-d", "510", "-m", "promise", "-f", "0", "--mode", "apm"]) == 0
    assert seen["method_overrides"] == {"mode": "apm"}
    seen.clear()
    assert cli.main(["-d", "510", "-m", "medsam", "-f", "0", "--mode", "apm"]) == 2
    assert not seen and "--mode is a promise option" in capsys.readouterr().err


def test_box_term_pulls_the_regressed_box_towards_the_tight_box():
    from samplan.methods.promise.train import PromiseLoss, tight_boxes

    target = torch.zeros(1, 1, 64, 64)
    target[0, 0, 10:20, 30:50] = 1
    assert tight_boxes(target[:, 0]).tolist() == [[30.0, 10.0, 49.0, 19.0]]
    logits = torch.zeros(1, 1, 64, 64)
    loss = PromiseLoss(1.0, 1.0, 1.0, weight_box=1.0)
    exact = loss(logits, target, None, {"box": torch.tensor([[[30.0, 10.0, 49.0, 19.0]]])})
    off = loss(logits, target, None, {"box": torch.tensor([[[0.0, 0.0, 63.0, 63.0]]])})
    assert torch.isclose(exact, PromiseLoss(1.0, 1.0, 1.0)(logits, target, None)) and off > exact + 0.2


def test_soft_box_reads_the_extent_of_a_known_map_and_passes_gradients():
    from samplan.methods.promise.network import soft_box

    prob = torch.zeros(2, 1, 16, 24)
    prob[0, 0, 3:9, 5:12] = 1.0  # rows 3..8, columns 5..11
    prob[1, 0, 3:9, 5:12] = 0.01  # the same shape, faint: still its extent (presence decides whether it counts)
    box = soft_box(prob)
    assert box[0, 0].tolist() == [5.0, 3.0, 12.0, 9.0]  # x0, y0 at the first occupied cell, x1, y1 past the last
    assert torch.allclose(box[1, 0], box[0, 0])
    flat = torch.full((1, 16, 24), 0.05)
    assert soft_box(flat)[0].tolist() == [0.0, 0.0, 24.0, 16.0]  # a flat map: the whole grid
    blob = torch.full((1, 16, 24), 0.1)
    blob[0, 6:10, 8:14] = 0.9
    blob.requires_grad_(True)
    b = soft_box(blob)
    assert 4.0 < b[0, 0].item() < 8.0 and 14.0 < b[0, 2].item() < 19.0  # soft: background widens it a little
    b[0, 0].backward()
    assert blob.grad is not None and bool(blob.grad.abs().sum() > 0)


def test_box_prompts_come_from_a_trained_heatmap(prepared):
    """A box-trained backbone gets the heatmap readout; one step trains the heatmap and the convolutions under it
    (no SAM weight), and the box SAM receives is the heatmap's soft extent."""
    from samplan.methods.promise.network import soft_box
    from samplan.methods.promise.train import PromiseLoss

    s = prepared["plans_png"]["methods"]["promise"]
    assert s["apm"]["readout"] == "heatmap" and s["recipe"]["loss"]["weight_heatmap"] == 1.0
    assert promise_plan.apm_readout(promise_plan.prompt_output(backbone_spec("vit_b"))[0])[0] == "regression"
    plans = tiny_plans(prepared["plans_png"], backbone="tiny_litemedsam", recipe={"optimizer": {"lr": 1e-3}})
    mp, net = _network(plans)
    assert mp.section.apm.readout == "heatmap" and mp.section.prompt.output == "box"
    assert net.apm.n_values == 1  # the linear layer regresses the presence logit only
    method = get_method("promise")
    recipe = method.training_recipe(mp, None)
    opt = recipe.make_optimizer(net.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    out = method.train_step(net, _whole_slice_batch(prepared, "png"), recipe, opt, CPU, mp)
    assert np.isfinite(out["loss"])
    changed = {k for k, v in net.state_dict().items() if v.dtype.is_floating_point and not torch.equal(before[k], v)}
    assert {"apm.heatmap.weight", "apm.heatmap.bias"} <= changed and any(k.startswith("apm.reduce.") for k in changed)
    assert not [k for k in changed if k.startswith("sam.")]
    net.eval()
    with torch.no_grad():
        emb, feats = net.encode(torch.randn(2, 3, mp.section.input_size, mp.section.input_size))
        prompts, _ = net.regressed_prompts(feats)
        heat = prompts["heatmap"]
        cells = soft_box(torch.sigmoid(heat)) * (mp.section.input_size / heat.shape[-1])
        expect = torch.stack([cells[..., [0, 2]].amin(-1), cells[..., [1, 3]].amin(-1),
                              cells[..., [0, 2]].amax(-1), cells[..., [1, 3]].amax(-1)], -1)
    assert torch.allclose(prompts["box"], expect)
    # the heatmap term: a map matching the target's cells costs less than a flat one
    target = torch.zeros(1, 1, 64, 64)
    target[0, 0, 16:32, 8:40] = 1
    match = torch.full((1, 1, 16, 16), -8.0)
    match[0, 0, 4:8, 2:10] = 8.0
    loss = PromiseLoss(0.0, 0.0, 0.0, weight_heatmap=1.0)
    logits = torch.zeros(1, 1, 64, 64)
    assert loss(logits, target, None, {"heatmap": match}) + 0.5 < loss(logits, target, None,
                                                                        {"heatmap": torch.zeros(1, 1, 16, 16)})
    hand_edited = copy.deepcopy(prepared["plans_png"])  # the planned backbone, points asked for by hand
    hand_edited["methods"]["promise"]["prompt"]["output"] = "points"
    with pytest.raises(SamplanError, match="apm.readout"):
        _network(hand_edited)
