"""Prostate158 (Adams et al., Comput Biol Med 2022; doi:10.5281/zenodo.6481141) -> an nnU-Net v2 raw dataset.

Published layout (the unzipped `prostate158_train/` and/or `prostate158_test/`; -i may also be a folder holding both):
  prostate158_train/train.csv, valid.csv     columns ID,t2,adc,dwi,t2_anatomy_reader1,t2_tumor_reader1,adc_tumor_reader1
  prostate158_train/train/{ID}/t2.nii.gz     (ID three digits, e.g. 020) + adc.nii.gz, dwi.nii.gz, the label files
  prostate158_test/test.csv, test/{ID}/...   the same, plus t2_anatomy_reader2 and adc_tumor_reader2 columns
The CSV paths are relative to the CSV's folder. Cases without a tumour leave the t2 tumour column empty and point the
adc one at an all-zero `empty.nii.gz`; both read as "no tumour" here.

Labels, as the dataset's authors define them (their MONAI bundle prostate_mri_anatomy): anatomy 1 = central gland
(transition zone with the central zone), 2 = peripheral zone; tumour files mark the PI-RADS >= 4 lesions with non-zero
values, all written as 1. Channels and labels per task follow the paper's baselines: anatomy = T2 with t2_anatomy_reader1,
tumour = T2, ADC, DWI with adc_tumor_reader1 (`channels`, `reader`, `tumor_label` choose others).

Geometry: the T2 grid is the output grid. ADC/DWI already on it are copied; otherwise they are resampled onto it with
linear interpolation (SimpleITK, through physical space, no registration; float32), and the dataset.json records which.
T2-drawn labels must lie on the T2 grid; ADC-drawn tumour labels on the T2 or the ADC grid (then nearest-neighbour onto
T2). train.csv + valid.csv become imagesTr/labelsTr, test.csv imagesTs/labelsTs; the official split is kept in
dataset.json ("official_split").
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from samplan.dataset.converters.common import (
    check_target, grid_difference, onto_grid, output_folder, read_volume, relabel, run_per_case, staged_folder,
    verify_converted, write_volume,
)
from samplan.dataset.dataset_json import case_id_problem
from samplan.errors import DatasetError, DatasetProblems, InputError
from samplan.utils import save_json

ENDING = ".nii.gz"
SPLITS = {"train.csv": "train", "valid.csv": "valid", "test.csv": "test"}
CHANNEL_NAMES = {"t2": "T2", "adc": "ADC", "dwi": "DWI"}
TASKS = {
    "anatomy": {"channels": ("t2",), "labels": {"background": 0, "transition zone": 1, "peripheral zone": 2},
                "id": 158, "name": "Prostate158Anatomy"},
    "tumor": {"channels": ("t2", "adc", "dwi"), "labels": {"background": 0, "tumor": 1}, "id": 159,
              "name": "Prostate158Tumor"},
}
ANATOMY_VALUES = {0: 0, 1: 1, 2: 2}
EXPECTED = ("the Prostate158 layout: a folder holding train.csv/valid.csv (prostate158_train) or test.csv "
            "(prostate158_test) with columns ID,t2,adc,dwi,t2_anatomy_reader1,..., and the case folders they name "
            "(train/020/t2.nii.gz, ...)")


def find_csvs(source: Path) -> list[Path]:
    """train.csv / valid.csv / test.csv in `source` or up to two folders below it (the test zip nests
    prostate158_test/prostate158_test/); InputError naming the layout if there is none."""
    found = [p for depth in ("", "*/", "*/*/") for name in SPLITS for p in sorted(source.glob(depth + name)) if p.is_file()]
    if found:
        return found
    raise InputError(f"{source} holds no train.csv, valid.csv or test.csv (looked two folders deep); expected {EXPECTED}. "
                     "Unzip prostate158_train.zip (and prostate158_test.zip) and point -i at the unzipped folder.")


def case_id(raw: str, where: str) -> str:
    """`prostate158_020` from the CSV ID "20" or "020"; DatasetError for an ID that cannot name a case."""
    raw = raw.strip()
    if raw.isdigit():
        return f"prostate158_{int(raw):03d}"
    problem = case_id_problem(raw, f"{where}: ID")
    if problem or not re.fullmatch(r"[A-Za-z0-9_-]+", raw):
        raise DatasetError(problem or f"{where}: ID {raw!r} holds characters other than letters, digits, _ and -; "
                                      "Prostate158 IDs are numbers. Fix the CSV.")
    return f"prostate158_{raw}"


def _inside(folder: Path, rel: str, where: str) -> Path:
    """`folder/rel` for a CSV path; DatasetError when it is absolute or climbs out of `folder` with "..".

    The check is on the text, not on resolved links: a case folder linked in from elsewhere is the user's choice.
    """
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise DatasetError(f"{where}: {rel!r} is an absolute path; Prostate158's CSV paths are relative to the CSV's folder.")
    if os.path.normpath(rel.replace("\\", "/")).split("/")[0] == "..":
        raise DatasetError(f"{where}: {rel!r} leads outside {folder}; Prostate158's CSV paths stay inside the CSV's folder.")
    return folder / rel


def read_cases(csv_path: Path, channels: Sequence[str], label_column: str, tumour: bool) -> dict[str, dict[str, Any]]:
    """{case: {"paths": {"t2"/"adc"/"dwi": file}, "label": file | None}} of one CSV; DatasetProblems listing every
    missing column, file or bad entry. `channels` are the image columns needed besides t2."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames or []
    image_columns = list(dict.fromkeys(["t2", *channels]))
    missing = [c for c in ["ID", *image_columns, label_column] if c not in columns]
    if missing:
        raise DatasetError(f"{csv_path}: column(s) {', '.join(missing)} missing (it has {', '.join(columns) or 'none'}); "
                           f"expected {EXPECTED}. Use the CSV of the published zip (only test.csv has *_reader2).")
    cases: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for i, row in enumerate(rows, start=2):
        where = f"{csv_path.name} line {i}"
        values = {c: (row.get(c) or "").strip() for c in ["ID", *image_columns, label_column]}
        empty = [c for c in image_columns + ([] if tumour else [label_column]) if not values[c]]
        if empty:
            problems.append(f"{where}: column(s) {', '.join(empty)} empty for ID {values['ID']!r}; every case has them in "
                            "the published CSV.")
            continue
        try:
            case = case_id(values["ID"], where)
            paths = {c: _inside(csv_path.parent, values[c], where) for c in image_columns}
            label = _inside(csv_path.parent, values[label_column], where) if values[label_column] else None
        except DatasetError as e:
            problems.append(str(e))
            continue
        problems += [f"{where}: {p} does not exist. Unzip the dataset completely." for p in [*paths.values(), label]
                     if p is not None and not p.is_file()]
        if case in cases:
            problems.append(f"{where}: ID {values['ID']} appears twice; each case is listed once.")
        cases[case] = {"paths": paths, "label": label}
    if problems:
        raise DatasetProblems(str(csv_path), problems)
    return cases


def _channel(path: Path, t2: sitk.Image, dst: Path) -> bool:
    """Write one ADC/DWI channel on the T2 grid (copied when it lies on it already, else linear resampling); True if
    resampled."""
    image = read_volume(path)
    if grid_difference(image, t2) is None:
        write_volume(image, dst, path)
        return False
    sitk.WriteImage(onto_grid(image, t2, sitk.sitkLinear), str(dst), useCompression=True)
    return True


def _tumour_map(image: sitk.Image) -> dict[int, int]:
    """Every non-negative integer value of a tumour mask: 0 stays 0, any other value is the lesion (1)."""
    values = np.unique(sitk.GetArrayViewFromImage(image))
    return {int(v): int(v > 0) for v in values if v >= 0 and v == np.round(v)}


def _label(path: Path | None, t2: sitk.Image, t2_path: Path, adc_path: Path | None, anatomy: bool,
           dst: Path) -> dict[str, bool]:
    """Write the case's label on the T2 grid; DatasetError naming the label and the image when their grids differ.
    `adc_path` is set for an ADC-drawn label, which may also lie on the ADC grid."""
    if path is None:  # the t2 tumour column is empty for cases without a tumour
        label = sitk.Image(t2.GetSize(), sitk.sitkUInt8)
    else:
        image = read_volume(path)
        expected = ("anatomy labels hold 0, 1 (central gland) and 2 (peripheral zone)" if anatomy
                    else "tumour labels hold 0 and non-negative integers marking the lesion")
        label = relabel(image, ANATOMY_VALUES if anatomy else _tumour_map(image), path, expected)
    resampled = False
    if path is not None and (diff := grid_difference(label, t2)) is not None:
        adc = read_volume(adc_path) if adc_path is not None else None
        if adc is None or grid_difference(label, adc) is not None:
            drawn_on = f"the T2 image {t2_path}" + (f" or the ADC image {adc_path}" if adc_path else "")
            raise DatasetError(f"{path} and {t2_path} are on different voxel grids ({diff}); this label must lie on the "
                               f"grid of {drawn_on}. Use the files of one case, unchanged from the zip.")
        label, resampled = onto_grid(label, t2, sitk.sitkNearestNeighbor, sitk.sitkUInt8), True
    label.CopyInformation(t2)
    sitk.WriteImage(label, str(dst), useCompression=True)
    return {"tumour": bool(sitk.GetArrayViewFromImage(label).any()), "label_resampled": resampled}


def convert_case(paths: dict[str, str], channels: list[str], label: str | None, adc_drawn: bool, anatomy: bool,
                 images_out: str, labels_out: str, case: str) -> dict[str, Any]:
    """Worker: one case's channel files and label on its T2 grid; returns the resampled channels and whether the label
    has tumour."""
    t2_path = Path(paths["t2"])
    t2 = read_volume(t2_path)
    resampled = []
    for i, name in enumerate(channels):
        dst = Path(images_out) / f"{case}_{i:04d}{ENDING}"
        if name == "t2":
            write_volume(t2, dst, t2_path)
        elif _channel(Path(paths[name]), t2, dst):
            resampled.append(name)
    adc = Path(paths["adc"]) if adc_drawn and "adc" in paths else None
    info = _label(Path(label) if label else None, t2, t2_path, adc, anatomy, Path(labels_out) / f"{case}{ENDING}")
    return {"resampled": resampled, **info}


def convert_prostate158(source: str | Path, task: str = "anatomy", channels: Sequence[str] | None = None, reader: int = 1,
                        tumor_label: str = "adc", dataset_id: int | None = None, output: str | None = None,
                        num_processes: int | None = None, overwrite: bool = False) -> Path:
    """Convert the unzipped Prostate158 folder(s) into an nnU-Net v2 raw dataset, verify it and return its folder."""
    source = Path(source).expanduser().absolute()
    if task not in TASKS:
        raise InputError(f"--task {task!r}: choose one of {', '.join(TASKS)}.")
    if tumor_label not in ("adc", "t2") or reader not in (1, 2):
        raise InputError(f"--tumor-label {tumor_label!r} --reader {reader}: choose adc or t2, and reader 1 or 2.")
    if not source.is_dir():
        raise InputError(f"{source} is not a folder; give the unzipped prostate158_train (or _test) folder.")
    channels = list(channels or TASKS[task]["channels"])
    if not channels or any(c not in CHANNEL_NAMES for c in channels) or len(set(channels)) != len(channels):
        raise InputError(f"--channels {' '.join(channels)}: choose distinct channels from {', '.join(CHANNEL_NAMES)}.")
    anatomy = task == "anatomy"
    label_column = f"t2_anatomy_reader{reader}" if anatomy else f"{tumor_label}_tumor_reader{reader}"
    adc_drawn = label_column.startswith("adc")
    target = output_folder(output, dataset_id, TASKS[task]["id"], TASKS[task]["name"])
    cases: dict[str, dict[str, Any]] = {}
    for csv_path in find_csvs(source):
        for case, entry in read_cases(csv_path, channels + (["adc"] if adc_drawn else []), label_column,
                                      not anatomy).items():
            if case in cases:
                raise DatasetError(f"{case} is listed in {csv_path} and in another CSV; the published splits are disjoint.")
            cases[case] = {**entry, "split": SPLITS[csv_path.name]}
    training = sorted(c for c, e in cases.items() if e["split"] != "test")
    if not training:
        raise DatasetError(f"{source}: only test.csv cases were found; nnU-Net needs training cases. Add prostate158_train.")
    check_target(target, overwrite, [source])
    dataset_json: dict[str, Any] = {
        "channel_names": {str(i): CHANNEL_NAMES[c] for i, c in enumerate(channels)},
        "labels": dict(TASKS[task]["labels"]),
        "numTraining": len(training),
        "file_ending": ENDING,
        "name": f"Prostate158 ({task})",
        "description": (f"Prostate158 biparametric 3T prostate MRI; label from {label_column}"
                        + ("; label 1 is the central gland (transition + central zone)" if anatomy else "")
                        + ". Converted by samplan_convert_prostate158."),
        "reference": "Adams et al., Prostate158, Comput Biol Med 2022; doi:10.5281/zenodo.6481141",
        "licence": "see the Prostate158 zenodo record (doi:10.5281/zenodo.6481141)",
        "official_split": {s: sorted(c for c, e in cases.items() if e["split"] == s)
                           for s in ("train", "valid", "test") if any(e["split"] == s for e in cases.values())},
    }
    with staged_folder(target, overwrite, sources=[source]) as out:
        items = []
        for case, entry in sorted(cases.items()):
            kind = "Ts" if entry["split"] == "test" else "Tr"
            images_out, labels_out = out / f"images{kind}", out / f"labels{kind}"
            images_out.mkdir(exist_ok=True)
            labels_out.mkdir(exist_ok=True)
            items.append((case, ({k: str(v) for k, v in entry["paths"].items()}, channels,
                                 str(entry["label"]) if entry["label"] else None, adc_drawn, anatomy,
                                 str(images_out), str(labels_out), case)))
        results = run_per_case(convert_case, items, num_processes, f"converting {source.name}")
        resampled = {c: r["resampled"] for c, r in results.items() if r["resampled"]}
        dataset_json["resampled_to_t2_grid"] = {
            "method": "SimpleITK, through physical space onto the T2 grid: linear for images, nearest neighbour for labels",
            "channels": resampled,
            "labels": sorted(c for c, r in results.items() if r["label_resampled"]),
        }
        save_json(dataset_json, out / "dataset.json")
        verify_converted(out, target, source, num_processes)
    if resampled:
        print(f"note: {len(resampled)} of {len(results)} case(s) had ADC/DWI on another grid than T2; resampled onto the T2 "
              "grid (linear), listed in dataset.json under resampled_to_t2_grid")
    if not anatomy:
        print(f"note: {sum(1 for r in results.values() if not r['tumour'])} of {len(results)} case(s) have no tumour")
    return target
