"""samunetr: the UNETR decoder, the slice adapter, pretrained-encoder loading, training and prediction end to end."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import copy_shared_subset
from samplan.cli.predict import main as predict_main
from samplan.errors import SamplanError
from samplan.pipeline.planning import plan_and_preprocess
from samplan.methods import get_method
from samplan.methods.samunetr.network import keep_largest_component, largest_component_logits
from samplan.models.backbones import backbone_spec, build_image_encoder
from samplan.models.position_embedding import resize_pos_embed
from samplan.models.unetr_decoder import UNETRDecoder, feature_block_indexes
from samplan.models.weights import save_backbone_checkpoint
from samplan.paths import preprocessed_root
from samplan.pipeline.train import train_fold
from samplan.utils import load_json
from method_plans import bind
from ddp_check import check_two_process_training
from synthetic import make_dataset_3d

DATASET = "Dataset900_Synth"
TINY = {"backbone": "tiny_vit", "checkpoint": "none", "batch_size": 4}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """6 synthetic cases (two labels, 12 x 40 x 36) planned and preprocessed once, 2d configuration only."""
    root = tmp_path_factory.mktemp("samunetr")
    dirs = {v: root / v for v in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED")}
    with pytest.MonkeyPatch.context() as mp:
        for var, d in dirs.items():
            d.mkdir()
            mp.setenv(var, str(d))
        mp.setenv("SAMPLAN_RESULTS", str(root / "unused"))
        make_dataset_3d(dirs["SAMPLAN_RAW"], n_cases=6)
        out = plan_and_preprocess(DATASET, num_processes=1, configurations=["2d"])
    return dirs, load_json(out / "plans.json")


@pytest.fixture
def env(prepared, tmp_path, monkeypatch):
    """The prepared folders, a fresh results folder, and the plans with the tiny backbone merged in."""
    dirs, plans = prepared
    for var, d in dirs.items():
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("SAMPLAN_RESULTS", str(tmp_path / "results"))
    plans = copy.deepcopy(plans)
    plans["methods"]["samunetr"].update(TINY)
    return plans


def test_feature_blocks_are_the_global_attention_blocks():
    assert feature_block_indexes(12, [2, 5, 8, 11]) == [2, 5, 8, 11]
    assert feature_block_indexes(24, [5, 11, 17, 23]) == [5, 11, 17, 23]
    assert feature_block_indexes(32, [7, 15, 23, 31]) == [7, 15, 23, 31]
    assert feature_block_indexes(4, [1, 3]) == [0, 1, 2, 3]  # fewer global blocks: last block of each quarter
    with pytest.raises(ValueError):
        feature_block_indexes(3, [2])


@pytest.mark.parametrize("size,feature", [(128, 20), (64, 3)])
def test_decoder_follows_the_paper_shapes(size, feature):
    g, embed = size // 16, 48
    dec = UNETRDecoder(in_chans=5, embed_dim=embed, num_outputs=3, feature_size=feature)
    x = torch.randn(2, 5, size, size)
    feats = [torch.randn(2, g, g, embed, requires_grad=True) for _ in range(4)]
    out = dec(x, feats)
    assert out.shape == (2, 3, size, size)
    assert dec.enc2(feats[0].permute(0, 3, 1, 2)).shape == (2, 2 * feature, 8 * g, 8 * g)  # three x2 upsamplings
    assert dec.enc3(feats[1].permute(0, 3, 1, 2)).shape == (2, 4 * feature, 4 * g, 4 * g)
    assert dec.enc4(feats[2].permute(0, 3, 1, 2)).shape == (2, 8 * feature, 2 * g, 2 * g)
    out.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)  # every skip reaches the output


def test_network_takes_cache_slices_of_any_size_and_trains_end_to_end(env):
    method = get_method("samunetr")
    net = method.build_network(bind(method, env, "2d"), 1, 3)
    size = env["methods"]["samunetr"]["input_size"]
    assert net.network.encoder.pos_embed.shape[1] == size // 16  # built at the planned input, not the native 256
    x = torch.randn(3, 1, 37, 29)
    out = net(x)
    assert out.shape == (3, 3, 37, 29)
    out[:, 1].mean().backward()
    # every encoder weight trains except SAM's 256-channel neck, which SAM-UNETR does not use
    no_grad = [n for n, p in net.network.encoder.named_parameters() if p.grad is None]
    assert no_grad and all(n.startswith("neck.") for n in no_grad), no_grad
    assert net.network.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_pretrained_encoder_is_resized_to_the_planned_input(env, tmp_path):
    """A native-256 checkpoint loads into the planned (smaller) input: pos_embed bilinearly resized, rest unchanged."""
    torch.manual_seed(3)
    native = build_image_encoder("tiny_vit")  # 256 input, 16 x 16 token grid
    ckpt = tmp_path / "tiny_vit_encoder.pth"
    save_backbone_checkpoint(native, ckpt)
    plans = copy.deepcopy(env)
    plans["methods"]["samunetr"]["checkpoint"] = str(ckpt)
    method = get_method("samunetr")
    net = method.build_network(bind(method, plans, "2d"), 1, 3)
    line = method.initialize_pretrained(net, bind(method, plans, "2d"))
    assert str(ckpt) in line and "trainable" in line
    size = plans["methods"]["samunetr"]["input_size"]
    enc = net.network.encoder
    assert size != 256 and torch.equal(enc.pos_embed, resize_pos_embed(native.pos_embed.detach(), size // 16))
    assert torch.equal(enc.blocks[0].attn.qkv.weight, native.blocks[0].attn.qkv.weight)
    spec = backbone_spec("tiny_vit")
    glob = spec.global_attn_indexes[0]
    assert enc.blocks[glob].attn.rel_pos_h.shape[0] == 2 * (size // 16) - 1
    ckpt.write_bytes(ckpt.read_bytes()[:-100] + b"\0" * 100)  # corrupted: refused by its hash note
    with pytest.raises(SamplanError, match="sha256"):
        method.initialize_pretrained(method.build_network(bind(method, plans, "2d"), 1, 3), bind(method, plans, "2d"))


def test_frozen_encoder_stays_out_of_the_optimiser(env):
    plans = copy.deepcopy(env)
    plans["methods"]["samunetr"]["freeze_encoder"] = True
    method = get_method("samunetr")
    from samplan.dataset.labels import LabelManager

    dj = load_json(preprocessed_root() / DATASET / "dataset.json")
    recipe = method.training_recipe(bind(method, plans, "2d"), LabelManager.from_dataset_json(dj))
    net = method.build_network(bind(method, plans, "2d"), 1, 3)
    opt = recipe.make_optimizer(net.parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in net.network.encoder.parameters())
    assert all(id(p) in in_opt for p in net.network.decoder.parameters())


def test_unknown_backbone_or_missing_checkpoint_is_one_error_and_writes_nothing(env, tmp_path):
    for overrides, needle in (({"backbone": "vit_q"}, "vit_q"), ({**TINY, "checkpoint": str(tmp_path / "no.pth")}, "no.pth"),
                              ({"backbone": "litemedsam"}, "SAM ViT")):
        with pytest.raises(SamplanError, match=needle):
            train_fold(DATASET, "samunetr", None, 0, epochs=1, device="cpu", num_workers=0, method_overrides=overrides)
    assert not (tmp_path / "results").exists()


def test_largest_component_filter():
    m = np.zeros((10, 10), bool)
    m[1:4, 1:4] = True  # 9 px
    m[6:8, 6:8] = True  # 4 px
    kept = keep_largest_component(m)
    assert kept.sum() == 9 and kept[2, 2] and not kept[7, 7]
    logits = torch.zeros(1, 3, 10, 10)
    logits[0, 1][torch.from_numpy(m)] = 5.0
    hard = largest_component_logits(logits, has_regions=False).argmax(1)[0].numpy()
    assert (hard == 1).sum() == 9 and hard[7, 7] == 0


def test_training_lowers_the_loss_and_predicts_in_the_input_geometry(env, prepared, tmp_path):
    fold_dir = train_fold(DATASET, "samunetr", None, 0, epochs=3, iters_per_epoch=8, val_iters=2, device="cpu",
                          num_workers=0, method_overrides=TINY)
    state = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    losses = state["logging"]["train_loss"]
    assert losses[-1] < losses[0], losses
    saved = load_json(fold_dir.parent / "plans.json")["methods"]["samunetr"]
    assert saved["backbone"] == "tiny_vit" and saved["checkpoint"] == "none"  # the folder records the override
    assert (fold_dir / "validation" / "summary.json").is_file()
    assert "randomly initialised" in (fold_dir / "training_log.txt").read_text()

    raw = prepared[0]["SAMPLAN_RAW"] / DATASET
    out = tmp_path / "pred"
    assert predict_main(["-i", str(raw / "imagesTr"), "-o", str(out), "-d", DATASET, "-m", "samunetr", "-f", "0",
                         "--disable-tta", "-np", "0", "--device", "cpu"]) == 0
    preds = sorted(out.glob("*.nii.gz"))
    assert len(preds) == 6
    ref = sitk.ReadImage(str(raw / "labelsTr" / preds[0].name))
    img = sitk.ReadImage(str(preds[0]))
    assert img.GetSize() == ref.GetSize() and np.allclose(img.GetSpacing(), ref.GetSpacing())
    assert np.allclose(img.GetOrigin(), ref.GetOrigin()) and np.allclose(img.GetDirection(), ref.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(img))) <= {0, 1, 2}


def test_two_gloo_processes_train_samunetr(env):
    check_two_process_training(DATASET, "samunetr", None, {**TINY, "batch_size": 2})


def test_real_hippocampus_subset_loss_goes_down(tmp_path, monkeypatch):
    """Eight real Hippocampus cases: samunetr with the tiny encoder learns within a few dozen iterations."""
    raw = tmp_path / "raw"
    copy_shared_subset("Dataset004_Hippocampus", raw, 8)
    for var, d in (("SAMPLAN_RAW", raw), ("SAMPLAN_PREPROCESSED", tmp_path / "pre"), ("SAMPLAN_RESULTS", tmp_path / "res")):
        monkeypatch.setenv(var, str(d))
    plan_and_preprocess("Dataset004_Hippocampus", num_processes=1, configurations=["2d"])
    fold_dir = train_fold("Dataset004_Hippocampus", "samunetr", None, 0, epochs=3, iters_per_epoch=10, val_iters=2,
                          device="cpu", num_workers=0, method_overrides=TINY, final_validation=False)
    losses = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)["logging"]["train_loss"]
    assert losses[-1] < 0.9 * losses[0], losses
