"""COVID-19-CT-Seg (Ma Jun et al. 2020, zenodo 3757476; benchmark: Med Phys 2021) -> an nnU-Net v2 raw dataset.

Published layout (the four zips unpacked side by side in -i; Kaggle's copy uses the lower-case names and .nii):
  COVID-19-CT-Seg_20cases/  coronacases_org_001.nii.gz .. _010, radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz ..
  Lung_Mask/                coronacases_001.nii.gz, radiopaedia_4_85506_1.nii.gz, ...    0, 1 left lung, 2 right lung
  Infection_Mask/           the same names                                                0, 1 infection
  Lung_and_Infection_Mask/  the same names                                                0, 1 left, 2 right, 3 infection
  (Kaggle: ct_scans/, lung_mask/, infection_mask/, lung_and_infection_mask/)
Values as the dataset's benchmark evaluation reads them (JunMa11/COVID-19-CT-Seg-Benchmark). A case is named after its
mask file (coronacases_001, radiopaedia_4_85506_1); two radiopaedia cases hold two scans each (10_85902_1/_3, 29_86490_1
/86491_1), so cases are grouped by radiopaedia case number for cross-validation ("case_groups").

Intensities: the authors state that the 10 radiopaedia scans were clipped to the lung window [-1250, 250] HU and scaled
to [0, 255], while the 10 coronacases scans are in HU, and recommend mapping the latter the same way. Each scan's scale is
found from its values (min >= 0 and max <= 255: the [0, 255] window; min below -500: HU) and recorded in dataset.json.
`intensities="lung-window"` (default) applies the authors' mapping to the HU scans, so that all 20 share one scale;
`"keep"` writes every scan as published (two scales in one dataset; the CT normalisation then pools both).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from samplan.dataset.converters.common import (
    check_target, grid_difference, output_folder, read_volume, relabel, run_per_case, staged_folder,
    useful_case_groups, verify_converted, visible_files, write_volume,
)
from samplan.dataset.dataset_json import CASE_GROUPS_KEY, case_id_problem
from samplan.errors import DatasetError, DatasetProblems, InputError
from samplan.utils import save_json

ENDING = ".nii.gz"
LUNG_WINDOW = (-1250.0, 250.0)
# (image folder, {labels option: mask folder}) of the Zenodo and the Kaggle copies
LAYOUTS = (
    ("COVID-19-CT-Seg_20cases", {"lungs": "Lung_Mask", "infection": "Infection_Mask",
                                 "lungs_and_infection": "Lung_and_Infection_Mask"}),
    ("ct_scans", {"lungs": "lung_mask", "infection": "infection_mask", "lungs_and_infection": "lung_and_infection_mask"}),
)
# (labels option, merge lungs) -> ({published value: written value}, dataset.json labels)
LABELS: dict[tuple[str, bool], tuple[dict[int, int], dict[str, int]]] = {
    ("infection", False): ({0: 0, 1: 1}, {"background": 0, "infection": 1}),
    ("lungs", False): ({0: 0, 1: 1, 2: 2}, {"background": 0, "left lung": 1, "right lung": 2}),
    ("lungs", True): ({0: 0, 1: 1, 2: 1}, {"background": 0, "lung": 1}),
    ("lungs_and_infection", False): ({0: 0, 1: 1, 2: 2, 3: 3},
                                     {"background": 0, "left lung": 1, "right lung": 2, "infection": 3}),
    ("lungs_and_infection", True): ({0: 0, 1: 1, 2: 1, 3: 2}, {"background": 0, "lung": 1, "infection": 2}),
}
PUBLISHED = {"infection": "0 and 1 (infection)", "lungs": "0, 1 (left lung) and 2 (right lung)",
             "lungs_and_infection": "0, 1 (left lung), 2 (right lung) and 3 (infection)"}
DEFAULT_IDS = {("infection", False): 190, ("lungs", False): 191, ("lungs", True): 192,
               ("lungs_and_infection", False): 193, ("lungs_and_infection", True): 194}
NAMES = {("infection", False): "COVID19CTSegInfection", ("lungs", False): "COVID19CTSegLungs",
         ("lungs", True): "COVID19CTSegLung", ("lungs_and_infection", False): "COVID19CTSegLungsInfection",
         ("lungs_and_infection", True): "COVID19CTSegLungInfection"}
GROUPS = r"(coronacases_\d+|radiopaedia_\d+)"


def mask_stem(image_stem: str) -> str:
    """The mask name of a published image name: coronacases_org_001 -> coronacases_001,
    radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm -> radiopaedia_4_85506_1 (other names are kept)."""
    if m := re.fullmatch(r"coronacases_org_(\d+)", image_stem):
        return f"coronacases_{m.group(1)}"
    if m := re.fullmatch(r"radiopaedia_org_covid-19-pneumonia-(\d+_\d+_\d+)-dcm", image_stem):
        return f"radiopaedia_{m.group(1)}"
    return image_stem


def _stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem


def find_pairs(source: Path, labels: str) -> dict[str, tuple[Path, Path]]:
    """{case: (image, mask)} of the published layout; InputError naming the layout when -i is not one, DatasetProblems
    listing images without a mask and masks without an image."""
    for images_name, masks in LAYOUTS:
        images_dir, masks_dir = source / images_name, source / masks[labels]
        if images_dir.is_dir():
            break
    else:
        layouts = "; or ".join(f"{i}/ with {', '.join(m.values())}/" for i, m in LAYOUTS)
        raise InputError(f"{source} is not in the COVID-19-CT-Seg layout: expected {layouts} (the zenodo 3757476 zips "
                         "unpacked side by side). Point -i at the folder that holds them.")
    if not masks_dir.is_dir():
        raise InputError(f"{masks_dir} is missing; --labels {labels} reads it (unpack {masks_dir.name}.zip beside "
                         f"{images_dir.name}/).")
    endings = [".nii.gz", ".nii"]
    images = {mask_stem(_stem(p)): p for p in visible_files(images_dir, endings)}
    found = {_stem(p): p for p in visible_files(masks_dir, endings)}
    problems = [f"{images[c]}: no mask {masks_dir / c}.nii.gz; unpack {masks_dir.name}.zip completely."
                for c in sorted(set(images) - set(found))]
    problems += [f"{found[c]}: no image for it in {images_dir} (expected coronacases_org_NNN / "
                 "radiopaedia_org_covid-19-pneumonia-<id>-dcm); remove it or add the image." for c in sorted(set(found) - set(images))]
    problems += filter(None, (case_id_problem(c, f"{found[c]}: case name") for c in sorted(found)))
    if problems:
        raise DatasetProblems(str(source), problems)
    if not images:
        raise DatasetError(f"{images_dir} holds no .nii.gz or .nii images; nothing to convert.")
    return {c: (images[c], found[c]) for c in sorted(images)}


def intensity_scale(values: np.ndarray) -> str:
    """"0-255" for the published lung-window scans, "HU" for scans with air below -500, else "unknown"."""
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= 255:
        return "0-255"
    return "HU" if lo < -500 else "unknown"


def to_lung_window(image: sitk.Image) -> sitk.Image:
    """The authors' mapping of HU onto the radiopaedia scans' scale: clip to [-1250, 250] HU, scale to [0, 255] (float32)."""
    lo, hi = LUNG_WINDOW
    arr = (np.clip(sitk.GetArrayViewFromImage(image).astype(np.float32), lo, hi) - lo) * np.float32(255.0 / (hi - lo))
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    return out


def convert_scan(image: str, mask: str, mapping: dict[int, int], labels: str, intensities: str, images_out: str,
                 labels_out: str, case: str) -> dict[str, Any]:
    """Worker: one scan (mapped to the lung window when asked) and its relabelled mask; returns its intensity scale."""
    image_path, mask_path = Path(image), Path(mask)
    ct = read_volume(image_path)
    scale = intensity_scale(sitk.GetArrayViewFromImage(ct))
    lab = relabel(read_volume(mask_path), mapping, mask_path, f"COVID-19-CT-Seg's {Path(mask).parent.name} masks hold "
                  f"{PUBLISHED[labels]}")
    if (diff := grid_difference(lab, ct)) is not None:
        raise DatasetError(f"{mask_path} and {image_path} are on different voxel grids ({diff}); a mask must lie on the grid "
                           "of its scan. Check that both belong to one case and come unchanged from the zenodo zips.")
    dst = Path(images_out) / f"{case}_0000{ENDING}"
    if intensities == "lung-window" and scale == "unknown":
        lo, hi = (float(v) for v in (sitk.GetArrayViewFromImage(ct).min(), sitk.GetArrayViewFromImage(ct).max()))
        raise DatasetError(f"{image_path}: values {lo:g}..{hi:g} are neither HU (air near -1000) nor the published [0, 255] "
                           "lung window, so the lung-window mapping cannot be chosen. Check the file, or convert with "
                           "--intensities keep.")
    if intensities == "lung-window" and scale == "HU":
        sitk.WriteImage(to_lung_window(ct), str(dst), useCompression=True)
    else:
        write_volume(ct, dst, image_path)
    lab.CopyInformation(ct)
    sitk.WriteImage(lab, str(Path(labels_out) / f"{case}{ENDING}"), useCompression=True)
    return {"scale": scale}


def convert_covid19ct(source: str | Path, labels: str = "infection", merge_lungs: bool = False,
                      intensities: str = "lung-window", dataset_id: int | None = None, output: str | None = None,
                      num_processes: int | None = None, overwrite: bool = False) -> Path:
    """Convert the unpacked COVID-19-CT-Seg zips into an nnU-Net v2 raw dataset, verify it and return its folder."""
    source = Path(source).expanduser().absolute()
    if labels not in PUBLISHED or intensities not in ("lung-window", "keep"):
        raise InputError(f"--labels {labels} --intensities {intensities}: choose labels from {', '.join(PUBLISHED)} and "
                         "intensities from lung-window, keep.")
    if merge_lungs and labels == "infection":
        raise InputError("--merge-lungs joins the left and right lung labels; it needs --labels lungs or lungs_and_infection.")
    if not source.is_dir():
        raise InputError(f"{source} is not a folder; give the folder holding the unpacked COVID-19-CT-Seg zips.")
    key = (labels, merge_lungs)
    target = output_folder(output, dataset_id, DEFAULT_IDS[key], NAMES[key])
    pairs = find_pairs(source, labels)
    check_target(target, overwrite, [source])
    mapping, label_names = LABELS[key]
    dataset_json: dict[str, Any] = {
        "channel_names": {"0": "CT"},
        "labels": dict(label_names),
        "numTraining": len(pairs),
        "file_ending": ENDING,
        "name": f"COVID-19-CT-Seg ({labels.replace('_', ' ')}{', lungs merged' if merge_lungs else ''})",
        "description": "COVID-19 CT lung and infection segmentation (20 cases). Converted by samplan_convert_covid19ct.",
        "reference": "Ma Jun et al., COVID-19 CT Lung and Infection Segmentation Dataset, doi:10.5281/zenodo.3757476; "
                     "Ma et al., Med Phys 2021, doi:10.1002/mp.14676",
        "licence": "see the zenodo record 3757476",
    }
    if pattern := useful_case_groups(GROUPS, list(pairs)):
        dataset_json[CASE_GROUPS_KEY] = pattern
    with staged_folder(target, overwrite, sources=[source]) as out:
        (out / "imagesTr").mkdir()
        (out / "labelsTr").mkdir()
        items = [(case, (str(img), str(msk), mapping, labels, intensities, str(out / "imagesTr"), str(out / "labelsTr"),
                         case)) for case, (img, msk) in pairs.items()]
        scales = {c: r["scale"] for c, r in run_per_case(convert_scan, items, num_processes,
                                                         f"converting {source.name}").items()}
        mapped = "HU, mapped to [0, 255] by clipping to [-1250, 250] HU" if intensities == "lung-window" else "HU, as published"
        dataset_json["intensities"] = {
            "mode": intensities,
            "lung_window_hu": list(LUNG_WINDOW),
            "cases": {c: {"0-255": "[0, 255] lung window, as published", "HU": mapped}.get(s, "unknown scale, as published")
                      for c, s in scales.items()},
        }
        save_json(dataset_json, out / "dataset.json")
        verify_converted(out, target, source, num_processes)
    n_hu, n_win = sum(s == "HU" for s in scales.values()), sum(s == "0-255" for s in scales.values())
    if intensities == "lung-window" and n_hu:
        print(f"note: {n_hu} scan(s) in HU were mapped to the [0, 255] lung window ([-1250, 250] HU) the other {n_win} "
              "are published in, as the dataset's authors recommend; see dataset.json 'intensities'")
    elif intensities == "keep" and n_hu and n_win:
        print(f"warning: the dataset mixes {n_hu} scan(s) in HU with {n_win} in the [0, 255] lung window (kept as published, "
              "recorded in dataset.json 'intensities'); intensity normalisation will pool both scales")
    return target
