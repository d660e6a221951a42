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


def _size(n: float) -> str:
    """Bytes as a short human-readable size (1.2 GB)."""
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


class DiskFullError(SamplanError):
    """The filesystem ran out of space (or quota) while samplan wrote into `folder`; nothing half-written was kept."""

    # sysexits.h EX_IOERR: scripts can tell "free space and retry" apart from bad input
    exit_code = 74

    def __init__(self, folder: str, free: int | None, needed: int | None = None, detail: str = ""):
        self.folder, self.free, self.needed, self.detail = str(folder), free, needed, detail
        free_txt = "unknown" if free is None else _size(free)
        need_txt = "" if needed is None else f"; about {_size(needed)} more are needed"
        super().__init__(f"not enough disk space in {self.folder} ({free_txt} free{need_txt}){detail}. Free space "
                         "and re-run the same command; it resumes where it stopped.")

    def __reduce__(self):  # worker processes send errors back pickled; rebuild from the fields, not the message
        return type(self), (self.folder, self.free, self.needed, self.detail)


class AlreadyRunningError(SamplanError):
    """Another samplan process holds the lock of the folder this run would write (see samplan.locks)."""

    # sysexits.h EX_TEMPFAIL: "try again later", which is what the user should do
    exit_code = 75


class InputError(SamplanError):
    """Files or folders given to a command cannot be used as they are (a damaged checkpoint, plans from another
    samplan version, the output folder equal to the input folder, ...); exit status 2, as for bad arguments."""

    exit_code = 2
