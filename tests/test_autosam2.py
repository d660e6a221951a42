"""autosam2 (AutoSAM2): slice selection, prompts from probability maps, fusion, gradient flow into the mapper and the
bridge through SAM (segment-anything and SAM2 models), regions, the plan's slice fraction, and training plus
prediction through the CLI in the input geometry."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from samplan.errors import SamplanError
from samplan.experiment_planning.budget import ComputeBudget
from samplan.methods import get_method
from samplan.methods.autosam2 import plan as autosam2_plan
from samplan.methods.autosam2.fusion import fuse, probabilities_to_logits
from samplan.methods.autosam2.network import build_autosam2, feature_slices
from samplan.methods.autosam2.predict import predict_case, sliding_window
from samplan.methods.autosam2.slices import select_slices
from samplan.methods.autosam2.train import run_branch, step
from samplan.prompts.from_probabilities import ProbabilityPromptSettings, prompts_from_probabilities
from samplan.pipeline.train import train_fold
from samplan.training.trainer import merge_overrides
from samplan.utils import load_json
from method_plans import bind
from ddp_check import check_two_process_training
from synthetic import make_dataset_2d_png, make_dataset_3d

TINY = {"backbone": "tiny_litemedsam", "checkpoint": "none", "unet": {"features": [4, 8, 8, 8, 8]},
        "branch": {"bridge_width": 8}, "slice_fraction": 0.6}
CPU = torch.device("cpu")


def _with_regions(ds) -> None:
    """Turn the synthetic labels into BraTS-like nested regions and name the channels (not in dataset order)."""
    meta = json.loads((ds / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole": [1, 2], "core": [2]}
    meta["regions_class_order"] = [1, 2]
    meta["channel_names"] = {"0": "T1c", "1": "FLAIR"}
    (ds / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Synthetic 3D MR with two labels, and a two-channel variant with regions, planned and preprocessed (3d_fullres)."""
    from conftest import plan_quickly, samplan_dirs

    with samplan_dirs(tmp_path_factory.mktemp("autosam2")) as root:
        labels = make_dataset_3d(root / "SAMPLAN_RAW", n_cases=5)
        regions = make_dataset_3d(root / "SAMPLAN_RAW", name="Dataset902_Regions", n_cases=3, n_channels=2, seed=1)
        _with_regions(regions)
        out = {"root": root, "labels": labels, "regions": regions}
        for key in ("labels", "regions"):
            out[f"plans_{key}"] = load_json(plan_quickly(out[key], ["autosam2"], ["3d_fullres"]) / "plans.json")
        yield out


def tiny_plans(plans: dict, **overrides) -> dict:
    """A copy of `plans` whose autosam2 section uses a tiny random SAM and a narrow U-Net (plus `overrides`)."""
    p = copy.deepcopy(plans)
    p["methods"]["autosam2"] = merge_overrides(p["methods"]["autosam2"], {**TINY, **overrides})
    return p


def confident_network(plans: dict, in_channels: int, num_outputs: int, seed: int = 0):
    """A tiny network whose U-Net calls everything foreground (label 1, or every region), so every planned slice has
    a prompt: the branch runs whatever the random weights."""
    mp = bind(get_method("autosam2"), plans)
    torch.manual_seed(seed)
    net = build_autosam2(mp.section, in_channels, num_outputs)
    with torch.no_grad():
        net.unet.head.weight.zero_()
        net.unet.head.bias.copy_(torch.tensor([-4.0, 4.0] + [-4.0] * (num_outputs - 2)) if not mp.section.regions
                                 else torch.full((num_outputs,), 4.0))
    return mp, net


def _batch(shape=(2, 1, 12, 40, 32), num_classes=3, regions=0, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(shape, generator=g)
    if regions:
        target = (torch.rand((shape[0], regions, *shape[2:]), generator=g) > 0.5).float()
    else:
        target = torch.randint(0, num_classes, (shape[0], 1, *shape[2:]), generator=g)
    return {"data": data, "target": target}


# --- slice selection ---------------------------------------------------------------------------------------------

def test_slice_selection_spreads_over_the_bands_and_returns_exactly_n():
    chosen = select_slices(155, 0.6)
    assert len(chosen) == 93 == len(set(chosen)) and chosen == sorted(chosen)
    frac = np.asarray(chosen) / 155
    centre = np.sum((frac >= 0.4) & (frac < 0.6))
    middle = np.sum(((frac >= 0.2) & (frac < 0.4)) | ((frac >= 0.6) & (frac < 0.8)))
    assert centre == 31  # the centre band has 31 slices: all taken, the rest of its half goes nearest the centre
    assert middle >= 0.3 * 93 - 1
    small = select_slices(100, 0.3)
    f = np.asarray(small) / 100
    assert len(small) == 30
    assert np.sum((f >= 0.4) & (f < 0.6)) == 15 and np.sum((f < 0.2) | (f >= 0.8)) == 6


@pytest.mark.parametrize("depth", range(1, 40))
def test_any_depth_and_fraction_gives_distinct_slices_and_zero_gives_none(depth):
    for fraction in (0.0, 0.1, 0.3, 0.6, 1.0):
        chosen = select_slices(depth, fraction)
        assert len(chosen) == len(set(chosen)) == int(np.floor(fraction * depth + 0.5))
        assert all(0 <= z < depth for z in chosen)
    assert select_slices(depth, 0.0) == []


# --- prompts from a probability map --------------------------------------------------------------------------------

def test_prompts_from_a_known_probability_map():
    yy, xx = np.mgrid[:64, :80]
    disc = (yy - 30) ** 2 + (xx - 40) ** 2 <= 12 ** 2
    prob = np.where(disc, 0.9, 0.05).astype(np.float32)
    s = ProbabilityPromptSettings()
    p = prompts_from_probabilities(prob, s)
    pos, neg = p.points[p.point_labels == 1], p.points[p.point_labels == 0]
    assert len(pos) == s.num_positive and len(neg) == s.num_negative and not p.oracle
    assert all(disc[int(y), int(x)] for x, y in pos)
    assert np.hypot(*(pos[0] - [40, 30])) <= 1.5  # deepest inside first: the centre
    assert min(np.hypot(*(a - b)) for i, a in enumerate(pos) for b in pos[i + 1:]) >= s.positive_spacing_px
    for x, y in neg:  # in the ring just outside the object, where the probability is low
        d = np.hypot(x - 40, y - 30)
        assert 12 < d <= 12 + s.negative_ring_px + 1 and prob[int(y), int(x)] < s.negative_threshold
    # tight box [28, 18, 52, 42], dilated by 3 and padded by max(5, 10% of 31) = 5
    assert p.box.tolist() == [20.0, 10.0, 60.0, 50.0]
    assert prompts_from_probabilities(np.where(yy * 80 + xx < 5, 0.9, 0.0), s) is None  # under min_pixels


def test_box_only_settings_and_empty_map():
    prob = np.zeros((32, 32), np.float32)
    prob[10:20, 5:12] = 0.8
    p = prompts_from_probabilities(prob, ProbabilityPromptSettings(points=False, box_dilation_px=0))
    assert len(p.points) == 0 and p.box.tolist() == [0.0, 5.0, 16.0, 24.0]
    assert prompts_from_probabilities(np.zeros((32, 32)), ProbabilityPromptSettings()) is None


# --- fusion --------------------------------------------------------------------------------------------------------

def test_fusion_of_regions_blends_prompted_outputs_only():
    u = torch.rand(2, 3, 8, 8)
    s = torch.rand(2, 3, 8, 8)
    prompted = torch.tensor([[True, False, True], [False, False, False]])
    f = fuse(u, s, prompted, True, background_weight=0.9, tumour_weight=0.25)
    assert torch.allclose(f[0, 0], 0.75 * u[0, 0] + 0.25 * s[0, 0]) and torch.equal(f[0, 1], u[0, 1])
    assert torch.equal(f[1], u[1])
    assert torch.allclose(torch.sigmoid(probabilities_to_logits(f, True)), f, atol=1e-5)


def test_fusion_of_labels_is_a_distribution_and_follows_the_weights():
    u = torch.softmax(torch.randn(3, 3, 6, 6), 1)
    s = torch.rand(3, 2, 6, 6)
    prompted = torch.tensor([[True, True], [True, False], [False, False]])
    f = fuse(u, s, prompted, False, 0.5, 0.5)
    assert torch.allclose(f.sum(1), torch.ones(3, 6, 6), atol=1e-5)
    assert torch.equal(f[2], u[2])  # no prompted output: the U-Net's slice unchanged
    assert torch.allclose(fuse(u, s, prompted, False, 0.0, 0.0), u, atol=1e-6)  # SAM's share 0: the U-Net
    sure = fuse(u, torch.ones(3, 2, 6, 6) * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), prompted, False, 1.0, 1.0)
    assert torch.all(sure[:2].argmax(1) == 1)  # SAM alone and sure of label 1: label 1 wins
    assert torch.allclose(torch.softmax(probabilities_to_logits(f, False), 1), f, atol=1e-5)


# --- the network: gradients reach the mapper and the bridge ---------------------------------------------------------

@pytest.mark.parametrize("backbone", ["tiny_litemedsam", "tiny_sam2"])
def test_one_step_changes_mapper_bridge_and_unet_and_no_frozen_sam_weight(prepared, backbone):
    plans = tiny_plans(prepared["plans_labels"], backbone=backbone)
    mp, net = confident_network(plans, 1, 3)
    assert set(mp.section.frozen_modules) == {"image_encoder", "prompt_encoder"}
    lm = get_method("autosam2")
    recipe = lm.training_recipe(mp, _label_manager(prepared["labels"]))
    opt = recipe.make_optimizer(net.parameters())
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net.train()
    out = step(net, _batch(), recipe, CPU, mp.section, optimizer=opt)
    assert out["sam_slices"] == 2  # the CPU cap of the plan
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    for module in ("mapper", "bridge"):  # every parameter of both, the first conv of the mapper included
        names = {n for n, _ in net.named_parameters() if n.startswith(module + ".")}
        assert names and names <= changed, sorted(names - changed)
    assert any(n.startswith("unet.") for n in changed)
    for part in ("image_encoder", "prompt_encoder"):
        prefix = "sam.model." + net.sam.parts[part] + "."
        assert not any(n.startswith(prefix) for n in changed)
    decoder = "sam.model." + net.sam.parts["mask_decoder"] + "."
    assert any(n.startswith(decoder) for n in changed)  # planned trainable


@pytest.mark.parametrize("trains_unet", [False, True])
def test_gradient_reaches_the_mapper_through_a_fully_frozen_sam(prepared, trains_unet):
    plans = tiny_plans(prepared["plans_labels"], frozen_modules=["image_encoder", "prompt_encoder", "mask_decoder"],
                       branch={"bridge_trains_unet": trains_unet})
    mp, net = confident_network(plans, 1, 3)
    assert not any(p.requires_grad for p in net.sam.parameters())
    net.train()
    batch = _batch()
    logits, features = net.unet(batch["data"])
    branch = run_branch(net, batch["data"], logits, features, mp.section, False)
    branch.logits.sum().backward()
    assert net.mapper.features[0][0].weight.grad.abs().sum() > 0
    assert net.bridge.body[0].weight.grad.abs().sum() > 0
    unet_grad = net.unet.up[1].body[0].weight.grad
    # the planned default: SAM's loss does not reach the U-Net; with bridge_trains_unet it does, through the bridge
    assert (unet_grad is not None and unet_grad.abs().sum() > 0) == trains_unet
    assert all(p.grad is None for p in net.sam.parameters())


def test_sam_parts_learn_at_the_planned_fraction_of_the_learning_rate(prepared):
    mp, net = confident_network(tiny_plans(prepared["plans_labels"]), 1, 3)
    recipe = get_method("autosam2").training_recipe(mp, _label_manager(prepared["labels"]))
    opt = recipe.make_optimizer(recipe.param_groups(net))
    new, sam = opt.param_groups
    decoder = {id(p) for p in net.sam.part("mask_decoder").parameters()}
    assert {id(p) for p in sam["params"]} == decoder  # the frozen encoders never reach the optimiser
    assert sam["lr"] == pytest.approx(new["lr"] * mp.section.recipe.sam_lr_scale) and mp.section.recipe.sam_lr_scale == 0.1
    assert {id(p) for p in net.mapper.parameters()} <= {id(p) for p in new["params"]}


def test_the_mapper_starts_from_the_planned_channels_image(prepared):
    plans = tiny_plans(prepared["plans_regions"])
    mp, net = confident_network(plans, 2, 2)
    assert mp.section.channels.names == ["T1c", "FLAIR"] and mp.section.regions
    x = torch.randn(3, 2, 20, 24)
    from samplan.methods.sam_common.slice_input import to_unit_range

    start = to_unit_range(x, mp.section.intensity.per_channel)[:, mp.section.channels.start_rgb_from_channels]
    with torch.no_grad():
        rgb = net.mapper(x, start)
    assert torch.allclose(rgb, start.clamp(1e-3, 1 - 1e-3), atol=0.02)


def test_feature_slices_interpolate_along_the_pooled_axis():
    f = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(2, 3, 4, 2, 2).contiguous()
    out = feature_slices(f, torch.tensor([0, 1]), torch.tensor([0, 5]), depth=8)
    # slice 5 of 8 sits at position (5.5 * 4 / 8) - 0.5 = 2.25 of the 4 pooled slices
    assert torch.allclose(out[0], torch.zeros(3, 2, 2)) and torch.allclose(out[1], torch.full((3, 2, 2), 2.25))


# --- regions -------------------------------------------------------------------------------------------------------

def test_regions_train_on_region_masks_and_predict_region_logits(prepared):
    plans = tiny_plans(prepared["plans_regions"])
    mp, net = confident_network(plans, 2, 2)
    lm = _label_manager(prepared["regions"])
    assert lm.has_regions and lm.regions == ((1, 2), (2,))
    assert mp.section.outputs == ["[1, 2]", "[2]"]
    recipe = get_method("autosam2").training_recipe(mp, lm)
    opt = recipe.make_optimizer(net.parameters())
    batch = _batch((1, 2, 12, 40, 32), regions=2)
    net.train()
    assert step(net, batch, recipe, CPU, mp.section, optimizer=opt)["sam_slices"] == 2
    net.eval()
    with torch.no_grad():
        val = step(net, batch, recipe, CPU, mp.section, label_manager=lm)
        assert len(val["tp"]) == 2
        logits = predict_case(net, torch.randn(2, 14, 30, 28), mp.section, [12, 24, 24], True, CPU)
    assert logits.shape == (2, 14, 30, 28) and torch.isfinite(logits).all()


# --- prediction ----------------------------------------------------------------------------------------------------

def test_sliding_window_features_equal_a_single_pass_when_one_window_covers_the_volume(prepared):
    plans = tiny_plans(prepared["plans_labels"])
    mp, net = confident_network(plans, 1, 3)
    net.eval()
    data = torch.randn(1, 12, 40, 32)
    chosen = select_slices(12, 0.6)
    logits, feats = sliding_window(net, data, (12, 40, 32), chosen, (), CPU)
    with torch.no_grad():
        ref_logits, ref_feats = net.unet(data[None])
        ref = feature_slices(ref_feats, torch.zeros(len(chosen), dtype=torch.long), torch.tensor(chosen), 12)
        ref = torch.nn.functional.interpolate(ref, size=(40, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(logits, ref_logits[0], atol=1e-4) and torch.allclose(feats, ref, atol=1e-4)


def test_prediction_refines_only_planned_slices(prepared):
    plans = tiny_plans(prepared["plans_labels"], slice_fraction=0.3)
    mp, net = confident_network(plans, 1, 3)
    net.eval()
    data = torch.randn(1, 20, 40, 32)
    with torch.no_grad():
        fused = predict_case(net, data, mp.section, [12, 40, 32], False, CPU)
        unet_only = predict_case(net, data, mp.section.replace(slice_fraction=0.0), [12, 40, 32], False, CPU)
    p_fused, p_unet = torch.softmax(fused, 0), torch.softmax(unet_only, 0)
    chosen = select_slices(20, 0.3)
    differs = [z for z in range(20) if not torch.allclose(p_fused[:, z], p_unet[:, z], atol=1e-5)]
    assert differs == chosen


# --- the plan ------------------------------------------------------------------------------------------------------

def test_plan_chooses_backbone_fraction_and_prompts_from_data_and_budget(prepared):
    plans = prepared["plans_labels"]
    s = plans["methods"]["autosam2"]
    assert s["backbone"] == "litemedsam" and s["prompt"]["output"] == "box" and s["max_sam_slices_per_step"] == 2
    assert s["unet"]["features"] == [16, 32, 64, 128, 128] and s["unet"]["dropout"] == 0.15
    assert s["recipe"]["loss"]["weight_dice"] == 0.7 and s["recipe"]["loss"]["weight_bce"] == 0.3
    assert s["recipe"]["optimizer"]["name"] == "AdamW" and s["recipe"]["lr_schedule"]["name"] == "one_cycle"
    assert s["recipe"]["grad_clip"] == 1.0 and s["fusion"] == {"background_weight": 0.5, "tumour_weight": 0.5}
    # the synthetic axis 0 has 3 mm slices; the plan pools it only where the base 3D topology does
    strides = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"]
    assert s["unet"]["pool_strides"][: len(strides) - 1] == strides[1:5]
    fp = load_json(prepared["root"] / "SAMPLAN_PREPROCESSED" / prepared["labels"].name / "fingerprint.json")
    base = {k: v for k, v in plans.items() if k != "methods"}
    dj = load_json(prepared["labels"] / "dataset.json")
    gpu = autosam2_plan.plan_section(fp, base, ComputeBudget.for_device("cuda"), dj)
    assert gpu.backbone == "sam2_hiera_s" and gpu.prompt.output == "points+box" and gpu.max_sam_slices_per_step is None
    cpu = autosam2_plan.plan_section(fp, base, ComputeBudget(), dj)
    assert cpu.slice_fraction <= 0.3 and "foreground" in cpu.slice_fraction_reason
    tiny = copy.deepcopy(fp)  # objects far too small on SAM's input: U-Net only
    for entry in tiny["label_statistics"]["per_label"].values():
        if entry.get("inplane_extent_pixels"):
            entry["inplane_extent_pixels"]["p95"] = [0.5, 0.5]
    assert autosam2_plan.plan_section(tiny, base, ComputeBudget(), dj).slice_fraction == 0.0


def test_a_2d_dataset_leaves_autosam2_out_and_refuses_it_by_name(samplan_env, capsys):
    from conftest import plan_quickly

    raw = make_dataset_2d_png(samplan_env["SAMPLAN_RAW"], n_cases=3)
    plans = load_json(plan_quickly(raw, None, ["2d"], plan_only=True) / "plans.json")
    assert "autosam2" not in plans["methods"] and "promise" in plans["methods"]
    assert "not planning autosam2" in capsys.readouterr().out
    with pytest.raises(SamplanError, match="needs 3D data"):
        plan_quickly(raw, ["autosam2"], ["2d"], plan_only=True)


def test_a_bad_frozen_part_is_refused_before_anything_is_built(prepared):
    plans = tiny_plans(prepared["plans_labels"], frozen_modules=["image_encoder", "neck"])
    with pytest.raises(SamplanError, match="frozen_modules"):
        bind(get_method("autosam2"), plans)


# --- the CLI -------------------------------------------------------------------------------------------------------

def test_two_gloo_processes_train_autosam2(prepared):
    check_two_process_training(prepared["labels"].name, "autosam2", None, TINY)


def test_training_and_prediction_through_the_cli_in_the_input_geometry(prepared, tmp_path):
    import SimpleITK as sitk

    from samplan.cli import predict as predict_cli

    ds = prepared["labels"]
    fold_dir = train_fold(ds.name, "autosam2", None, 0, epochs=2, iters_per_epoch=2, val_iters=1, num_workers=0,
                          precision="fp32", method_overrides=TINY)
    log = (fold_dir / "training_log.txt").read_text()
    assert "SAM branch tiny_litemedsam" in log and "frozen image_encoder, prompt_encoder" in log
    assert len(load_json(fold_dir / "progress.json")["train_loss"]) == 2
    assert load_json(fold_dir / "validation" / "summary.json")["metric_per_case"]
    out = tmp_path / "pred"
    assert predict_cli.main(["-i", str(ds / "imagesTr"), "-o", str(out), "-d", ds.name, "-m", "autosam2", "-f", "0",
                             "--device", "cpu", "--disable-tta"]) == 0
    for lab in sorted((ds / "labelsTr").glob("*.nii.gz")):
        ref, pred = sitk.ReadImage(str(lab)), sitk.ReadImage(str(out / lab.name))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert np.allclose(pred.GetOrigin(), ref.GetOrigin()) and np.allclose(pred.GetDirection(), ref.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


def _label_manager(ds):
    from samplan.dataset.labels import LabelManager

    return LabelManager.from_dataset_json(load_json(ds / "dataset.json"))


def test_one_cycle_schedule_rises_to_the_peak_falls_to_the_end_and_resumes():
    from samplan.engine.optim import OneCycleLRScheduler

    def run(epochs: int, state=None, steps: int | None = None):
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = OneCycleLRScheduler(opt, epochs, pct_start=0.4, div_factor=10, final_div_factor=400)
        if state is not None:
            sched.load_state_dict(state)
        lrs = []
        for _ in range(epochs if steps is None else steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs, sched.state_dict()

    lrs, _ = run(11)
    assert lrs[0] == pytest.approx(1e-4) and lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-3 / 4000)
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5])) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    first, state = run(11, steps=6)
    rest, _ = run(11, state=state, steps=5)
    assert first + rest == pytest.approx(lrs)  # a continued run follows the same curve
