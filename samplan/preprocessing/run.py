"""Preprocess every training case of a dataset for each planned configuration, resumably and in parallel."""
from __future__ import annotations

import filecmp
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image

from samplan.dataset.dataset_json import DatasetJson, list_training_cases, load_dataset_json
from samplan.dataset.image_io import NATURAL_ENDINGS
from samplan.disk_space import check_free_space
from samplan.errors import DatasetError
from samplan.parallel import default_num_processes, map_cases
from samplan.preprocessing.cache import case_is_complete, remove_partial_files, write_case
from samplan.preprocessing.preprocessor import configuration_plan, preprocess_case_files, target_spacing
from samplan.utils import atomic_path

GT_FOLDER = "gt_segmentations"
# bump when the cache layout or a preprocessing rule changes, so that old caches are redone
CACHE_FORMAT_VERSION = 1


def preprocessing_key(plans: dict[str, Any], configuration: str, dataset_json: DatasetJson) -> str:
    """Short hash of every setting that changes a cached case; cases written under another key are redone."""
    plan = configuration_plan(plans, configuration)
    relevant = {
        "format": CACHE_FORMAT_VERSION,
        "transpose_forward": plans.get("transpose_forward"),
        "intensity": plans.get("foreground_intensity_properties_per_channel"),
        "labels": dataset_json.get("labels"),
        **{k: plan.get(k) for k in ("spacing", "normalization_schemes", "use_mask_for_norm",
                                    "resampling_fn_data_kwargs", "resampling_fn_seg_kwargs")},
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def preprocess_dataset(
    raw_dir: Path,
    out_dir: Path,
    plans: dict,
    configurations: Sequence[str] | None = None,
    num_processes: int | None = None,
    verified: bool = False,
) -> None:
    """Preprocess all training cases of `raw_dir` into `out_dir/<data_identifier>/` for each configuration.

    `verified`: the raw files were just checked by verify_dataset, so their damage check is not repeated.

    Complete cases (properties present, arrays intact, same preprocessing settings) are skipped and
    anything else is redone, so an interrupted run can simply be started again. Raw label files are also
    copied to `out_dir/gt_segmentations/` for evaluation.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    dataset_json = load_dataset_json(raw_dir)
    names = list(plans.get("configurations", {})) if configurations is None else list(configurations)
    for name in names:
        configuration_plan(plans, name)  # fail early on a typo, before any work
    cases = list_training_cases(raw_dir, dataset_json)
    for case, files in cases.items():
        if not files["images"]:
            raise DatasetError(f"case '{case}' has a label file but no images in {raw_dir / 'imagesTr'}.")
    copy_gt_segmentations(cases, out_dir / GT_FOLDER, dataset_json["file_ending"])
    for name in names:
        _preprocess_configuration(cases, out_dir, plans, name, dataset_json, num_processes, not verified)


def _preprocess_configuration(
    cases: dict[str, dict[str, Any]],
    out_dir: Path,
    plans: dict,
    configuration: str,
    dataset_json: DatasetJson,
    num_processes: int | None,
    check: bool = True,
) -> None:
    """Preprocess the cases of one configuration that are not complete yet (`check`: the files' damage check)."""
    plan = configuration_plan(plans, configuration)
    folder = out_dir / plan["data_identifier"]
    folder.mkdir(parents=True, exist_ok=True)
    key = preprocessing_key(plans, configuration, dataset_json)
    todo = [c for c in cases if not case_is_complete(folder, c, key)]
    if not todo:
        print(f"{configuration}: all {len(cases)} cases already preprocessed in {folder}")
        return
    # preflight: a cached case has so far been 2-4x its raw images (float32 ZSTD vs gzip); refuse below half of that
    raw_bytes = sum(Path(f).stat().st_size for c in todo for f in cases[c]["images"])
    check_free_space(folder, raw_bytes // 2, f"preprocessing {len(todo)} case(s) of {configuration}")
    per_case = max(_estimate_case_bytes(cases[c]["images"], plans, plan) for c in todo)
    n = default_num_processes(num_processes, bytes_per_task=per_case, n_tasks=len(todo))
    print(f"{configuration}: {len(todo)} of {len(cases)} cases to preprocess into {folder} with {n} process(es)")
    items = [
        (c, (c, [str(f) for f in cases[c]["images"]], str(cases[c]["label"]), plans, configuration, dataset_json,
             str(folder), key, check))
        for c in todo
    ]
    map_cases(_preprocess_and_write, items, n, desc=f"preprocessing {configuration}")


def _preprocess_and_write(
    case: str,
    image_files: list[str],
    seg_file: str,
    plans: dict,
    configuration: str,
    dataset_json: DatasetJson,
    folder: str,
    key: str,
    check: bool = True,
) -> list[int]:
    """Worker: preprocess one case and write it to the cache; returns the preprocessed shape (C, Z, Y, X)."""
    remove_partial_files(folder, case)
    data, seg, props = preprocess_case_files(image_files, seg_file, plans, configuration, dataset_json, check=check)
    props["preprocessing_key"] = key
    write_case(folder, case, data, seg, props, patch_size=configuration_plan(plans, configuration).get("patch_size"))
    return list(data.shape)


def _image_header(path: Path) -> tuple[list[int], list[float]]:
    """Shape `(Z, Y, X)` and spacing of an image file from its header only (2D: Z = 1, spacing 999)."""
    if str(path).lower().endswith(NATURAL_ENDINGS):
        with Image.open(path) as im:
            return [1, im.size[1], im.size[0]], [999.0, 1.0, 1.0]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    size, spacing = list(reader.GetSize())[::-1], list(reader.GetSpacing())[::-1]
    if len(size) == 2:
        size, spacing = [1, *size], [999.0, *spacing]
    return size, spacing


def _estimate_case_bytes(image_files: Sequence[Path], plans: dict, plan: dict) -> float:
    """Rough peak memory of preprocessing one case, from the image headers and the resampling factor."""
    try:
        shape, spacing = _image_header(Path(image_files[0]))
    except Exception:  # noqa: BLE001 - unreadable headers are reported by the reader itself later
        return 0.0
    channels = len(image_files) if len(image_files) > 1 else 3 if str(image_files[0]).lower().endswith(NATURAL_ENDINGS) else 1
    axes = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    sp = [spacing[a] for a in axes]
    scale = float(np.prod(np.asarray(sp) / np.asarray(target_spacing(plan, sp))))
    voxels = float(np.prod(shape))
    # input side: reading + normalised copy (3 float32 copies per channel) and label boxes (int32, bool);
    # output side: the resampled channels (float32) and the label pass (float64 scores, see resampling);
    # plus the worker's own imports (~200 MB). Measured on a BraTS case (2 x 240x240x155): 0.3 GB above the
    # imports at 1.5 mm, 1.2 GB at 0.7 mm; this estimate gives 0.8 and 1.9 GB.
    return voxels * (12 * channels + 16) + voxels * max(scale, 1.0) * (4 * channels + 40) + 250e6


def copy_gt_segmentations(cases: dict[str, dict[str, Any]], gt_dir: Path, file_ending: str) -> None:
    """Copy each case's raw label file to `gt_dir/{case}{file_ending}` (atomic; identical copies are skipped)."""
    gt_dir.mkdir(parents=True, exist_ok=True)
    for case, files in cases.items():
        src, dst = Path(files["label"]), gt_dir / f"{case}{file_ending}"
        if not src.is_file():
            raise DatasetError(f"label file {src} of case '{case}' does not exist.")
        if dst.is_file() and dst.stat().st_size == src.stat().st_size and filecmp.cmp(src, dst, shallow=False):
            continue
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
