"""Post-processing of label maps: keep only the largest connected component of chosen labels (nnU-Net's rule).

Which labels are post-processed is decided on cross-validation results (samplan.pipeline.find_best): only where it
does not lower the label's mean Dice. Components are 26-connected in 3D (8 in 2D): samplan.engine.components.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from samplan.dataset.image_io import read_seg, write_seg
from samplan.engine.components import keep_largest_component as largest_component


def keep_largest_component(seg: np.ndarray, label: int) -> np.ndarray:
    """`seg` with every component of `label` but the largest set to background (0)."""
    mask = seg == label
    removed = mask & ~largest_component(mask)
    if not removed.any():
        return seg
    out = seg.copy()
    out[removed] = 0
    return out


def postprocess(seg: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """`keep_largest_component` for each of `labels`, in order."""
    for label in labels:
        seg = keep_largest_component(seg, int(label))
    return seg


def postprocess_folder(input_dir: Path, output_dir: Path, labels: Sequence[int], file_ending: str) -> list[Path]:
    """Post-process every `{case}{file_ending}` of `input_dir` into `output_dir` (same names and geometry)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(Path(input_dir).glob(f"*{file_ending}")):
        seg, props = read_seg(f)
        target = output_dir / f.name
        write_seg(postprocess(seg[0], labels), target, props)
        out.append(target)
    return out
