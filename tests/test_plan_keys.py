"""Plans are true: every key of every method's plan section is read by the code that uses the section.

Each method is planned on synthetic datasets (3D MR with two labels, 2D RGB PNG) and on real Hippocampus cases, and
every hook runs once (check_plan, build_network, initialize_pretrained, the prompt hooks, the recipe, a train and a
validation step, a prediction) while samplan.experiment_planning.sections.record_reads records which fields are
read. A leaf key that no run reads fails the test, unless the section declares it `info()` (documentation only) or
it is a tagged section's tag (read by the parser to pick the variant). Variants that read other keys (medsam's box
policies, samzeroshot's propagation and multimask output) run as scenarios of their own.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import numpy as np
import pytest
import torch

from samplan.dataset.labels import LabelManager
from samplan.experiment_planning.sections import record_reads, section_leaves
from samplan.methods import get_method
from samplan.methods.base import PredictionContext, TrainableMethod
from samplan.preprocessing.cache import open_case
from samplan.prompts.case_prompts import reference_prompts
from samplan.training.data_loader import PatchLoader
from samplan.training.trainer import merge_overrides
from samplan.utils import load_json
from synthetic import make_dataset_2d_png, make_dataset_3d

TINY = {"backbone": "tiny_vit", "checkpoint": "none", "batch_size": 2}
PROMISE_TINY = {**TINY, "apm": {"conv_channels": 8, "resnet_layers": [1, 1, 1, 1]}, "ips": {"hidden": 16}}
AUTOSAM2_TINY = {"backbone": "tiny_litemedsam", "checkpoint": "none", "unet": {"features": [4, 8, 8, 8, 8]},
                 "branch": {"bridge_width": 8}, "slice_fraction": 0.6}
# (dataset, method, configuration, overrides of the section)
SCENARIOS = [
    ("3d", "unet", "3d_fullres", {}),
    ("3d", "unet", "2d", {}),
    ("3d", "samunetr", "2d", TINY),
    ("3d", "medsam", "2d", TINY),
    ("3d", "medsam", "2d", {**TINY, "box_policy": {"name": "fixed_planned_region", "per": "object"}}),
    ("3d", "samzeroshot", "2d", {"backbone": "tiny_vit", "checkpoint": "none"}),
    ("3d", "samzeroshot", "2d", {"backbone": "tiny_litemedsam", "checkpoint": "none", "output": "multimask",
                                 "prompt": {"strategy": "propagate"}}),
    ("png", "samunetr", "2d", TINY),
    ("png", "medsam", "2d", {**TINY, "box_policy": {"name": "fixed_full_image"}}),
    ("png", "samzeroshot", "2d", {"backbone": "tiny_vit", "checkpoint": "none", "prompt": {"strategy": "box"}}),
    ("hippocampus", "unet", "2d", {}),
    ("hippocampus", "samunetr", "2d", TINY),
    ("hippocampus", "medsam", "2d", TINY),
    ("hippocampus", "samzeroshot", "2d", {"backbone": "tiny_vit", "checkpoint": "none"}),
    ("3d", "promise", "2d", PROMISE_TINY),
    ("png", "promise", "2d", {**PROMISE_TINY, "mode": "ips_oracle", "image_augmentation": True}),
    ("hippocampus", "promise", "2d", {**PROMISE_TINY, "backbone": "tiny_litemedsam", "mode": "apm"}),
    ("3d", "autosam2", "3d_fullres", AUTOSAM2_TINY),
    ("hippocampus", "autosam2", "3d_fullres", {**AUTOSAM2_TINY, "backbone": "tiny_sam2"}),
]
METHODS = ("unet", "samunetr", "medsam", "samzeroshot", "promise", "autosam2")
THREE_D_ONLY = ("autosam2",)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The three datasets planned for every method and preprocessed (2d, and 3d_fullres for the 3D one)."""
    from conftest import copy_shared_subset, shared_dataset

    from conftest import plan_quickly, samplan_dirs

    out = {}
    with samplan_dirs(tmp_path_factory.mktemp("plan_keys")) as root:
        raws = {"3d": make_dataset_3d(root / "SAMPLAN_RAW", n_cases=3),
                "png": make_dataset_2d_png(root / "SAMPLAN_RAW", n_cases=3)}
        try:
            shared_dataset("Dataset004_Hippocampus")
            raws["hippocampus"] = copy_shared_subset("Dataset004_Hippocampus", root / "SAMPLAN_RAW", 3)
        except pytest.skip.Exception:
            pass  # without ../shared/data the synthetic scenarios still run
        for key, raw in raws.items():
            methods = [m for m in METHODS if key != "png" or m not in THREE_D_ONLY]
            pre = plan_quickly(raw, methods, ["2d"] if key == "png" else ["2d", "3d_fullres"])
            plans = load_json(pre / "plans.json")
            for cfg in plans["configurations"].values():  # small U-Nets: the test is about keys, not accuracy
                kw = cfg.get("architecture", {}).get("arch_kwargs")
                if kw:
                    kw["features_per_stage"] = [4 * 2**i for i in range(kw["n_stages"])]
            out[key] = (plans, load_json(pre / "dataset.json"), pre)
        yield out


def _batch(loader: PatchLoader) -> dict[str, Any]:
    return next(iter(loader.epoch(0, 1)))


def _exercise(method_name: str, plans: dict, dataset_json: dict, pre, configuration: str) -> None:
    """Every hook of the method once, on the first cached case."""
    method = get_method(method_name)
    lm = LabelManager.from_dataset_json(dataset_json)
    mp = method.check_plan(plans, configuration)
    n_in = len(dataset_json["channel_names"])
    torch.manual_seed(0)
    net = method.build_network(mp, n_in, lm.num_outputs)
    method.initialize_pretrained(net, mp)
    method.missing_prompts_error(mp)
    method.validation_prompt_strategy(mp)
    settings = method.reference_prompt_settings(mp)
    cache = pre / plans["configurations"][configuration]["data_identifier"]
    cases = sorted(p.name[: -len(".json")] for p in cache.glob("*.json"))
    if isinstance(method, TrainableMethod):
        recipe = method.training_recipe(mp, lm)
        recipe.iterations_per_epoch = recipe.val_iterations_per_epoch = 1
        recipe.batch_size = min(recipe.batch_size, 2)
        opt = recipe.make_optimizer(net.parameters())
        recipe.make_scheduler(opt, recipe.num_epochs)
        net.train()
        def loader(train: bool) -> Any:  # the method's own loader, else the trainer's patch loader
            own = method.training_loader(mp, cache, cases, recipe, lm, train=train, seed=0)
            return own if own is not None else PatchLoader(cache, cases, recipe, lm, train=train, seed=0, num_workers=0)

        method.train_step(net, _batch(loader(True)), recipe, opt, torch.device("cpu"), mp)
        net.eval()
        with torch.no_grad():
            method.validation_step(net, _batch(loader(False)), recipe, torch.device("cpu"), lm, mp)
    data, seg, _ = open_case(cache, cases[0])
    data, seg = torch.from_numpy(np.asarray(data[:])), np.asarray(seg[:])[0]
    seg = np.where(seg < 0, 0, seg)
    prompts = reference_prompts(cases[0], seg, settings.strategy, settings) if method.dimensionality == "2d" else None
    net.eval()
    with torch.no_grad():
        method.predict_logits(net, data, mp,
                              PredictionContext(torch.device("cpu"), prompts=prompts, reference=seg))


def _is_tag(cls: type, name: str) -> bool:
    return getattr(cls, "TAG", None) is not None and getattr(cls, "TAG_KEY", None) == name


@pytest.fixture(scope="module")
def runs(datasets):
    """Per method: the leaves of every scenario's section and the fields all its scenarios read."""
    leaves: dict[str, dict[str, tuple[type, str]]] = defaultdict(dict)
    reads: dict[str, set[tuple[type, str]]] = defaultdict(set)
    ran = []
    for key, method_name, configuration, overrides in SCENARIOS:
        if key not in datasets:
            continue
        plans, dataset_json, pre = datasets[key]
        plans = copy.deepcopy(plans)
        plans["methods"][method_name] = merge_overrides(plans["methods"][method_name], overrides)
        with record_reads() as seen:
            _exercise(method_name, plans, dataset_json, pre, configuration)
        section = get_method(method_name).check_plan(plans, configuration).section
        for path, cls, name, is_info in section_leaves(section):
            if not is_info and not _is_tag(cls, name):
                leaves[method_name][f"{key}: {path}"] = (cls, name)
        reads[method_name] |= seen
        ran.append((key, method_name))
    return leaves, reads, ran


@pytest.mark.parametrize("method_name", METHODS)
def test_every_plan_key_is_read(runs, method_name):
    leaves, reads, ran = runs
    assert any(m == method_name for _, m in ran)
    unread = sorted(path for path, field in leaves[method_name].items() if field not in reads[method_name])
    assert not unread, (f"{method_name}: plan keys that nothing reads (read them, or declare them info()): "
                        + ", ".join(unread))


def test_the_real_dataset_ran(runs):
    from conftest import shared_dataset

    shared_dataset("Dataset004_Hippocampus")  # skips without ../shared/data
    _, _, ran = runs
    assert {m for k, m in ran if k == "hippocampus"} == set(METHODS)


def test_recording_sees_an_unread_key(datasets):
    """The check can fail: a section field nobody reads is not among the recorded reads."""
    plans, _, _ = datasets["3d"]
    section = get_method("medsam").check_plan(plans, "2d").section
    with record_reads() as seen:
        _ = section.box_policy.name
    assert (type(section.box_policy), "name") in seen
    assert (type(section.box_policy), "max_jitter_px") not in seen
