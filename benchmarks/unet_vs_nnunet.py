"""Benchmark samplan's unet against nnU-Net 2.8.1: same cases, patch, batch and iterations; training and prediction.

  python benchmarks/unet_vs_nnunet.py --cases 12 --iters 3 --test-cases 2          # smoke test
  flock /work/scratch/cpu.lock .venv/bin/python benchmarks/unet_vs_nnunet.py --work /tmp/uvn --keep

1. The first `--cases` cases of the dataset are copied into `WORK/raw` (numTraining rewritten), the next
   `--test-cases` into `WORK/test` (held out). Both tools plan and preprocess (`-np 2`); samplan's plans.json then
   takes nnU-Net's patch and batch size (and its architecture, only if the two planners disagree on it).
2. Both train fold 0 on the CPU, `--threads` torch threads, `--workers` data-augmentation processes, fp32, no
   validation patches, no final validation: 1 warm-up epoch + `--iters / --epoch-iters` timed epochs of
   `--epoch-iters` iterations. nnU-Net runs a trainer subclass written at run time into its venv.
   s/iteration: the timed epochs' times from each tool's log (data-loader waits + forward/backward/step) divided
   by their iterations. CPU s/iteration: user + system CPU seconds of the whole training command (all its
   processes, start-up and warm-up included; getrusage) divided by all its iterations; it barely depends on what
   else runs on the machine. `--repeats N` trains each tool N times in ABBA order and reports the medians.
3. Both predict the held-out cases with fold 0, with and without mirroring TTA; samplan_evaluate scores all four.
Each command's wall time and peak RSS (summed over its process tree) come from preprocess.run_measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import NNUNET_CMD, REPO, _default_nnunet_bin, _find_dataset, run_measured  # noqa: E402  (shared)

MARKER = ".unet_vs_nnunet"  # a --work folder holding it may be wiped by the next run
TRAINER_TEMPLATE = '''"""Written by samplan's benchmarks/unet_vs_nnunet.py: nnU-Net's default trainer, shortened."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = 0  # "Epoch time" then measures the training iterations only

    def on_validation_epoch_end(self, val_outputs):
        if val_outputs:
            return super().on_validation_epoch_end(val_outputs)
        lm = self.label_manager
        n = len(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [float("nan")] * n, self.current_epoch)
        self.logger.log("val_losses", float("nan"), self.current_epoch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (benchmark)")
'''


def _fresh_work(path: str | None) -> Path:
    """An empty work folder: a new temporary one, or `path` (wiped only if a previous run of this script made it)."""
    work = Path(tempfile.mkdtemp(prefix="unet_vs_nnunet_")) if path is None else Path(path)
    if work.is_dir() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            sys.exit(f"error: {work} is not empty and was not made by this script; choose another --work")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()
    return work


def copy_cases(src: Path, work: Path, n_train: int, n_test: int) -> tuple[str, list[str], list[str]]:
    """First `n_train` cases (sorted ids) -> WORK/raw/NAME, the next `n_test` -> WORK/test/{imagesTs,labelsTs}."""
    ds = json.loads((src / "dataset.json").read_text())
    ending, channels = ds["file_ending"], sorted(int(k) for k in ds["channel_names"])
    cases = sorted(p.name[:-len(ending)] for p in (src / "labelsTr").glob(f"*{ending}"))
    if n_train + n_test > len(cases):
        sys.exit(f"error: {src} has {len(cases)} cases; --cases {n_train} + --test-cases {n_test} do not fit")
    train, test = cases[:n_train], cases[n_train:n_train + n_test]
    raw = work / "raw" / src.name
    for group, img_dir, lab_dir in ((train, raw / "imagesTr", raw / "labelsTr"),
                                    (test, work / "test" / "imagesTs", work / "test" / "labelsTs")):
        img_dir.mkdir(parents=True)
        lab_dir.mkdir(parents=True)
        for c in group:
            for ch in channels:
                shutil.copy(src / "imagesTr" / f"{c}_{ch:04d}{ending}", img_dir)
            shutil.copy(src / "labelsTr" / f"{c}{ending}", lab_dir)
    (raw / "dataset.json").write_text(json.dumps({**ds, "numTraining": n_train}, indent=2))
    return src.name, train, test


def align_samplan_plan(pre: Path, nn_plans: dict, conf: str) -> dict[str, Any]:
    """Give samplan's plans.json nnU-Net's patch and batch (and architecture if it differs); check the cache still fits.

    The preprocessing key (samplan.preprocessing.run) hashes every setting that changes a cached case; patch and
    batch size are not among them, so the cached cases stay valid (only their blosc2 chunking was sized for the
    old patch). Raises SystemExit if the key changes or a cached case no longer counts as complete.
    """
    from samplan.dataset.dataset_json import load_dataset_json
    from samplan.preprocessing.cache import case_is_complete
    from samplan.preprocessing.run import preprocessing_key
    from samplan.utils import load_json, save_json

    plans, dataset_json = load_json(pre / "plans.json"), load_dataset_json(pre)
    ours, ref = plans["configurations"][conf], nn_plans["configurations"][conf]
    key_before = preprocessing_key(plans, conf, dataset_json)
    note = {"samplan_planned": {"patch_size": ours["patch_size"], "batch_size": ours["batch_size"]},
            "nnunet_planned": {"patch_size": ref["patch_size"], "batch_size": ref["batch_size"]},
            "architecture_copied": ours["architecture"] != ref["architecture"]}
    ours["patch_size"], ours["batch_size"] = list(ref["patch_size"]), int(ref["batch_size"])
    if note["architecture_copied"]:  # a patch the planner did not size the network for needs the matching topology
        ours["architecture"] = json.loads(json.dumps(ref["architecture"]))
    save_json(plans, pre / "plans.json")
    key_after = preprocessing_key(load_json(pre / "plans.json"), conf, dataset_json)
    cache = pre / ours["data_identifier"]
    cases = load_json(pre / "fingerprint.json")["case_identifiers"]
    stale = [c for c in cases if not case_is_complete(cache, c, key_after)]
    if key_after != key_before or stale:
        sys.exit(f"error: editing {pre / 'plans.json'} invalidated samplan's cache (key {key_before} -> {key_after}, "
                 f"{len(stale)} stale cases)")
    note["cache_valid"] = True
    return note


def write_trainer(nn_python: Path, epochs: int, iters: int) -> str:
    """Write the trainer subclass into nnU-Net's variants package (atomically); return its class name."""
    name = f"nnUNetTrainer_samplanBench_{epochs}x{iters}"
    code = "import os, nnunetv2.training.nnUNetTrainer.variants as v; print(os.path.dirname(v.__file__))"
    found = subprocess.run([str(nn_python), "-c", code], check=True, capture_output=True, text=True)
    folder = Path(found.stdout.strip())
    target = folder / f"{name}.py"
    tmp = folder / f".{name}.py.tmp"
    tmp.write_text(TRAINER_TEMPLATE.format(name=name, epochs=epochs, iters=iters))
    os.replace(tmp, target)  # nnU-Net imports every module of the package: never let it see half a file
    return name


def samplan_epoch_times(results: Path, name: str, conf: str) -> list[float]:
    """samplan's per-epoch times (progress.json) of fold 0."""
    (f,) = (results / name).glob(f"unet__*__{conf}/fold_0/progress.json")
    return [float(t) for t in json.loads(f.read_text())["epoch_time"]]


def nnunet_epoch_times(results: Path, name: str, trainer: str, conf: str) -> list[float]:
    """nnU-Net's per-epoch times ("Epoch time: X s" lines of its newest training log) of fold 0."""
    logs = (results / name / f"{trainer}__nnUNetPlans__{conf}" / "fold_0").glob("training_log_*.txt")
    newest = max(logs, key=lambda f: f.stat().st_mtime)  # the names' date fields are not zero-padded
    return [float(t) for t in re.findall(r"Epoch time: ([0-9.]+) s", newest.read_text())]


def per_iteration(times: list[float], iters_per_epoch: int) -> float:
    """Seconds per training iteration over every epoch but the first (the warm-up)."""
    timed = times[1:]
    return sum(timed) / (len(timed) * iters_per_epoch) if timed else float("nan")


def _check(run: dict[str, Any], what: str) -> dict[str, Any]:
    """Exit with the log's tail when a measured command failed."""
    if run["returncode"] != 0:
        tail = "\n".join(Path(run["log"]).read_text().splitlines()[-25:])
        sys.exit(f"error: {what} failed (exit {run['returncode']}), log {run['log']}:\n{tail}")
    return run


def evaluate(bin_dir: Path, work: Path, name: str, pred: Path) -> float:
    """Mean foreground Dice of `pred` against the held-out labels (samplan_evaluate)."""
    out = pred / "summary.json"
    _check(run_measured([str(bin_dir / "samplan_evaluate"), "-gt", str(work / "test" / "labelsTs"), "-pred", str(pred),
                         "-d", str(work / "raw" / name / "dataset.json"), "-o", str(out), "-np", "1"],
                        dict(os.environ), work / "logs" / f"evaluate_{pred.name}.log"), f"samplan_evaluate {pred}")
    return float(json.loads(out.read_text())["foreground_mean"]["Dice"])


def _gb(b: float) -> str:
    return f"{b / 2**30:.2f} GB"


def _cells(r: dict[str, Any]) -> list[str]:
    """The measured cells of one row (after tool, config, patch, batch)."""
    def pair(key: str, fmt: Callable[[float], str]) -> str:  # TTA / no TTA
        return f"{fmt(r[key][0])} / {fmt(r[key][1])}"
    return [f"{r['s_per_iter']:.3f}", f"{r['cpu_s_per_iter']:.3f}", _gb(r["train_rss"]),
            pair("pred_s", lambda v: f"{v:.1f}"), pair("pred_rss", _gb), pair("dice", lambda v: f"{v:.4f}")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The result rows (one per tool) plus a samplan / nnU-Net ratio row when both ran."""
    head = ["tool", "config", "patch", "batch", "s/iteration", "CPU s/iteration", "train peak RSS",
            "predict s (TTA / no TTA)", "predict peak RSS (TTA / no TTA)", "mean fg Dice (TTA / no TTA)"]
    table = [head, ["---"] * len(head)]
    table += [[r["tool"], r["config"], "x".join(map(str, r["patch"])), str(r["batch"]), *_cells(r)] for r in rows]
    if len(rows) == 2:
        o, n = rows

        def x(k: str, i: int | None = None) -> str:
            a, b = (o[k], n[k]) if i is None else (o[k][i], n[k][i])
            return f"x{a / b:.2f}" if b else "-"
        table.append(["samplan / nnU-Net", "", "", "", x("s_per_iter"), x("cpu_s_per_iter"), x("train_rss"),
                      f"{x('pred_s', 0)} / {x('pred_s', 1)}", f"{x('pred_rss', 0)} / {x('pred_rss', 1)}", ""])
    return "\n".join("| " + " | ".join(r) + " |" for r in table)


def commands(tool: str, args: argparse.Namespace, name: str, conf: str, epochs: int,
             trainer: str | None) -> tuple[list[str], list[str], str]:
    """(training command, prediction command without -i/-o, its no-TTA flag) of one tool."""
    if tool == "samplan":
        b = Path(args.samplan_bin)
        return ([str(b / "samplan_train"), "-d", name, "-m", "unet", "-c", conf, "-f", "0", "--epochs", str(epochs),
                 "--iters-per-epoch", str(args.epoch_iters), "--val-iters", "0", "--device", "cpu", "--precision",
                 "fp32", "-np", str(args.workers), "--no-val"],
                [str(b / "samplan_predict"), "-d", name, "-m", "unet", "-c", conf, "-f", "0", "--device", "cpu",
                 "--precision", "fp32"], "--disable-tta")
    b, dset = Path(args.nnunet_bin), str(int(name[7:10]))
    return ([str(b / "nnUNetv2_train"), dset, conf, "0", "-tr", trainer, "-device", "cpu"],
            [str(b / "nnUNetv2_predict"), "-d", dset, "-c", conf, "-f", "0", "-tr", trainer, "-device", "cpu",
             "-npp", str(args.predict_np), "-nps", str(args.predict_np), "--disable_progress_bar"], "--disable_tta")


def _children_cpu_s() -> float:
    """User + system CPU seconds of all finished, waited-for descendants of this process (getrusage)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_tool(tool: str, cmd: list[str], args: argparse.Namespace, work: Path, name: str, conf: str,
               env: dict[str, str], trainer: str | None, repeat: int) -> dict[str, Any]:
    """One training run (a repeat starts a new training of fold 0): epoch times, s/iteration, wall, peak RSS, load."""
    load0 = os.getloadavg()[0]
    print(f"{tool}: training, repeat {repeat + 1} (load average {load0:.1f})", flush=True)
    cpu0 = _children_cpu_s()
    run = _check(run_measured(cmd, env, work / "logs" / f"{tool}_train_{repeat + 1}.log"), f"{tool} training")
    cpu = _children_cpu_s() - cpu0
    times = (samplan_epoch_times(work / "samplan_results", name, conf) if tool == "samplan"
             else nnunet_epoch_times(work / "nnunet_results", name, trainer, conf))
    return {"epoch_times": times, "s_per_iter": per_iteration(times, args.epoch_iters), "wall_s": run["wall_s"],
            "cpu_s": cpu, "cpu_s_per_iter": cpu / (len(times) * args.epoch_iters),
            "peak_rss_bytes": run["peak_rss_bytes"], "max_processes": run["max_processes"],
            "load_average_1min": [load0, os.getloadavg()[0]]}


def predict_tool(tool: str, cmd: list[str], no_tta: str, args: argparse.Namespace, work: Path, name: str,
                 env: dict[str, str]) -> dict[str, list[float]]:
    """Predict the held-out cases with and without TTA and evaluate each: wall s, peak RSS, mean fg Dice."""
    out: dict[str, list[float]] = {"pred_s": [], "pred_rss": [], "dice": []}
    for tag, extra in (("tta", []), ("notta", [no_tta])):
        pred = work / "predictions" / f"{tool.lower()}_{tag}"
        print(f"{tool}: predicting {args.test_cases} held-out cases ({tag})", flush=True)
        run = _check(run_measured([*cmd, "-i", str(work / "test" / "imagesTs"), "-o", str(pred), *extra], env,
                                  work / "logs" / f"{tool}_predict_{tag}.log"), f"{tool} prediction ({tag})")
        out["pred_s"].append(run["wall_s"])
        out["pred_rss"].append(run["peak_rss_bytes"])
        out["dice"].append(evaluate(Path(args.samplan_bin), work, name, pred))
    return out


def print_report(name: str, n_train: int, args: argparse.Namespace, prep: dict[str, Any], rows: list[dict[str, Any]],
                 info: dict[str, Any]) -> None:
    """Preprocessing and per-training details, the machine's load, then the markdown table."""
    print("\npreprocessing: " + ", ".join(f"{k} {r['wall_s']:.1f} s / {_gb(r['peak_rss_bytes'])}"
                                         for k, r in prep.items()))
    for r in rows:
        for i, x in enumerate(r["trainings"]):
            print(f"{r['tool']} training {i + 1}: epoch times {[round(t, 2) for t in x['epoch_times']]} s, "
                  f"{x['s_per_iter']:.3f} s/iteration; command {x['wall_s']:.1f} s wall, {x['cpu_s']:.1f} CPU s, "
                  f"{_gb(x['peak_rss_bytes'])}, "
                  f"up to {x['max_processes']} processes; load average {x['load_average_1min'][0]:.1f} -> "
                  f"{x['load_average_1min'][1]:.1f}")
    if "same_fold0_split" in info:
        print(f"fold 0 training cases identical in both tools: {info['same_fold0_split']}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end (1, 5, 15 min): {load} on {os.cpu_count()} cores (other jobs share the CPU)")
    print(f"\n{name}, {n_train} cases, fold 0, {args.timed_iters} timed iterations (+{args.epoch_iters} warm-up), "
          f"{args.test_cases} held-out cases, CPU, {args.threads} threads, {args.workers} augmentation worker(s)\n")
    print(markdown_table(rows))


def run_benchmark(args: argparse.Namespace) -> int:
    """Copy, preprocess, align the plans, train, predict, evaluate both tools; print the table."""
    src = _find_dataset(Path(args.source), args.dataset)
    conf, work = args.config, _fresh_work(args.work)
    (work / "logs").mkdir()
    name, train_ids, test_ids = copy_cases(src, work, args.cases, args.test_cases)
    epochs = 1 + math.ceil(args.iters / args.epoch_iters)
    args.timed_iters = (epochs - 1) * args.epoch_iters
    threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = dict(os.environ, **threads, SAMPLAN_RAW=str(work / "raw"),
               SAMPLAN_PREPROCESSED=str(work / "samplan_preprocessed"), SAMPLAN_RESULTS=str(work / "samplan_results"),
               nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "nnunet_preprocessed"),
               nnUNet_results=str(work / "nnunet_results"), nnUNet_n_proc_DA=str(args.workers),
               nnUNet_def_n_proc=str(args.np), nnUNet_compile="false")
    nn_exe = Path(args.nnunet_bin) / NNUNET_CMD
    have_nnunet = nn_exe.is_file()
    print(f"{name}: {len(train_ids)} training cases ({train_ids[0]}..{train_ids[-1]}), {len(test_ids)} held out; "
          f"{conf}; {epochs} epochs x {args.epoch_iters} iterations (first epoch = warm-up); work folder {work}; load "
          f"average {os.getloadavg()[0]:.1f}", flush=True)
    prep = {"samplan": _check(run_measured([str(Path(args.samplan_bin) / "samplan_plan_and_preprocess"), "-d", name,
                                            "-m", "unet", "-c", conf, "-np", str(args.np)], env,
                                           work / "logs" / "samplan_preprocess.log"), "samplan_plan_and_preprocess")}
    pre = work / "samplan_preprocessed" / name
    rows, info, trainer = [], {}, None
    if have_nnunet:
        args.nnunet_version = subprocess.run(
            [str(Path(args.nnunet_bin) / "python"), "-c",
             "import importlib.metadata as m; print(m.version('nnunetv2'))"],
            capture_output=True, text=True).stdout.strip() or "?"
        prep["nnU-Net"] = _check(run_measured([str(nn_exe), "-d", str(int(name[7:10])), "-c", conf, "-np", str(args.np),
                                               "-npfp", str(args.np), "--verify_dataset_integrity"], env,
                                              work / "logs" / "nnunet_preprocess.log"), NNUNET_CMD)
        nn_plans = json.loads((work / "nnunet_preprocessed" / name / "nnUNetPlans.json").read_text())
        info["plan_alignment"] = align_samplan_plan(pre, nn_plans, conf)
        print(f"plans: {json.dumps(info['plan_alignment'])}", flush=True)
        trainer = write_trainer(Path(args.nnunet_bin) / "python", epochs, args.epoch_iters)
    else:
        print(f"note: {nn_exe} not found; samplan only (pass --nnunet-bin)")
    plans = {"samplan": json.loads((pre / "plans.json").read_text())}
    tools = ["samplan"] + (["nnU-Net"] if have_nnunet else [])
    if have_nnunet:
        plans["nnU-Net"] = nn_plans
    cmds = {t: commands(t, args, name, conf, epochs, trainer) for t in tools}
    trains: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    for r in range(args.repeats):  # ABBA...: a load that drifts during the run hits both tools alike
        for t in (tools if r % 2 == 0 else tools[::-1]):
            trains[t].append(train_tool(t, cmds[t][0], args, work, name, conf, env, trainer, r))
    for t in tools:
        cfg = plans[t]["configurations"][conf]
        rows.append({"tool": t if t == "samplan" else f"nnU-Net {args.nnunet_version}", "config": conf,
                     "patch": cfg["patch_size"], "batch": cfg["batch_size"], "trainings": trains[t],
                     "s_per_iter": statistics.median(x["s_per_iter"] for x in trains[t]),
                     "train_rss": max(x["peak_rss_bytes"] for x in trains[t]),
                     "cpu_s_per_iter": statistics.median(x["cpu_s_per_iter"] for x in trains[t]),
                     **predict_tool(t, cmds[t][1], cmds[t][2], args, work, name, env)})
    if have_nnunet:
        ours_split = json.loads((pre / "splits_final.json").read_text())[0]
        ref_split = json.loads((work / "nnunet_preprocessed" / name / "splits_final.json").read_text())[0]
        info["same_fold0_split"] = sorted(ours_split["train"]) == sorted(ref_split["train"])
    print_report(name, len(train_ids), args, prep, rows, info)
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": name, "info": info, "preprocess": prep, "rows": rows,
                                               "args": vars(args)}, indent=2, default=str))
    if args.keep or args.work:
        print(f"\nkept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the benchmark."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="Dataset004_Hippocampus", help="DatasetXXX_Name or id inside --source")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "raw"), help="raw datasets (read only)")
    p.add_argument("--cases", type=int, default=60, help="training cases: the first N by case id (default 60)")
    p.add_argument("--test-cases", type=int, default=10, help="held-out cases predicted: the next N (default 10)")
    p.add_argument("--config", choices=("3d_fullres", "2d"), default="3d_fullres")
    p.add_argument("--iters", type=int, default=50, help="timed training iterations (default 50)")
    p.add_argument("--epoch-iters", type=int, default=None,
                   help="iterations per epoch; the first epoch is the untimed warm-up (default min(25, --iters))")
    p.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS) of both tools (default 2)")
    p.add_argument("--workers", type=int, default=1,
                   help="augmentation processes: samplan_train -np and nnUNet_n_proc_DA (default 1, samplan's "
                        "default on 2 cores)")
    p.add_argument("-np", type=int, default=2, help="preprocessing processes of both tools (default 2)")
    p.add_argument("--predict-np", type=int, default=2, help="nnUNetv2_predict -npp and -nps (default 2; samplan "
                                                             "predicts with its default, one background thread)")
    p.add_argument("--samplan-bin", default=str(REPO / ".venv" / "bin"), help="folder of samplan's commands")
    p.add_argument("--nnunet-bin", default=str(_default_nnunet_bin()),
                   help=f"folder of {NNUNET_CMD} (nnU-Net is skipped if absent)")
    p.add_argument("--repeats", type=int, default=1,
                   help="train each tool this many times, alternating ABBA; s/iteration is the median (default 1)")
    p.add_argument("--work", default=None, help="work folder, kept (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    args = p.parse_args(argv)
    args.epoch_iters = args.epoch_iters or min(25, args.iters)
    if min(args.cases, args.test_cases, args.iters, args.epoch_iters, args.threads, args.repeats) < 1 \
            or args.workers < 0:
        p.error("--cases, --test-cases, --iters, --epoch-iters, --threads and --repeats must be at least 1, "
                "--workers at least 0")
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
