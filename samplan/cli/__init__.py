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
