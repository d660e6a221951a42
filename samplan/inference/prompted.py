"""Prompts for prompted methods at prediction time, in the preprocessed slice grid of each case.

Sources: a user's prompts file (samplan.prompts.prompts_file; raw voxel or world coordinates, mapped here
through the preprocessing's transpose, crop and resampling), or a reference label map per case
(`{reference_dir}/{case}{file_ending}`, read and preprocessed exactly like the image) turned into the
paper's oracle point prompts ("oracle"), boxes ("box") or one key-slice box that the method propagates
("propagate"). Reference-derived prompts are an oracle: `PromptSource.record` writes prompts_used.json
(`"oracle": true`, the strategy) into the prediction folder so that results stay labelled.

Coordinates: a slice of the preprocessed case `(C, Z, Y, X)` is `(Y, X)`; points are `(x, y)` = (column, row)
pixels, boxes `[x0, y0, x1, y1]` inclusive, as in samplan.prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samplan.errors import SamplanError
from samplan.evaluation.evaluate import PROMPTS_RECORD
from samplan.prompts.boxes import box_from_mask, key_slice
from samplan.prompts.points import oracle_prompts
from samplan.utils import save_json

REFERENCE_STRATEGIES = ("oracle", "box", "propagate")


@dataclass(frozen=True)
class GridPrompt:
    """One SAM call on slice `slice` of the preprocessed grid, painted with label value `label`.

    points `(N, 2)` float64 (x, y); point_labels `(N,)` int64 1/0; box `(4,)` float64 or None.
    """

    slice: int
    label: int
    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None


@dataclass
class CasePrompts:
    """The prompts of one case: `propagate` means each prompt is a key slice whose box the method propagates."""

    case: str
    prompts: list[GridPrompt]
    strategy: str
    oracle: bool
    propagate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _no_points() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 2), np.float64), np.zeros((0,), np.int64)


def reference_prompts(case: str, seg: np.ndarray, strategy: str, settings: Mapping[str, Any]) -> CasePrompts:
    """Prompts from a reference label map `seg` `(Z, Y, X)` (or `(1, Z, Y, X)`; -1 = outside the crop, i.e. background).

    settings: the plan's "prompt" entry: label_groups (lists of label values per SAM call), points, negative_point, box.
    """
    if strategy not in REFERENCE_STRATEGIES:
        raise SamplanError(f"unknown prompt strategy {strategy!r}; use one of {', '.join(REFERENCE_STRATEGIES)}.")
    seg = np.asarray(seg)
    seg = seg[0] if seg.ndim == 4 else seg
    groups = [list(map(int, g)) for g in settings.get("label_groups") or [[v] for v in np.unique(seg) if v > 0]]
    out: list[GridPrompt] = []
    for group in groups:
        paint = group[0]
        if strategy == "propagate":
            boxes = [box_from_mask(np.isin(seg[z], group)) for z in range(seg.shape[0])]
            key = key_slice(boxes)
            if key is not None:
                out.append(GridPrompt(key, paint, *_no_points(), boxes[key]))
            continue
        for z in range(seg.shape[0]):
            sl = seg[z]
            if not np.isin(sl, group).any():
                continue
            if strategy == "box":
                out.append(GridPrompt(z, paint, *_no_points(), box_from_mask(np.isin(sl, group))))
                continue
            p = oracle_prompts(sl, group, with_box=bool(settings.get("box", False)))
            pts, lab = p.points, p.point_labels
            if not settings.get("negative_point", True):
                pts, lab = pts[lab == 1], lab[lab == 1]
            if not settings.get("points", True):
                pts, lab = _no_points()
            if len(pts) or p.box is not None:
                out.append(GridPrompt(z, paint, pts, lab, p.box))
    return CasePrompts(case, out, strategy, oracle=True, propagate=strategy == "propagate")


def raw_to_grid(points_zyx: np.ndarray, properties: Mapping[str, Any], plans: Mapping[str, Any], grid_shape: Sequence[int]) -> np.ndarray:
    """Continuous raw array indices `(N, 3)` (axis order of the reader, pixel centres at integers) -> indices in the
    preprocessed grid `(N, 3)` `(z, y, x)`: transpose, minus the crop box start, then the resampling's
    pixel-centre mapping `(i + 0.5) * new / old - 0.5` per axis."""
    p = np.atleast_2d(np.asarray(points_zyx, np.float64))
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    t = p[:, forward]
    start = np.array([int(b[0]) for b in properties["bbox_used_for_cropping"]], np.float64)
    old = np.array(properties["shape_after_cropping_and_before_resampling"], np.float64)
    new = np.array([int(s) for s in grid_shape][-3:], np.float64)
    return (t - start + 0.5) * (new / old) - 0.5


def file_prompts(case: str, slice_prompts: Sequence[Any], properties: Mapping[str, Any], plans: Mapping[str, Any],
                 grid_shape: Sequence[int]) -> CasePrompts:
    """A prompts file's `SlicePrompt`s (raw voxel grid of the case) -> `GridPrompt`s on the preprocessed grid `(Z, Y, X)`.

    The raw slice axis (0) must stay the slice axis after the plan's transpose (a raw slice would otherwise
    cut across many network slices); boxes are the min/max of their two mapped corners, clipped to the slice.
    """
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    n_z, h, w = [int(s) for s in grid_shape][-3:]
    if forward[0] != 0 and int(properties["shape_before_cropping"][forward.index(0)]) > 1:
        raise SamplanError(f"case {case}: the plan transposes the slice axis (transpose_forward {forward}); prompts-file "
                           "slices cannot be mapped to the network's slices. Use --prompt-strategy with --reference-dir.")
    out = []
    for sp in slice_prompts:
        pts = np.asarray(sp.points, np.float64).reshape(-1, 2)
        xy = [pts] if sp.box is None else [pts, np.asarray(sp.box, np.float64).reshape(2, 2)]
        xy = np.vstack(xy)
        zyx = np.stack([np.full(len(xy), float(sp.slice)), xy[:, 1], xy[:, 0]], axis=1)
        g = raw_to_grid(zyx, properties, plans, grid_shape)
        z = int(np.clip(np.floor(g[0, 0] + 0.5), 0, n_z - 1)) if len(g) else 0
        gx, gy = np.clip(g[:, 2], 0, w - 1), np.clip(g[:, 1], 0, h - 1)
        n = len(pts)
        box = None
        if sp.box is not None:
            box = np.array([gx[n:].min(), gy[n:].min(), gx[n:].max(), gy[n:].max()])
        out.append(GridPrompt(z, int(sp.label), np.stack([gx[:n], gy[:n]], axis=1), np.asarray(sp.point_labels, np.int64), box))
    return CasePrompts(case, out, "file", oracle=False)


class PromptSource:
    """Where a prediction run's prompts come from: a prompts file, or reference label maps with a strategy.

    `reference_file(case)` is the label map the predictor preprocesses with the image (None for a file
    source); `for_case(case, seg, properties, data_shape, plans, method_name)` gives the method's keyword
    arguments (`prompts`, `embedding_cache`).
    """

    def __init__(self, *, prompts_file: str | Path | None = None, strategy: str | None = None,
                 reference_dir: str | Path | None = None, file_ending: str = ".nii.gz", embedding_cache: Any = None):
        if (prompts_file is None) == (reference_dir is None):
            raise SamplanError("give either a prompts file (--prompts) or reference label maps (--reference-dir with "
                               "--prompt-strategy oracle|box|propagate), not both or neither.")
        self.prompts_file = None if prompts_file is None else Path(prompts_file)
        self.reference_dir = None if reference_dir is None else Path(reference_dir)
        self.strategy = "file" if prompts_file is not None else (strategy or "oracle")
        if self.reference_dir is not None and self.strategy not in REFERENCE_STRATEGIES:
            raise SamplanError(f"--prompt-strategy {self.strategy!r} needs one of {', '.join(REFERENCE_STRATEGIES)} with --reference-dir.")
        if self.prompts_file is not None and not self.prompts_file.is_file():
            raise SamplanError(f"prompts file {self.prompts_file} does not exist.")
        if self.reference_dir is not None and not self.reference_dir.is_dir():
            raise SamplanError(f"reference folder {self.reference_dir} does not exist.")
        self.file_ending = file_ending
        self.embedding_cache = embedding_cache
        self.cases: list[str] = []
        self._entries: dict[str, list[dict]] | None = None

    @property
    def oracle(self) -> bool:
        """True when the prompts derive from reference masks."""
        return self.reference_dir is not None

    def reference_file(self, case: str) -> Path | None:
        """The reference label map of `case` (SamplanError when missing), or None for a prompts file."""
        if self.reference_dir is None:
            return None
        f = self.reference_dir / f"{case}{self.file_ending}"
        if not f.is_file():
            raise SamplanError(f"no reference label map {f} for case {case}; --reference-dir needs {{case}}{self.file_ending} per case.")
        return f

    def check_cases(self, case_ids: Sequence[str]) -> None:
        """Before any output: a prompts file must parse and name only cases of this run (every problem at once)."""
        if self.prompts_file is None:
            return
        from samplan.prompts.prompts_file import PromptsFileError

        known = set(case_ids)
        unknown = [c for c in self._file_entries() if c not in known]
        if unknown:
            shown = ", ".join(sorted(known)[:5]) + (", ..." if len(known) > 5 else "")
            raise PromptsFileError(self.prompts_file, [
                f"{self.prompts_file}: cases[{c!r}]: no such case among the input images (known: {shown}); fix the "
                "identifier or add the image." for c in unknown])

    def _file_entries(self) -> dict[str, list[dict]]:
        """The prompts file's schema-checked entries per case, read once per run."""
        if self._entries is None:
            from samplan.prompts.prompts_file import read_prompts_file

            self._entries = read_prompts_file(self.prompts_file)
        return self._entries

    def _file_prompts_raw(self, case: str, properties: Mapping[str, Any], plans: Mapping[str, Any]) -> list[Any]:
        """The case's validated prompts-file entries on its raw grid (shape from the recorded pre-crop shape)."""
        from samplan.prompts.prompts_file import ImageGrid, PromptsFileError, case_prompts

        forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
        transposed = [int(s) for s in properties["shape_before_cropping"]]
        raw_shape = [transposed[forward.index(j)] for j in range(3)]
        entries = self._file_entries().get(case, [])
        prompts, problems = case_prompts(entries, ImageGrid.from_properties(raw_shape, properties), f"cases[{case!r}]")
        if problems:
            raise PromptsFileError(self.prompts_file, [f"{self.prompts_file}: {p}" for p in problems])
        return prompts

    def for_case(self, case: str, seg: np.ndarray | None, properties: Mapping[str, Any],
                 data_shape: Sequence[int], plans: Mapping[str, Any], method_name: str) -> dict[str, Any]:
        """Keyword arguments for the method's predict_logits for one preprocessed case."""
        self.cases.append(case)
        settings = (plans.get("methods", {}).get(method_name, {}) or {}).get("prompt", {})
        if self.reference_dir is not None:
            if seg is None:
                raise SamplanError(f"case {case}: the reference label map was not preprocessed.")
            prompts = reference_prompts(case, np.where(np.asarray(seg) < 0, 0, seg), self.strategy, settings)
        else:
            if case not in self._file_entries():
                prompts = CasePrompts(case, [], "file", oracle=False)
            else:
                prompts = file_prompts(case, self._file_prompts_raw(case, properties, plans), properties, plans, data_shape)
        return {"prompts": prompts, "embedding_cache": self.embedding_cache}

    def record(self, output_dir: str | Path) -> Path:
        """Write prompts_used.json (oracle flag, strategy, source, cases) into the prediction folder."""
        path = Path(output_dir) / PROMPTS_RECORD
        save_json({"oracle": self.oracle, "strategy": self.strategy,
                   "source": str(self.reference_dir if self.oracle else self.prompts_file),
                   "note": "prompts derived from the reference masks: an oracle protocol, not a fully automatic result"
                   if self.oracle else "prompts from a user's prompts file",
                   "cases": sorted(set(self.cases))}, path)
        return path
