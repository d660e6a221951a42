"""ProMISe (promise) against zero-shot and fine-tuned box-prompted LiteMedSAM on one fold, no human prompt anywhere.

  python benchmarks/promise.py                                              # Kvasir-SEG, fold 0
  python benchmarks/promise.py -d Dataset511_CVCClinicDB --case-groups '(seq\\d+)_'   # CVC, folds by video sequence

Rows, all with LiteMedSAM's real weights and evaluated on the fold's validation images in their original geometry:
1. zero-shot LiteMedSAM with a whole-image box (medsam, box policy fixed_full_image, no step taken);
2. medsam fine-tuned with the whole-image box, `--epochs x --iters` iterations of batch 4 (image encoder and mask
   decoder trained);
3. promise apm and 4. promise apm_ips, the same number of iterations (batch 8, frozen SAM, cached features);
5. promise apm_ips with `--long-epochs` epochs (about the medsam row's wall time, when the iterations are cheap);
6. (`--rows ...,long_regression`) row 5 with the paper's readout, the box regressed by global pooling and a linear
   layer, where the plan reads it from the APM's heatmap (box prompts);
7. (`--rows ...,long_ips_full_lr`) row 5 with the IPS at the APM's learning rate (`recipe.ips_lr_scale` 1).
The first promise row also encodes every image once into the feature cache, which the later promise rows reuse
(same frozen SAM). Every training row is `train_fold` (what `samplan_train` runs) plus its final validation; the time column is the
wall time of that row (planning excluded), measured in this one run: compare rows, not runs.
`--case-groups` writes `case_groups` into the copied dataset.json, so the folds keep each group on one side.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from medsam_finetune import REPO, _dice_row, _setup_env, print_table, zero_shot  # noqa: E402  (shared rows)


def _train_row(name: str, dataset: str, method: str, fold: int, epochs: int, iters: int, overrides: dict) -> list[str]:
    """Train one fold (then its final validation) and return its table row."""
    from samplan.pipeline.train import train_fold
    from samplan.utils import load_json

    t0 = time.perf_counter()
    fold_dir = train_fold(dataset, method, None, fold, epochs=epochs, iters_per_epoch=iters, val_iters=2,
                          device="cpu", num_workers=0, method_overrides=overrides)
    secs = time.perf_counter() - t0
    row = _dice_row(name, load_json(fold_dir / "validation" / "summary.json"), secs)
    shutil.copy(fold_dir / "training_log.txt", fold_dir.parent / f"training_log_{name.replace(' ', '_')}.txt")
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the rows and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="Dataset510_KvasirSEG")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "raw"))
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--case-groups", default=None, help="regular expression naming each case's group (dataset.json)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--iters", type=int, default=4, help="training iterations per epoch (rows 2-4)")
    p.add_argument("--long-epochs", type=int, default=12, help="epochs of row 5 (0: no row 5)")
    p.add_argument("--promise-lr", type=float, default=None, help="Adam learning rate of promise (default: the plan's)")
    p.add_argument("--long-lr", type=float, default=None, help="Adam learning rate of row 5 (default: --promise-lr)")
    p.add_argument("--rows", default="zero,medsam,apm,apm_ips,long", help="which rows to run")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="samplan_promise_"))
    _setup_env(work, Path(args.source), args.dataset)
    if args.case_groups:
        meta_file = work / "raw" / args.dataset / "dataset.json"
        meta = json.loads(meta_file.read_text())
        meta["case_groups"] = args.case_groups
        meta_file.write_text(json.dumps(meta, indent=2))
    from samplan.pipeline.planning import plan_and_preprocess
    from samplan.utils import load_json

    t0 = time.perf_counter()
    pre = plan_and_preprocess(args.dataset, methods=["medsam", "promise"], configurations=["2d"], num_processes=2)
    print(f"planned and preprocessed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    plans = load_json(pre / "plans.json")
    medsam = {"box_policy": {**plans["methods"]["medsam"]["box_policy"], "name": "fixed_full_image"}}
    promise: dict = {}
    if args.promise_lr is not None:
        promise["recipe"] = {"optimizer": {"lr": args.promise_lr}}
    lr = args.promise_lr if args.promise_lr is not None else plans["methods"]["promise"]["recipe"]["optimizer"]["lr"]
    rows, wanted, n = [], set(args.rows.split(",")), args.epochs * args.iters
    if "zero" in wanted:
        summary, secs = zero_shot(args.dataset, args.fold, medsam, work / "zero_shot")
        rows.append(_dice_row("zero-shot LiteMedSAM, whole-image box", summary, secs))
    if "medsam" in wanted:
        rows.append(_train_row(f"medsam whole-image box {n} it", args.dataset, "medsam", args.fold, args.epochs,
                               args.iters, medsam))
    for mode in ("apm", "apm_ips"):
        if mode in wanted:
            rows.append(_train_row(f"promise {mode} {n} it lr {lr:g}", args.dataset, "promise", args.fold,
                                   args.epochs, args.iters, {**promise, "mode": mode}))
    long_lr = lr if args.long_lr is None else args.long_lr
    readout = plans["methods"]["promise"]["apm"]["readout"]
    long_recipe = {"optimizer": {"lr": long_lr}}
    variants = [  # (row key, label, overrides beyond row 5's): row 5 and its A/Bs at the same budget
        ("long", readout, {}),
        # the paper's readout: global pooling + linear layer regress the box
        ("long_regression", "regression",
         {"recipe": {**long_recipe, "loss": {"weight_heatmap": 0.0}}, "apm": {"readout": "regression"}}),
        ("long_ips_full_lr", "IPS at 1x lr", {"recipe": {**long_recipe, "ips_lr_scale": 1.0}}),
    ]
    for key, label, extra in variants:
        if key not in wanted or not args.long_epochs or (key == "long_regression" and readout == "regression"):
            continue
        rows.append(_train_row(f"promise apm_ips {args.long_epochs * args.iters} it lr {long_lr:g} ({label})",
                               args.dataset, "promise", args.fold, args.long_epochs, args.iters,
                               {"recipe": long_recipe, "mode": "apm_ips", **extra}))
    splits = load_json(pre / "splits_final.json")
    grouped = f", grouped by {args.case_groups}" if args.case_groups else ""
    print_table(f"{args.dataset}, fold {args.fold}: {len(splits[args.fold]['train'])} training / "
                f"{len(splits[args.fold]['val'])} validation images{grouped}", ["row", "Dice", "cases", "s", "per-case Dice"],
                rows)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
