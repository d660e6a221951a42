"""Fine-tuned versus zero-shot medsam (LiteMedSAM real weights) with the same box policy on one fold's validation cases.

  python benchmarks/medsam_finetune.py                                   # Kvasir-SEG, fold 0, fixed whole-image box
  python benchmarks/medsam_finetune.py -d Dataset004_Hippocampus --box reference_jitter --epochs 2

Both rows go through the same code a user runs: the dataset is planned and preprocessed ("2d") in a temporary
folder, the zero-shot row predicts the fold's validation images with the pretrained network as loaded for a new
training (no step taken), the fine-tuned row is `train_fold` (the same as `samplan_train -m medsam`) followed by
its final validation, and both are evaluated into summary.json by `evaluate_folders`. The box policy is the
plan's `box_policy.name`: with "fixed_full_image" no reference box is used at inference, so both rows are fair,
human-free predictions. Printed: mean foreground Dice, per-case Dice, wall time.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _setup_env(work: Path, source: Path, dataset: str) -> None:
    """A fresh raw/preprocessed/results tree in `work` with a copy of the dataset."""
    for var, sub in (("SAMPLAN_RAW", "raw"), ("SAMPLAN_PREPROCESSED", "pre"), ("SAMPLAN_RESULTS", "res")):
        os.environ[var] = str(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)
    shutil.copytree(source / dataset, work / "raw" / dataset, dirs_exist_ok=True)


def _dice_row(name: str, summary: dict, seconds: float) -> list[str]:
    """One table row: mode, mean foreground Dice, per-case Dice (first label), time."""
    per_case = [next(iter(c["metrics"].values()))["Dice"] for c in summary["metric_per_case"]]
    cases = " ".join(f"{d:.3f}" for d in per_case)
    return [name, f"{summary['foreground_mean']['Dice']:.4f}", str(len(per_case)), f"{seconds:.0f}", cases]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """The title, then a left-aligned plain-text table."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}\n")
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def zero_shot(dataset: str, fold: int, overrides: dict, out_dir: Path) -> tuple[dict, float]:
    """Predict the fold's validation cases with the pretrained (untrained) network; evaluate them."""
    from samplan.dataset.dataset_json import group_images_by_case
    from samplan.evaluation.evaluate import dataset_settings, evaluate_folders
    from samplan.inference.predictor import Predictor
    from samplan.paths import raw_root
    from samplan.training.trainer import prepare_fold

    t0 = time.perf_counter()
    s = prepare_fold(dataset, "medsam", None, fold, overrides)
    network = s.method.build_network(s.mp, s.num_input_channels, s.label_manager.num_outputs)
    print(s.method.initialize_pretrained(network, s.mp), file=sys.stderr)
    predictor = Predictor(s.method, network, s.plans, s.configuration, s.dataset_json, None,
                          num_input_channels=s.num_input_channels, device="cpu", tta=False, progress=False)
    images = group_images_by_case(raw_root() / s.dataset_name / "imagesTr", s.dataset_json["file_ending"])
    predictor.predict_cases({c: images[c] for c in s.val_ids}, out_dir)
    targets, ignore, ending = dataset_settings(str(s.preprocessed_dir / "dataset.json"))
    summary = evaluate_folders(s.preprocessed_dir / "gt_segmentations", out_dir, targets, ending,
                               output_file=out_dir / "summary.json", ignore_label=ignore, num_processes=1,
                               only_predicted=True, progress=False)
    return summary, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Run both rows and print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", default="Dataset510_KvasirSEG")
    p.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "raw"))
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--box", default="fixed_full_image", help="box policy of both rows (default fixed_full_image)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters", type=int, default=10, help="training iterations per epoch")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="samplan_medsam_"))
    _setup_env(work, Path(args.source), args.dataset)
    from samplan.pipeline.planning import plan_and_preprocess
    from samplan.pipeline.train import train_fold
    from samplan.utils import load_json

    t0 = time.perf_counter()
    pre = plan_and_preprocess(args.dataset, methods=["medsam"], configurations=["2d"], num_processes=2)
    print(f"planned and preprocessed in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    policy = {**load_json(pre / "plans.json")["methods"]["medsam"]["box_policy"], "name": args.box}
    overrides = {"box_policy": policy}
    rows = []
    summary, secs = zero_shot(args.dataset, args.fold, overrides, work / "zero_shot")
    rows.append(_dice_row("zero-shot LiteMedSAM", summary, secs))
    t0 = time.perf_counter()
    fold_dir = train_fold(args.dataset, "medsam", None, args.fold, epochs=args.epochs, iters_per_epoch=args.iters,
                          val_iters=2, device="cpu", num_workers=0, method_overrides=overrides)
    rows.append(_dice_row(f"fine-tuned {args.epochs}x{args.iters} it", load_json(fold_dir / "validation" / "summary.json"),
                          time.perf_counter() - t0))
    print_table(f"{args.dataset}, fold {args.fold} validation, box policy {args.box}",
                ["mode", "Dice", "cases", "s", "per-case Dice"], rows)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
