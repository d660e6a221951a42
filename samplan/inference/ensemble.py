"""Ensembles: the probabilities of several models' predictions of a case, averaged in the original geometry.

Each member folder holds `{case}.npz` (key "probabilities", float16 `(K, Z, Y, X)` in the image's grid) and
`{case}.json` (its properties), as samplan_predict --save-probabilities and samplan_train --npz write them. The mean
is turned into a label map (argmax over labels, or regions painted in order) and written with the image's geometry.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from samplan.dataset.image_io import write_seg
from samplan.dataset.labels import LabelManager
from samplan.errors import SamplanError
from samplan.utils import atomic_path, load_json, save_json


def load_probabilities(folder: Path, case: str) -> np.ndarray:
    """The float32 probabilities `(K, Z, Y, X)` of `case` in `folder` (SamplanError naming the file when missing)."""
    f = Path(folder) / f"{case}.npz"
    if not f.is_file():
        raise SamplanError(f"{f} is missing: ensembles need the members' probabilities (samplan_train --val --npz, or "
                           "samplan_predict --save-probabilities).")
    try:
        # allow_pickle=False: a member folder may come from someone else, and an unpickled object can run code
        with np.load(f, allow_pickle=False) as z:
            return z["probabilities"].astype(np.float32)
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise SamplanError(f"{f} is not a probabilities file samplan reads (an .npz holding the plain float array "
                           f"'probabilities'; object arrays and pickles are refused): {type(e).__name__}: {e}. Predict "
                           "the case again with --save-probabilities (or samplan_train --val --npz).") from None


def ensemble_case(members: Sequence[Path], case: str, output_file: Path, label_manager: LabelManager,
                  save_probabilities: bool = False) -> Path:
    """Average the members' probabilities of `case`, write the label map (and with `save_probabilities` the mean)."""
    total = None
    for folder in members:
        p = load_probabilities(folder, case)
        if total is not None and p.shape != total.shape:
            raise SamplanError(f"{folder}/{case}.npz has shape {p.shape}, the other members {total.shape}.")
        total = p if total is None else total + p
    mean = total / len(members)
    properties = load_json(Path(members[0]) / f"{case}.json")
    seg = label_manager.probabilities_to_segmentation(mean)
    output_file = Path(output_file)
    if save_probabilities:
        with atomic_path(output_file.with_name(f"{case}.npz")) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, probabilities=mean.astype(np.float16))
        save_json(properties, output_file.with_name(f"{case}.json"))
    write_seg(np.asarray(seg), output_file, properties)
    return output_file


def ensemble_folders(members: Sequence[Path], cases: Sequence[str], output_dir: Path, label_manager: LabelManager,
                     file_ending: str, save_probabilities: bool = False, progress: bool = False) -> list[Path]:
    """`ensemble_case` for every case into `output_dir/{case}{file_ending}`; cases already there are kept."""
    from tqdm import tqdm

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for case in tqdm(cases, desc="ensembling", unit="case", disable=not progress):
        target = output_dir / f"{case}{file_ending}"
        if not target.is_file():
            ensemble_case(members, case, target, label_manager, save_probabilities)
        out.append(target)
    return out
