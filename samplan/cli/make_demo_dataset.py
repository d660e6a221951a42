"""samplan_make_demo_dataset: write the generated MR-like demo dataset Dataset999_Demo in the nnU-Net raw format."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_make_demo_dataset                      # into $SAMPLAN_RAW/Dataset999_Demo
  samplan_make_demo_dataset -o /tmp/raw --cases 20 --seed 1
  samplan_make_demo_dataset && samplan_plan_and_preprocess -d 999
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_make_demo_dataset."""
    p = make_parser("samplan_make_demo_dataset", __doc__, EPILOG)
    p.add_argument("-o", "--output", default=None, metavar="OUT_RAW_DIR", help="raw datasets folder (default: SAMPLAN_RAW)")
    p.add_argument("--cases", type=int, default=12, help="number of training cases (default: 12)")
    p.add_argument("--test-cases", type=int, default=0, help="held-out cases written to imagesTs/labelsTs (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files (default: 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.dataset.demo import write_demo_dataset
        from samplan.paths import raw_root

        out = args.output if args.output is not None else raw_root()
        ds = write_demo_dataset(out, n_cases=args.cases, seed=args.seed, n_test_cases=args.test_cases)
        print(f"wrote {args.cases} training and {args.test_cases} held-out cases to {ds}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
