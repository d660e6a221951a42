"""The trainer end to end on a tiny synthetic dataset: loss goes down, outputs, exact resume, validation, CLI."""
from __future__ import annotations

import json
import re

import pytest
import torch

from samplan.cli.train import main as train_main
from samplan.errors import SamplanError
from samplan.pipeline.planning import plan_and_preprocess
from samplan.methods.base import TrainableMethod
from samplan.methods.unet.method import UNetMethod
from samplan.paths import model_dir, preprocessed_root
from samplan.models.checkpoint import REQUIRED_KEYS
from samplan.pipeline.train import train_fold
from samplan.utils import load_json, save_json
from synthetic import make_dataset_3d

DATASET = "Dataset900_Synth"
CKPTS = ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """6 synthetic cases planned and preprocessed once (3d_fullres and 2d), networks shrunk to a few features."""
    root = tmp_path_factory.mktemp("trainer")
    dirs = {v: root / v for v in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED")}
    with pytest.MonkeyPatch.context() as mp:
        for var, d in dirs.items():
            d.mkdir()
            mp.setenv(var, str(d))
        mp.setenv("SAMPLAN_RESULTS", str(root / "unused"))
        make_dataset_3d(dirs["SAMPLAN_RAW"], n_cases=6)
        out = plan_and_preprocess(DATASET, num_processes=1)
    plans = load_json(out / "plans.json")
    for cfg in plans["configurations"].values():
        kw = cfg["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [8 * 2**i for i in range(kw["n_stages"])]
    save_json(plans, out / "plans.json")
    return dirs


@pytest.fixture
def env(prepared, tmp_path, monkeypatch):
    """The prepared raw/preprocessed folders and a fresh results folder."""
    for var, d in prepared.items():
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("SAMPLAN_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def _train(configuration="3d_fullres", fold=0, **kw):
    kw = {"iters_per_epoch": 5, "val_iters": 2, "device": "cpu", "num_workers": 0, **kw}
    return train_fold(DATASET, "unet", configuration, fold, **kw)


def test_training_lowers_the_loss_and_writes_the_model_folder(env):
    fold_dir = _train(epochs=3, iters_per_epoch=10)
    state = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    losses = state["logging"]["train_loss"]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert state["logging"]["val_loss"][-1] < state["logging"]["val_loss"][0]
    for name in CKPTS:  # plain data only: loadable without unpickling arbitrary objects
        ck = torch.load(fold_dir / name, weights_only=True)
        assert all(k in ck for k in (*REQUIRED_KEYS, "optimizer_state", "scheduler_state", "logging", "best_ema",
                                     "seed", "num_epochs", "dataset_name", "num_input_channels", "num_outputs"))
    assert (state["current_epoch"], state["fold"], state["num_outputs"], state["seed"]) == (3, 0, 3, 12345)
    mdir = model_dir(DATASET, "unet", "3d_fullres")
    assert fold_dir == mdir / "fold_0" and all((mdir / f).is_file() for f in ("plans.json", "dataset.json", "fingerprint.json"))
    progress = load_json(fold_dir / "progress.json")
    assert len(progress["lr"]) == 3 and progress["lr"][0] == 1e-2 > progress["lr"][1] > progress["lr"][2]
    assert (fold_dir / "progress.png").stat().st_size > 1000

    log = (fold_dir / "training_log.txt").read_text()
    assert len(re.findall(r"epoch \d/3 .* pseudo Dice \(running, patches\)", log)) == 3 and "final validation of 2 case(s)" in log
    summary = load_json(fold_dir / "validation" / "summary.json")
    val_ids = load_json(preprocessed_root() / DATASET / "splits_final.json")[0]["val"]
    assert sorted(c["prediction_file"].split("/")[-1] for c in summary["metric_per_case"]) == sorted(f"{c}.nii.gz" for c in val_ids)
    assert summary["mean"]["1"]["Dice"] > 0.6  # the large structure is learnt within 30 steps (chance: ~0.04)
    assert f"mean foreground Dice {summary['foreground_mean']['Dice']:.4f}" in log

    # --val redoes only the final validation from checkpoint_final
    (fold_dir / "validation" / "summary.json").unlink()
    _train(only_validate=True)
    assert load_json(fold_dir / "validation" / "summary.json")["foreground_mean"] == summary["foreground_mean"]
    assert torch.equal(torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)["network_weights"]["decoder.seg_layers.0.weight"],
                       state["network_weights"]["decoder.seg_layers.0.weight"])


def _assert_same_run(a, b):
    sa, sb = (torch.load(d / "checkpoint_final.pth", weights_only=True) for d in (a, b))
    for k, v in sa["network_weights"].items():
        assert torch.equal(v, sb["network_weights"][k]), k
    for k, v in sa["optimizer_state"]["state"].items():  # momentum buffers
        assert torch.equal(v["momentum_buffer"], sb["optimizer_state"]["state"][k]["momentum_buffer"])
    for key in ("train_loss", "val_loss", "dice_per_class", "ema_pseudo_dice", "lr"):
        assert json.dumps(sa["logging"][key]) == json.dumps(sb["logging"][key]), key
    assert (sa["best_ema"], sa["current_epoch"]) == (sb["best_ema"], sb["current_epoch"])


def test_continue_after_an_interruption_equals_an_uninterrupted_run(env, monkeypatch):
    monkeypatch.setenv("SAMPLAN_RESULTS", str(env / "a"))
    uninterrupted = _train(epochs=3, final_validation=False)

    # run b dies in the middle of epoch 2 (after 7 of 15 steps), then is continued with --c
    monkeypatch.setenv("SAMPLAN_RESULTS", str(env / "b"))
    calls = {"n": 0}

    def dying_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return TrainableMethod.train_step(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(UNetMethod, "train_step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            _train(epochs=3, final_validation=False)
    fold_b = model_dir(DATASET, "unet", "3d_fullres") / "fold_0"
    assert torch.load(fold_b / "checkpoint_latest.pth", weights_only=True)["current_epoch"] == 1
    assert not (fold_b / "checkpoint_final.pth").exists()
    resumed = _train(continue_training=True, final_validation=False)  # epochs and seed come from the checkpoint
    _assert_same_run(uninterrupted, resumed)
    assert "continuing from" in (fold_b / "training_log.txt").read_text()

    # stopping after 1 of 1 epochs and extending the run to 3 epochs gives the same run too
    monkeypatch.setenv("SAMPLAN_RESULTS", str(env / "c"))
    _train(epochs=1, final_validation=False)
    _assert_same_run(uninterrupted, _train(epochs=3, continue_training=True, final_validation=False))


def test_2d_configuration_fold_all_and_pretrained_weights(env):
    fold_dir = _train("2d", "all", epochs=1, iters_per_epoch=2)
    summary = load_json(fold_dir / "validation" / "summary.json")
    assert fold_dir.name == "fold_all" and len(summary["metric_per_case"]) == 6

    init = fold_dir / "checkpoint_final.pth"
    fold1 = _train("2d", 1, epochs=1, iters_per_epoch=1, val_iters=1, pretrained_weights=init, final_validation=False)
    n_tensors = len(torch.load(init, weights_only=True)["network_weights"])
    n_heads = sum(".seg_layers." in k for k in torch.load(init, weights_only=True)["network_weights"])
    assert f"{n_tensors - n_heads} tensors loaded, {n_heads} left as initialised" in (fold1 / "training_log.txt").read_text()
    with pytest.raises(SamplanError, match="cannot be combined"):
        _train("2d", 1, epochs=1, pretrained_weights=init, continue_training=True)


def test_cli_errors_and_help(env, capsys):
    assert train_main(["-d", "900", "-m", "unte", "-f", "0"]) == 1
    err = capsys.readouterr().err
    assert "unknown method 'unte'" in err and "unet" in err and "samunetr" in err
    assert train_main(["-d", "900", "-m", "samunetr", "-f", "0", "--backbone", "vit_q"]) == 1
    assert "vit_q" in (err := capsys.readouterr().err) and "vit_b" in err  # an unknown backbone lists the known ones
    assert train_main(["-d", "900", "-m", "unet", "-f", "0", "-c", "3d_lowres"]) == 1
    assert "3d_fullres" in capsys.readouterr().err
    assert train_main(["-d", "900", "-m", "unet", "-f", "0", "--val"]) == 1  # nothing trained yet
    assert "checkpoint_final.pth does not exist" in capsys.readouterr().err
    assert train_main(["-d", "900", "-m", "unet", "-f", "0", "--epochs", "0", "--device", "cpu", "-np", "0"]) == 1
    assert "at least 1" in capsys.readouterr().err
    for bad in (["-f", "five"], ["-f", "-1"]):
        with pytest.raises(SystemExit):
            train_main(["-d", "900", "-m", "unet", *bad])
    with pytest.raises(SystemExit):
        train_main(["-h"])
    assert "examples:" in capsys.readouterr().out
