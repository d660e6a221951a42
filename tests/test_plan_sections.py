"""Typed plan sections: parsed once, strictly, with errors that name the key and the plans file; the backbone table's
parameter counts match the built modules."""
from __future__ import annotations

import copy

import pytest

from samplan.errors import SamplanError
from samplan.methods import get_method
from samplan.methods.medsam.plan import MedSAMSection
from samplan.methods.sam_common.plan import PercentileClipRule, WindowRule
from samplan.utils import load_json, save_json
from synthetic import make_dataset_3d


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """The synthetic 3D dataset planned for every method (no preprocessing), with SAMPLAN_* set for the module."""
    from conftest import plan_quickly, samplan_dirs

    with samplan_dirs(tmp_path_factory.mktemp("sections")) as root:
        raw = make_dataset_3d(root / "SAMPLAN_RAW", n_cases=3)
        pre = plan_quickly(raw, None, plan_only=True)
        yield raw, pre, load_json(pre / "plans.json")


def test_every_section_round_trips(planned):
    _, _, plans = planned
    for name in ("unet", "samunetr", "medsam", "samzeroshot"):
        method = get_method(name)
        section = method.section_type.from_dict(plans["methods"][name], name)
        assert section.to_dict() == plans["methods"][name]  # what is written is what is parsed


def test_intensity_rules_take_the_variant_their_mode_names(planned):
    _, _, plans = planned
    section = MedSAMSection.from_dict(plans["methods"]["medsam"])
    assert isinstance(section.intensity.per_channel[0], PercentileClipRule)
    raw = copy.deepcopy(plans["methods"]["medsam"])
    raw["intensity"]["per_channel"] = [{"mode": "window", "window": [-1.0, 2.0], "raw_window": [-160.0, 240.0]}]
    assert isinstance(MedSAMSection.from_dict(raw).intensity.per_channel[0], WindowRule)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["box_policy"].update(max_jiter_px=3), r"methods.medsam.box_policy: unknown key\(s\) 'max_jiter_px'"),
    (lambda s: s.pop("batch_size"), r"methods.medsam lacks 'batch_size'"),
    (lambda s: s.update(batch_size="4"), r"methods.medsam.batch_size must be an integer"),
    (lambda s: s["box_policy"].update(name="tight"), r"methods.medsam.box_policy.name is 'tight'; use one of"),
    (lambda s: s["intensity"]["per_channel"][0].update(mode="gamma"),
     r"methods.medsam.intensity.per_channel\[0\].mode is 'gamma'; use one of percentile_clip, scale, window"),
    (lambda s: s["recipe"]["optimizer"].update(name="Lion"), r"methods.medsam.recipe.optimizer.name is 'Lion'"),
])
def test_bad_sections_are_refused_naming_the_key_and_the_file(planned, edit, message):
    _, pre, plans = planned
    plans = copy.deepcopy(plans)
    edit(plans["methods"]["medsam"])
    with pytest.raises(SamplanError, match=message) as e:
        get_method("medsam").check_plan(plans, plans_file=pre / "plans.json")
    assert str(pre / "plans.json") in str(e.value)


def test_samplan_train_refuses_a_misspelt_key_before_writing_anything(planned, capsys):
    from samplan.cli.train import main as train_main

    raw, pre, plans = planned
    edited = copy.deepcopy(plans)
    edited["methods"]["samunetr"]["recipe"]["num_epoch"] = 3
    save_json(edited, pre / "plans.json")
    try:
        assert train_main(["-d", raw.name, "-m", "samunetr", "-f", "0", "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert "methods.samunetr.recipe: unknown key(s) 'num_epoch'" in err and str(pre / "plans.json") in err
        results = raw.parents[1] / "SAMPLAN_RESULTS"
        assert not any(results.rglob("*")), "nothing may be written for a bad plan"
    finally:
        save_json(plans, pre / "plans.json")


def test_configurations_outside_the_section_are_refused(planned):
    _, _, plans = planned
    with pytest.raises(SamplanError, match="configuration '3d_fullres' is not planned for medsam; planned: 2d"):
        get_method("medsam").check_plan(plans, "3d_fullres")


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_litemedsam", "tiny_sam2", "litemedsam"])
def test_backbone_parameter_counts_match_the_built_modules(name):
    import samplan.models.backbones as bb
    from samplan.models.specs import backbone_spec

    spec = backbone_spec(name)
    if spec.family == "sam2":
        pytest.importorskip("sam2")
        model = bb.build_sam2(name)
        encoder = model.image_encoder
    else:
        model = bb.build_sam_model(name)
        encoder = model.image_encoder
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert count(encoder) == pytest.approx(spec.encoder_params_m, abs=5e-4)
    assert count(model) == pytest.approx(spec.model_params_m, abs=5e-4)
