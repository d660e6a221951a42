"""Does preprocessing many small cases in worker processes leak memory? RSS of the parent and each worker over a run.

Writes a synthetic 3D dataset (tests/synthetic.py: one channel, two labels, about 32^3 voxels,
anisotropic so every case is resampled), then runs samplan's `preprocess_dataset` on it with `-np`
workers in a child process, polling the RSS of that process and of its workers (psutil) while
counting finished cases. Prints the RSS when 10 %, 50 % and 100 % of the cases are done, and the
growth from 10 % to 100 %: a leak shows as steady growth, a bounded run as flat numbers.

  python benchmarks/preprocess_memory.py                  # 2,000 cases, 2 workers
  python benchmarks/preprocess_memory.py --cases 200 --keep --workdir /tmp/pm
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
POLL_S = 0.25
MARKS = (0.1, 0.5, 1.0)


def plans(spacing: list[float]) -> dict[str, Any]:
    """A hand-written 3d_fullres plan (z-score, nnU-Net's resampling settings) for the synthetic dataset."""
    resampling = {"order": 3, "order_z": 0, "force_separate_z": None}
    config = {"data_identifier": "3d_fullres", "spacing": spacing, "patch_size": [16, 32, 32], "batch_size": 2,
              "median_image_size_in_voxels": [16, 32, 32], "normalization_schemes": ["ZScoreNormalization"],
              "use_mask_for_norm": [False],
              "resampling_fn_data_kwargs": {"is_seg": False, **resampling},
              "resampling_fn_seg_kwargs": {"is_seg": True, **resampling, "order": 1},
              "resampling_fn_probabilities_kwargs": {"is_seg": False, **resampling, "order": 1}}
    return {"dataset_name": "Dataset950_MemSynth", "plans_name": "samplanPlans", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "foreground_intensity_properties_per_channel": {},
            "configurations": {"3d_fullres": config}}


def make_dataset(root: Path, n_cases: int, size: int) -> Path:
    """The synthetic raw dataset (reused when it already has `n_cases` cases)."""
    sys.path.insert(0, str(REPO / "tests"))
    from synthetic import make_dataset_3d

    ds = root / "Dataset950_MemSynth"
    if (ds / "dataset.json").is_file() and len(list((ds / "labelsTr").glob("*.nii.gz"))) == n_cases:
        return ds
    return make_dataset_3d(root, name=ds.name, n_cases=n_cases, shape=(size, size, size), spacing_zyx=(2.5, 0.9, 0.9))


def _role(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "gone"
    return "resource_tracker" if "resource_tracker" in cmd else "worker"


def _sample(root: psutil.Process) -> dict[str, Any]:
    """RSS (bytes) of the parent and of each live worker, by pid."""
    out = {"parent": root.memory_info().rss, "workers": {}}
    for child in root.children(recursive=True):
        try:
            if _role(child) == "worker":
                out["workers"][child.pid] = child.memory_info().rss
        except psutil.Error:
            pass  # exited between listing and reading
    return out


def monitor(cmd: list[str], folder: Path, n_cases: int) -> tuple[list[tuple[float, int, dict]], int, float]:
    """Run `cmd`, polling RSS and the count of finished cases; returns samples, exit code and wall time."""
    samples = []
    t0 = time.perf_counter()
    # the progress bar goes to a file: an unread pipe would fill up and block the run
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = _sample(root)
            except psutil.Error:
                break
            done = sum(1 for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else 0
            samples.append((time.perf_counter() - t0, done, rss))
            time.sleep(POLL_S)
        proc.wait()
        if proc.returncode:
            log.seek(0)
            print(log.read()[-2000:], file=sys.stderr)
    return samples, proc.returncode, time.perf_counter() - t0


def at_marks(samples: list[tuple[float, int, dict]], n_cases: int) -> list[tuple[float, tuple[float, int, dict]]]:
    """The first sample at or after each mark (the last sample stands in for 100 % when the run ended between polls)."""
    rows = []
    for mark in MARKS:
        hit = next((s for s in samples if s[1] >= mark * n_cases and s[2]["workers"]), None)
        rows.append((mark, hit or samples[-1]))
    return rows


def report(samples: list, n_cases: int) -> str:
    """Markdown table: RSS of the parent and the workers at 10/50/100 % of the cases, and growth 10 % -> 100 %."""
    rows = at_marks(samples, n_cases)
    lines = ["| cases done | s | parent RSS MB | worker RSS MB (each) | workers max MB |", "|---|---|---|---|---|"]
    for mark, (t, done, rss) in rows:
        each = ", ".join(f"{v / MB:.0f}" for _, v in sorted(rss["workers"].items()))
        peak = max(rss["workers"].values(), default=0) / MB
        lines.append(f"| {mark:.0%} ({done}) | {t:.0f} | {rss['parent'] / MB:.0f} | {each} | {peak:.0f} |")
    first, last = rows[0][1][2], rows[-1][1][2]
    grow_parent = (last["parent"] - first["parent"]) / MB
    common = set(first["workers"]) & set(last["workers"])
    grow_workers = [(last["workers"][p] - first["workers"][p]) / MB for p in sorted(common)]
    peak_parent = max(s[2]["parent"] for s in samples) / MB
    peak_worker = max((max(s[2]["workers"].values(), default=0) for s in samples), default=0) / MB
    lines.append("")
    lines.append(f"growth 10 % -> 100 %: parent {grow_parent:+.0f} MB, workers (same pids) "
                 f"{', '.join(f'{g:+.0f}' for g in grow_workers) or 'n/a (workers replaced)'} MB; "
                 f"peak over the run: parent {peak_parent:.0f} MB, one worker {peak_worker:.0f} MB")
    return "\n".join(lines)


def child(raw: str, out: str, plans_file: str, num_processes: int) -> None:
    """Run preprocess_dataset (in its own process, so that its RSS is measured alone)."""
    from samplan.preprocessing.run import preprocess_dataset

    preprocess_dataset(Path(raw), Path(out), json.loads(Path(plans_file).read_text()), ["3d_fullres"], num_processes)


def main(argv: list[str] | None = None) -> None:
    """Command line: build the dataset, preprocess it while measuring, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--size", type=int, default=32, help="edge of the (cubic, +0..2 voxels) images")
    ap.add_argument("-np", "--num-processes", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="where the dataset and the output go (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--child", nargs=3, metavar=("RAW", "OUT", "PLANS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child, args.num_processes)
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="samplan_preprocess_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        raw = make_dataset(work / "raw", args.cases, args.size)
        print(f"dataset: {args.cases} cases in {raw} ({time.perf_counter() - t0:.0f} s)", flush=True)
        out = work / "preprocessed" / raw.name
        shutil.rmtree(out, ignore_errors=True)
        plans_file = work / "plans.json"
        plans_file.write_text(json.dumps(plans([2.5, 1.2, 1.2])))
        cmd = [sys.executable, __file__, "--child", str(raw), str(out), str(plans_file), "-np", str(args.num_processes)]
        samples, code, wall = monitor(cmd, out / "3d_fullres", args.cases)
        if code != 0 or not samples:
            sys.exit(f"preprocessing failed (exit {code})")
        print(f"preprocessed {args.cases} cases with -np {args.num_processes} in {wall:.0f} s "
              f"({len(samples)} RSS samples every {POLL_S} s)\n")
        print(report(samples, args.cases))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
