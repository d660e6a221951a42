"""samplan_report: one self-contained HTML page comparing the candidates of samplan_find_best (tables, Dice box
plots, overlays of each candidate's best and worst validation case, training curves)."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_report -d 4                        # $SAMPLAN_RESULTS/Dataset004_Hippocampus/find_best/report.html
  samplan_report -d Hippocampus -o ~/hippocampus_report.html

Reads $SAMPLAN_RESULTS/<dataset>/find_best/find_best.json (run samplan_find_best -d D first), the reference label
maps in $SAMPLAN_PREPROCESSED/<dataset>/gt_segmentations, the images in $SAMPLAN_RAW/<dataset>/imagesTr and the
progress.json of every trained model. Every figure is embedded: the file opens offline and can be sent alone.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_report."""
    p = make_parser("samplan_report", __doc__, EPILOG)
    p.add_argument("-d", "--dataset", required=True, help="dataset id (4), full name or bare name")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="HTML file to write (default: $SAMPLAN_RESULTS/<dataset>/find_best/report.html)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.evaluation.report import write_report

        print(f"wrote {write_report(args.dataset, args.output)}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
