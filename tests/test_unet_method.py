"""The unet method: network from the planned architecture, recipe from the plan section, registry errors."""
from __future__ import annotations

import copy

import pytest
import torch

from samplan.dataset.labels import LabelManager
from samplan.errors import SamplanError
from samplan.pipeline.planning import plan_and_preprocess
from samplan.methods import get_method
from samplan.methods.base import TrainableMethod
from samplan.methods.unet.method import UNetMethod
from samplan.methods.unet.network import set_deep_supervision
from samplan.methods.unet.plan import deep_supervision_scales
from samplan.engine.augmentation import build_train_transforms
from samplan.training.checkpoint import load_pretrained_weights
from samplan.engine.losses import DeepSupervisionLoss, DiceBCELoss, DiceCELoss
from samplan.engine.optim import PolyLRScheduler
from samplan.utils import load_json
from method_plans import bind
from synthetic import make_dataset_3d

PLAIN = LabelManager((0, 1, 2), (), (), None)
REGIONS = LabelManager((), ((1, 2), (2,)), (1, 2), None)


@pytest.fixture(scope="module")
def module_plans(tmp_path_factory):
    """Real plans of the synthetic 3D dataset (3d_fullres and 2d), with small feature counts for speed."""
    root = tmp_path_factory.mktemp("unet_plans")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        ds = make_dataset_3d(root / "SAMPLAN_RAW")
        out = plan_and_preprocess(ds.name, plan_only=True, num_processes=1)
    p = load_json(out / "plans.json")
    for cfg in p["configurations"].values():
        kw = cfg["architecture"]["arch_kwargs"]
        kw["features_per_stage"] = [4 * 2**i for i in range(kw["n_stages"])]
    return p


@pytest.fixture
def plans(module_plans):
    """A copy each test may change."""
    return copy.deepcopy(module_plans)


def test_registry_errors_and_trainability():
    with pytest.raises(SamplanError) as e:
        get_method("unte")
    assert "unet" in str(e.value) and "samunetr" in str(e.value) and "Did you mean 'unet'" in str(e.value)
    assert isinstance(get_method("unet"), TrainableMethod)
    assert isinstance(get_method("samunetr"), TrainableMethod)


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_network_outputs_follow_the_plan(plans, configuration):
    method = UNetMethod()
    cfg = plans["configurations"][configuration]
    strides = cfg["architecture"]["arch_kwargs"]["strides"]
    torch.manual_seed(0)
    net = method.build_network(bind(method, plans, configuration), 1, 3)
    patch = cfg["patch_size"]
    x = torch.randn(2, 1, *patch)
    with torch.no_grad():
        outs = net(x)
    scales = deep_supervision_scales(strides)
    assert isinstance(outs, list) and len(outs) == len(strides) - 1 == len(scales)
    for o, s in zip(outs, scales):
        assert list(o.shape) == [2, 3, *[round(p * f) for p, f in zip(patch, s)]]
    set_deep_supervision(net, False)  # inference: only the full-resolution logits, same weights
    with torch.no_grad():
        full = net(x)
    assert torch.equal(full, outs[0])


def test_deep_supervision_scales_are_cumulative_strides():
    assert deep_supervision_scales([[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]]) == [
        [1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]


def test_recipe_from_the_plan_section(plans):
    method = UNetMethod()
    section = plans["methods"]["unet"]["recipe"]
    r3 = method.training_recipe(bind(method, plans, "3d_fullres"), PLAIN)
    assert isinstance(r3.loss, DeepSupervisionLoss) and isinstance(r3.loss.loss, DiceCELoss)
    assert r3.loss.weights == tuple(section["deep_supervision"]["weights"]["3d_fullres"])
    assert r3.loss.weights[-1] == 0 and sum(r3.loss.weights) == pytest.approx(1)
    assert r3.loss.loss.dice.batch_dice is False
    assert r3.patch_size == tuple(plans["configurations"]["3d_fullres"]["patch_size"])
    assert r3.batch_size == plans["configurations"]["3d_fullres"]["batch_size"]
    assert (r3.num_epochs, r3.iterations_per_epoch, r3.val_iterations_per_epoch) == (1000, 250, 50)
    assert r3.oversample_foreground == 0.33 and r3.grad_clip == 12.0 and r3.mirror_axes == (0, 1, 2)
    assert len(r3.deep_supervision_scales) == len(r3.loss.weights)

    r2 = method.training_recipe(bind(method, plans, "2d"), REGIONS)
    assert isinstance(r2.loss.loss, DiceBCELoss) and r2.loss.loss.dice.batch_dice is True
    assert r2.mirror_axes == (0, 1) and len(r2.patch_size) == 2

    net = method.build_network(bind(method, plans, "3d_fullres"), 1, 3)
    opt = r3.make_optimizer(net.parameters())
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD) and g["nesterov"] and g["momentum"] == 0.99
    assert g["lr"] == 1e-2 and g["weight_decay"] == 3e-5
    sched = r3.make_scheduler(opt, 10)
    assert isinstance(sched, PolyLRScheduler)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([1e-2 * (1 - e / 10) ** 0.9 for e in range(10)])

    # the augmentation settings are valid keyword arguments of the data helper's transform builder
    build_train_transforms(**r3.augmentation, patch_size=r3.patch_size,
                           deep_supervision_scales=r3.deep_supervision_scales, label_manager=PLAIN)


def test_edited_topology_gets_matching_deep_supervision_weights(plans):
    p = copy.deepcopy(plans)
    kw = p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage"):
        kw[key] = kw[key][:-1]
    kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][:-1]
    kw["n_stages"] -= 1
    r = UNetMethod().training_recipe(bind(UNetMethod(), p, "3d_fullres"), PLAIN)
    assert len(r.loss.weights) == len(r.deep_supervision_scales) == kw["n_stages"] - 1


def test_plans_may_not_name_arbitrary_classes(plans):
    p = copy.deepcopy(plans)
    p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    with pytest.raises(SamplanError, match="only classes from"):
        UNetMethod().build_network(bind(UNetMethod(), p, "3d_fullres"), 1, 3)
    with pytest.raises(SamplanError, match="not planned"):
        UNetMethod().build_network(bind(UNetMethod(), plans, "3d_lowres"), 1, 3)


def test_pretrained_weights_skip_segmentation_heads(plans, tmp_path):
    method = UNetMethod()
    torch.manual_seed(1)
    source = method.build_network(bind(method, plans, "3d_fullres"), 1, 5)
    torch.save({"network_weights": source.state_dict()}, tmp_path / "w.pth")
    torch.manual_seed(2)
    target = method.build_network(bind(method, plans, "3d_fullres"), 1, 3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    loaded, kept = load_pretrained_weights(target, tmp_path / "w.pth")
    after = target.state_dict()
    assert kept and all(".seg_layers." in f".{k}" for k in kept)
    assert all(torch.equal(after[k], source.state_dict()[k]) for k in loaded)
    assert all(torch.equal(after[k], before[k]) for k in kept)
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(SamplanError, match="no tensor"):
        load_pretrained_weights(target, tmp_path / "other.pth")
