"""Full disk: samplan_plan_and_preprocess into a small tmpfs that fills up half way, then again after space is
freed; the first run must end with a clear DiskFullError (exit status 74, the folder named, no traceback, no
temporary file) and the second must finish with outputs byte-identical to a run on a normal disk.

Used by benchmarks/faults.py; runnable alone: `python benchmarks/faults_disk.py --work /tmp/disk`. Mounting a tmpfs
needs root (or CAP_SYS_ADMIN); without it the trial returns {"mounted": False, "why": ...}.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DATASET = "Dataset999_Demo"
PY = sys.executable
PLAN_ARGS = ["-d", "999", "-m", "unet", "-np", "1"]
TMPFS_BYTES = 16 * 2**20
MIB = 2**20


def _run(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a samplan CLI module in a fresh process."""
    return subprocess.run([PY, "-m", module, *args], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])


def _env(work: Path, preprocessed: Path) -> dict[str, str]:
    """Environment with the SAMPLAN_* folders of this trial."""
    return {**os.environ, "SAMPLAN_RAW": str(work / "raw"), "SAMPLAN_PREPROCESSED": str(preprocessed),
            "SAMPLAN_RESULTS": str(work / "results")}


def _tree_size(folder: Path) -> int:
    """Bytes of all files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _differences(a: Path, b: Path) -> list[str]:
    """Relative paths whose presence or bytes differ between two folders."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    differ = sorted(str(p) for p in files_a ^ files_b)
    differ += sorted(str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False))
    return differ


def _mount(point: Path, size: int) -> str | None:
    """Mount a tmpfs of `size` bytes on `point`; the reason when that is impossible, else None."""
    point.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True,
                       text=True)
    return None if r.returncode == 0 else f"mount -t tmpfs failed (uid {os.geteuid()}): {r.stderr.strip()}"


def run_full_disk_trial(work: Path) -> dict:
    """Fill a small tmpfs during preprocessing, check the error, free space, re-run; a dict of the results."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    point = work / "tmpfs"
    why = _mount(point, TMPFS_BYTES)
    if why:
        return {"mounted": False, "why": why}
    try:
        return _trial(work, point)
    finally:
        subprocess.run(["umount", str(point)], check=False)


def _trial(work: Path, point: Path) -> dict:
    """The trial on the mounted tmpfs `point`."""
    made = _run("samplan.cli.make_demo_dataset", ["--cases", "4"], _env(work, work / "reference"))
    if made.returncode:
        return {"mounted": True, "error": f"demo dataset: {made.stderr.strip()}"}
    reference = _run("samplan.cli.plan_and_preprocess", PLAN_ARGS, _env(work, work / "reference"))
    if reference.returncode:
        return {"mounted": True, "error": f"reference run: {reference.stderr.strip()[-500:]}"}
    needed = _tree_size(work / "reference" / DATASET)

    # leave room for about half of the outputs (the last MiB counts as full: see samplan.disk_space)
    filler = point / "filler.bin"
    with open(filler, "wb") as f:
        f.write(b"\0" * (TMPFS_BYTES - needed // 2 - MIB))
    env = _env(work, point / "preprocessed")
    full = _run("samplan.cli.plan_and_preprocess", PLAN_ARGS, env)
    out = point / "preprocessed" / DATASET
    error = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    result = {
        "mounted": True,
        "tmpfs_mib": TMPFS_BYTES / MIB,
        "output_mib": round(needed / MIB, 2),
        "full_exit_status": full.returncode,
        "full_message": error[0] if error else full.stderr.strip()[-300:],
        "message_names_folder": bool(error) and str(out) in error[0],
        "message_says_resume": bool(error) and "re-run the same command" in error[0],
        "traceback": "Traceback" in full.stderr,
        "temp_files_left": [str(p) for p in out.rglob(".*tmp*")] if out.is_dir() else [],
        "lock_left": (out / ".samplan.lock").exists(),
    }
    filler.unlink()  # space freed: the same command must now resume and finish
    again = _run("samplan.cli.plan_and_preprocess", PLAN_ARGS, env)
    result["resumed_exit_status"] = again.returncode
    result["resume_note"] = [line for line in again.stdout.splitlines() if "to preprocess" in line]
    result["differences_to_normal_disk"] = _differences(work / "reference" / DATASET, out) if out.is_dir() else ["all"]
    result["passed"] = (full.returncode == 74 and result["message_names_folder"] and result["message_says_resume"]
                        and not result["traceback"] and not result["temp_files_left"] and not result["lock_left"]
                        and again.returncode == 0 and not result["differences_to_normal_disk"])
    return result


def main() -> None:
    """Run one trial and print its results as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="samplan_disk_"))
    print(json.dumps(run_full_disk_trial(work), indent=2))


if __name__ == "__main__":
    main()
