"""samplan_evaluate: compare predicted label maps with reference ones and write summary.json (nnU-Net's schema + HD95, NSD)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samplan.cli import make_parser, run_cli
from samplan.evaluation.conventions import HD95_CONVENTIONS, NSD_CONVENTIONS

EPILOG = """examples:
  samplan_evaluate -gt $SAMPLAN_RAW/Dataset004_Hippocampus/labelsTr -pred out/ -d 4
  samplan_evaluate -gt labelsTs/ -pred out/ -l 1 2 -o results/summary.json --nsd-tol 2
  samplan_evaluate -gt labelsTr/ -pred fold_0/validation/ -d 4 --only-predicted -np 2
  samplan_evaluate -gt labelsTs/ -pred out/ -d 4 --hd95 pooled --nsd area_weighted

Labels: with -d, the labels (or regions, e.g. BraTS [1,2,3], [2,3], [3]) and the ignore label of the
dataset's dataset.json; otherwise -l, or every non-zero value found in the files.
Empty masks: Dice/IoU/HD95 are null when reference and prediction are both empty (skipped by the
means); HD95 is the image diagonal in mm and NSD 0 when exactly one is empty; NSD is 1 when both are.
HD95 and NSD follow MONAI by default (compute_hausdorff_distance(percentile=95), compute_surface_dice);
summary.json states the conventions used under "metric_conventions".
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_evaluate."""
    p = make_parser("samplan_evaluate", __doc__, EPILOG)
    p.add_argument("-gt", "--reference", required=True, metavar="DIR", help="folder of reference label maps {case}{ending}")
    p.add_argument("-pred", "--prediction", required=True, metavar="DIR", help="folder of predicted label maps {case}{ending}")
    p.add_argument("-d", "--dataset", default=None, help="dataset id/name, or path to a dataset.json: labels, regions, ignore label and file ending from it")
    p.add_argument("-l", "--labels", type=int, nargs="+", default=None, help="label values to evaluate (default: from -d, else all found)")
    p.add_argument("-il", "--ignore-label", type=int, default=None, help="reference value whose voxels are not counted (default: from -d, else none)")
    p.add_argument("-o", "--output", default=None, help="summary file (default: PRED_DIR/summary.json)")
    p.add_argument("--nsd-tol", type=float, default=1.0, metavar="MM", help="tolerance of the normalised surface Dice in mm (default: 1.0)")
    p.add_argument("--hd95", choices=tuple(HD95_CONVENTIONS), default="monai",
                   help="HD95 convention: monai = max of the two directed 95th percentiles (default, as MONAI and "
                        "BraTS papers); pooled = 95th percentile of both directions pooled (medpy; samplan's earlier default)")
    p.add_argument("--nsd", choices=tuple(NSD_CONVENTIONS), default="monai",
                   help="NSD convention: monai = border voxels counted (default, as MONAI's compute_surface_dice); "
                        "area_weighted = surface elements weighted by area (DeepMind's surface-distance)")
    p.add_argument("--file-ending", default=None, help="file ending of the label maps (default: from -d, else from the files in -gt)")
    p.add_argument("--only-predicted", action="store_true", help="evaluate only the cases that have a prediction instead of failing on missing ones")
    p.add_argument("-np", "--num-processes", type=int, default=None, help="worker processes (default: number of cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.evaluation.evaluate import dataset_settings, evaluate_folders, format_summary_table, infer_file_ending

        targets, ignore, ending = None, args.ignore_label, args.file_ending
        if args.dataset is not None:
            ds_targets, ds_ignore, ds_ending = dataset_settings(args.dataset)
            targets = ds_targets
            ignore = ignore if ignore is not None else ds_ignore
            ending = ending or ds_ending
        if args.labels is not None:
            targets = args.labels
        ending = ending or infer_file_ending(args.reference)
        output = Path(args.output) if args.output else Path(args.prediction) / "summary.json"
        summary = evaluate_folders(
            args.reference,
            args.prediction,
            targets,
            ending,
            output_file=output,
            ignore_label=ignore,
            num_processes=args.num_processes,
            nsd_tolerance_mm=args.nsd_tol,
            only_predicted=args.only_predicted,
            hd95_convention=args.hd95,
            nsd_convention=args.nsd,
        )
        print(format_summary_table(summary))
        print(f"wrote {output}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
