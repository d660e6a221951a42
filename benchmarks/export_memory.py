"""Peak memory of export (logits on the plan grid -> label map file): the whole-array way vs samplan's.

Every measurement runs in a fresh Python process that builds the case's logits (smooth random fields,
float32, on the plan grid), then writes the label map with `export_prediction` ("after") or with the
former whole-array export kept below ("before": all K classes resampled at once, then argmax). The
process's peak RSS (getrusage) is reported next to its RSS just before the export, which is mostly the
logits themselves, i.e. what the sliding-window prediction hands to export anyway.

  python benchmarks/export_memory.py                       # both cases, before and after
  python benchmarks/export_memory.py --cases brats --probabilities

Cases: "brats" is 240x240x155 at 1 mm, cropped to its nonzero box, three sigmoid regions (WT/TC/ET) and a
1 mm plan grid; "ct" is 512x512x600 at 0.7x0.7x1.0 mm, nothing cropped, 14 softmax classes and a plan grid
of 1.0x1.0x1.5 mm (a dataset median with thicker slices, as nnU-Net's 3d_fullres would pick). A "before"
run is skipped when its estimated peak does not fit in the memory available now.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
GB = 2**30

# (Z, Y, X) image, spacing, crop box, plan spacing, label definitions
CASES: dict[str, dict[str, Any]] = {
    "brats": {"shape": (155, 240, 240), "spacing": (1.0, 1.0, 1.0), "box": ((8, 148), (35, 205), (50, 190)),
              "plan_spacing": [1.0, 1.0, 1.0],
              "labels": {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3},
                         "regions_class_order": [1, 2, 3]}},
    "ct": {"shape": (600, 512, 512), "spacing": (1.0, 0.7, 0.7), "box": ((0, 600), (0, 512), (0, 512)),
           "plan_spacing": [1.5, 1.0, 1.0],
           "labels": {"labels": {"background": 0, **{f"organ{i}": i for i in range(1, 14)}}}},
}


def case_inputs(name: str) -> tuple[dict, dict, Any, list[int]]:
    """(properties, plans, label manager, logits grid shape) of a benchmark case."""
    from samplan.dataset.labels import LabelManager
    from samplan.preprocessing.resampling import compute_new_shape

    c = CASES[name]
    cropped = [b - a for a, b in c["box"]]
    props = {"spacing": list(c["spacing"]), "shape_before_cropping": list(c["shape"]),
             "shape_after_cropping_and_before_resampling": cropped, "bbox_used_for_cropping": [list(b) for b in c["box"]],
             "geometry": {"kind": "sitk", "spacing": list(c["spacing"][::-1]), "origin": [0.0, 0.0, 0.0],
                          "direction": list(np.eye(3).ravel()), "ndim": 3}}
    probs_kwargs = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    plans = {"transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": {"data_identifier": "bench", "spacing": c["plan_spacing"],
                                               "resampling_fn_probabilities_kwargs": probs_kwargs}}}
    grid = compute_new_shape(cropped, c["spacing"], c["plan_spacing"])
    return props, plans, LabelManager.from_dataset_json(c["labels"]), grid


def smooth_logits(k: int, grid: list[int], seed: int = 0):
    """float32 torch logits `(k, *grid)`: coarse random fields interpolated up, so the label map has regions."""
    import torch

    coarse = torch.randn(1, k, *(max(2, s // 24) for s in grid), generator=torch.Generator().manual_seed(seed)) * 4
    return torch.nn.functional.interpolate(coarse, size=tuple(grid), mode="trilinear", align_corners=False)[0]


def whole_array_label_map(logits, props: dict, plans: dict, configuration: str, lm, return_probabilities: bool = False):
    """The export before it was bounded: every class resampled at once, then softmax/argmax over the whole array."""
    import torch

    from samplan.inference.export import _uncrop_and_untranspose
    from samplan.preprocessing.preprocessor import configuration_plan, target_spacing
    from samplan.preprocessing.resampling import resample_probabilities

    plan = configuration_plan(plans, configuration)
    original = [float(props["spacing"][a]) for a in plans["transpose_forward"]]
    kwargs = {k: v for k, v in plan["resampling_fn_probabilities_kwargs"].items() if k in ("order", "order_z", "force_separate_z")}
    cropped = torch.from_numpy(resample_probabilities(
        logits, props["shape_after_cropping_and_before_resampling"], target_spacing(plan, original), original, **kwargs))
    probs = lm.logits_to_probabilities(cropped) if lm.has_regions or return_probabilities else None
    seg = lm.probabilities_to_segmentation(probs if lm.has_regions else cropped)
    seg = _uncrop_and_untranspose(seg.astype(np.uint8 if 0 <= seg.min() and seg.max() < 256 else np.int16), props, plans)
    if not return_probabilities:
        return seg
    fill = np.zeros(probs.shape[0], np.float16)
    fill[0] = 0 if lm.has_regions else 1
    return seg, _uncrop_and_untranspose(probs.numpy().astype(np.float16), props, plans, fill)


def _whole_array_export(logits, props, plans, lm, out: Path, probabilities: bool) -> None:
    from samplan.dataset.image_io import write_seg

    result = whole_array_label_map(logits, props, plans, "3d_fullres", lm, probabilities)
    seg = result[0] if probabilities else result
    if probabilities:
        with open(out.with_name("case.npz"), "wb") as f:
            np.savez_compressed(f, probabilities=result[1])
    write_seg(seg, out, props)


def child(name: str, mode: str, probabilities: bool) -> dict[str, Any]:
    """Build the logits, export them once, report RSS (runs in its own process)."""
    from samplan.inference.export import export_prediction

    props, plans, lm, grid = case_inputs(name)
    logits = smooth_logits(lm.num_outputs, grid)
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.nii.gz"
        if mode == "after":
            export_prediction(logits, props, plans, "3d_fullres", lm, out, save_probabilities=probabilities)
        else:
            _whole_array_export(logits, props, plans, lm, out, probabilities)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"case": name, "mode": mode, "probabilities": probabilities, "classes": lm.num_outputs,
            "grid": grid, "logits_gb": logits.numel() * 4 / GB, "rss_before_gb": before / GB,
            "peak_gb": peak / GB, "seconds": time.perf_counter() - t0}


def estimated_before_gb(name: str, probabilities: bool) -> float:
    """Rough peak of the whole-array export: logits, K resampled classes (x2 with softmax) and the argmax."""
    c = CASES[name]
    k = len(c["labels"]["labels"]) - (1 if "regions_class_order" in c else 0)
    cropped = float(np.prod([b - a for a, b in c["box"]]))
    grid = cropped * float(np.prod(np.asarray(c["spacing"]) / np.asarray(c["plan_spacing"])))
    per_voxel = 4 * k * (2 if probabilities or "regions_class_order" in c else 1) + 12
    return (4 * k * grid + per_voxel * cropped + (2 * k * np.prod(c["shape"]) if probabilities else 0)) / GB + 0.5


def measure(name: str, mode: str, probabilities: bool) -> dict[str, Any] | str:
    """Run one measurement in a fresh process; a reason string when it is skipped or fails."""
    if mode == "before":
        need, have = estimated_before_gb(name, probabilities), psutil.virtual_memory().available / GB
        if need > 0.8 * have:
            return f"skipped: needs ~{need:.0f} GB, {have:.0f} GB available"
    cmd = [sys.executable, __file__, "--child", name, mode] + (["--probabilities"] if probabilities else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ''}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, str, bool, dict | str]]) -> str:
    """Markdown table of the measurements."""
    head = "| case | export | probabilities | K | logits grid | logits GB | RSS before export GB | peak RSS GB | export extra GB | s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, mode, probs, r in rows:
        if isinstance(r, str):
            lines.append(f"| {name} | {mode} | {'yes' if probs else 'no'} | | | | | {r} | | |")
            continue
        lines.append(f"| {name} | {mode} | {'yes' if probs else 'no'} | {r['classes']} | {'x'.join(map(str, r['grid']))} | "
                     f"{r['logits_gb']:.2f} | {r['rss_before_gb']:.2f} | {r['peak_gb']:.2f} | "
                     f"{r['peak_gb'] - r['rss_before_gb']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line: measure the chosen cases before/after and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--modes", nargs="+", choices=["before", "after"], default=["before", "after"])
    ap.add_argument("--probabilities", action="store_true", help="also write the float16 probabilities (.npz)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.probabilities)))
        return
    rows = []
    for name in args.cases:
        for mode in args.modes:
            rows.append((name, mode, args.probabilities, measure(name, mode, args.probabilities)))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
