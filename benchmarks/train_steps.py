"""Seconds per training step of a method, with and without flushing subnormal floats to zero, in one run.

  python benchmarks/train_steps.py                                  # medsam (LiteMedSAM real weights), Hippocampus
  python benchmarks/train_steps.py -m promise unet --steps 6 --precision fp32 bf16

The dataset (default Dataset004_Hippocampus from ../shared/data/raw) is copied, planned and preprocessed for the
method ("2d" for the SAM methods, else the method's first configuration) in --work (kept, reused). Each row builds the
network and optimiser exactly as `samplan_train` does (plans' batch, recipe, --precision) and times --steps calls of
the method's train_step on the same pre-built batches (loading is outside the timing); the first step is reported
separately (optimiser state allocation). The variants alternate (off, on, off, on ...) so that drift in the
machine's load hits both: "ftz off" is torch's default (what samplan trains with), "ftz on" flushes subnormals
(`torch.set_flush_denormal(True)`). samplan does not turn it on: in the same process scipy's cKDTree (surface
distances of the final validation's metrics) then crashes with a segmentation fault. Columns: method, precision, variant, first step s, median of the other steps s,
and the ratio off/on of the medians.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _prepare(work: Path, source: Path, dataset: str, method: str) -> None:
    """Raw copy, plans and cache of `dataset` for `method` under `work` (reused when present)."""
    for var, sub in (("SAMPLAN_RAW", "raw"), ("SAMPLAN_PREPROCESSED", "pre"), ("SAMPLAN_RESULTS", "res")):
        os.environ[var] = str(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)
    if not (work / "raw" / dataset).is_dir():
        shutil.copytree(source / dataset, work / "raw" / dataset)
    from samplan.pipeline.planning import plan_and_preprocess
    from samplan.utils import load_json

    plans = work / "pre" / dataset / "plans.json"
    if not plans.is_file() or method not in load_json(plans).get("methods", {}):
        plan_and_preprocess(dataset, methods=sorted({method, *load_json(plans).get("methods", {})}) if plans.is_file()
                            else [method], num_processes=1)


def _time_steps(dataset: str, method: str, precision: str, steps: int, ftz: bool) -> tuple[float, float]:
    """(first step s, median of the later steps s) of a fresh network and optimiser with FTZ on or off."""
    import torch

    from samplan.methods.base import PromptedMethod
    from samplan.training.epochs import make_loader
    from samplan.training.logger import TrainingLogger
    from samplan.training.trainer import _recipe, _start, prepare_fold

    torch.set_flush_denormal(ftz)
    configuration = "2d" if method in ("medsam", "promise", "samunetr") else None
    s = prepare_fold(dataset, method, configuration, 0)
    if isinstance(s.method, PromptedMethod):
        raise SystemExit(f"{method} has no training step")
    recipe = _recipe(s, None, 1, steps, 0)
    run = _start(s, recipe, TrainingLogger(Path(os.environ["SAMPLAN_RESULTS"]), echo=False, write=False), None, 1,
                 torch.device("cpu"), precision, None)
    own = s.method.training_loader(s.mp, s.cache_dir, s.train_ids, recipe, s.label_manager, train=True, seed=1)
    loader = own or make_loader(s.cache_dir, s.train_ids, recipe, s.label_manager, train=True, seed=1, num_workers=0)
    batches = list(loader.epoch(0, steps))
    run.network.train()
    times = []
    for b in batches:
        t = time.perf_counter()
        s.method.train_step(run.network, b, recipe, run.optimizer, torch.device("cpu"), s.mp)
        times.append(time.perf_counter() - t)
    torch.set_flush_denormal(False)
    return times[0], statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="Dataset004_Hippocampus")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "raw"))
    p.add_argument("-m", "--methods", nargs="+", default=["medsam"])
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=5, help="timed steps per row, the first reported apart (>= 2)")
    p.add_argument("--repeats", type=int, default=1, help="off/on pairs per method and precision")
    p.add_argument("--work", default="/tmp/samplan_train_steps")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2")
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    for method in args.methods:
        _prepare(Path(args.work), Path(args.source), args.dataset, method)
        for precision in args.precision:
            got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(args.repeats):
                for ftz in (False, True):
                    got[ftz].append(_time_steps(args.dataset, method, precision, args.steps, ftz))
                    print(f"{method} {precision} ftz {'on' if ftz else 'off'}: first {got[ftz][-1][0]:.2f} s, "
                          f"then {got[ftz][-1][1]:.2f} s/step", flush=True)
            med = {k: statistics.median(x[1] for x in v) for k, v in got.items()}
            for ftz in (False, True):
                first = statistics.median(x[0] for x in got[ftz])
                rows.append([method, precision, "ftz on" if ftz else "ftz off", f"{first:.2f}", f"{med[ftz]:.2f}",
                             f"x{med[False] / med[True]:.2f}" if ftz else ""])
    head = ["method", "precision", "variant", "first step s", "median step s", "off / on"]
    print(f"\n{args.dataset}, {args.steps} steps per row ({args.repeats} repeat(s)), {torch.get_num_threads()} threads\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
