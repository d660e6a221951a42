"""Peak RSS of a whole `samplan_predict` run on one large synthetic case (CT-like, or BraTS-like with --brats).

Goals checked: a 512x512x600 CT (0.7x0.7x1.0 mm, 14 classes) is predicted under 8 GB peak RSS; a BraTS-like
240x240x155 case (4 channels, 1 mm, WT/TC/ET regions) under 3 GB. In a work folder the script
1. writes a synthetic raw dataset (N training cases + one imagesTs case), slab by slab to keep its own memory low;
2. runs `samplan_plan_and_preprocess -d ID -m unet -c 3d_fullres -np 1`;
3. trains unet 3d_fullres fold 0 for one iteration, without the final validation (`--no-val`): the model is
   nearly random, which does not matter for memory (it predicts the same shapes either way);
4. runs `/usr/bin/time -v samplan_predict ... --disable-tta --device cpu` on the test case (and with TTA when
   --tta is given) and reads "Maximum resident set size" and the wall time;
5. prints a table: case, shape, classes, patch, windows, peak RSS, wall time, goal, met?

GNU time's maximum RSS is that of the largest single process (samplan_predict with its default -np 0 is one
process with one preprocessing thread, so that is the whole run). Every step gets its own SAMPLAN_RAW/
PREPROCESSED/RESULTS inside the work folder, so nothing outside it is read or written.

  python benchmarks/predict_memory.py                                   # full CT: 600x512x512, 14 classes, 8 GB goal
  python benchmarks/predict_memory.py --brats                           # full BraTS: 155x240x240, 3 GB goal
  python benchmarks/predict_memory.py --shape 120 128 128 --classes 4 --threads 1   # a quick small run
  python benchmarks/predict_memory.py --work /tmp/pm --tta              # keep the folder; also measure with TTA
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the samplan_* console scripts live next to this interpreter
GB = 1e9  # decimal GB, as the goals are stated
CONFIG = "3d_fullres"
SLAB = 16  # slices generated at once: bounds the generator's temporary arrays at a few slabs

CT_ID, CT_NAME = 961, "Dataset961_PredMemCT"
BRATS_ID, BRATS_NAME = 962, "Dataset962_PredMemBraTS"
BRATS_CHANNELS = ("T1", "T1c", "T2", "FLAIR")
# raw BraTS values: 1 necrotic / non-enhancing core, 2 edema, 3 enhancing (4 in the original data)
NCR, EDEMA, ET = 1, 2, 3
# brain, edema, necrosis, enhancing rim per channel: rough MR contrasts, so that the channels differ
BRATS_INTENSITY = {"T1": (500, 420, 280, 470), "T1c": (520, 440, 300, 950),
                   "T2": (400, 720, 820, 600), "FLAIR": (380, 760, 520, 620)}


@dataclass
class Ellipsoid:
    """An axis-aligned ellipsoid in voxel coordinates (z, y, x) with the value painted inside."""
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    value: int

    def paint(self, out: np.ndarray, z0: int, value: int | None = None, mask_of: np.ndarray | None = None) -> None:
        """Set `out` (a slab starting at slice z0) to the value inside the ellipsoid, only within its bounding box."""
        box = []
        for axis, (c, r) in enumerate(zip(self.center, self.radii)):
            lo, hi = int(np.floor(c - r)), int(np.ceil(c + r)) + 1
            off = z0 if axis == 0 else 0
            lo, hi = max(lo - off, 0), min(hi - off, out.shape[axis])
            if hi <= lo:
                return  # this slab misses the ellipsoid
            box.append((lo, hi))
        (za, zb), (ya, yb), (xa, xb) = box
        # separable squared distances broadcast to the box only: no full-volume coordinate grids
        dz = ((np.arange(za, zb, dtype=np.float32) + z0 - self.center[0]) / self.radii[0]) ** 2
        dy = ((np.arange(ya, yb, dtype=np.float32) - self.center[1]) / self.radii[1]) ** 2
        dx = ((np.arange(xa, xb, dtype=np.float32) - self.center[2]) / self.radii[2]) ** 2
        inside = dz[:, None, None] + dy[None, :, None] + dx[None, None, :] <= 1.0
        if mask_of is not None:
            inside &= mask_of[za:zb, ya:yb, xa:xb]
        out[za:zb, ya:yb, xa:xb][inside] = self.value if value is None else value


def write_image(arr: np.ndarray, path: Path, spacing_zyx: tuple[float, float, float]) -> None:
    """Write a (Z, Y, X) array as NIfTI with the given spacing (fast gzip level: the files are temporary)."""
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(img, str(path), True, 1)


def ct_case(shape: tuple[int, int, int], n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 image (air, body, spine, organs, noise) and its uint8 label map of n_classes - 1 organs."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    body_r = (ny * 0.40 * rng.uniform(0.95, 1.05), nx * 0.46 * rng.uniform(0.95, 1.05))
    body = Ellipsoid((nz / 2, ny / 2, nx / 2), (nz * 10.0, *body_r), -60)  # huge z radius: a cylinder along z
    spine = Ellipsoid((nz / 2, ny / 2 + body_r[0] * 0.6, nx / 2), (nz * 10.0, ny * 0.05, nx * 0.05), 700)
    organs = []
    for k in range(1, n_classes):
        # organs anywhere in the inner part of the body, of varied size, each with its own HU level
        angle, frac = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform(0, 0.35))
        center = (rng.uniform(0.2, 0.8) * nz, ny / 2 + frac * body_r[0] * np.sin(angle),
                  nx / 2 + frac * body_r[1] * np.cos(angle))
        radii = (rng.uniform(0.06, 0.16) * nz, rng.uniform(0.05, 0.11) * ny, rng.uniform(0.05, 0.11) * nx)
        organs.append(Ellipsoid(center, radii, k))
    hu = {k: int(v) for k, v in zip(range(1, n_classes), rng.permutation(np.linspace(-20, 250, max(n_classes - 1, 1))))}
    image = np.empty(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    for z0 in range(0, nz, SLAB):
        z1 = min(z0 + SLAB, nz)
        img = np.full((z1 - z0, ny, nx), -1000, np.int16)
        lab = label[z0:z1]
        body.paint(img, z0)
        in_body = img == body.value
        spine.paint(img, z0, mask_of=in_body)
        for organ in organs:
            organ.paint(lab, z0, mask_of=in_body)
        for k, v in hu.items():
            img[lab == k] = v
        noise = rng.normal(0.0, 15.0, img.shape).astype(np.float32)
        image[z0:z1] = np.clip(img + noise, -1024, 3071).astype(np.int16)
    return image, label


def brats_case(shape: tuple[int, int, int], seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Four MR-like int16 channels (zero outside the brain) and a BraTS label map (1 NCR, 2 edema, 3 enhancing)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    c = np.array(shape, dtype=float) / 2
    brain = Ellipsoid(tuple(c), (nz * 0.42, ny * 0.40, nx * 0.34), 1)
    # tumour: edema ellipsoid, enhancing ellipsoid inside it, necrotic core inside that
    tc = c + rng.uniform(-0.12, 0.12, 3) * np.array(shape)
    r = np.array(shape, dtype=float) * rng.uniform(0.14, 0.18)
    edema = Ellipsoid(tuple(tc), tuple(r), EDEMA)
    rim = Ellipsoid(tuple(tc + rng.uniform(-0.02, 0.02, 3) * np.array(shape)), tuple(r * 0.55), ET)
    core = Ellipsoid(rim.center, tuple(r * 0.35), NCR)
    label = np.zeros(shape, np.uint8)
    brain_mask = np.zeros(shape, bool)
    for z0 in range(0, nz, SLAB):
        z1 = min(z0 + SLAB, nz)
        m = brain_mask[z0:z1]
        brain.paint(m, z0, value=True)
        for part in (edema, rim, core):
            part.paint(label[z0:z1], z0, mask_of=m)
    images = []
    for name in BRATS_CHANNELS:
        levels = np.array(BRATS_INTENSITY[name], dtype=np.float32)  # indexed by tissue below
        # tissue index per voxel: 0 brain, 1 edema, 2 necrosis, 3 enhancing rim
        tissue_of_label = np.array([0, 2, 1, 3], dtype=np.uint8)
        img = np.zeros(shape, np.int16)
        for z0 in range(0, nz, SLAB):
            z1 = min(z0 + SLAB, nz)
            vals = levels[tissue_of_label[label[z0:z1]]] + rng.normal(0.0, 25.0, (z1 - z0, ny, nx)).astype(np.float32)
            # >= 1 inside the brain: the nonzero mask (crop, normalisation) must be exactly the brain
            img[z0:z1] = np.where(brain_mask[z0:z1], np.clip(vals, 1, 4000), 0).astype(np.int16)
        images.append(img)
    return images, label


def make_dataset(raw: Path, brats: bool, shape: tuple[int, int, int], n_train: int, n_classes: int, seed: int) -> Path:
    """Write the raw dataset (imagesTr, labelsTr, imagesTs with one case, dataset.json, splits_final.json)."""
    ds = raw / (BRATS_NAME if brats else CT_NAME)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (ds / sub).mkdir(parents=True, exist_ok=True)
    spacing = (1.0, 1.0, 1.0) if brats else (1.0, 0.7, 0.7)  # (z, y, x); the task's (x, y, z) reversed
    cases = [(f"case_{i:03d}", "imagesTr", True) for i in range(n_train)] + [("test_000", "imagesTs", False)]
    for i, (case, folder, with_label) in enumerate(cases):
        t0 = time.perf_counter()
        if brats:
            channels, label = brats_case(shape, seed + i)
        else:
            image, label = ct_case(shape, n_classes, seed + i)
            channels = [image]
            del image
        for ch, arr in enumerate(channels):
            write_image(arr, ds / folder / f"{case}_{ch:04d}.nii.gz", spacing)
        del channels
        if with_label:
            write_image(label, ds / "labelsTr" / f"{case}.nii.gz", spacing)
        del label
        print(f"  wrote {folder}/{case} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if brats:
        channel_names = {str(i): n for i, n in enumerate(BRATS_CHANNELS)}
        # regions as nnU-Net v2 declares them: lists of raw values, painted in regions_class_order
        labels: dict[str, Any] = {"background": 0, "whole tumor": [NCR, EDEMA, ET], "tumor core": [NCR, ET],
                                  "enhancing tumor": [ET]}
        extra: dict[str, Any] = {"regions_class_order": [EDEMA, NCR, ET]}
    else:
        channel_names = {"0": "CT"}
        labels = {"background": 0, **{f"organ_{k:02d}": k for k in range(1, n_classes)}}
        extra = {}
    meta = {"channel_names": channel_names, "labels": labels, **extra, "numTraining": n_train, "file_ending": ".nii.gz"}
    (ds / "dataset.json").write_text(json.dumps(meta, indent=2))
    train_ids = [c for c, _, lab in cases if lab]
    if n_train >= 2:
        # one fold only: 5-fold cross-validation needs 5 cases, and only fold 0 is trained here
        splits = [{"train": train_ids[:-1], "val": train_ids[-1:]}]
        (ds / "splits_final.json").write_text(json.dumps(splits, indent=2))
    return ds


def parse_time_v(path: Path) -> tuple[float, float]:
    """(peak RSS in bytes, wall seconds) from a GNU `time -v` report."""
    text = path.read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", text).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time.*?:\s*([\d:.]+)\s*$", text, re.M).group(1)
    seconds = 0.0
    for part in wall.split(":"):  # h:mm:ss or m:ss.ss
        seconds = seconds * 60 + float(part)
    return rss_kb * 1024.0, seconds


def run_timed(name: str, args: list[str], env: dict[str, str], work: Path) -> tuple[float, float]:
    """Run a samplan command under `/usr/bin/time -v`; its output goes to work/logs/<name>.log. Returns (RSS, wall)."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    report = logs / f"{name}.time"
    cmd = ["/usr/bin/time", "-v", "-o", str(report), *args]
    print(f"$ {Path(args[0]).name} {' '.join(args[1:])}", flush=True)
    with open(logs / f"{name}.log", "w") as log:
        # output to a file: a pipe nobody reads would block a chatty run
        code = subprocess.run(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = (logs / f"{name}.log").read_text()[-3000:]
        sys.exit(f"{name} failed with exit status {code}; last output:\n{tail}")
    rss, wall = parse_time_v(report)
    print(f"  {name}: {wall:.0f} s, peak RSS {rss / GB:.2f} GB", flush=True)
    return rss, wall


def model_plan(results: Path, dataset: str) -> dict[str, Any]:
    """The 3d_fullres configuration of the trained model's plans.json (the one prediction uses)."""
    files = sorted((results / dataset).glob(f"unet__*__{CONFIG}/plans.json"))
    if not files:
        sys.exit(f"no unet {CONFIG} model folder with plans.json under {results / dataset}")
    plans = json.loads(files[0].read_text())
    conf = dict(plans["configurations"][CONFIG])
    conf["transpose_forward"] = plans.get("transpose_forward", [0, 1, 2])
    return conf


def preprocessed_shape(images: list[Path], conf: dict[str, Any]) -> list[int]:
    """The test case's shape on the plan grid: crop to the nonzero box, transpose, resample (samplan's own rules)."""
    from samplan.preprocessing.cropping import bbox_of_mask
    from samplan.preprocessing.resampling import compute_new_shape
    from scipy.ndimage import binary_fill_holes

    mask = None
    for f in images:  # one channel at a time: only a bool mask stays in memory
        img = sitk.ReadImage(str(f))
        nonzero = sitk.GetArrayViewFromImage(img) != 0
        mask = nonzero if mask is None else mask | nonzero
        spacing = img.GetSpacing()[::-1]
        del img
    axes = [int(a) for a in conf["transpose_forward"]]
    mask = binary_fill_holes(mask.transpose(axes))
    box = bbox_of_mask(mask)
    cropped = [b - a for a, b in box]
    return compute_new_shape(cropped, [spacing[a] for a in axes], [float(s) for s in conf["spacing"]])


def n_windows(shape: list[int], patch: list[int]) -> int:
    """Sliding windows of one forward pass over the case (the image is padded to at least the patch first)."""
    from samplan.engine.sliding_window import window_starts

    return len(window_starts([max(s, p) for s, p in zip(shape, patch)], patch))


def main(argv: list[str] | None = None) -> None:
    """Command line: build, plan, train, predict under /usr/bin/time, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="work folder, kept (default: a temporary folder, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--brats", action="store_true", help="BraTS-like case: 4 channels, 1 mm, WT/TC/ET regions, goal 3 GB")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"),
                    help="image shape (default 600 512 512; 155 240 240 with --brats)")
    ap.add_argument("--cases", type=int, default=2, help="training cases (default 2; one test case is added)")
    ap.add_argument("--classes", type=int, default=14, help="CT labels including background (default 14)")
    ap.add_argument("--goal-gb", type=float, help="peak RSS goal in GB (default 8, 3 with --brats)")
    ap.add_argument("--tta", action="store_true", help="also predict with mirroring TTA")
    ap.add_argument("--threads", type=int, help="torch/BLAS threads of every step (default: their own choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="reuse the dataset, preprocessing and model already in --work")
    args = ap.parse_args(argv)
    if not Path("/usr/bin/time").is_file():
        sys.exit("needs GNU time at /usr/bin/time (apt-get install time)")
    shape = tuple(args.shape or ((155, 240, 240) if args.brats else (600, 512, 512)))
    goal = args.goal_gb or (3.0 if args.brats else 8.0)
    n_classes = 4 if args.brats else args.classes
    dataset, ds_id = (BRATS_NAME, BRATS_ID) if args.brats else (CT_NAME, CT_ID)
    fold = "0" if args.cases >= 2 else "all"  # a one-case dataset has no fold 0 split
    work = args.work or Path(tempfile.mkdtemp(prefix="samplan_predict_memory_"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    raw, pre, res = work / "raw", work / "preprocessed", work / "results"
    env = {**os.environ, "SAMPLAN_RAW": str(raw), "SAMPLAN_PREPROCESSED": str(pre), "SAMPLAN_RESULTS": str(res)}
    if args.threads:
        env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    try:
        t0 = time.perf_counter()
        ds = raw / dataset
        if not (args.reuse and (ds / "dataset.json").is_file()):
            print(f"1. dataset {dataset}: {args.cases} training + 1 test case of {shape} in {work}", flush=True)
            shutil.rmtree(ds, ignore_errors=True)
            make_dataset(raw, args.brats, shape, args.cases, n_classes, args.seed)
        gen_s = time.perf_counter() - t0
        model_ok = any((res / dataset).glob(f"unet__*__{CONFIG}/fold_{fold}/checkpoint_final.pth"))
        steps: dict[str, tuple[float, float]] = {}
        if not (args.reuse and model_ok):
            print("2. plan and preprocess", flush=True)
            steps["plan_and_preprocess"] = run_timed("plan_and_preprocess", [
                str(BIN / "samplan_plan_and_preprocess"), "-d", str(ds_id), "-m", "unet", "-c", CONFIG, "-np", "1"], env, work)
            print(f"3. train unet {CONFIG} fold {fold}: 1 epoch of 1 iteration, no final validation", flush=True)
            steps["train"] = run_timed("train", [
                str(BIN / "samplan_train"), "-d", str(ds_id), "-m", "unet", "-c", CONFIG, "-f", fold, "--epochs", "1",
                "--iters-per-epoch", "1", "--val-iters", "0", "--no-val", "--device", "cpu", "-np", "0"], env, work)
        conf = model_plan(res, dataset)
        patch = [int(p) for p in conf["patch_size"]]
        test_images = sorted((ds / "imagesTs").glob("test_000_*.nii.gz"))
        pp_shape = preprocessed_shape(test_images, conf)
        windows = n_windows(pp_shape, patch)
        print(f"plan: spacing {conf['spacing']}, patch {patch}, batch {conf.get('batch_size')}; test case on the plan "
              f"grid {pp_shape}: {windows} windows", flush=True)
        rows = []
        for tta in ([False, True] if args.tta else [False]):
            name = "predict_tta" if tta else "predict"
            out = work / f"out_{name}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"4. predict the test case{' with TTA' if tta else ''}", flush=True)
            rss, wall = run_timed(name, [
                str(BIN / "samplan_predict"), "-i", str(ds / "imagesTs"), "-o", str(out), "-d", str(ds_id), "-m", "unet",
                "-c", CONFIG, "-f", fold, "--device", "cpu", *([] if tta else ["--disable-tta"])], env, work)
            if not (out / "test_000.nii.gz").is_file():
                sys.exit(f"{name} wrote no test_000.nii.gz in {out}")
            rows.append((tta, rss, wall))
        done = [f"generate {gen_s:.0f} s"] + [f"{k} {w:.0f} s / {r / GB:.2f} GB" for k, (r, w) in steps.items()]
        print(f"\nsteps: {', '.join(done)}{' (model reused)' if not steps else ''}")
        kind = "BraTS-like, 4 ch" if args.brats else "CT-like"
        dims = "x".join(str(s) for s in shape[::-1])  # x*y*z, as the goals are written
        print("\n| case | shape (x*y*z) | classes | plan-grid shape (z,y,x) | patch | windows | TTA | peak RSS GB | wall s "
              "| goal GB | met? |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for tta, rss, wall in rows:
            print(f"| {kind} | {dims} | {n_classes if not args.brats else '3 regions'} | {'x'.join(map(str, pp_shape))} "
                  f"| {'x'.join(map(str, patch))} | {windows} | {'yes' if tta else 'no'} | {rss / GB:.2f} | {wall:.0f} "
                  f"| < {goal:g} | {'yes' if rss < goal * GB else 'NO'} |")
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.work is None:
            print(f"work folder kept: {work}")


if __name__ == "__main__":
    main()
