"""Medical Segmentation Decathlon task folder -> nnU-Net v2 raw dataset, as nnU-Net's own MSD converter does it.

MSD layout (`TaskXX_Name/`): `dataset.json` (nnU-Net v1 style: "modality" {index: name}, "labels" {value: name},
"training"/"test" listings), `imagesTr/{case}.nii.gz`, `labelsTr/{case}.nii.gz`, optional `imagesTs/{case}.nii.gz`.
Tasks with several modalities store one 4D image per case (X, Y, Z, modality); the tarballs also hold a macOS
`._{case}.nii.gz` beside every file, which is skipped (`common.visible_files`).

Result (`$SAMPLAN_RAW/DatasetXXX_Name`, XXX = the task number unless `dataset_id` is given):
- 4D images are split into one 3D file per modality, `{case}_{XXXX}.nii.gz`, keeping the spacing, origin and the 3x3
  direction of the first three axes (the 4th axis is the modality index, not space); 3D images are copied as
  `{case}_0000.nii.gz` byte for byte; labels are copied; imagesTs is converted the same way when present;
- dataset.json: `channel_names` = MSD "modality" (the 4D volume order), `labels` = MSD "labels" inverted to name ->
  value, `numTraining` = the cases found, `file_ending` ".nii.gz"; the descriptive keys are kept.

BraTS (Task01_BrainTumour, recognised by its label names, never by position): nnU-Net v2's BraTS numbering
(Dataset137_BraTS21 maps the challenge's 2 edema -> 1, 1 necrosis/non-enhancing -> 2, 4 enhancing -> 3) is what
MSD ships already (1 edema, 2 non-enhancing tumour, 3 enhancing tumour), so the published label files are copied
unchanged; a json that numbers the same names differently is remapped voxel by voxel onto 1/2/3. The labels are then
written as nnU-Net's BraTS regions (whole tumour 1+2+3, tumour core 2+3, enhancing tumour 3, painted in
`regions_class_order` 1, 2, 3), because BraTS is trained and evaluated on these nested regions, not on the disjoint
labels; nnU-Net's plain MSD converter keeps the disjoint labels, which `regions=False` (`--no-regions`) reproduces.
Channel names come from MSD's "modality" (FLAIR, T1w, t1gd, T2w in MSD's order), not from BraTS 2021's T1/T1ce/T2/
FLAIR order that Dataset137 hard-codes.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from samplan.dataset.converters.common import (
    check_dataset_id_free, check_target, dataset_folder_name, run_per_case, staged_folder, verify_converted, visible_files,
)
from samplan.dataset.integrity import file_problems, too_large
from samplan.errors import DatasetError, DatasetProblems, InputError
from samplan.paths import raw_root
from samplan.utils import load_json, save_json

ENDING = ".nii.gz"
TASK_FOLDER = re.compile(r"^Task(\d+)_(.+)$")
# nnU-Net v2's BraTS label numbering, by normalised MSD label name (see the module docstring)
BRATS_LABELS = {"edema": 1, "non enhancing tumor": 2, "enhancing tumor": 3}
BRATS_REGIONS: dict[str, Any] = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
BRATS_REGIONS_CLASS_ORDER = [1, 2, 3]
# MSD's descriptive keys worth keeping; "modality", "training", "test", "numTest" and "tensorImageSize" (4D) are not
KEPT_KEYS = ("name", "description", "reference", "licence", "license", "release")


def target_name(source: Path, dataset_id: int | None = None) -> str:
    """`DatasetXXX_Name` from a `TaskXX_Name` folder; `dataset_id` replaces XX (and names a folder of any other name)."""
    m = TASK_FOLDER.match(source.name)
    if m is None and dataset_id is None:
        raise InputError(f"{source}: the folder name is not of the MSD form TaskXX_Name (e.g. Task04_Hippocampus), so "
                         "neither the dataset id nor its name is known. Rename the folder, or give the id with -d "
                         "(the folder name then becomes the dataset name).")
    number = dataset_id if dataset_id is not None else int(m.group(1))
    return dataset_folder_name(number, m.group(2) if m else source.name)


def read_msd_json(source: Path) -> tuple[dict[str, Any], dict[str, str], dict[int, str]]:
    """MSD dataset.json -> (the json, channel_names {"0": name}, labels {value: name}); DatasetError naming the problem."""
    path = source / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; an MSD task folder holds dataset.json, imagesTr/ and labelsTr/. "
                           "Point -i at the extracted TaskXX_Name folder.")
    try:
        msd = load_json(path)
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); extract the task tarball again.") from None
    if not isinstance(msd, dict):
        raise DatasetError(f"{path} must hold a JSON object, not {type(msd).__name__}.")
    if "modality" not in msd:
        hint = (" It has channel_names: it is an nnU-Net v2 dataset already and needs no conversion; copy it into "
                "SAMPLAN_RAW as DatasetXXX_Name.") if "channel_names" in msd else ""
        raise DatasetError(f'{path} has no "modality" key, so it is not an MSD dataset.json.{hint}')
    return msd, _channel_names(msd["modality"], path), _msd_labels(msd.get("labels"), path)


def _channel_names(modality: Any, path: Path) -> dict[str, str]:
    """MSD "modality" {"0": "FLAIR", ...} checked: keys 0..n-1, names strings; returned in index order."""
    ok = isinstance(modality, dict) and all(str(k).isdigit() and isinstance(v, str) for k, v in modality.items())
    by_index = {int(k): v for k, v in modality.items()} if ok else {}
    if not by_index or sorted(by_index) != list(range(len(modality))):
        raise DatasetError(f'{path}: "modality" is {modality!r}; it must map the modality indices "0", "1", ... to names, '
                           'e.g. {"0": "FLAIR", "1": "T1w"}. Fix the file.')
    return {str(i): by_index[i] for i in range(len(by_index))}


def _msd_labels(labels: Any, path: Path) -> dict[int, str]:
    """MSD "labels" {"0": "background", "1": "edema", ...} checked: integer keys, string names, each name once."""
    if not (isinstance(labels, dict) and labels and all(str(k).isdigit() and isinstance(v, str) for k, v in labels.items())):
        raise DatasetError(f'{path}: "labels" is {labels!r}; it must map label values to names, e.g. '
                           '{"0": "background", "1": "tumour"}. Fix the file.')
    out = {int(k): v for k, v in labels.items()}
    names = list(out.values())
    if len(set(names)) != len(names):
        raise DatasetError(f'{path}: "labels" gives one name to several values ({labels!r}); nnU-Net maps names to '
                           "values, so each name must be unique. Rename the duplicates.")
    return dict(sorted(out.items()))


def _norm(name: str) -> str:
    """Label name for comparison: lower case, British spelling folded, runs of space/_/- as one space."""
    return re.sub(r"[\s_-]+", " ", name.strip().lower()).replace("tumour", "tumor").replace("oedema", "edema")


def brats_label_map(msd_labels: dict[int, str]) -> dict[int, int] | None:
    """{MSD value: nnU-Net BraTS value} when the labels are exactly background, edema, non-enhancing and enhancing tumour
    (matched by name, whatever their numbering); None for any other label set."""
    by_name = {_norm(n): v for v, n in msd_labels.items()}
    if set(by_name) != {"background", *BRATS_LABELS} or by_name["background"] != 0:
        return None
    return {0: 0, **{by_name[n]: v for n, v in BRATS_LABELS.items()}}


def translate_dataset_json(msd: dict[str, Any], channel_names: dict[str, str], msd_labels: dict[int, str],
                           n_training: int, brats: bool, source_name: str) -> dict[str, Any]:
    """The nnU-Net v2 dataset.json of a converted MSD task (BraTS regions when `brats`)."""
    out: dict[str, Any] = {"channel_names": channel_names}
    if brats:
        out["labels"] = dict(BRATS_REGIONS)
        out["regions_class_order"] = list(BRATS_REGIONS_CLASS_ORDER)
    else:
        out["labels"] = {name: value for value, name in msd_labels.items()}
    out.update(numTraining=n_training, file_ending=ENDING)
    out.update({k: msd[k] for k in KEPT_KEYS if isinstance(msd.get(k), str)})
    out["converted_from"] = f"{source_name} (Medical Segmentation Decathlon) by samplan_convert_msd"
    return out


def training_pairs(source: Path) -> dict[str, tuple[Path, Path]]:
    """{case: (imagesTr file, labelsTr file)}; DatasetProblems listing every image without label and label without image."""
    folders = [source / "imagesTr", source / "labelsTr"]
    missing = [f"{d.name}/ is missing in {source}; an MSD task folder holds imagesTr/ and labelsTr/." for d in folders
               if not d.is_dir()]
    if missing:
        raise DatasetProblems(str(source), missing)
    images = {p.name[: -len(ENDING)]: p for p in visible_files(folders[0], [ENDING])}
    labels = {p.name[: -len(ENDING)]: p for p in visible_files(folders[1], [ENDING])}
    if not labels:
        raise DatasetError(f"{folders[1]} holds no {ENDING} label files; nothing to convert.")
    if images and all(re.search(r"_\d{4}$", c) for c in images) and {c[:-5] for c in images} == set(labels):
        raise DatasetError(f"{folders[0]} holds {{case}}_XXXX{ENDING} files: {source} is in the nnU-Net v2 raw format "
                           "already and needs no conversion. Copy it into SAMPLAN_RAW as DatasetXXX_Name.")
    problems = [f"imagesTr/{images[c].name}: no label labelsTr/{c}{ENDING}. MSD training images all have labels; "
                "extract the tarball again or move the image to imagesTs/." for c in sorted(set(images) - set(labels))]
    problems += [f"labelsTr/{labels[c].name}: no image imagesTr/{c}{ENDING}. Extract the tarball again or remove the label."
                 for c in sorted(set(labels) - set(images))]
    if problems:
        raise DatasetProblems(str(source), problems)
    return {c: (images[c], labels[c]) for c in sorted(labels)}


def _header(path: Path) -> sitk.ImageFileReader:
    """A reader holding `path`'s header; DatasetError when it is unreadable or announces an absurd size."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot be read by SimpleITK ({str(e).strip().splitlines()[-1]}). Extract it again.") from e
    one = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    n_bytes = int(np.prod(reader.GetSize(), dtype=np.int64)) * sitk.GetArrayViewFromImage(one).nbytes
    if msg := too_large(n_bytes, "its header"):
        raise DatasetError(f"{path}: {msg}")
    return reader


def _read_whole(path: Path, reader: sitk.ImageFileReader) -> sitk.Image:
    """Decode a file after the damage check (ITK reads a truncated .nii.gz without complaint)."""
    if problems := file_problems(path):
        raise DatasetError(f"{path}: " + " Also: ".join(problems))
    try:
        return reader.Execute()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot be read by SimpleITK ({str(e).strip().splitlines()[-1]}). Extract it again.") from e


def split_image(src: Path, out_dir: Path, case: str, channel_names: dict[str, str]) -> None:
    """One MSD image -> `{case}_{XXXX}.nii.gz` per modality in `out_dir` (a 3D image is copied as `_0000`)."""
    reader = _header(src)
    n, dim, size = len(channel_names), reader.GetDimension(), reader.GetSize()
    declared = f"dataset.json declares {n} modalit{'y' if n == 1 else 'ies'} ({', '.join(channel_names.values())})"
    if dim == 3 and n == 1:
        shutil.copyfile(src, out_dir / f"{case}_0000{ENDING}")
        return
    if dim != 4 or size[3] != n:
        shape = "x".join(map(str, size))
        raise DatasetError(f"{src}: a {dim}D image of size {shape}, but {declared}, so a 4D image with {n} volumes (or a 3D "
                           "image for one modality) was expected. Fix the image or the \"modality\" key of dataset.json.")
    image = _read_whole(src, reader)
    for c in range(n):
        try:
            # the submatrix rule takes the top-left 3x3 direction, as nnU-Net does; ITK refuses it when it is singular
            volume = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, c], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        except RuntimeError as e:
            raise DatasetError(f"{src}: the spatial part of its 4D direction matrix is not a valid 3D direction ({e}); "
                               "fix the image header.") from e
        sitk.WriteImage(volume, str(out_dir / f"{case}_{c:04d}{ENDING}"), useCompression=True)


def write_label(src: Path, dst: Path, label_map: dict[int, int] | None) -> None:
    """Copy a label file; with a non-identity `label_map` {old: new} rewrite its values instead (same geometry)."""
    if label_map is None or all(k == v for k, v in label_map.items()):
        shutil.copyfile(src, dst)
        return
    image = _read_whole(src, _header(src))
    arr = sitk.GetArrayViewFromImage(image)
    unknown = sorted(set(np.unique(arr).tolist()) - set(label_map))
    if unknown:
        raise DatasetError(f"{src}: label value(s) {unknown} are not declared in dataset.json labels ({sorted(label_map)}). "
                           "Declare them or fix the label file.")
    out = np.zeros(arr.shape, np.uint8)
    for old, new in label_map.items():
        out[arr == old] = new
    remapped = sitk.GetImageFromArray(out)
    remapped.CopyInformation(image)
    sitk.WriteImage(remapped, str(dst), useCompression=True)


def _convert_case(image: str, label: str | None, images_out: str, labels_out: str | None, case: str,
                  channel_names: dict[str, str], label_map: dict[int, int] | None) -> None:
    """Worker: one case's channel files and label (paths as strings so that they travel to spawned workers cheaply)."""
    split_image(Path(image), Path(images_out), case, channel_names)
    if label is not None and labels_out is not None:
        write_label(Path(label), Path(labels_out) / f"{case}{ENDING}", label_map)


def _bytes_per_case(files: list[Path]) -> float | None:
    """Peak memory of splitting the largest image: its voxels twice (the 4D image and one extracted volume)."""
    try:
        largest = max(files, key=lambda p: p.stat().st_size)
        reader = _header(largest)
    except (ValueError, OSError, DatasetError):
        return None
    one = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    return 2.0 * float(np.prod(reader.GetSize())) * sitk.GetArrayViewFromImage(one).nbytes


def convert_msd(source: str | Path, dataset_id: int | None = None, num_processes: int | None = None,
                overwrite: bool = False, regions: bool = True) -> Path:
    """Convert an MSD task folder into `$SAMPLAN_RAW/DatasetXXX_Name`, verify it, and return its path.

    `regions` False keeps BraTS's disjoint labels instead of the WT/TC/ET regions. Nothing is written on any error.
    """
    source = Path(source).expanduser().absolute()
    if not source.is_dir():
        raise InputError(f"{source} is not a folder; give the extracted MSD task folder, e.g. -i Task04_Hippocampus.")
    name = target_name(source, dataset_id)
    check_dataset_id_free(name)
    target = raw_root() / name
    check_target(target, overwrite, [source])
    msd, channel_names, msd_labels = read_msd_json(source)
    pairs = training_pairs(source)
    tests = visible_files(source / "imagesTs", [ENDING]) if (source / "imagesTs").is_dir() else []
    label_map = brats_label_map(msd_labels) if regions else None
    dataset_json = translate_dataset_json(msd, channel_names, msd_labels, len(pairs), label_map is not None, source.name)
    with staged_folder(target, overwrite, sources=[source]) as out:
        images_tr, labels_tr, images_ts = out / "imagesTr", out / "labelsTr", out / "imagesTs"
        for d in (images_tr, labels_tr) + ((images_ts,) if tests else ()):
            d.mkdir()
        items = [(case, (str(img), str(lab), str(images_tr), str(labels_tr), case, channel_names, label_map))
                 for case, (img, lab) in pairs.items()]
        items += [(f"{p.name[: -len(ENDING)]} (imagesTs)", (str(p), None, str(images_ts), None, p.name[: -len(ENDING)],
                                                            channel_names, None)) for p in tests]
        run_per_case(_convert_case, items, num_processes, f"converting {source.name}",
                     _bytes_per_case([img for img, _ in pairs.values()] + tests))
        save_json(dataset_json, out / "dataset.json")
        verify_converted(out, target, source, num_processes)
    return target
