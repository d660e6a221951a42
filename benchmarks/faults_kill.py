"""Killed runs: SIGKILL each samplan stage at a random moment (or in the middle of a file write), re-run the same
command, and compare its outputs with those of an uninterrupted run.

Used by benchmarks/faults.py; runnable alone: `python benchmarks/faults_kill.py --trials 10 --work /tmp/kill`.
Every stage runs in its own process group on the generated demo dataset (Dataset999_Demo, small), with fp32 and a
fixed seed so that an uninterrupted run is reproducible; "identical" means byte for byte (preprocessed files,
evaluation summary), voxel for voxel (label maps) and tensor for tensor (final training weights).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from medsam_finetune import print_table  # noqa: E402  (shared table printer)

DATASET = "Dataset999_Demo"
TABLE_COLUMNS = ["stage", "kill", "trials", "runs started", "resumed", "identical", "half-written files",
                 "temp files after re-run"]
PY = sys.executable
TRAIN_ARGS = ["-d", "999", "-m", "unet", "-c", "2d", "-f", "0", "--epochs", "3", "--iters-per-epoch", "4",
              "--val-iters", "2", "--device", "cpu", "--precision", "fp32"]
MODEL_ARGS = ["-d", "999", "-m", "unet", "-c", "2d", "-f", "0", "--device", "cpu", "--precision", "fp32"]
# a kill inside a write: samplan's atomic writer is wrapped so that, on the chosen write, the temporary file is cut
# to half and the process kills itself before the rename, as a SIGKILL landing in the middle of that write would
_KILL_DURING_WRITE = r"""
import contextlib, importlib, os, signal, sys
import samplan.utils as u
import samplan.models.checkpoint, samplan.preprocessing.cache
real = u.atomic_path
calls = {"n": 0}
target_call, suffix = int(os.environ["SAMPLAN_FAULT_CALL"]), os.environ["SAMPLAN_FAULT_SUFFIX"]

@contextlib.contextmanager
def half_then_killed(target):
    with real(target) as tmp:
        yield tmp
        if str(target).endswith(suffix):
            calls["n"] += 1
            if calls["n"] >= target_call:  # the temporary file is half written, the target not yet replaced
                data = tmp.read_bytes()
                tmp.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

# modules that imported atomic_path by name; image_io imports it when it writes
u.atomic_path = samplan.models.checkpoint.atomic_path = samplan.preprocessing.cache.atomic_path = half_then_killed
cli = importlib.import_module("samplan.cli." + sys.argv[1])
sys.exit(cli.main(sys.argv[2:]))
"""
# which files each kill-during-write trial interrupts
WRITE_SUFFIXES = {"checkpoint": ".pth", "export": ".nii.gz", "cache": ".b2nd"}


@dataclass
class Stage:
    """One CLI stage: how to run it in a trial folder, how to resume it, what to compare."""

    name: str
    cli: str
    args: Callable[[Path], list[str]]
    resume_args: Callable[[Path], list[str]]
    prepare: Callable[[Path, Path], None]  # (reference work dir, trial dir): copy the stage's inputs
    compare: Callable[[Path, Path], tuple[bool, str]]  # (reference dir, trial dir) -> identical?, detail
    write_kind: str | None = None  # the writer a kill-during-write trial interrupts
    write_args: list[str] | None = None  # arguments of that trial (the patched writer must run in this process)
    durations: list[float] = field(default_factory=list)


def _env(root: Path) -> dict[str, str]:
    """The samplan folders of one trial (SAMPLAN_RAW, set by reference_runs, is shared and read-only)."""
    return {**os.environ, "SAMPLAN_PREPROCESSED": str(root / "pre"), "SAMPLAN_RESULTS": str(root / "res")}


def _run(cli: str, args: list[str], root: Path, kill_after: float | None = None,
         write_kind: str | None = None, write_call: int = 1) -> tuple[int, float]:
    """Run `samplan.cli.<cli>`; SIGKILL its process group after `kill_after` s. Returns (exit status, seconds)."""
    env = _env(root)
    if write_kind is None:
        cmd = [PY, "-m", f"samplan.cli.{cli}", *args]
    else:
        cmd = [PY, "-c", _KILL_DURING_WRITE, cli, *args]
        env.update(SAMPLAN_FAULT_SUFFIX=WRITE_SUFFIXES[write_kind], SAMPLAN_FAULT_CALL=str(write_call))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: loader workers and preprocessing pools too
        proc.communicate()
        return -9, time.perf_counter() - t0
    if proc.returncode not in (0, -9) and kill_after is None and write_kind is None:
        raise RuntimeError(f"{cli} {' '.join(args)} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return proc.returncode, time.perf_counter() - t0


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every non-hidden file under `folder` by relative path (hidden = a writer's temporary file)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def _leftover_temporaries(folder: Path) -> list[str]:
    """Temporary files a killed writer left (hidden `.name.*.tmp*` files)."""
    return [str(p.relative_to(folder)) for p in folder.rglob(".*.tmp*")]


def _compare_trees(ref: Path, trial: Path) -> tuple[bool, str]:
    """Byte-for-byte comparison of two folders."""
    a, b = _tree_bytes(ref), _tree_bytes(trial)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return (not differ, f"{len(a)} files" if not differ else f"differ: {', '.join(differ[:4])}")


def _compare_label_maps(ref: Path, trial: Path) -> tuple[bool, str]:
    """Voxel-for-voxel comparison of the label maps of two prediction folders."""
    import SimpleITK as sitk

    def names(folder: Path) -> list[str]:  # hidden files are a killed writer's temporaries
        return sorted(p.name for p in folder.glob("*.nii.gz") if not p.name.startswith("."))

    files = names(ref)
    if names(trial) != files:
        return False, f"different files: {sorted(set(files) ^ set(names(trial)))[:4]}"
    for name in files:
        ra, ta = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / name))) for d in (ref, trial))
        if ra.shape != ta.shape or not np.array_equal(ra, ta):
            return False, f"{name} differs in {int(np.sum(ra != ta)) if ra.shape == ta.shape else 'shape'} voxels"
    return True, f"{len(files)} label maps"


def _compare_weights(ref: Path, trial: Path) -> tuple[bool, str]:
    """The final weights of two trainings: equal, or the largest difference."""
    import torch

    rel = Path("res") / DATASET / "unet__samplanPlans__2d" / "fold_0" / "checkpoint_final.pth"
    if not (trial / rel).is_file():
        return False, "no checkpoint_final.pth"
    a, b = (torch.load(d / rel, map_location="cpu", weights_only=True)["network_weights"] for d in (ref, trial))
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return diff == 0.0, "weights equal" if diff == 0.0 else f"max |diff| {diff:.2e}"


def _copy(src: Path, dst: Path) -> None:
    """Copy a folder (trial inputs)."""
    if src.exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)


def make_stages(work: Path) -> list[Stage]:
    """The four stages on the demo dataset, each reading the reference run's outputs of the stage before."""
    ref = work / "ref"
    imgs_ts, labels_ts = work / "raw" / DATASET / "imagesTs", work / "raw" / DATASET / "labelsTs"
    return [
        Stage("plan_and_preprocess", "plan_and_preprocess", lambda r: ["-d", "999", "-c", "2d", "-np", "2"],
              lambda r: ["-d", "999", "-c", "2d", "-np", "2"], lambda ref_, r: None,
              lambda ref_, r: _compare_trees(ref_ / "pre_after_preprocessing", r / "pre"), "cache",
              ["-d", "999", "-c", "2d", "-np", "1"]),
        Stage("train", "train", lambda r: TRAIN_ARGS, lambda r: [*TRAIN_ARGS, "--c"],
              lambda ref_, r: _copy(ref_ / "pre", r / "pre"), _compare_weights, "checkpoint"),
        Stage("predict", "predict", lambda r: ["-i", str(imgs_ts), "-o", str(r / "pred"), *MODEL_ARGS],
              lambda r: ["-i", str(imgs_ts), "-o", str(r / "pred"), *MODEL_ARGS, "--continue"],
              lambda ref_, r: (_copy(ref_ / "pre", r / "pre"), _copy(ref_ / "res", r / "res")) and None,
              lambda ref_, r: _compare_label_maps(ref_ / "pred", r / "pred"), "export"),
        Stage("evaluate", "evaluate", lambda r: ["-gt", str(labels_ts), "-pred", str(ref / "pred"), "-d", "999",
                                                 "-o", str(r / "eval" / "summary.json")],
              lambda r: ["-gt", str(labels_ts), "-pred", str(ref / "pred"), "-d", "999", "-o", str(r / "eval" / "summary.json")],
              lambda ref_, r: None, lambda ref_, r: _compare_trees(ref_ / "eval", r / "eval")),
    ]


STAGES_CACHE: list[Stage] = []  # the stages of the current work folder (set by the caller)


def load_durations(work: Path, stages: list[Stage]) -> None:
    """The reference runs' durations recorded by reference_runs."""
    saved = json.loads((work / "ref" / "durations.json").read_text())
    for st in stages:
        st.durations[:] = [saved[st.name]]


def reference_runs(work: Path, stages: list[Stage]) -> None:
    """The demo dataset and one uninterrupted run of every stage (in order) in `work/ref`; records durations."""
    raw = work / "raw"
    os.environ["SAMPLAN_RAW"] = str(raw)
    if not (raw / DATASET / "dataset.json").is_file():
        subprocess.run([PY, "-m", "samplan.cli.make_demo_dataset", "-o", str(raw), "--cases", "8",
                        "--test-cases", "3"], check=True, stdout=subprocess.DEVNULL)
    ref = work / "ref"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    for st in stages:
        _, sec = _run(st.cli, st.args(ref), ref)
        st.durations[:] = [sec]
        if st.name == "plan_and_preprocess":  # training adds splits_final.json: compare with the state before it
            shutil.copytree(ref / "pre", ref / "pre_after_preprocessing")
    (ref / "durations.json").write_text(json.dumps({st.name: st.durations[0] for st in stages}))


def _one_trial(work: Path, st: Stage, root: Path, write_kind: str | None, t_rng: random.Random,
               estimate: float) -> tuple[int, float]:
    """Start the stage in a fresh trial folder and kill it (at a random moment within `estimate` seconds, or
    inside a write); (exit status, seconds)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    st.prepare(work / "ref", root)
    if write_kind is None:  # from just after start-up to just before the end of an uninterrupted run
        return _run(st.cli, st.args(root), root, kill_after=t_rng.uniform(0.5, max(1.0, 0.95 * estimate)))
    return _run(st.cli, st.write_args or st.args(root), root, write_kind=write_kind, write_call=t_rng.randint(1, 3))


def kill_trials(work: Path, stages: list[Stage], trials: int, seed: int) -> list[dict]:
    """`trials` random-moment kills per stage plus kill-during-write trials; one row per stage and kind.

    A run that ends before its kill time is no trial: it is repeated with a new seed, and the run's duration
    becomes the stage's estimate (the reference may have run on a busier machine)."""
    rng = random.Random(seed)
    rows = []
    for st in stages:
        kinds = [("random moment", None)] + ([(f"during {st.write_kind} write", st.write_kind)] if st.write_kind else [])
        for kind, write_kind in kinds:
            n = trials if write_kind is None else max(3, trials // 3)
            survived = identical = killed = attempts = 0
            details, leftovers, half_written, seeds = [], 0, 0, []
            estimate = st.durations[0]
            while killed < n and attempts < 3 * n:
                attempts += 1
                trial_seed = rng.randrange(2**31)
                root = work / "trials" / f"{st.name}_{'w' if write_kind else 'r'}{attempts}"
                code, sec = _one_trial(work, st, root, write_kind, random.Random(trial_seed), estimate)
                if code != -9:  # finished (or failed) before the kill: not a trial
                    estimate = min(estimate, sec)
                    shutil.rmtree(root, ignore_errors=True)
                    continue
                killed += 1
                seeds.append(trial_seed)
                half_written += len(_leftover_temporaries(root))
                code, _ = _run(st.cli, st.resume_args(root), root, kill_after=600)
                leftovers += len(_leftover_temporaries(root))
                survived += code == 0
                same, detail = st.compare(work / "ref", root) if code == 0 else (False, f"re-run exit {code}")
                identical += same
                if not same:
                    details.append(f"seed {trial_seed}: {detail}")
                shutil.rmtree(root, ignore_errors=True)
            rows.append({"stage": st.name, "kill": kind, "trials": killed, "runs started": attempts,
                         "resumed": survived, "identical": identical, "half-written files": half_written,
                         "temp files after re-run": leftovers, "seeds": seeds, "details": details})
    return rows


def main() -> None:
    """Run the trials and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/samplan_faults_kill"))
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", nargs="*", default=None)
    args = ap.parse_args()
    stages = make_stages(args.work)
    reference_runs(args.work, stages)
    if args.stages:
        stages = [s for s in stages if s.name in args.stages]
    rows = kill_trials(args.work, stages, args.trials, args.seed)
    print_table("killed runs (SIGKILL, then the same command re-run)", TABLE_COLUMNS,
                [[str(r[c]) for c in TABLE_COLUMNS] for r in rows])
    for r in rows:
        print(f"{r['stage']} ({r['kill']}): seeds {r['seeds']}" + (f"; {'; '.join(r['details'])}" if r["details"] else ""))
    print(json.dumps({"reference_seconds": {s.name: round(s.durations[0], 1) for s in stages}}))


if __name__ == "__main__":
    main()
