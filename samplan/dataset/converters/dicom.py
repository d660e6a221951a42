"""DICOM series -> `{case}_0000.nii.gz` images, one case per series, each in its series' own geometry.

SimpleITK's ImageSeriesReader (GDCM) does the DICOM work: `GetGDCMSeriesIDs` lists the series of one folder,
`GetGDCMSeriesFileNames` orders a series' files by slice position along the slice normal (not by file name), and
the reader takes spacing (the slice spacing from the positions), origin and direction from the tags. Before a series
is written, the gaps between its slices are checked: a missing slice, uneven spacing or two slices at one position
(several time points or echoes in one series) would otherwise be stretched silently onto one average spacing.

Case names: the name of the series' folder (the input folder's own name for files directly in it); several series
in one folder get `_1`, `_2`, ... in the order of their SeriesNumber (then Series Instance UID); folders of the same
name in different places are told apart by their path below the input folder (`patientA_T1`, `patientB_T1`).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from samplan.dataset.converters.common import check_target, run_per_case, staged_folder
from samplan.dataset.dataset_json import case_id_problem
from samplan.dataset.integrity import too_large
from samplan.errors import DatasetError, InputError

ENDING = ".nii.gz"
# relative deviation of a slice gap from the median gap that is still one regular grid (rounding in the tags)
GAP_TOLERANCE = 0.01


@dataclass(frozen=True)
class Series:
    """One DICOM series: its folder, Series Instance UID and files in slice order (GDCM's)."""

    folder: Path
    uid: str
    files: tuple[str, ...]
    number: int


def _series_number(file: str) -> int:
    """SeriesNumber (0020,0011) of a file, or a large number when it is absent or not a number (sorted last)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
        return int(reader.GetMetaData("0020|0011").strip()) if reader.HasMetaDataKey("0020|0011") else 1 << 30
    except (RuntimeError, ValueError):
        return 1 << 30


def find_series(root: Path) -> list[Series]:
    """Every DICOM series in `root` and the folders below it (hidden folders skipped), in folder and series order."""
    found = []
    # ITK warns "No Series were found" for every folder without DICOM files: noise while searching a tree
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        for folder, dirs, _files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder):
                files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
                if files:
                    found.append(Series(Path(folder), uid, files, _series_number(files[0])))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return sorted(found, key=lambda s: (str(s.folder.relative_to(root)), s.number, s.uid))


def case_names(series: list[Series], root: Path) -> list[str]:
    """One case id per series (see the module docstring); InputError when a name cannot be a case id."""
    def base(folder: Path) -> str:
        return folder.name if folder != root else root.name

    folders = sorted({s.folder for s in series})
    leaves = [base(f) for f in folders]
    name_of = {f: (base(f) if leaves.count(base(f)) == 1 else "_".join(f.relative_to(root).parts) or root.name)
               for f in folders}
    in_folder = Counter(s.folder for s in series)
    seen: Counter[Path] = Counter()
    names = []
    for s in series:
        seen[s.folder] += 1
        names.append(name_of[s.folder] if in_folder[s.folder] == 1 else f"{name_of[s.folder]}_{seen[s.folder]}")
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise InputError(f"several series under {root} would be named {', '.join(clash)}; rename one of their folders.")
    for s, n in zip(series, names):
        if problem := case_id_problem(n, f"{s.folder}: case name"):
            raise InputError(problem)
    return names


def check_slice_gaps(image: sitk.Image, positions: list[np.ndarray], folder: Path) -> None:
    """DatasetError when the slices of a series are not evenly spaced along its normal (missing or duplicate slices)."""
    if len(positions) < 2 or image.GetDimension() != 3:
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    steps = np.diff(np.array(positions), axis=0)
    gaps = steps @ normal
    median = float(np.median(gaps))
    sideways = float(np.max(np.linalg.norm(steps - np.outer(gaps, normal), axis=1)))
    if sideways > GAP_TOLERANCE * max(abs(median), 1e-3):
        # ITK stacks the slices as if each lay straight above the last: a tilted gantry's volume would come out sheared
        raise DatasetError(f"{folder}: consecutive slices are shifted sideways by up to {sideways:.4g} mm, not only along the "
                           "slice normal (a tilted CT gantry, or slices of several stacks). Resample the series onto a "
                           "straight grid (gantry-tilt correction) or split the stacks, then convert again.")
    if abs(median) < 1e-6 or np.any(np.abs(gaps) < 1e-6):
        raise DatasetError(f"{folder}: several slices of one series lie at the same position (several time points, echoes "
                           "or a duplicated file); split the series into one folder per volume, or remove the duplicates.")
    worst = float(np.max(np.abs(gaps - median)))
    if worst > GAP_TOLERANCE * abs(median):
        raise DatasetError(f"{folder}: the slice gaps are uneven (from {np.min(np.abs(gaps)):.4g} to {np.max(np.abs(gaps)):.4g} "
                           f"mm, median {abs(median):.4g} mm): slices are missing or the spacing changes inside the series. "
                           "Re-export the complete series; a volume of one average spacing would be distorted.")


def _positions(reader: sitk.ImageSeriesReader, n: int, folder: Path) -> list[np.ndarray]:
    """ImagePositionPatient (0020,0032) of each slice, in the reader's order."""
    out = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            raise DatasetError(f"{folder}: a file of the series has no ImagePositionPatient (0020,0032), so its slice order "
                               "and spacing are unknown. Export the series with its geometry tags.")
        out.append(np.array([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]))
    return out


def convert_series(folder: str, files: list[str], out_file: str) -> dict[str, Any]:
    """Worker: read one series (slices in GDCM's position order), check its slice gaps, write it; returns a summary."""
    head = sitk.ImageFileReader()
    head.SetFileName(files[0])
    try:
        head.ReadImageInformation()
    except RuntimeError as e:
        raise DatasetError(f"{files[0]}: cannot be read as DICOM ({str(e).strip().splitlines()[-1]}).") from e
    one = sitk.Image([1] * head.GetDimension(), head.GetPixelID(), head.GetNumberOfComponents())
    if msg := too_large(int(np.prod(head.GetSize(), dtype=np.int64)) * len(files) * sitk.GetArrayViewFromImage(one).nbytes,
                        f"the series of {len(files)} file(s)"):
        raise DatasetError(f"{folder}: {msg}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise DatasetError(f"{folder}: the DICOM series cannot be read ({str(e).strip().splitlines()[-1]}).") from e
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise DatasetError(f"{folder}: a colour (RGB) DICOM series; samplan's images hold one channel per file. Convert "
                           "it to grey, or split its colour channels into separate _0000/_0001/_0002 files yourself.")
    if len(files) > 1:
        check_slice_gaps(image, _positions(reader, len(files), Path(folder)), Path(folder))
    sitk.WriteImage(image, out_file, useCompression=True)
    return {"size": list(image.GetSize()), "spacing": [round(s, 4) for s in image.GetSpacing()], "slices": len(files)}


def convert_dicom(source: str | Path, output: str | Path, num_processes: int | None = None,
                  overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Convert every DICOM series under `source` into `output/{case}_0000.nii.gz`; returns {case: summary + source}."""
    source = Path(source).expanduser().absolute()
    if not source.is_dir():
        raise InputError(f"{source} is not a folder; give the folder that holds the DICOM files (searched recursively).")
    check_target(output, overwrite, [source])
    series = find_series(source)
    if not series:
        raise InputError(f"no DICOM series found in {source} or its subfolders (GDCM recognised no DICOM file). Check "
                         "the folder; files without the DICOM preamble may need re-exporting.")
    names = case_names(series, source)
    with staged_folder(output, overwrite, sources=[source]) as out:
        items = [(name, (str(s.folder), list(s.files), str(out / f"{name}_0000{ENDING}"))) for name, s in zip(names, series)]
        results = run_per_case(convert_series, items, num_processes, f"converting DICOM series in {source.name}")
    return {name: {**results[name], "source": str(s.folder.relative_to(source)), "series_uid": s.uid}
            for name, s in zip(names, series)}
