"""A user's prompts file (JSON): points and boxes per case, slice and label, in voxel or world coordinates.

Schema (version 1)::

    {
      "version": 1,
      "coordinates": "voxel",
      "cases": {
        "lung_001": [
          {"label": 1, "slice": 40, "points": [[120, 200], [300, 210]], "point_labels": [1, 0]},
          {"label": 1, "slice": 40, "box": [90, 150, 180, 260]},
          {"label": 2, "coordinates": "world", "points": [[-61.2, 14.0, -120.5]]},
          {"label": 2, "coordinates": "world", "box": [[-80.0, -5.0, -120.5], [-40.0, 30.0, -120.5]]}
        ],
        "xray_007": [{"label": 1, "points": [[64, 80]]}]
      }
    }

- `cases` maps case identifiers (as in the dataset) to a list of entries. One entry is one prompt on one
  slice for one label value: one SAM call. Entries with the same slice and label are separate calls
  (e.g. one box per lung); the predictor merges their masks.
- `label` (required): the positive label value the prompt asks for.
- `points` (optional): list of points; `point_labels` (optional, default all 1): 1 positive, 0 negative,
  one per point. `box` (optional): at least one of `points` and `box` is required.
- `coordinates`: "voxel" or "world", per entry, defaulting to the file's top-level value (itself "voxel").
- Voxel: a point is `[x, y]` = (column, row) in pixels of the image as stored on disk (before any
  preprocessing), a box is `[x0, y0, x1, y1]` with inclusive corners, x0 <= x1, y0 <= y1; `slice` is the
  index along axis 0 of the `(Z, Y, X)` array, required for 3D images, omitted (or 0) for 2D ones.
- World: physical mm in SimpleITK's (LPS) convention, `[x, y, z]` for 3D images and `[x, y]` for 2D ones;
  a box is its two opposite corners `[[x, y, z], [x, y, z]]`. Points map to continuous voxel indices as
  SimpleITK's `TransformPhysicalPointToContinuousIndex` does (oblique directions included) and are
  projected onto the nearest slice; every point and corner of an entry must land on the same slice. The
  voxel box is the min/max of the two mapped corners. `slice` must not be given.
- A coordinate is inside the image when it rounds to a pixel of it (-0.5 <= c <= size - 0.5); coordinates
  in that half-pixel margin are clipped to the outermost pixel centre. Anything else is an error.

Every problem of a file is reported at once, each naming the file, the case and the entry as
`cases["lung_001"][2]` (entries are counted from 0, as JSON arrays are) and how to fix it.

The file may come from anyone, so its reading is bounded: at most `MAX_FILE_BYTES` bytes, `MAX_POINTS` points
per entry (one SAM call embeds every point), numbers within float range, labels within int32, and the
error message lists the first `MAX_REPORTED` problems.
"""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samplan.errors import DatasetError, SamplanError
from samplan.utils import load_json

VERSION = 1
COORDINATES = ("voxel", "world")
_TOP_KEYS = {"version", "coordinates", "cases"}
_ENTRY_KEYS = {"label", "slice", "points", "point_labels", "box", "coordinates"}
# a hand-made or generated prompts file is kilobytes; 16 MiB is about a million points
MAX_FILE_BYTES = 16 * 2**20
# the prompt encoder embeds every point of a call; a few clicks are typical, a thousand is already unusual
MAX_POINTS = 1024
MAX_LABEL = 2**31 - 1  # label maps are at most int32
MAX_REPORTED = 50  # problems listed in the message (all are in `.problems`)
_REPR = reprlib.Repr()
_REPR.maxlist, _REPR.maxlevel, _REPR.maxlong, _REPR.maxstring, _REPR.maxother = 6, 3, 40, 60, 60


class PromptsFileError(DatasetError):
    """A prompts file with one or more problems; `problems` lists each with its case, entry and fix."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems[:MAX_REPORTED])
        more = len(self.problems) - MAX_REPORTED
        lines += f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.problems)} problem(s) in prompts file {path}:\n{lines}")


@dataclass(frozen=True)
class ImageGrid:
    """The voxel grid of one case: array shape `(Z, Y, X)` and SimpleITK geometry in (x, y[, z]) order.

    spacing `(d,)` mm, origin `(d,)` mm, direction `(d, d)` (columns are the axis directions), d = 2 or 3.
    """

    shape: tuple[int, int, int]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray

    @classmethod
    def from_properties(cls, shape: Sequence[int], properties: Mapping[str, Any]) -> "ImageGrid":
        """Grid from an array shape `(Z, Y, X)` or `(C, Z, Y, X)` and `image_io` properties.

        Natural images (PNG, ...) have no physical geometry; like ITK's PNG reader, they get spacing 1,
        origin 0 and the identity direction, so their world coordinates equal their pixel coordinates.
        """
        shape = tuple(int(s) for s in shape)[-3:]
        geom = properties["geometry"]
        if geom["kind"] != "sitk":
            return cls(shape, np.ones(2), np.zeros(2), np.eye(2))
        d = int(geom["ndim"])
        return cls(shape, np.asarray(geom["spacing"], float), np.asarray(geom["origin"], float),
                   np.asarray(geom["direction"], float).reshape(d, d))

    @property
    def ndim(self) -> int:
        """Number of physical dimensions (2 for 2D images, stored as `(1, Y, X)`)."""
        return len(self.spacing)


@dataclass(frozen=True)
class SlicePrompt:
    """One prompt (one SAM call) on slice `slice` (axis 0 of `(Z, Y, X)`; 0 for 2D) for label value `label`.

    points: `(N, 2)` float64 `(x, y)` = (column, row) pixels; point_labels: `(N,)` int64, 1/0;
    box: `(4,)` float64 `[x0, y0, x1, y1]` inclusive, or None; entry: the entry's index in the file.
    """

    slice: int
    label: int
    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None
    entry: int


def world_to_voxel(points: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                   direction: np.ndarray | Sequence[float]) -> np.ndarray:
    """Physical points `(N, d)` (SimpleITK/LPS mm, x, y[, z]) -> continuous indices `(N, d)` in (x, y[, z]) order.

    index = diag(1/spacing) @ inverse(direction) @ (point - origin), what SimpleITK's
    `TransformPhysicalPointToContinuousIndex` computes; `direction` is `(d, d)` or flat row-major `(d*d,)`.
    The result's last column is the slice index (axis 0 of the `(Z, Y, X)` array) for 3D images.
    """
    p = np.atleast_2d(np.asarray(points, np.float64))
    d = p.shape[1]
    m = np.asarray(direction, np.float64).reshape(d, d)
    # solve instead of inverting: the direction may be any non-singular (e.g. oblique) matrix
    return np.linalg.solve(m, (p - np.asarray(origin, np.float64)).T).T / np.asarray(spacing, np.float64)


def _short(v: Any) -> str:
    """repr of a value from the file, shortened: a wrong value may be a list of a million items."""
    return _REPR.repr(v)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # a JSON integer beyond float range (JSON sets no size limit)
        return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coords_ok(v: Any, sizes: tuple[int, ...]) -> bool:
    """True when `v` is a list of `n` numbers with n in `sizes`."""
    return isinstance(v, list) and len(v) in sizes and all(_is_number(x) for x in v)


def _check_entry(e: Any, default_coords: str, where: str) -> list[str]:
    """Schema problems of one entry (independent of the image)."""
    if not isinstance(e, dict):
        return [f"{where}: an entry must be an object like {{\"label\": 1, \"slice\": 0, \"points\": [[x, y]]}}, got {type(e).__name__}."]
    problems = []
    unknown = sorted(set(e) - _ENTRY_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_ENTRY_KEYS)} (check the spelling).")
    if "label" not in e:
        problems.append(f"{where}: 'label' is missing; add the label value this prompt is for, e.g. \"label\": 1.")
    elif not _is_int(e["label"]) or not 0 < e["label"] <= MAX_LABEL:
        problems.append(f"{where}: 'label' must be a positive integer label value (at most {MAX_LABEL}), got {_short(e['label'])}.")
    coords = e.get("coordinates", default_coords)
    if coords not in COORDINATES:
        problems.append(f"{where}: 'coordinates' must be \"voxel\" or \"world\", got {_short(coords)}.")
        return problems
    world = coords == "world"
    if "points" not in e and "box" not in e:
        problems.append(f"{where}: neither 'points' nor 'box' is given; add at least one.")
    if "slice" in e:
        if world:
            problems.append(f"{where}: 'slice' is given with world coordinates; remove it (the slice follows from z).")
        elif not _is_int(e["slice"]) or e["slice"] < 0:
            problems.append(f"{where}: 'slice' must be a non-negative integer (index along axis 0), got {_short(e['slice'])}.")
    pts = e.get("points")
    shape = "[x, y] or [x, y, z] (world)" if world else "[x, y] (voxel: column, row)"
    if isinstance(pts, list) and len(pts) > MAX_POINTS:
        problems.append(f"{where}: {len(pts)} points in one entry, more than the {MAX_POINTS} one SAM call takes; "
                        "split them over several entries (the masks of entries on one slice and label are merged).")
    elif pts is not None and (not isinstance(pts, list) or not pts
                              or not all(_coords_ok(p, (2, 3) if world else (2,)) for p in pts)):
        problems.append(f"{where}: 'points' must be a non-empty list of {shape} finite numbers, got {_short(pts)}.")
    elif pts is not None and world and len({len(p) for p in pts}) > 1:
        problems.append(f"{where}: 'points' mixes 2- and 3-number points; use one dimension per image.")
    if "point_labels" in e:
        lab = e["point_labels"]
        if pts is None:
            problems.append(f"{where}: 'point_labels' is given without 'points'; remove it or add the points.")
        elif not isinstance(lab, list) or not all(_is_int(v) and v in (0, 1) for v in lab):
            problems.append(f"{where}: 'point_labels' must be a list of 1 (positive) / 0 (negative), got {_short(lab)}.")
        elif isinstance(pts, list) and len(lab) != len(pts):
            problems.append(f"{where}: {len(lab)} point_labels for {len(pts)} points; give one label per point.")
    if "box" in e:
        box = e["box"]
        if world:
            if not (isinstance(box, list) and len(box) == 2 and all(_coords_ok(c, (2, 3)) for c in box)
                    and len(box[0]) == len(box[1])):
                problems.append(f"{where}: a world 'box' must be two opposite corners [[x, y, z], [x, y, z]] "
                                f"(or [[x, y], [x, y]] in 2D), got {_short(box)}.")
        elif not _coords_ok(box, (4,)):
            problems.append(f"{where}: a voxel 'box' must be [x0, y0, x1, y1] (4 finite numbers), got {_short(box)}.")
        elif box[0] > box[2] or box[1] > box[3]:
            problems.append(f"{where}: 'box' {box} has x0 > x1 or y0 > y1; write it as [x0, y0, x1, y1] with x0 <= x1, y0 <= y1.")
    return problems


def read_prompts_file(path: str | Path) -> dict[str, list[dict]]:
    """Read and validate a prompts file -> {case: [entry, ...]} with each entry's `coordinates` filled in.

    Checks the schema only (the image is not needed); every problem is reported at once in one
    `PromptsFileError` (a DatasetError).
    """
    path = Path(path)
    try:
        data = load_json(path, max_bytes=MAX_FILE_BYTES)
    except FileNotFoundError:
        raise PromptsFileError(path, [f"{path} does not exist; check the path."]) from None
    except OSError as err:
        raise PromptsFileError(path, [f"{path} cannot be read ({err.strerror}); give the path of a JSON file."]) from None
    except ValueError as err:  # bad syntax, not UTF-8, or an integer of more digits than Python converts
        raise PromptsFileError(path, [f"{path}: not valid JSON ({err}); fix the syntax."]) from None
    except SamplanError as err:  # larger than MAX_FILE_BYTES, or nested too deeply
        raise PromptsFileError(path, [str(err)]) from None
    if not isinstance(data, dict):
        raise PromptsFileError(path, [f"{path}: the top level must be an object with a 'cases' key."])
    problems = []
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        problems.append(f"{path}: unknown top-level key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}.")
    if data.get("version", VERSION) != VERSION:
        problems.append(f"{path}: 'version' is {_short(data['version'])}; this samplan reads version {VERSION}.")
    default = data.get("coordinates", "voxel")
    if default not in COORDINATES:
        problems.append(f"{path}: top-level 'coordinates' must be \"voxel\" or \"world\", got {_short(default)}.")
        default = "voxel"
    cases = data.get("cases")
    if not isinstance(cases, dict):
        problems.append(f"{path}: 'cases' must be an object mapping case identifiers to lists of entries.")
        raise PromptsFileError(path, problems)
    out: dict[str, list[dict]] = {}
    for case, entries in cases.items():
        if not isinstance(entries, list):
            problems.append(f"{path}: cases[{_short(case)}] must be a list of entries, got {type(entries).__name__}.")
            continue
        for i, e in enumerate(entries):
            problems += [f"{path}: {p}" for p in _check_entry(e, default, f"cases[{_short(case)}][{i}]")]
        out[case] = [dict(e, coordinates=e.get("coordinates", default)) if isinstance(e, dict) else e for e in entries]
    if problems:
        raise PromptsFileError(path, problems)
    return out


def _in_image(values: np.ndarray, size: int) -> bool:
    """True when every coordinate rounds to a pixel of an axis of `size` pixels."""
    return bool(np.all((values >= -0.5) & (values <= size - 0.5)))


def _entry_prompt(e: dict, i: int, grid: ImageGrid, where: str) -> tuple[SlicePrompt | None, list[str]]:
    """One validated entry -> its SlicePrompt on `grid`, or the problems (bounds, dimension, slice)."""
    n_z, h, w = grid.shape
    box = e.get("box")
    world = e["coordinates"] == "world"
    if "points" in e:
        pts = np.asarray(e["points"], np.float64)
    else:  # a box-only entry: no points, in the dimension of the box's coordinates
        pts = np.zeros((0, len(box[0]) if world else 2))
    if world:
        corners = np.asarray(box, np.float64) if box is not None else np.zeros((0, pts.shape[1]))
        dims = {pts.shape[1]} if "points" in e else set()
        dims |= {corners.shape[1]} if box is not None else set()
        if dims != {grid.ndim}:
            return None, [f"{where}: world coordinates need {grid.ndim} numbers per point for this {grid.ndim}D image, "
                          f"got {sorted(dims)}."]
        idx = world_to_voxel(np.vstack([pts, corners]), grid.spacing, grid.origin, grid.direction)
        if grid.ndim == 3:
            slices = np.floor(idx[:, 2] + 0.5).astype(int)  # projection onto the nearest slice
            if not _in_image(idx[:, 2], n_z):
                return None, [f"{where}: z index {np.round(idx[:, 2], 2).tolist()} is outside slices 0..{n_z - 1}; "
                              "check the point against the image's origin, spacing and direction."]
            if len(set(slices.tolist())) > 1:
                return None, [f"{where}: the points/corners land on slices {sorted(set(slices.tolist()))}; "
                              "one entry must lie on one slice: split it into one entry per slice."]
            z = int(slices[0])
        else:
            z = 0
        pts, corners = idx[:len(pts), :2], idx[len(pts):, :2]
        box = None if box is None else np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    else:
        z = e.get("slice")
        if z is None and n_z > 1:
            return None, [f"{where}: 'slice' is missing; this image has {n_z} slices, give the index along axis 0."]
        z = 0 if z is None else z
        if z >= n_z:
            return None, [f"{where}: slice {z} is outside the image (slices 0..{n_z - 1})."]
        box = None if box is None else np.asarray(box, np.float64)
    xs = np.concatenate([pts[:, 0], [] if box is None else box[[0, 2]]])
    ys = np.concatenate([pts[:, 1], [] if box is None else box[[1, 3]]])
    if not (_in_image(xs, w) and _in_image(ys, h)):
        return None, [f"{where}: x {np.round(xs, 2).tolist()} / y {np.round(ys, 2).tolist()} fall outside the image "
                      f"(x 0..{w - 1}, y 0..{h - 1}); points are [x = column, y = row]."]
    pts = np.stack([np.clip(pts[:, 0], 0, w - 1), np.clip(pts[:, 1], 0, h - 1)], axis=1) if len(pts) else pts.reshape(0, 2)
    if box is not None:
        box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
    labels = np.asarray(e.get("point_labels", [1] * len(pts)), np.int64)
    return SlicePrompt(int(z), int(e["label"]), pts.astype(np.float64), labels, box, i), []


def case_prompts(entries: list[dict], grid: ImageGrid, where: str = "") -> tuple[list[SlicePrompt], list[str]]:
    """Validated entries of one case -> (prompts sorted by slice, label, entry; problems found on `grid`)."""
    out, problems = [], []
    for i, e in enumerate(entries):
        prompt, errs = _entry_prompt(e, i, grid, f"{where}[{i}]")
        problems += errs
        if prompt is not None:
            out.append(prompt)
    return sorted(out, key=lambda p: (p.slice, p.label, p.entry)), problems


def load_prompts(path: str | Path, grids: Mapping[str, ImageGrid]) -> dict[str, list[SlicePrompt]]:
    """Read a prompts file and convert every case to per-slice prompts on its image grid `grids[case]`.

    Returns {case: [SlicePrompt, ...]} for the cases of the file; raises one `PromptsFileError` listing
    every schema, unknown-case and out-of-image problem.
    """
    cases = read_prompts_file(path)
    out, problems = {}, []
    for case, entries in cases.items():
        if case not in grids:
            known = ", ".join(sorted(grids)[:5]) + (", ..." if len(grids) > 5 else "")
            problems.append(f"{path}: cases[{_short(case)}]: no such case in the dataset (known: {known}); fix the identifier.")
            continue
        out[case], errs = case_prompts(entries, grids[case], f"cases[{_short(case)}]")
        problems += [f"{path}: {p}" for p in errs]
    if problems:
        raise PromptsFileError(path, problems)
    return out
