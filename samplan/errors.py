"""User-facing errors: one clear message, a fixed exit status, no traceback from the CLI."""
from __future__ import annotations


class SamplanError(Exception):
    """An error caused by the user's input or environment; the CLI prints it and exits with `exit_code`."""

    exit_code = 1


class DatasetError(SamplanError):
    """The raw dataset is malformed (missing files, bad dataset.json, geometry mismatch, ...)."""

    exit_code = 2


class DatasetProblems(DatasetError):
    """Several dataset problems found at once; each item names the case, the file, what is wrong and the fix."""

    def __init__(self, dataset_dir: str, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in dataset {dataset_dir}; nothing was written:\n{lines}")
