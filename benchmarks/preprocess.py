"""Benchmark samplan_plan_and_preprocess against nnUNetv2_plan_and_preprocess on one raw dataset.

Both tools run on the same fresh copy of the dataset, each with its own empty output roots. For each
run the wall time and the peak resident memory of the whole process tree (the command plus all its
worker processes, RSS summed, psutil polled every 0.2 s) are measured. Then samplan's fingerprint.json
and plans.json are compared field by field with nnU-Net's dataset_fingerprint.json and nnUNetPlans.json.

  python benchmarks/preprocess.py -d Dataset004_Hippocampus -np 2
  python benchmarks/preprocess.py --self-test REF_DIR   # REF_DIR holds nnU-Net's two JSON files
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
NNUNET_CMD = "nnUNetv2_plan_and_preprocess"
POLL_S = 0.2
Row = dict[str, Any]  # {"field", "ours", "nnunet", "detail", "ok"}


def run_measured(cmd: list[str], env: dict[str, str], log_file: Path) -> dict[str, Any]:
    """Run `cmd` with output to `log_file`; return exit code, wall time (s) and peak summed RSS (bytes) of its tree."""
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak_rss, peak_procs = 0, 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass  # a worker that ended between listing and reading
            peak_rss, peak_procs = max(peak_rss, rss), max(peak_procs, len(tree))
            time.sleep(POLL_S)
        proc.wait()
    return {"command": cmd, "returncode": proc.returncode, "wall_s": time.perf_counter() - t0,
            "peak_rss_bytes": peak_rss, "max_processes": peak_procs, "log": str(log_file)}


def _rel_diff(a: float, b: float) -> float:
    """|a - b| relative to |b| (0 when both are 0)."""
    return 0.0 if a == b else abs(a - b) / max(abs(b), 1e-12)


def _row(field: str, ours: Any, ref: Any, ok: bool, detail: str = "") -> Row:
    return {"field": field, "ours": ours, "nnunet": ref, "detail": detail, "ok": bool(ok)}


def _equal_arrays(ours: Any, ref: Any, rtol: float = 1e-5) -> bool:
    """Element-wise equality of nested number lists (within `rtol`); False on any shape mismatch or None."""
    if ours is None or ref is None:
        return False
    a, b = np.asarray(ours, dtype=float), np.asarray(ref, dtype=float)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=1e-8))


def _per_case_row(field: str, ours: list | None, ref: list, rtol: float) -> Row:
    """One row for a per-case list (spacings, shapes): equal?, else how many cases differ."""
    if _equal_arrays(ours, ref, rtol):
        return _row(field, f"{len(ours)} cases", f"{len(ref)} cases", True, "all equal")
    if ours is None:
        return _row(field, None, f"{len(ref)} cases", False, "missing")
    if len(ours) != len(ref):
        return _row(field, f"{len(ours)} cases", f"{len(ref)} cases", False, "case count differs")
    n_diff = sum(not _equal_arrays(o, r, rtol) for o, r in zip(ours, ref))
    same_multiset = _equal_arrays(sorted(map(list, ours)), sorted(map(list, ref)), rtol)
    return _row(field, f"{len(ours)} cases", f"{len(ref)} cases", False,
                "same values, case order differs" if same_multiset else f"{n_diff} cases differ")


def compare_fingerprints(ours: dict, ref: dict, rtol: float = 1e-3) -> list[Row]:
    """Rows comparing samplan's fingerprint.json with nnU-Net's dataset_fingerprint.json (same keys)."""
    rows = [_per_case_row("spacings", ours.get("spacings"), ref["spacings"], 1e-5),
            _per_case_row("shapes_after_crop", ours.get("shapes_after_crop"), ref["shapes_after_crop"], 0.0)]
    ours_int = ours.get("foreground_intensity_properties_per_channel", {})
    for ch, ref_stats in ref["foreground_intensity_properties_per_channel"].items():
        for stat in ("mean", "median", "std", "min", "max", "percentile_00_5", "percentile_99_5"):
            o, r = ours_int.get(ch, {}).get(stat), ref_stats[stat]
            if o is None:
                rows.append(_row(f"intensity[{ch}].{stat}", None, r, False, "missing"))
                continue
            d = _rel_diff(o, r)
            rows.append(_row(f"intensity[{ch}].{stat}", o, r, d <= rtol, f"{100 * d:.4f} %"))
    o, r = ours.get("median_relative_size_after_cropping"), ref["median_relative_size_after_cropping"]
    d = None if o is None else _rel_diff(o, r)
    rows.append(_row("median_relative_size_after_cropping", o, r, d is not None and d <= rtol,
                     "missing" if d is None else f"{100 * d:.4f} %"))
    return rows


def _arch(config: dict) -> dict:
    return config.get("architecture", {}).get("arch_kwargs", {})


def compare_plans(ours: dict, ref: dict, configuration: str = "3d_fullres") -> list[Row]:
    """Rows comparing samplan's plans.json with nnUNetPlans.json for one configuration."""
    rows = [_row("transpose_forward", ours.get("transpose_forward"), ref["transpose_forward"],
                 ours.get("transpose_forward") == ref["transpose_forward"])]
    for key in ("original_median_spacing_after_transp", "original_median_shape_after_transp"):
        rows.append(_row(key, ours.get(key), ref[key], _equal_arrays(ours.get(key), ref[key])))
    rc = ref["configurations"].get(configuration)
    oc = ours.get("configurations", {}).get(configuration)
    if rc is None:
        return rows + [_row(f"configurations.{configuration}", "present" if oc else None, None, oc is None,
                            "nnU-Net did not plan it")]
    if oc is None:
        return rows + [_row(f"configurations.{configuration}", None, "present", False, "samplan did not plan it")]
    numeric = {"spacing (target)": (oc.get("spacing"), rc["spacing"]),
               "median_image_size_in_voxels": (oc.get("median_image_size_in_voxels"), rc["median_image_size_in_voxels"]),
               "patch_size": (oc.get("patch_size"), rc["patch_size"]),
               "strides": (_arch(oc).get("strides"), _arch(rc).get("strides")),
               "kernel_sizes": (_arch(oc).get("kernel_sizes"), _arch(rc).get("kernel_sizes")),
               "features_per_stage": (_arch(oc).get("features_per_stage"), _arch(rc).get("features_per_stage"))}
    for field, (o, r) in numeric.items():
        rows.append(_row(field, o, r, _equal_arrays(o, r)))
    exact = {"batch_size": (oc.get("batch_size"), rc["batch_size"]),
             "n_stages": (_arch(oc).get("n_stages"), _arch(rc).get("n_stages")),
             "normalization_schemes": (oc.get("normalization_schemes"), rc["normalization_schemes"]),
             "use_mask_for_norm": (oc.get("use_mask_for_norm"), rc["use_mask_for_norm"]),
             "network_class_name": (oc.get("architecture", {}).get("network_class_name"),
                                    rc["architecture"]["network_class_name"])}
    for kw in ("resampling_fn_data_kwargs", "resampling_fn_seg_kwargs", "resampling_fn_probabilities_kwargs"):
        exact[kw] = (oc.get(kw), rc.get(kw))
    for field, (o, r) in exact.items():
        rows.append(_row(field, o, r, o == r))
    return rows


def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """Plain-text table with columns padded to the widest cell."""
    cells = [header] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return "-" if v is None else str(v)


def comparison_table(rows: list[Row]) -> str:
    """The comparison rows as a table with OK/DIFF per row."""
    return format_table(["field", "samplan", "nnU-Net", "detail", "status"],
                        [[r["field"], r["ours"], r["nnunet"], r["detail"], "OK" if r["ok"] else "DIFF"] for r in rows])


def self_test(ref_dir: Path, configuration: str = "3d_fullres") -> None:
    """Check the comparison: nnU-Net's files against themselves are all OK, perturbed copies show DIFF."""
    fp = json.loads((ref_dir / "dataset_fingerprint.json").read_text())
    plans = json.loads((ref_dir / "nnUNetPlans.json").read_text())
    rows = compare_fingerprints(fp, fp) + compare_plans(plans, plans, configuration)
    assert all(r["ok"] for r in rows), comparison_table([r for r in rows if not r["ok"]])
    fp2, plans2 = copy.deepcopy(fp), copy.deepcopy(plans)
    fp2["foreground_intensity_properties_per_channel"]["0"]["mean"] *= 1.01
    fp2["shapes_after_crop"][0][1] += 1
    cfg = plans2["configurations"][configuration]
    cfg["patch_size"][0] += 8
    cfg["batch_size"] += 1
    cfg["normalization_schemes"] = ["CTNormalization"] * len(cfg["normalization_schemes"])
    diff = {r["field"] for r in compare_fingerprints(fp2, fp) + compare_plans(plans2, plans, configuration) if not r["ok"]}
    expected = {"intensity[0].mean", "shapes_after_crop", "patch_size", "batch_size", "normalization_schemes"}
    assert diff == expected, f"expected DIFF exactly in {sorted(expected)}, got {sorted(diff)}"
    del fp2["median_relative_size_after_cropping"], plans2["configurations"][configuration]
    assert not compare_fingerprints(fp2, fp)[-1]["ok"] and not compare_plans(plans2, plans, configuration)[-1]["ok"]
    print(f"self-test passed: {len(rows)} identical rows OK, perturbed fields DIFF: {', '.join(sorted(diff))}")


def _find_dataset(source: Path, spec: str) -> Path:
    """`source/DatasetXXX_Name` matching a full name or a numeric id."""
    cands = [p for p in sorted(source.glob("Dataset[0-9][0-9][0-9]_*")) if spec in (p.name, p.name[7:10], str(int(p.name[7:10])))]
    if len(cands) != 1:
        sys.exit(f"error: dataset '{spec}' not found (or ambiguous) in {source}; use --source or a full DatasetXXX_Name")
    return cands[0]


def _default_nnunet_bin() -> Path:
    found = shutil.which(NNUNET_CMD)
    return Path(found).parent if found else REPO.parent / "nnunet_venv" / "bin"


def run_benchmark(args: argparse.Namespace) -> int:
    """Copy the dataset, run both tools, print the timing and comparison tables; return the exit status."""
    src = _find_dataset(Path(args.source), args.dataset)
    name, conf = src.name, args.configuration
    work = Path(tempfile.mkdtemp(prefix="samplan_bench_"))
    try:
        shutil.copytree(src, work / "raw" / name)
        ours_cmd = [str(Path(args.samplan_bin) / "samplan_plan_and_preprocess"), "-d", name, "-np", str(args.np), "-c", conf]
        env = dict(os.environ, SAMPLAN_RAW=str(work / "raw"), SAMPLAN_PREPROCESSED=str(work / "samplan_preprocessed"),
                   SAMPLAN_RESULTS=str(work / "samplan_results"))
        runs = {"samplan": run_measured(ours_cmd, env, work / "samplan.log")}
        nn_exe = Path(args.nnunet_bin) / NNUNET_CMD
        if nn_exe.is_file():
            # -npfp and nnUNet_def_n_proc: otherwise nnU-Net spawns 8 fingerprint/verification workers whatever -np says
            nn_cmd = [str(nn_exe), "-d", str(int(name[7:10])), "-c", conf, "-np", str(args.np), "-npfp", str(args.np),
                      "--verify_dataset_integrity"]
            nn_env = dict(os.environ, nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nnunet_preprocessed"),
                          nnUNet_results=str(work / "nnunet_results"), nnUNet_def_n_proc=str(args.np))
            runs["nnU-Net"] = run_measured(nn_cmd, nn_env, work / "nnunet.log")
        else:
            print(f"note: {nn_exe} not found; timing samplan only (pass --nnunet-bin)")
        print(f"\n{name}: {sum(1 for _ in (src / 'labelsTr').iterdir())} cases, configuration {conf}, -np {args.np}\n")
        print(format_table(["tool", "exit", "wall s", "peak RSS MB", "max procs", "command"],
                           [[k, r["returncode"], round(r["wall_s"], 1), round(r["peak_rss_bytes"] / 2**20, 1),
                             r["max_processes"], " ".join([Path(r["command"][0]).name, *r["command"][1:]])] for k, r in runs.items()]))
        if len(runs) == 2 and all(r["returncode"] == 0 for r in runs.values()):
            o, n = runs["samplan"], runs["nnU-Net"]
            print(f"\nsamplan / nnU-Net: wall time x{o['wall_s'] / n['wall_s']:.2f}, "
                  f"peak RSS x{o['peak_rss_bytes'] / max(n['peak_rss_bytes'], 1):.2f}")
        status = 0
        for k, r in runs.items():
            if r["returncode"] != 0:
                status = 1
                tail = Path(r["log"]).read_text().splitlines()[-15:]
                print(f"\n{k} failed (exit {r['returncode']}); last lines of its log:\n" + "\n".join(tail))
        ours_dir, ref_dir = work / "samplan_preprocessed" / name, work / "nnunet_preprocessed" / name
        if status == 0 and "nnU-Net" in runs:
            rows = compare_fingerprints(json.loads((ours_dir / "fingerprint.json").read_text()),
                                        json.loads((ref_dir / "dataset_fingerprint.json").read_text()), args.rtol)
            print(f"\nfingerprint (intensity statistics: OK when the relative difference <= {100 * args.rtol:g} %)\n")
            print(comparison_table(rows))
            plan_rows = compare_plans(json.loads((ours_dir / "plans.json").read_text()),
                                      json.loads((ref_dir / "nnUNetPlans.json").read_text()), conf)
            print(f"\nplan ({conf})\n")
            print(comparison_table(plan_rows))
            n_diff = sum(not r["ok"] for r in rows + plan_rows)
            print(f"\n{len(rows) + len(plan_rows) - n_diff} OK, {n_diff} DIFF")
        if args.json:
            Path(args.json).write_text(json.dumps({"dataset": name, "runs": runs}, indent=2, default=str))
        return status
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the benchmark (or the comparison self-test)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", help="DatasetXXX_Name or its id, a folder of --source")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "raw"), help="raw datasets folder (read only)")
    p.add_argument("-np", type=int, default=2, help="worker processes for both tools (default 2)")
    p.add_argument("--samplan-bin", default=str(REPO / ".venv" / "bin"), help="folder holding samplan_plan_and_preprocess")
    p.add_argument("--nnunet-bin", default=str(_default_nnunet_bin()), help=f"folder holding {NNUNET_CMD} (skipped if absent)")
    p.add_argument("--configuration", default="3d_fullres", help="configuration to preprocess and compare")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance for the intensity statistics (default 1e-3)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy and both outputs")
    p.add_argument("--json", default=None, help="also write the timings to this JSON file")
    p.add_argument("--self-test", metavar="REF_DIR", default=None, help="test the comparison on nnU-Net's files in REF_DIR")
    args = p.parse_args(argv)
    if args.self_test:
        self_test(Path(args.self_test), args.configuration)
        return 0
    if not args.dataset:
        p.error("-d is required")
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
