"""PatchLoader on a synthetic blosc2 cache and on preprocessed Hippocampus cases: shapes, oversampling, padding,
determinism across worker counts and epochs, deep-supervision and region targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import copy_shared_subset
from samplan.dataset.labels import LabelManager
from samplan.errors import SamplanError
from samplan.preprocessing.cache import write_case
from samplan.preprocessing.foreground import sample_class_locations
from samplan.training import data_loader
from samplan.engine.augmentation import augmentation_params
from samplan.training.data_loader import PatchLoader
from samplan.engine.recipe import TrainingRecipe

PLAIN = LabelManager((0, 1, 2), (), (), None)
CASES = ["big_0", "big_1", "big_2", "empty", "small"]


def _recipe(patch, batch_size=3, ds=None, oversample=0.33, augmentation=None) -> TrainingRecipe:
    return TrainingRecipe(loss=torch.nn.Identity(), make_optimizer=None, make_scheduler=None, num_epochs=1,
                          iterations_per_epoch=1, val_iterations_per_epoch=1, batch_size=batch_size,
                          patch_size=tuple(patch), oversample_foreground=oversample, deep_supervision_scales=ds,
                          augmentation=augmentation if augmentation is not None else augmentation_params(patch))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Cases with a small label 1 box and a one-row label 2 inside a positive image; one empty, one tiny case."""
    folder = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    for case in CASES:
        shape = (6, 12, 10) if case == "small" else (20 + int(rng.integers(0, 5)), 48, 40 + int(rng.integers(0, 5)))
        img = (1.0 + np.abs(rng.normal(size=(2, *shape)))).astype(np.float32)  # nonzero everywhere inside
        seg = np.zeros((1, *shape), np.int8)
        if case != "empty":
            z, y, x = (int(rng.integers(0, s - 3)) for s in shape)
            seg[0, z:z + 2, y:y + 3, x:x + 3] = 1
            seg[0, z + 2, y, x:x + 3] = 2
        props = {"spacing": [1.0, 1.0, 1.0], "class_locations": sample_class_locations(seg, [(1,), (2,)])}
        write_case(folder, case, img, seg, props, patch_size=(16, 24, 24))
    return folder


def _has_fg(target: torch.Tensor) -> list[bool]:
    return [bool((t > 0).any()) for t in target]


def test_3d_batches_shapes_dtypes_and_deep_supervision(cache):
    ds = [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    loader = PatchLoader(cache, CASES, _recipe((16, 24, 24), ds=ds), PLAIN, train=True, seed=0, num_workers=0)
    assert loader.spec.sample_size == tuple(augmentation_params((16, 24, 24))["initial_patch_size"])
    batches = list(loader.epoch(0, 4))
    assert len(batches) == 4
    for b in batches:
        assert b["data"].shape == (3, 2, 16, 24, 24) and b["data"].dtype == torch.float32
        assert [tuple(t.shape) for t in b["target"]] == [(3, 1, 16, 24, 24), (3, 1, 8, 12, 12), (3, 1, 4, 6, 6)]
        assert all(t.dtype == torch.int64 and 0 <= t.min() and t.max() <= 2 for t in b["target"])
        assert len(b["keys"]) == 3 and set(b["keys"]) <= set(CASES)
        assert torch.isfinite(b["data"]).all()


def test_2d_batches_are_slices_and_oversampled_slices_contain_the_class(cache):
    ds = [[1, 1], [0.5, 0.5]]
    train = PatchLoader(cache, CASES, _recipe((24, 24), batch_size=4, ds=ds), PLAIN, train=True, seed=0, num_workers=0)
    b = next(iter(train.epoch(0, 1)))
    assert b["data"].shape == (4, 2, 24, 24)
    assert [tuple(t.shape) for t in b["target"]] == [(4, 1, 24, 24), (4, 1, 12, 12)]
    # validation patches are not augmented: every oversampled slice of a case with labels shows a label
    val = PatchLoader(cache, CASES, _recipe((24, 24), batch_size=4, oversample=0.5), PLAIN, train=False, seed=0,
                      num_workers=0)
    n = 0
    for b in val.epoch(0, 30):
        for j in (2, 3):
            if b["keys"][j] != "empty":
                assert (b["target"][j] > 0).any()
                n += 1
    assert n > 30


@pytest.mark.parametrize("train", [False, True])
def test_oversampling_puts_foreground_in_the_last_samples(cache, train):
    loader = PatchLoader(cache, CASES, _recipe((16, 24, 24)), PLAIN, train=train, seed=1, num_workers=0)
    hits = {0: [], 1: [], 2: []}
    for b in loader.epoch(0, 40):
        for j, fg in enumerate(_has_fg(b["target"])):
            if b["keys"][j] != "empty":
                hits[j].append(fg)
    last, first = np.mean(hits[2]), np.mean(hits[0] + hits[1])
    # round(3 * (1 - 0.33)) = 2 random samples, then one centred on a labelled voxel
    assert last >= (1.0 if not train else 0.9), last
    assert first < 0.7 and last - first > 0.3, (first, last)


def test_small_case_is_padded_with_zero_and_background(cache):
    for patch in [(16, 24, 24), (24, 24)]:
        loader = PatchLoader(cache, ["small"], _recipe(patch, batch_size=2), PLAIN, train=False, seed=0, num_workers=0)
        for b in loader.epoch(0, 3):
            assert b["data"].shape[2:] == patch
            inside = (b["data"][:, 0] != 0).sum(dim=tuple(range(1, len(patch) + 1)))
            # the whole image (or slice) fits in the patch and everything around it is padding
            expected = 6 * 12 * 10 if len(patch) == 3 else 12 * 10
            assert inside.tolist() == [expected, expected]
            assert (b["target"][b["data"][:, :1] == 0] == 0).all()


def test_same_batches_for_any_worker_count_and_epoch(cache):
    recipe = _recipe((16, 24, 24), ds=[[1, 1, 1], [0.5, 0.5, 0.5]])
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    in_process = PatchLoader(cache, CASES, recipe, PLAIN, train=True, seed=7, num_workers=0)
    ref = {e: list(in_process.epoch(e, 3)) for e in (0, 1)}
    # building batches in this process leaves the trainer's global generators alone
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)
    with PatchLoader(cache, CASES, recipe, PLAIN, train=True, seed=7, num_workers=2) as workers:
        for e in (1, 0):  # epochs out of order, through the same persistent workers
            got = list(workers.epoch(e, 3))
            assert len(got) == 3
            for a, b in zip(ref[e], got):
                assert a["keys"] == b["keys"] and torch.equal(a["data"], b["data"])
                assert all(torch.equal(x, y) for x, y in zip(a["target"], b["target"]))
    assert not torch.equal(ref[0][0]["data"], ref[1][0]["data"])  # epochs differ
    again = list(in_process.epoch(1, 3))
    assert all(torch.equal(a["data"], b["data"]) for a, b in zip(ref[1], again))
    other_seed = next(iter(PatchLoader(cache, CASES, recipe, PLAIN, train=True, seed=8, num_workers=0).epoch(1, 1)))
    assert not torch.equal(other_seed["data"], ref[1][0]["data"])


def test_region_targets(cache):
    lm = LabelManager((), ((1, 2), (2,)), (1, 2), None)
    ds = [[1, 1, 1], [0.5, 0.5, 0.5]]
    loader = PatchLoader(cache, CASES, _recipe((16, 24, 24), ds=ds), lm, train=True, seed=0, num_workers=0)
    seen = 0
    for b in loader.epoch(0, 6):
        full, half = b["target"]
        assert full.shape == (3, 2, 16, 24, 24) and half.shape == (3, 2, 8, 12, 12) and full.dtype == torch.float32
        assert set(torch.unique(full).tolist()) <= {0.0, 1.0}
        assert (full[:, 1] <= full[:, 0]).all()  # label 2 lies inside region {1, 2}
        seen += int(full[:, 0].sum() > 0)
    assert seen >= 3


def test_open_case_handles_stay_bounded_and_missing_cases_are_named(cache, monkeypatch):
    monkeypatch.setattr(data_loader, "HANDLE_CACHE_SIZE", 2)
    loader = PatchLoader(cache, CASES, _recipe((16, 24, 24)), PLAIN, train=False, seed=0, num_workers=0)
    list(loader.epoch(0, 5))
    assert len(loader._builder._cases._cases) <= 2
    with pytest.raises(SamplanError, match="ghost"):
        PatchLoader(cache, CASES + ["ghost"], _recipe((16, 24, 24)), PLAIN, train=False, seed=0, num_workers=0)


def test_real_hippocampus_batches(samplan_env):
    copy_shared_subset("Dataset004_Hippocampus", samplan_env["SAMPLAN_RAW"], 8)
    from samplan.pipeline.planning import plan_and_preprocess
    from samplan.utils import load_json

    out = plan_and_preprocess("Dataset004_Hippocampus", num_processes=1, methods=["unet"])
    plans, lm = load_json(out / "plans.json"), LabelManager.from_dataset_json(load_json(out / "dataset.json"))
    for name, config in plans["configurations"].items():
        patch = config["patch_size"]
        kernels = np.array(config["architecture"]["arch_kwargs"]["strides"], dtype=float)
        ds = (1 / np.cumprod(kernels, axis=0))[:-1].tolist()  # one target per decoder output, full resolution first
        cases = sorted(p.stem for p in (out / config["data_identifier"]).glob("*.json"))
        assert len(cases) == 8
        loader = PatchLoader(out / config["data_identifier"], cases, _recipe(patch, config["batch_size"], ds=ds), lm,
                             train=True, seed=0, num_workers=0)
        fg_last = []
        for b in loader.epoch(0, 8):
            assert b["data"].shape == (config["batch_size"], 1, *patch) and torch.isfinite(b["data"]).all()
            assert [tuple(t.shape[2:]) for t in b["target"]] == [tuple(round(p * s) for p, s in zip(patch, f)) for f in ds]
            fg_last.append(_has_fg(b["target"][0])[-1])
        assert np.mean(fg_last) >= 0.85, (name, fg_last)
