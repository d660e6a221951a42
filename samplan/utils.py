"""Small shared helpers: atomic writes and JSON with numpy types."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np


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
    target.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix so that writers which infer the format from it (SimpleITK, blosc2) still work
    suffix = "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would have
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_json(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> None:
    """Write `obj` as JSON atomically (numpy types converted); `indent=None` writes compact JSON."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            separators = (",", ":") if indent is None else None
            json.dump(obj, f, indent=indent, separators=separators, default=_json_default)
            f.write("\n")


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path) as f:
        return json.load(f)
