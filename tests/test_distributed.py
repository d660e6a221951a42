"""Data-parallel training on torch.distributed: two gloo CPU processes train like one process with the same global
batch (3D with per-sample Dice, 2D with nnU-Net's batch Dice), resume with --c, and rank 0 alone writes."""
from __future__ import annotations

import re

import pytest
import torch

from samplan.engine.data_parallel import shard
from samplan.errors import SamplanError
from samplan.methods.unet.method import UNetMethod
from samplan.paths import preprocessed_root
from samplan.pipeline.planning import plan_and_preprocess
from samplan.pipeline.train import train_fold
from samplan.training.data_loader import PatchLoader
from samplan.training.distributed import free_port
from samplan.training.trainer import prepare_fold
from samplan.utils import load_json, save_json
from synthetic import make_dataset_3d

DATASET = "Dataset903_SynthDDP"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """6 synthetic cases planned and preprocessed once (3d_fullres and 2d), networks shrunk to a few features."""
    root = tmp_path_factory.mktemp("ddp")
    dirs = {v: root / v for v in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED")}
    with pytest.MonkeyPatch.context() as mp:
        for var, d in dirs.items():
            d.mkdir()
            mp.setenv(var, str(d))
        mp.setenv("SAMPLAN_RESULTS", str(root / "unused"))
        make_dataset_3d(dirs["SAMPLAN_RAW"], name=DATASET, n_cases=6)
        out = plan_and_preprocess(DATASET, num_processes=1)
    plans = load_json(out / "plans.json")
    for cfg in plans["configurations"].values():
        kw = cfg["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [4 * 2**i for i in range(kw["n_stages"])]
        cfg["batch_size"] = 3  # uneven over two ranks (2 + 1): the loss weights must make up for it
    save_json(plans, out / "plans.json")
    return dirs


@pytest.fixture
def env(prepared, monkeypatch):
    for var, d in prepared.items():
        monkeypatch.setenv(var, str(d))
    return monkeypatch


def test_shards_split_the_global_batch_in_rank_order():
    for n in (1, 2, 3, 7, 12):
        for world in range(1, n + 1):
            parts = [shard(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1


def test_rank_shares_of_augmented_batches_make_up_the_single_process_batch(env):
    s = prepare_fold(DATASET, "unet", "3d_fullres", 0)
    recipe = UNetMethod().training_recipe(s.mp, s.label_manager)
    assert recipe.batch_size == 3 and recipe.deep_supervision_scales

    def batch(rank, world):
        loader = PatchLoader(s.cache_dir, s.train_ids, recipe, s.label_manager, train=True, seed=7, num_workers=0,
                             rank=rank, world_size=world)
        return next(iter(loader.epoch(2, 1)))

    whole = batch(0, 1)
    for world in (2, 3):
        parts = [batch(r, world) for r in range(world)]
        assert [k for p in parts for k in p["keys"]] == whole["keys"]
        assert torch.equal(torch.cat([p["data"] for p in parts]), whole["data"])
        for level, target in enumerate(whole["target"]):  # deep supervision: one target per level
            assert torch.equal(torch.cat([p["target"][level] for p in parts]), target)


def _final(env, results, configuration, **kw):
    env.setenv("SAMPLAN_RESULTS", str(results))
    fold_dir = train_fold(DATASET, "unet", configuration, 0, iters_per_epoch=3, val_iters=2, device="cpu",
                          num_workers=0, precision="fp32", final_validation=False, **kw)
    return fold_dir, torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)


def _max_weight_difference(a, b):
    return max(float((a["network_weights"][k] - b["network_weights"][k]).abs().max()) for k in a["network_weights"])


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(env, tmp_path, configuration):
    _, one = _final(env, tmp_path / "one", configuration, epochs=2)
    if configuration == "3d_fullres":  # the two-process run is killed after epoch 1 and continued with --c
        _final(env, tmp_path / "two", configuration, epochs=1, num_devices=2)
        fold_dir, two = _final(env, tmp_path / "two", configuration, epochs=2, num_devices=2, continue_training=True)
    else:
        fold_dir, two = _final(env, tmp_path / "two", configuration, epochs=2, num_devices=2)
    diff = _max_weight_difference(one, two)
    print(f"{configuration}: largest weight difference, one process vs two gloo processes after 6 SGD steps: {diff:.2e}")
    assert diff < 1e-4
    for key in ("train_loss", "val_loss", "pseudo_dice"):
        assert two["logging"][key] == pytest.approx(one["logging"][key], rel=1e-4, abs=1e-5), key
    log = (fold_dir / "training_log.txt").read_text()
    assert "2 data-parallel processes" in log
    assert len(re.findall(r"epoch 2/2 ", log)) == 1  # rank 0 alone writes the log
    assert two["current_epoch"] == 2 and two["seed"] == one["seed"]


def test_more_processes_than_samples_fail_before_anything_is_written(env, tmp_path):
    env.setenv("SAMPLAN_RESULTS", str(tmp_path / "results"))
    with pytest.raises(SamplanError, match="batch of at least 4.*--num-devices 3 or fewer"):
        train_fold(DATASET, "unet", "3d_fullres", 0, epochs=1, device="cpu", num_devices=4)
    assert not (tmp_path / "results").exists()
    assert (preprocessed_root() / DATASET / "plans.json").is_file()


def test_torchrun_started_processes_train_like_one_process(env, tmp_path):
    import os
    import subprocess
    import sys

    _, one = _final(env, tmp_path / "one", "3d_fullres", epochs=1)
    env.setenv("SAMPLAN_RESULTS", str(tmp_path / "torchrun"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "samplan.cli.train", "-d", DATASET, "-m", "unet", "-c", "3d_fullres", "-f", "0", "--epochs", "1",
           "--iters-per-epoch", "3", "--val-iters", "2", "--device", "cpu", "-np", "0", "--precision", "fp32",
           "--no-val"]
    done = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fold_dir = tmp_path / "torchrun" / DATASET / "unet__samplanPlans__3d_fullres" / "fold_0"
    two = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    assert _max_weight_difference(one, two) < 1e-4
    assert "2 data-parallel processes" in (fold_dir / "training_log.txt").read_text()
