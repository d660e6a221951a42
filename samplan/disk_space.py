"""Full disks: recognise an out-of-space failure, turn it into a DiskFullError naming the folder, and check free
space before a long job."""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from samplan.errors import DiskFullError, SamplanError

# EDQUOT (quota exceeded) needs the same remedy as a full disk
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Below this many free bytes a write that "succeeded" may have been cut short: SimpleITK prints "NWAD: wrote only
# 0 of N bytes" and returns normally, and blosc2/torch raise a bare RuntimeError without an errno.
NEARLY_FULL_BYTES = 1 << 20


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes available to this user on the filesystem of `folder` (its nearest existing parent); None if unknown."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException) -> bool:
    """True when `exc`, or an exception it was raised from or during, is an out-of-space/quota OSError."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


def nearly_full(folder: str | os.PathLike) -> bool:
    """True when less than NEARLY_FULL_BYTES are free on the filesystem of `folder`."""
    free = free_bytes(folder)
    return free is not None and free < NEARLY_FULL_BYTES


def failed_for_space(exc: BaseException, folder: str | os.PathLike) -> bool:
    """True when `exc`, raised by a writer into `folder`, means the disk is full (judge before removing anything)."""
    if isinstance(exc, SamplanError):
        return False
    # blosc2 ("Error while creating the NDArray") and torch ("unexpected pos") raise a RuntimeError without errno
    return is_disk_full(exc) or (isinstance(exc, (OSError, RuntimeError)) and nearly_full(folder))


def discard_partial(partial: Path, target: Path, why: str = "") -> DiskFullError:
    """Delete the unfinished `partial` file of `target` and return the DiskFullError that reports it."""
    reached = partial.stat().st_size if partial.exists() else 0
    partial.unlink(missing_ok=True)  # first, so that the free space reported is what the user has
    why = f"; {why}" if why else ""
    return DiskFullError(str(target.parent), free_bytes(target.parent),
                         detail=f" while writing {target.name} (its unfinished {reached} bytes were removed{why})")


@contextmanager
def disk_full_guard(folder: str | os.PathLike, detail: str = "") -> Iterator[None]:
    """Re-raise an out-of-space OSError raised in the block as DiskFullError naming `folder` and its free space."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(str(folder), free_bytes(folder), detail=detail) from e


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Preflight: DiskFullError naming `folder`, `needed` and the free bytes when `what` clearly cannot fit."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise DiskFullError(str(folder), free, needed=needed - free, detail=f" for {what}; nothing was written")
