"""Small shared helpers: atomic writes (and the clean-up of what killed writers left) and JSON with numpy types."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from samplan.disk_space import NEARLY_FULL_BYTES, discard_partial, disk_full_guard, failed_for_space, nearly_full
from samplan.errors import SamplanError


def _json_default(obj: Any) -> Any:
    """json.dump hook for the values json does not know: numpy scalars/arrays and paths.

    A hook instead of a pre-walk of the whole object: properties can hold tens of thousands of coordinates.
    """
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} cannot be written as JSON")


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    # keep the real suffix so that writers which infer the format from it (SimpleITK, blosc2) still work
    suffix = "".join(target.suffixes)
    with disk_full_guard(target.parent, detail=f" while creating {target.name}"):  # no inode or block left
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would have
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            # SimpleITK reports a short write on stderr only: nothing that ends in the last MiB of a disk is kept
            short = nearly_full(target.parent)
            if not short:
                os.replace(tmp_path, target)
        except Exception as e:
            if not failed_for_space(e, target.parent):
                raise
            raise discard_partial(tmp_path, target) from e
        if short:
            raise discard_partial(tmp_path, target, f"less than {NEARLY_FULL_BYTES // 2**20} MiB was left")
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> int:
    """Delete the temporary files that killed writers of `folder/name` left (call only where no other process
    can be writing it: under the run's lock, or for a case this run is about to write); returns how many."""
    stale = list(Path(folder).glob(f".{glob_escape(name)}.*.tmp*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def save_json(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> None:
    """Write `obj` as JSON atomically (numpy types converted); `indent=None` writes compact JSON."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            separators = (",", ":") if indent is None else None
            # dumps, not dump: json.dump always takes the pure-Python encoder, dumps the C one when indent is None
            # (a case's properties with class locations: 13 s of 52 in preprocessing 200 Hippocampus cases)
            f.write(json.dumps(obj, indent=indent, separators=separators, default=_json_default))
            f.write("\n")


# far above any JSON samplan writes (plans, properties with class locations: a few MiB), far below what a
# crafted file needs to exhaust memory: json holds about ten times the file size as Python objects
MAX_JSON_BYTES = 64 * 2**20


def load_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file of at most `max_bytes` bytes; SamplanError naming the file and the bound otherwise."""
    def too_large(size: str) -> SamplanError:
        mib = f" ({max_bytes / 2**20:g} MiB)" if max_bytes >= 2**20 else ""
        return SamplanError(f"{path} holds {size} bytes; samplan reads JSON files of at most {max_bytes} bytes{mib}. "
                            "Check that it is the right file (samplan's own JSON files are far smaller) or shrink it.")

    size = os.stat(path).st_size
    if size > max_bytes:
        raise too_large(str(size))
    with open(path, "rb") as f:
        # read one byte past the bound rather than trust the size: a FIFO or a device reports 0
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise too_large(f"more than {max_bytes}")
    try:
        return json.loads(raw)
    except RecursionError:
        raise SamplanError(f"{path} nests JSON arrays/objects too deeply to be read; it is not a samplan JSON file "
                           "(check the file).") from None
