"""autosam2 with the SAM branch on 0 %, 30 % and 60 % of the slices, the same iterations, one fold.

  python benchmarks/autosam2.py -d Dataset004_Hippocampus --max-cases 60 --warmup 500 --epochs 4 --iters 15
  python benchmarks/autosam2.py -d Dataset501_BraTS2015DM --brats-regions --folds-of 4 --epochs 4 --iters 10
  python benchmarks/autosam2.py -d Dataset503_PICAIToy_ADCHBV --folds-of 3 --epochs 4 --iters 10

The dataset (optionally its first `--max-cases`) is copied to a work folder, planned and preprocessed for autosam2
(3d_fullres); `--brats-regions` rewrites the BraTS 2013 labels (1 necrosis, 2 edema, 3 non-enhancing, 4 enhancing)
as the regions WT = 1-4, TC = 1, 3, 4, ET = 4 with `regions_class_order`; `--patch Z Y X` / `--batch B` replace
the plan's 3D patch and batch (a BraTS step with the CPU plan's 96 x 160 x 160 x 2 costs about 25 s on 2 cores);
`--folds-of K` writes a K-fold
splits_final.json for sets too small for 5 folds. `--warmup N` first trains the U-Net alone (fraction 0) for N
iterations, and every row starts from those weights (`--pretrained-weights`): on a CPU budget the SAM branch then
gets prompts from a U-Net that sees the structures, instead of from an untrained one. Each row is `train_fold`
(what `samplan_train -m autosam2` runs) with the plan's `slice_fraction` overridden, in a process of its own so that
its peak RSS is its own, followed by the final validation of the fold's validation cases in their original
geometry (mirroring off unless --tta). Every row trains the same iterations (warm-up + epochs x iters).
Printed per row: Dice per label or region and their mean, the mean Dice of the same model's U-Net alone (SAM
branch switched off at prediction: what the branch changed), seconds per training iteration (epoch time, its few
validation batches included, over the training iterations), the training and validation wall times and the peak
RSS. Compare rows of one run: timings on shared machines drift by 30 % between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from medsam_finetune import REPO, _setup_env, print_table  # noqa: E402  (shared helpers)

BRATS_REGIONS = {"background": 0, "whole_tumour": [1, 2, 3, 4], "tumour_core": [1, 3, 4], "enhancing_tumour": [4]}
BRATS_ORDER = [2, 1, 4]  # WT painted as edema, then TC as necrosis, then ET as enhancing


def _subset(raw: Path, max_cases: int | None) -> None:
    """Keep only the first `max_cases` (sorted) labelled cases of the copied raw dataset."""
    meta = json.loads((raw / "dataset.json").read_text())
    ending = meta["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (raw / "labelsTr").glob(f"*{ending}"))
    for c in cases[max_cases:] if max_cases else []:
        (raw / "labelsTr" / f"{c}{ending}").unlink()
        for f in (raw / "imagesTr").glob(f"{c}_[0-9][0-9][0-9][0-9]{ending}"):
            f.unlink()
    meta["numTraining"] = min(len(cases), max_cases or len(cases))
    (raw / "dataset.json").write_text(json.dumps(meta, indent=2))


def _small_splits(raw: Path, k: int) -> None:
    """A K-fold splits_final.json over the sorted cases (fold i validates every K-th case from i)."""
    meta = json.loads((raw / "dataset.json").read_text())
    ending = meta["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (raw / "labelsTr").glob(f"*{ending}"))
    splits = [{"train": [c for j, c in enumerate(cases) if j % k != i], "val": cases[i::k]} for i in range(k)]
    (raw / "splits_final.json").write_text(json.dumps(splits, indent=2))


def unet_alone(fold_dir: Path, fold: int, out: Path) -> dict:
    """The summary of the fold's validation cases predicted by the same trained model with the SAM branch off
    (slice fraction 0 in a copy of its model folder): what the branch itself changed, apart from the U-Net."""
    from samplan.dataset.dataset_json import group_images_by_case
    from samplan.evaluation.evaluate import dataset_settings, evaluate_folders
    from samplan.inference.predictor import Predictor
    from samplan.paths import preprocessed_root, raw_root
    from samplan.utils import load_json, save_json

    model = fold_dir.parent
    copy = out / model.parent.name / model.name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns("validation", "checkpoint_best.pth",
                                                              "checkpoint_latest.pth"))
    plans = load_json(copy / "plans.json")
    plans["methods"]["autosam2"]["slice_fraction"] = 0.0
    save_json(plans, copy / "plans.json")
    dataset = model.parent.name
    meta = load_json(copy / "dataset.json")
    val = load_json(preprocessed_root() / dataset / "splits_final.json")[fold]["val"]
    images = group_images_by_case(raw_root() / dataset / "imagesTr", meta["file_ending"])
    pred = copy / "pred"
    Predictor.from_model_dir(copy, folds=[fold], device="cpu", tta=False, progress=False).predict_cases(
        {c: images[c] for c in val}, pred, overwrite=True, num_processes=0)
    targets, ignore, ending = dataset_settings(str(copy / "dataset.json"))
    return evaluate_folders(preprocessed_root() / dataset / "gt_segmentations", pred, targets, ending,
                            output_file=pred / "summary.json", ignore_label=ignore, num_processes=1,
                            only_predicted=True, progress=False)


def run_row(args: argparse.Namespace) -> None:
    """Child process: train and validate one fraction, write its numbers as JSON."""
    from samplan.pipeline.train import train_fold
    from samplan.utils import load_json

    t0 = time.perf_counter()
    fold_dir = train_fold(args.dataset, "autosam2", None, args.fold, epochs=args.epochs, iters_per_epoch=args.iters,
                          val_iters=args.val_iters, device="cpu", num_workers=args.workers, final_validation=False,
                          method_overrides={"slice_fraction": args.row}, seed=args.seed,
                          pretrained_weights=args.pretrained)
    train_secs = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_fold(args.dataset, "autosam2", None, args.fold, device="cpu", only_validate=True,
               method_overrides={"slice_fraction": args.row}, validation_tta=args.tta)
    val_secs = time.perf_counter() - t0
    progress = load_json(fold_dir / "progress.json")
    summary = load_json(fold_dir / "validation" / "summary.json")
    alone = unet_alone(fold_dir, args.fold, Path(args.result).parent / f"unet_alone_{args.row:g}")
    log = (fold_dir / "training_log.txt").read_text()
    shutil.copy(fold_dir / "training_log.txt", Path(args.result).with_suffix(".log"))
    Path(args.result).write_text(json.dumps({
        "fraction": args.row, "dice": {k: v["Dice"] for k, v in summary["mean"].items()},
        "fg_dice": summary["foreground_mean"]["Dice"], "cases": len(summary["metric_per_case"]),
        "unet_alone": alone["foreground_mean"]["Dice"],
        "sec_per_it": sum(progress["epoch_time"]) / (args.epochs * args.iters), "train_s": train_secs,
        "val_s": val_secs, "log_tail": log.splitlines()[-1]}))


def main(argv: list[str] | None = None) -> int:
    """Prepare the dataset, run one child per fraction, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="Dataset004_Hippocampus")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "raw"))
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.3, 0.6])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters", type=int, default=25, help="training iterations per epoch")
    p.add_argument("--val-iters", type=int, default=2, help="validation batches per epoch (pseudo Dice)")
    p.add_argument("--warmup", type=int, default=0, help="U-Net-only iterations every row starts from (0: none)")
    p.add_argument("--max-cases", type=int, default=None, help="use only the first N cases")
    p.add_argument("--folds-of", type=int, default=None, help="write a K-fold splits_final.json (small sets)")
    p.add_argument("--brats-regions", action="store_true", help="BraTS 2013 labels -> regions WT/TC/ET")
    p.add_argument("--patch", type=int, nargs=3, default=None, help="a smaller 3D patch than the plan's (CPU budgets)")
    p.add_argument("--batch", type=int, default=None, help="another batch size than the plan's")
    p.add_argument("--tta", action="store_true", help="mirroring in the final validation")
    p.add_argument("--workers", type=int, default=1, help="data loader processes per training")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    p.add_argument("--row", type=float, default=None, help=argparse.SUPPRESS)  # child mode: one fraction
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pretrained", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row is not None:
        run_row(args)
        return 0

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="samplan_autosam2_"))
    _setup_env(work, Path(args.source), args.dataset)
    raw = work / "raw" / args.dataset
    _subset(raw, args.max_cases)
    if args.brats_regions:
        meta = json.loads((raw / "dataset.json").read_text())
        meta["labels"], meta["regions_class_order"] = BRATS_REGIONS, BRATS_ORDER
        (raw / "dataset.json").write_text(json.dumps(meta, indent=2))
    if args.folds_of:
        _small_splits(raw, args.folds_of)
    from samplan.pipeline.planning import plan_and_preprocess
    from samplan.utils import load_json

    t0 = time.perf_counter()
    pre = plan_and_preprocess(args.dataset, methods=["autosam2"], configurations=["3d_fullres"], num_processes=2)
    plans = load_json(pre / "plans.json")
    cfg, section = plans["configurations"]["3d_fullres"], plans["methods"]["autosam2"]
    if args.patch or args.batch:  # every row (and prediction) uses the edited plan
        from samplan.utils import save_json

        print(f"the plan's patch {cfg['patch_size']} and batch {cfg['batch_size']} replaced by {args.patch} and "
              f"{args.batch}", file=sys.stderr)
        cfg["patch_size"] = args.patch or cfg["patch_size"]
        cfg["batch_size"] = args.batch or cfg["batch_size"]
        save_json(plans, pre / "plans.json")
    print(f"planned and preprocessed in {time.perf_counter() - t0:.0f} s; patch {cfg['patch_size']}, batch "
          f"{cfg['batch_size']}; planned slice fraction {section['slice_fraction']} ({section['slice_fraction_reason']})",
          file=sys.stderr)
    pretrained = None
    if args.warmup:
        from samplan.pipeline.train import train_fold

        t0 = time.perf_counter()
        os.environ["SAMPLAN_RESULTS"] = str(work / "res_warmup")
        # epochs of 50 iterations: the one-cycle schedule is stepped per epoch
        warm = train_fold(args.dataset, "autosam2", None, args.fold, epochs=max(1, args.warmup // 50),
                          iters_per_epoch=min(50, args.warmup),
                          val_iters=args.val_iters, device="cpu", num_workers=args.workers, final_validation=False,
                          method_overrides={"slice_fraction": 0.0}, seed=args.seed)
        pretrained = warm / "checkpoint_final.pth"
        print(f"warm-up: the U-Net alone for {args.warmup} iterations in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
    results = []
    for fraction in args.fractions:
        out = work / f"row_{fraction:g}.json"
        env = {**os.environ, "SAMPLAN_RESULTS": str(work / f"res_{fraction:g}")}
        cmd = [sys.executable, __file__, "-d", args.dataset, "-f", str(args.fold), "--epochs", str(args.epochs),
               "--iters", str(args.iters), "--val-iters", str(args.val_iters), "--workers", str(args.workers),
               "--seed", str(args.seed), "--row", str(fraction), "--result", str(out)] + (["--tta"] if args.tta else []) \
            + (["--pretrained", str(pretrained)] if pretrained else [])
        proc = subprocess.Popen(cmd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            print(f"row {fraction} failed (status {status}); its log: {work / f'res_{fraction:g}'}", file=sys.stderr)
            continue
        row = json.loads(out.read_text())
        row["peak_rss_gb"] = usage.ru_maxrss / 2**20  # kB on Linux
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    if not results:
        return 1
    keys = list(results[0]["dice"])
    header = ["slice fraction", *[f"Dice {k}" for k in keys], "mean", "its U-Net alone", "cases", "s/it", "train s",
              "val s", "peak RSS GB"]
    rows = [[f"{r['fraction']:g}", *[f"{r['dice'][k]:.4f}" for k in keys], f"{r['fg_dice']:.4f}",
             f"{r['unet_alone']:.4f}", str(r["cases"]),
             f"{r['sec_per_it']:.2f}", f"{r['train_s']:.0f}", f"{r['val_s']:.0f}", f"{r['peak_rss_gb']:.2f}"]
            for r in results]
    warm = f"{args.warmup} U-Net-only + " if args.warmup else ""
    print_table(f"autosam2 on {args.dataset}, fold {args.fold}, {warm}{args.epochs} x {args.iters} iterations (batch "
                f"{cfg['batch_size']}, patch {cfg['patch_size']}), {section['backbone']}", header, rows)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
