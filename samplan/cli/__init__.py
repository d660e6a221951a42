"""Thin command-line entry points: parse arguments, call the package, turn SamplanError into one message."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from samplan.errors import SamplanError


def run_cli(fn: Callable[[], object]) -> int:
    """Call `fn`; print a SamplanError as one message on stderr and return its exit code."""
    try:
        fn()
    except SamplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


def make_parser(prog: str, description: str | None, epilog: str) -> argparse.ArgumentParser:
    """An argument parser whose help keeps the description's and examples' line breaks."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_converter_options(p: argparse.ArgumentParser, id_help: str | None = None) -> None:
    """The options every converter shares: -np, --overwrite, and with `id_help` the dataset's -d and -o."""
    if id_help is not None:
        p.add_argument("-d", "--dataset-id", type=int, default=None, metavar="ID", help=f"dataset id ({id_help})")
        p.add_argument("-o", "--output", default=None, metavar="NAME_OR_DIR",
                       help="DatasetXXX_Name (into SAMPLAN_RAW) or an output folder path, instead of -d")
    p.add_argument("-np", "--num-processes", type=int, default=None,
                   help="worker processes (default: number of cores, bounded by RAM)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (once the new one is complete)")
