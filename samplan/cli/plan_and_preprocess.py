"""samplan_plan_and_preprocess: verify a raw dataset, fingerprint it, write plans.json and preprocess it."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_plan_and_preprocess -d 4
  samplan_plan_and_preprocess -d Dataset004_Hippocampus -np 2
  samplan_plan_and_preprocess -d Hippocampus --plan-only -m unet samunetr
  samplan_plan_and_preprocess -d Prostate158 --overwrite-target-spacing 3.0 0.5 0.5
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_plan_and_preprocess."""
    p = make_parser("samplan_plan_and_preprocess", __doc__, EPILOG)
    p.add_argument("-d", "--dataset", required=True, nargs="+", help="dataset id (4), full name (Dataset004_Hippocampus) or bare name (Hippocampus)")
    p.add_argument("-m", "--methods", nargs="+", default=None, help="plan only these methods (default: all registered)")
    p.add_argument("-c", "--configurations", nargs="+", default=None, help="preprocess only these configurations (default: all planned)")
    p.add_argument("-np", "--num-processes", type=int, default=None, help="worker processes (default: bounded by cores and free memory)")
    p.add_argument("--plan-only", action="store_true", help="write fingerprint.json and plans.json, do not preprocess")
    p.add_argument("--no-verify", action="store_true", help="skip dataset verification (not recommended)")
    p.add_argument("--clean", action="store_true", help="recompute the fingerprint even if one exists")
    p.add_argument("--overwrite-target-spacing", nargs="+", type=float, default=None, metavar="MM", help="target spacing for 3d_fullres, in the raw array axis order")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.pipeline.planning import plan_and_preprocess

        for d in args.dataset:
            plan_and_preprocess(
                d,
                verify=not args.no_verify,
                plan_only=args.plan_only,
                methods=args.methods,
                configurations=args.configurations,
                overwrite_target_spacing=args.overwrite_target_spacing,
                num_processes=args.num_processes,
                clean=args.clean,
            )

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
