"""Reliability and security faults, measured: killed runs, damaged files, bad prediction input, concurrent runs,
a full disk, untrusted files, memory peaks. Prints one table (trials, survived, outputs identical, clear errors).

  python benchmarks/faults.py                      # everything (about 30-40 min on 2 cores)
  python benchmarks/faults.py --only damaged bad_input untrusted concurrent --trials 3

Everything runs the real command-line tools in fresh processes on the generated demo dataset (Dataset999_Demo)
and on files derived from ../shared/data, in `--work` (deleted first). "Clear error" means: the expected exit
status, one message naming the file (or folder) without a traceback, and nothing written for the bad input.
The kill trials are in benchmarks/faults_kill.py, the full-disk trial in benchmarks/faults_disk.py; the memory
rows come from benchmarks/export_memory.py, benchmarks/predict_memory.py (a whole samplan_predict of a BraTS-like
case; with --ct-predict also of a 512x512x600 14-class CT, about an hour on 2 cores) and
benchmarks/preprocess_memory.py (run with --only memory).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import faults_kill as fk  # noqa: E402
from medsam_finetune import print_table  # noqa: E402

PY = sys.executable
COLUMNS = ["fault", "trials", "survived / clear error", "identical / nothing written", "detail"]


def _cli(module: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 900,
         wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run `samplan.cli.<module>` in a fresh process (or start it, with wait=False)."""
    cmd = [PY, "-m", f"samplan.cli.{module}", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _clear(proc: subprocess.CompletedProcess, code: int, *names: str) -> tuple[bool, str]:
    """The expected exit status, no traceback, every name in the message."""
    err = proc.stderr
    ok = proc.returncode == code and "Traceback" not in err and all(n in err for n in names)
    problems = [l.strip() for l in err.splitlines() if l.startswith("  -")]  # a list of problems: show the first
    first = problems[0] if problems else next((l for l in err.splitlines() if l.startswith("error")), err.strip()[-160:])
    return ok, f"exit {proc.returncode}: {first[:160]}"


def _row(fault: str, trials: int, survived: int, identical: int | str, detail: str = "") -> dict:
    return {"fault": fault, "trials": trials, "survived / clear error": survived,
            "identical / nothing written": identical, "detail": detail}


# ---------------------------------------------------------------- killed runs
def killed_runs(work: Path, trials: int, seed: int) -> list[dict]:
    """SIGKILL at random moments and inside writes, for every stage (faults_kill)."""
    rows = []
    for r in fk.kill_trials(work, fk.STAGES_CACHE, trials, seed):
        detail = (f"{r['runs started'] - r['trials']} run(s) ended before their kill time and were repeated; "
                  f"seeds {r['seeds']}; kills left {r['half-written files']} half-written temporary file(s), "
                  f"{r['temp files after re-run']} remain after the re-run")
        if r["details"]:
            detail += "; " + "; ".join(r["details"])
        rows.append(_row(f"kill {r['stage']} ({r['kill']})", r["trials"], r["resumed"],
                         r["identical"], detail))
    return rows


# ---------------------------------------------------------------- damaged files
def damaged_files(work: Path) -> list[dict]:
    """Every detectable damage of every format: refused when read (prediction path); for .nii.gz datasets also by
    samplan_plan_and_preprocess before anything is written."""
    import damage
    from samplan.dataset.image_io import read_images
    from samplan.errors import DatasetError

    folder = work / "damaged"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    n = reported = 0
    missed = []
    for fmt in damage.FORMATS:
        (folder / fmt).mkdir()
        clean = damage.make_clean(fmt, folder / fmt)
        for name, fn in damage.DAMAGES.items():
            if fmt not in damage.DETECTABLE.get(name, set()):
                continue
            dst = folder / fmt / f"{name}_0000{damage.ending(fmt)}"
            try:
                fn(clean, dst)
            except ValueError:
                continue  # the damage does not apply to this format
            n += 1
            try:
                read_images([dst])
                missed.append(f"{fmt}/{name}")
            except DatasetError as e:
                reported += dst.name in str(e)
    rows = [_row("damaged file read (11 formats x detectable damages)", n, reported, "-",
                 "missed: " + ", ".join(missed) if missed else "each error names the file")]

    # end to end: a Hippocampus subset whose case 2 is damaged, through samplan_plan_and_preprocess
    src = damage.SHARED_RAW / "Dataset004_Hippocampus"
    ok = nothing = trials = 0
    details = []
    for name, fn in damage.DAMAGES.items():
        if "nii.gz" not in damage.DETECTABLE.get(name, set()):
            continue
        raw = work / "damaged_raw" / name
        ds = raw / "Dataset994_Damaged"
        for sub in ("imagesTr", "labelsTr"):
            (ds / sub).mkdir(parents=True, exist_ok=True)
        dj = json.loads((src / "dataset.json").read_text())
        cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (src / "imagesTr").glob("*_0000.nii.gz"))[:4]
        for c in cases:
            shutil.copy(src / "imagesTr" / f"{c}_0000.nii.gz", ds / "imagesTr")
            shutil.copy(src / "labelsTr" / f"{c}.nii.gz", ds / "labelsTr")
        dj.update(numTraining=len(cases), name="Damaged")
        dj.pop("dataset", None)
        (ds / "dataset.json").write_text(json.dumps(dj))
        bad = ds / "imagesTr" / f"{cases[1]}_0000.nii.gz"
        tmp = bad.with_name("clean.nii.gz")
        bad.rename(tmp)
        try:
            fn(tmp, bad)
        except ValueError:
            continue
        tmp.unlink()
        pre = work / "damaged_pre" / name
        env = {**os.environ, "SAMPLAN_RAW": str(raw), "SAMPLAN_PREPROCESSED": str(pre),
               "SAMPLAN_RESULTS": str(work / "damaged_res")}
        proc = _cli("plan_and_preprocess", ["-d", "994", "-np", "1"], env)
        trials += 1
        clear, detail = _clear(proc, 2, cases[1], bad.name)
        ok += clear
        nothing += not pre.exists() or not any(pre.rglob("*"))
        if not clear:
            details.append(f"{name}: {detail}")
    rows.append(_row("damaged .nii.gz in a dataset -> plan_and_preprocess", trials, ok, nothing,
                     "; ".join(details) or "exit 2, case and file named"))
    return rows


# ---------------------------------------------------------------- bad input at prediction time
def _nifti_like(src: Path, dst: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    img = sitk.ReadImage(str(src))
    out = sitk.GetImageFromArray(change(sitk.GetArrayFromImage(img)))
    if out.GetDimension() == img.GetDimension():
        out.CopyInformation(img)
    sitk.WriteImage(out, str(dst), useCompression=True)


def bad_prediction_input(work: Path) -> list[dict]:
    """samplan_predict on a folder mixing good and bad cases, and on damaged model folders (the kill reference's)."""
    ref = work / "ref"
    model_env = {**os.environ, "SAMPLAN_RESULTS": str(ref / "res"), "SAMPLAN_PREPROCESSED": str(ref / "pre")}
    model_args = fk.MODEL_ARGS
    test_dir = Path(os.environ["SAMPLAN_RAW"]) / fk.DATASET / "imagesTs"
    good = sorted(test_dir.glob("*_0000.nii.gz"))
    src = good[0]

    def trunc(dst: Path) -> None:
        data = src.read_bytes()
        dst.write_bytes(data[: len(data) // 2])

    def nan(dst: Path) -> None:
        _nifti_like(src, dst, lambda a: np.where(np.arange(a.size).reshape(a.shape) % 97 == 0, np.nan, a).astype(np.float32))

    bad_cases: dict[str, Callable[[Path], list[Path]]] = {
        "extra channel file": lambda d: [shutil.copy(src, d / "bad_0000.nii.gz"), shutil.copy(src, d / "bad_0001.nii.gz")],
        "truncated file": lambda d: [trunc(d / "bad_0000.nii.gz")],
        "non-finite voxels": lambda d: [nan(d / "bad_0000.nii.gz")],
        "2D image for a 3D-data model": lambda d: [_nifti_like(src, d / "bad_0000.nii.gz", lambda a: a[a.shape[0] // 2])],
        "unreadable file (random bytes)": lambda d: [(d / "bad_0000.nii.gz").write_bytes(os.urandom(5000))],
    }
    rows = []
    for what, make in bad_cases.items():
        d = work / "bad_input" / what.replace(" ", "_")
        inp, out = d / "in", d / "out"
        shutil.rmtree(d, ignore_errors=True)
        inp.mkdir(parents=True)
        for g in good:
            shutil.copy(g, inp)
        make(inp)
        proc = _cli("predict", ["-i", str(inp), "-o", str(out), *model_args], model_env)
        clear, detail = _clear(proc, 2, "bad")
        goods = all((out / g.name.replace("_0000", "")).is_file() for g in good)
        rows.append(_row(f"predict: {what}", 1, int(clear and goods), int(not (out / "bad.nii.gz").exists()),
                         f"{detail}; good cases predicted: {goods}"))

    # files with another ending: ignored with a note, every case predicted
    d = work / "bad_input" / "other_endings"
    shutil.rmtree(d, ignore_errors=True)
    (d / "in").mkdir(parents=True)
    for g in good:
        shutil.copy(g, d / "in")
    (d / "in" / "notes.txt").write_text("x")
    (d / "in" / "thumb_0000.png").write_bytes(b"\x89PNG")
    proc = _cli("predict", ["-i", str(d / "in"), "-o", str(d / "out"), *model_args], model_env)
    rows.append(_row("predict: files with another ending", 1, int(proc.returncode == 0 and "notes.txt" in proc.stderr),
                     "-", f"exit {proc.returncode}, note names them"))
    # output folder = input folder
    proc = _cli("predict", ["-i", str(d / "in"), "-o", str(d / "in"), *model_args], model_env)
    clear, detail = _clear(proc, 2)
    rows.append(_row("predict: output folder = input folder", 1, int(clear), int(not [p for p in (d / "in").glob("*.nii.gz") if not p.name.endswith("_0000.nii.gz")]),
                     detail))

    # damaged model folders
    fold_rel = Path(fk.DATASET) / "unet__samplanPlans__2d"
    marker = work / "pickle_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def damaged_checkpoint(m: Path) -> None:
        f = m / fold_rel / "fold_0" / "checkpoint_final.pth"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])

    def malicious_checkpoint(m: Path) -> None:
        import torch
        torch.save({"network_weights": Payload()}, m / fold_rel / "fold_0" / "checkpoint_final.pth")

    def random_checkpoint(m: Path) -> None:
        (m / fold_rel / "fold_0" / "checkpoint_final.pth").write_bytes(os.urandom(4096))

    def other_version(m: Path) -> None:
        p = m / fold_rel / "plans.json"
        plans = json.loads(p.read_text())
        plans["plans_version"] = 99
        p.write_text(json.dumps(plans))

    def missing_checkpoint(m: Path) -> None:
        (m / fold_rel / "fold_0" / "checkpoint_final.pth").unlink()

    for what, change in {"truncated checkpoint": damaged_checkpoint, "random-bytes checkpoint": random_checkpoint,
                         "pickled code in the checkpoint": malicious_checkpoint,
                         "plans from another samplan version": other_version,
                         "missing checkpoint": missing_checkpoint}.items():
        d = work / "bad_model" / what.replace(" ", "_")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(ref / "res", d / "res")
        change(d / "res")
        marker.unlink(missing_ok=True)
        proc = _cli("predict", ["-i", str(test_dir), "-o", str(d / "out"), *model_args],
                    {**model_env, "SAMPLAN_RESULTS": str(d / "res")})
        clear, detail = _clear(proc, 2 if what != "missing checkpoint" else proc.returncode)
        clear = clear and proc.returncode != 0 and not marker.exists()
        rows.append(_row(f"model folder: {what}", 1, int(clear), int(not (d / "out").exists()),
                         detail + ("; pickle RAN" if marker.exists() else "")))
    return rows


# ---------------------------------------------------------------- concurrent runs
def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> bool:
    t0 = time.time()
    while time.time() - t0 < seconds and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.2)
    return path.exists()


def concurrent_runs(work: Path) -> list[dict]:
    """Two plan_and_preprocess of one dataset; two trainings of one fold; a dead holder's lock taken over."""
    rows = []
    root = work / "concurrent"
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "SAMPLAN_PREPROCESSED": str(root / "pre"), "SAMPLAN_RESULTS": str(root / "res")}
    first = _cli("plan_and_preprocess", ["-d", "999", "-c", "2d", "-np", "2"], env, wait=False)
    lock = root / "pre" / fk.DATASET / ".samplan.lock"
    seen = _wait_for(lock, first)
    second = _cli("plan_and_preprocess", ["-d", "999", "-c", "2d", "-np", "2"], env)
    clear, detail = _clear(second, 75, str(first.pid))
    first.wait()
    same, d2 = fk._compare_trees(work / "ref" / "pre_after_preprocessing", root / "pre")
    rows.append(_row("two plan_and_preprocess at once", 1, int(seen and clear and first.returncode == 0), int(same),
                     f"second: {detail}; first finished, {d2}"))

    train_args = [a if a != "3" else "50" for a in fk.TRAIN_ARGS]  # long enough to overlap
    first = _cli("train", train_args, env, wait=False)
    lock = root / "res" / fk.DATASET / "unet__samplanPlans__2d" / "fold_0" / ".samplan.lock"
    seen = _wait_for(lock, first)
    second = _cli("train", train_args, env)
    clear, detail = _clear(second, 75, str(first.pid))
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    third = _cli("train", [*fk.TRAIN_ARGS, "--c"], env)
    rows.append(_row("two trainings of one fold; then the holder SIGKILLed", 1, int(seen and clear), "-",
                     f"second: {detail}"))
    rows.append(_row("stale lock of a killed training taken over", 1, int(third.returncode == 0), "-",
                     f"--c after the kill: exit {third.returncode}"))
    return rows


# ---------------------------------------------------------------- full disk, untrusted inputs, memory
def full_disk(work: Path) -> list[dict]:
    """A 16 MiB tmpfs as the preprocessed folder (faults_disk)."""
    import faults_disk

    r = faults_disk.run_full_disk_trial(work / "disk")
    if not r.get("mounted", True):
        return [_row("full disk (tmpfs)", 0, 0, "-", f"not run: {r.get('why')}")]
    detail = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("passed",))
    return [_row("full disk during preprocessing, then space freed", 1, int(bool(r.get("passed"))),
                 int(bool(r.get("passed"))), detail[:300])]


def untrusted(work: Path) -> list[dict]:
    """dataset.json paths outside the dataset, case names with separators, a decompression-bomb PNG."""
    from PIL import Image

    rows = []
    base = work / "untrusted"
    shutil.rmtree(base, ignore_errors=True)
    demo = Path(os.environ["SAMPLAN_RAW"]) / fk.DATASET
    for what, edit in {
        "dataset.json path with ..": lambda dj, ds: dj.update(dataset={"c": {"images": ["../../etc/hostname"], "label": "labelsTr/x.nii.gz"}}),
        "dataset.json absolute path": lambda dj, ds: dj.update(dataset={"c": {"images": ["/etc/hostname"], "label": "labelsTr/x.nii.gz"}}),
        "symlink leaving the dataset": lambda dj, ds: (ds / "imagesTr" / "evil_0000.nii.gz").symlink_to("/etc/hostname"),
    }.items():
        raw = base / what.replace(" ", "_")
        ds = raw / "Dataset993_Untrusted"
        shutil.copytree(demo, ds, ignore=shutil.ignore_patterns("*Ts"))
        dj = json.loads((ds / "dataset.json").read_text())
        edit(dj, ds)
        (ds / "dataset.json").write_text(json.dumps(dj))
        env = {**os.environ, "SAMPLAN_RAW": str(raw), "SAMPLAN_PREPROCESSED": str(raw / "pre")}
        proc = _cli("plan_and_preprocess", ["-d", "993", "-np", "1"], env)
        clear, detail = _clear(proc, 2)
        rows.append(_row(f"untrusted: {what}", 1, int(clear), int(not (raw / "pre").exists()), detail))
    bomb = base / "bomb" / "in"
    bomb.mkdir(parents=True)
    Image.new("L", (30000, 30000)).save(bomb / "bomb_0000.png", optimize=True)  # ~1 MB file, 900 Mpixel
    from samplan.dataset.image_io import read_images
    from samplan.errors import DatasetError

    try:
        read_images([bomb / "bomb_0000.png"])
        rows.append(_row("untrusted: decompression-bomb PNG (900 Mpx, ~1 MB)", 1, 0, "-", "read!"))
    except DatasetError as e:
        rows.append(_row("untrusted: decompression-bomb PNG (900 Mpx, ~1 MB)", 1, 1, "-", str(e)[:160]))
    return rows


def memory(work: Path) -> list[dict]:
    """Peak RSS of export (BraTS-like, CT-like) and of preprocessing 2,000 small cases with -np 2."""
    rows = []
    proc = subprocess.run([PY, str(HERE / "export_memory.py"), "--modes", "after"], capture_output=True, text=True)
    table = proc.stdout.split("\n\n")[-1]  # the final table (the lines before it repeat its rows as they come)
    for line in table.splitlines():
        if line.startswith("| brats") or line.startswith("| ct"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append(_row(f"memory: export of the {cells[0]} case ({cells[3]} classes, grid {cells[4]})", 1, 1, "-",
                             f"peak RSS {cells[7]} GB, of which logits {cells[5]} GB"))
    # whole samplan_predict runs: BraTS always; the 512x512x600 CT (about an hour on 2 cores) with --ct-predict
    for kind, extra in (("brats", ["--brats"]), *((("ct", []),) if CT_PREDICT else ())):
        proc = subprocess.run([PY, str(HERE / "predict_memory.py"), "--work", str(work / f"predict_{kind}"), "--reuse",
                               *extra], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith(f"| {kind} |")), None)
        cells = [c.strip() for c in line.strip("|").split("|")] if line else []
        ok = proc.returncode == 0 and bool(cells) and cells[-1] == "yes"
        rows.append(_row(f"memory: whole samplan_predict of the {kind} case ({cells[1] if cells else '?'})", 1, int(ok),
                         "-", f"peak RSS {cells[7]} GB, goal {cells[9]} GB, {cells[8]} s" if cells
                         else (proc.stdout + proc.stderr)[-200:]))
    proc = subprocess.run([PY, str(HERE / "preprocess_memory.py"), "--workdir", str(work / "pm")],
                          capture_output=True, text=True)
    rows.append(_row("memory: preprocessing 2,000 cases, -np 2", 1, int(proc.returncode == 0), "-",
                     " / ".join(l.strip() for l in proc.stdout.splitlines() if "%" in l)[:300]))
    return rows


CT_PREDICT = False  # set by --ct-predict
SECTIONS = {"killed": killed_runs, "damaged": damaged_files, "bad_input": bad_prediction_input,
            "concurrent": concurrent_runs, "disk": full_disk, "untrusted": untrusted, "memory": memory}


def main() -> None:
    """Run the chosen sections and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/samplan_faults"))
    ap.add_argument("--trials", type=int, default=10, help="kill trials per stage (random moments)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--ct-predict", action="store_true",
                    help="memory: also a whole samplan_predict of a 512x512x600 14-class CT (about an hour on 2 cores)")
    args = ap.parse_args()
    global CT_PREDICT
    CT_PREDICT = args.ct_predict
    fk.STAGES_CACHE = fk.make_stages(args.work)
    if not (args.work / "ref" / "eval").is_dir():
        fk.reference_runs(args.work, fk.STAGES_CACHE)
    else:
        os.environ["SAMPLAN_RAW"] = str(args.work / "raw")
        fk.load_durations(args.work, fk.STAGES_CACHE)
    rows = []
    for name in args.only:
        t0 = time.perf_counter()
        fn = SECTIONS[name]
        new = fn(args.work, args.trials, args.seed) if name == "killed" else fn(args.work)
        rows += new
        print(f"{name}: {len(new)} row(s) in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print_table("faults (benchmarks/faults.py)", COLUMNS, [[str(r[c]) for c in COLUMNS] for r in rows])


if __name__ == "__main__":
    main()
