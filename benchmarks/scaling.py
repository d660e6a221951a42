"""Do preprocessing and prediction grow linearly with the number of cases and with the voxels per case?

In a work folder (its own SAMPLAN_RAW/PREPROCESSED/RESULTS) the script
1. writes CT-like synthetic datasets (predict_memory.ct_case: body, spine, 2 organs, noise; int16, slab by slab):
   the base (--base-cases training cases + --test-cases imagesTs cases of --base-shape), a "cases" series with
   the case counts times each scale, and a "voxels" series with the base case counts and each case grown by the
   scale (axes doubled in turn y, x, z: 64x96x96 -> 64x192x192 at 4x -> 128x384x192 at 16x). The spacing of the
   training cases cycles through SPACINGS (3 of 4 are resampled), the test cases are at the target spacing (so
   that their sliding-window count depends on their size only); every run gets the same target spacing
   (--overwrite-target-spacing), so growing the images grows the field of view, not the resolution;
2. runs `samplan_plan_and_preprocess -d ID -m unet -c 3d_fullres -np N` on each dataset with fresh output folders
   (verification, fingerprint, plan and preprocessing: what a user waits for);
3. trains unet 3d_fullres once on the base dataset (fold all, 1 iteration, --no-val) and runs
   `samplan_predict --disable-tta --device cpu` with it on every dataset's test cases;
4. prints one markdown table (time, time per Mvoxel and peak RSS per run), the slope of log(time) over log(scale)
   per series (1.0 = linear), marginal costs and a verdict, and the plan of every dataset (patch size, windows).

Wall time and peak RSS of each command: preprocess.run_measured (psutil, summed RSS of the process tree, polled
every 0.2 s) around GNU `time -v` (exact peak of the largest single process); the larger of the two is shown.

  python benchmarks/scaling.py --work /work/bench/scaling                       # 8 cases of 64x96x96; 1x 4x 16x
  python benchmarks/scaling.py --base-shape 16 32 32 --base-cases 2 --scales 1 2  # a quick check
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_memory import (BIN, CONFIG, ct_case, model_plan, n_windows, parse_time_v,  # noqa: E402
                            preprocessed_shape, write_image)
from preprocess import run_measured  # noqa: E402  (psutil peak of the summed process tree)

MB, MVOX = 2**20, 1e6
N_CLASSES = 3  # background and two organs
# (z, y, x) mm, cycled over the cases: the median, and the target of every run, is TARGET
SPACINGS = ((1.25, 0.75, 0.75), (1.0, 0.7, 0.7), (1.5, 0.8, 0.8), (1.25, 0.75, 0.75))
TARGET = (1.25, 0.75, 0.75)
GROW_ORDER = (1, 2, 0)  # the axes doubled in turn for the voxel series
FIRST_ID = 970
LINEAR_RATIO = 1.5  # per-Mvoxel time at the largest scale within this factor of 1x counts as linear


@dataclass(frozen=True)
class Synth:
    """One generated dataset: its raw-folder name, id, case counts and (z, y, x) shape of every case."""
    name: str
    ds_id: int
    n_train: int
    n_test: int
    shape: tuple[int, int, int]

    @property
    def voxels(self) -> int:
        """Voxels of one case."""
        return int(np.prod(self.shape))


def scaled_shape(base: tuple[int, int, int], scale: int) -> tuple[int, int, int]:
    """`base` with scale x the voxels: the axes of GROW_ORDER doubled in turn (scale must be a power of 2)."""
    if scale < 1 or scale & (scale - 1):
        sys.exit(f"--scales must be powers of 2 (1, 2, 4, 8, 16, ...), got {scale}")
    shape = list(base)
    for k in range(int(math.log2(scale))):
        shape[GROW_ORDER[k % 3]] *= 2
    return tuple(shape)


def plan_datasets(base: tuple[int, int, int], n_train: int, n_test: int,
                  scales: list[int]) -> dict[tuple[str, int], Synth]:
    """(series, scale) -> dataset; scale 1 of both series is the one base dataset."""
    out: dict[tuple[str, int], Synth] = {}
    base_ds = Synth(f"Dataset{FIRST_ID:03d}_ScaleBase", FIRST_ID, n_train, n_test, base)
    next_id = FIRST_ID + 1
    for series in ("cases", "voxels"):
        for s in scales:
            if s == 1:
                out[series, s] = base_ds
                continue
            if series == "cases":
                ds = Synth(f"Dataset{next_id:03d}_ScaleCasesX{s}", next_id, n_train * s, n_test * s, base)
            else:
                ds = Synth(f"Dataset{next_id:03d}_ScaleVoxelsX{s}", next_id, n_train, n_test, scaled_shape(base, s))
            out[series, s] = ds
            next_id += 1
    return out


def generate(raw: Path, ds: Synth, seed: int) -> None:
    """Write ds into raw/ (reused when a previous run wrote the same dataset: dataset.json is written last)."""
    folder = raw / ds.name
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ_01": 1, "organ_02": 2},
            "numTraining": ds.n_train, "file_ending": ".nii.gz"}
    stamp = folder.parent / f".{ds.name}.generated.json"  # outside the dataset: verification sees only its own files
    want = json.loads(json.dumps({"shape": ds.shape, "n_train": ds.n_train, "n_test": ds.n_test, "seed": seed,
                                  "spacings": SPACINGS, "test_spacing": TARGET}))  # as read back: lists
    if (folder / "dataset.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        print(f"  {ds.name}: reused", flush=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    t0 = time.perf_counter()
    cases = ([(f"case_{i:04d}", "imagesTr") for i in range(ds.n_train)]
             + [(f"test_{i:04d}", "imagesTs") for i in range(ds.n_test)])
    for i, (case, sub) in enumerate(cases):
        # the same seeds and spacings in every dataset: the x4 cases series holds the base cases and more
        image, label = ct_case(ds.shape, N_CLASSES, seed + i)
        # test cases at the target spacing: their window count depends on their size only, not on a spacing mix
        spacing = SPACINGS[i % len(SPACINGS)] if sub == "imagesTr" else TARGET
        write_image(image, folder / sub / f"{case}_0000.nii.gz", spacing)
        if sub == "imagesTr":
            write_image(label, folder / "labelsTr" / f"{case}.nii.gz", spacing)
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    stamp.write_text(json.dumps(want))
    print(f"  {ds.name}: {ds.n_train}+{ds.n_test} cases of {'x'.join(map(str, ds.shape))} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)


def cpu_seconds(report: Path) -> float:
    """User + system CPU seconds of a command and its waited-for children, from a GNU `time -v` report."""
    text = report.read_text()
    return sum(float(re.search(rf"{kind} time \(seconds\):\s*([\d.]+)", text).group(1)) for kind in ("User", "System"))


def measured(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> tuple[float, float, float]:
    """Run a samplan command; (wall s, peak RSS bytes, CPU s) or exit with its log's tail when it fails."""
    report = logs / f"{name}.time"
    print(f"$ {Path(cmd[0]).name} {' '.join(cmd[1:])}", flush=True)
    res = run_measured(["/usr/bin/time", "-v", "-o", str(report), *cmd], env, logs / f"{name}.log")
    if res["returncode"] != 0:
        sys.exit(f"{name} failed (exit {res['returncode']}); last output:\n{Path(res['log']).read_text()[-3000:]}")
    one_process_rss, _ = parse_time_v(report)
    rss = max(res["peak_rss_bytes"], one_process_rss)
    cpu = cpu_seconds(report)
    print(f"  {res['wall_s']:.1f} s ({cpu:.1f} CPU s), peak RSS {rss / MB:.0f} MB", flush=True)
    return res["wall_s"], rss, cpu


def preprocess(ds: Synth, env: dict[str, str], work: Path, np_: int) -> tuple[tuple[float, float, float], dict]:
    """Fresh plan_and_preprocess of ds; ((wall, peak RSS, CPU s), its 3d_fullres plan)."""
    out = work / "preprocessed" / ds.name
    shutil.rmtree(out, ignore_errors=True)
    measures = measured(f"preprocess_{ds.name}", [
        str(BIN / "samplan_plan_and_preprocess"), "-d", str(ds.ds_id), "-m", "unet", "-c", CONFIG, "-np", str(np_),
        "--overwrite-target-spacing", *map(str, TARGET)], env, work / "logs")
    plans = json.loads((out / "plans.json").read_text())
    return measures, plans["configurations"][CONFIG]


def train(base: Synth, env: dict[str, str], work: Path) -> None:
    """One iteration of unet 3d_fullres on every base case: a model to predict with (its weights do not matter)."""
    shutil.rmtree(work / "results" / base.name, ignore_errors=True)
    measured("train", [str(BIN / "samplan_train"), "-d", str(base.ds_id), "-m", "unet", "-c", CONFIG, "-f", "all",
                       "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "0", "--no-val", "--device", "cpu",
                       "-np", "0"], env, work / "logs")


def predict(ds: Synth, base: Synth, env: dict[str, str], work: Path) -> tuple[float, float, float]:
    """samplan_predict of ds's test cases with the base model; (wall, peak RSS, CPU s)."""
    out = work / "predictions" / ds.name
    shutil.rmtree(out, ignore_errors=True)
    measures = measured(f"predict_{ds.name}", [
        str(BIN / "samplan_predict"), "-i", str(work / "raw" / ds.name / "imagesTs"), "-o", str(out),
        "-d", str(base.ds_id), "-m", "unet", "-c", CONFIG, "-f", "all", "--disable-tta", "--device", "cpu"],
        env, work / "logs")
    written = len(list(out.glob("*.nii.gz")))
    if written != ds.n_test:
        sys.exit(f"predict {ds.name} wrote {written} of {ds.n_test} label maps in {out}")
    return measures


def windows(ds: Synth, work: Path, conf: dict) -> int:
    """Sliding windows of all of ds's test cases under the model's plan."""
    patch = [int(p) for p in conf["patch_size"]]
    images = sorted((work / "raw" / ds.name / "imagesTs").glob("*_0000.nii.gz"))
    return sum(n_windows(preprocessed_shape([f], conf), patch) for f in images)


def slope(scales: list[float], times: list[float]) -> float:
    """Least-squares slope of log(time) over log(scale): 1 is linear, 2 quadratic."""
    return float(np.polyfit(np.log(scales), np.log(times), 1)[0]) if len(scales) > 1 else float("nan")


def _marginal(mvox: list[float], times: list[float]) -> list[float]:
    """Extra seconds per extra Mvoxel from each scale to the next."""
    return [(t1 - t0) / (m1 - m0) for m0, m1, t0, t1 in zip(mvox, mvox[1:], times, times[1:])]


def verdict(mvox: list[float], wall: list[float], cpu: list[float]) -> str:
    """Slopes, per-Mvoxel ratio, marginal costs and a line fit of one series and step, and linear or not.

    Linear when the wall time per Mvoxel at the largest scale is within LINEAR_RATIO of the 1x value and the
    marginal CPU seconds per Mvoxel do not grow by more than LINEAR_RATIO from the first step to the last: a
    fixed start-up cost makes small runs dear per Mvoxel and could hide a growing cost, and CPU seconds, unlike
    wall time, hardly change when other jobs share the cores.
    """
    scales = [m / mvox[0] for m in mvox]
    ratio = [(t[-1] / mvox[-1]) / (t[0] / mvox[0]) for t in (wall, cpu)]
    m_wall, m_cpu = _marginal(mvox, wall), _marginal(mvox, cpu)
    per_mv, fixed = np.polyfit(mvox, wall, 1) if len(mvox) > 1 else (float("nan"), float("nan"))
    faster = ratio[0] > LINEAR_RATIO or (len(m_cpu) > 1 and m_cpu[-1] > LINEAR_RATIO * m_cpu[0])
    return (f"slope {slope(scales, wall):.2f} (CPU {slope(scales, cpu):.2f}); s per Mvoxel {ratio[0]:.2f}x the 1x "
            f"value (CPU {ratio[1]:.2f}x); marginal s per Mvoxel {' -> '.join(f'{m:.2f}' for m in m_wall)} "
            f"(CPU {' -> '.join(f'{m:.2f}' for m in m_cpu)}); fit {fixed:.1f} s + {per_mv:.2f} s per Mvoxel: "
            f"**{'FASTER THAN LINEAR' if faster else 'linear'}**")


def _cell(wall: float, cpu: float) -> str:
    return f"{wall:.1f} ({cpu:.0f})"


def report(sets: dict[tuple[str, int], Synth], pp: dict, pr: dict, plans: dict, wins: dict, scales: list[int]) -> str:
    """The markdown table (time as "wall s (CPU s)"), slopes and verdicts per series and step, and the plans."""
    lines = ["| series | scale | cases (train + test) | voxels per case (z x y x x) | total Mvoxels (train / test) "
             "| preprocess s (CPU s) | s per Mvoxel | preprocess peak RSS MB | predict s (CPU s) "
             "| predict s per Mvoxel | predict peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for series in ("cases", "voxels"):
        rows = {"preprocess": ([], [], []), "predict": ([], [], [])}  # (Mvoxels, wall, CPU) per scale
        for s in scales:
            ds = sets[series, s]
            mv_tr, mv_te = ds.n_train * ds.voxels / MVOX, ds.n_test * ds.voxels / MVOX
            (pw, prss, pc), (qw, qrss, qc) = pp[ds.name], pr[ds.name]
            for step, mv, w, c in (("preprocess", mv_tr, pw, pc), ("predict", mv_te, qw, qc)):
                for values, v in zip(rows[step], (mv, w, c)):
                    values.append(v)
            lines.append(f"| {series} | {s}x | {ds.n_train} + {ds.n_test} | {'x'.join(map(str, ds.shape))} "
                         f"({ds.voxels / MVOX:.2f} M) | {mv_tr:.1f} / {mv_te:.1f} | {_cell(pw, pc)} | {pw / mv_tr:.2f} "
                         f"| {prss / MB:.0f} | {_cell(qw, qc)} | {qw / mv_te:.2f} | {qrss / MB:.0f} |")
        for step, (mv, wall, cpu) in rows.items():
            summary.append(f"- {series}, {step}: {verdict(mv, wall, cpu)}")
        w = [wins[sets[series, s].name] for s in scales]
        per_window = [" -> ".join(f"{t / n:.2f}" for t, n in zip(times, w)) for times in rows["predict"][1:]]
        summary.append(f"- {series}, predict per sliding window: {' -> '.join(map(str, w))} windows; s per window "
                       f"{per_window[0]} (CPU {per_window[1]})")
    lines += ["", "slope: of log(wall s) over log(scale), least squares (1.0 = linear); marginal: extra s per extra "
              "Mvoxel from one scale to the next (CPU: user + system s of the process tree); fit: wall s = fixed + "
              "s per Mvoxel x Mvoxels", *summary, "",
              "| dataset | shape | preprocess plan patch (batch) | model patch | windows (test cases) |",
              "|---|---|---|---|---|"]
    for ds in {ds.name: ds for ds in sets.values()}.values():
        conf = plans[ds.name]
        lines.append(f"| {ds.name} | {'x'.join(map(str, ds.shape))} | {'x'.join(map(str, conf['patch_size']))} "
                     f"({conf['batch_size']}) | {'x'.join(map(str, plans['model']['patch_size']))} "
                     f"| {wins[ds.name]} ({ds.n_test}) |")
    return "\n".join(lines)


def measure(work: Path, sets: dict[tuple[str, int], Synth], num_processes: int, seed: int) -> dict:
    """Generate, preprocess each dataset, train once, predict each; the measurements as a JSON-able dict."""
    env = {**os.environ, "SAMPLAN_RAW": str(work / "raw"), "SAMPLAN_PREPROCESSED": str(work / "preprocessed"),
           "SAMPLAN_RESULTS": str(work / "results")}
    unique = list({ds.name: ds for ds in sets.values()}.values())
    base = sets["cases", 1]
    print(f"1. datasets in {work / 'raw'}", flush=True)
    for ds in unique:
        generate(work / "raw", ds, seed)
    print(f"2. plan and preprocess (-np {num_processes}, target spacing {TARGET})", flush=True)
    pp, plans = {}, {}
    for ds in unique:
        pp[ds.name], plans[ds.name] = preprocess(ds, env, work, num_processes)
    print("3. train unet on the base dataset: 1 iteration, no validation", flush=True)
    train(base, env, work)
    plans["model"] = model_plan(work / "results", base.name)
    print("4. predict every dataset's test cases with that model", flush=True)
    pr = {ds.name: predict(ds, base, env, work) for ds in unique}
    wins = {ds.name: windows(ds, work, plans["model"]) for ds in unique}
    plans = {k: {"patch_size": c["patch_size"], "batch_size": c["batch_size"]} for k, c in plans.items()}
    return {"preprocess": pp, "predict": pr, "plans": plans, "windows": wins}


def main(argv: list[str] | None = None) -> None:
    """Command line: measure (or read --from-json), print the tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path,
                    help="work folder, kept; its datasets are reused (default: a temporary folder, removed)")
    ap.add_argument("--base-shape", type=int, nargs=3, default=[64, 96, 96], metavar=("Z", "Y", "X"))
    ap.add_argument("--base-cases", type=int, default=8, help="training cases of the base dataset (default 8)")
    ap.add_argument("--test-cases", type=int, default=2, help="test cases of the base dataset (default 2)")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="powers of 2, from 1 (default 1 4 16)")
    ap.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing workers (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the measurements as JSON")
    ap.add_argument("--from-json", type=Path, help="print the tables of a previous --json file; measure nothing")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        vars(args).update(saved["args"])
    scales = sorted(set(args.scales))
    if scales[0] != 1:
        sys.exit("--scales must include 1 (the base every other scale is compared with)")
    sets = plan_datasets(tuple(args.base_shape), args.base_cases, args.test_cases, scales)
    if args.from_json:
        print(report(sets, saved["preprocess"], saved["predict"], saved["plans"], saved["windows"], scales))
        return
    if not Path("/usr/bin/time").is_file():
        sys.exit("needs GNU time at /usr/bin/time (apt-get install time)")
    work = (args.work or Path(tempfile.mkdtemp(prefix="samplan_scaling_"))).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    try:
        results = measure(work, sets, args.num_processes, args.seed)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(report(sets, results["preprocess"], results["predict"], results["plans"], results["windows"], scales))
    if args.json:
        keys = ("base_shape", "base_cases", "test_cases", "scales", "num_processes", "seed")
        args.json.write_text(json.dumps({"args": {k: getattr(args, k) for k in keys}, **results}, indent=2))


if __name__ == "__main__":
    main()
