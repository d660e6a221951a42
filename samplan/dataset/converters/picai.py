"""PI-CAI Public Training and Development Dataset (Saha et al. 2024; zenodo 6517398 images, picai_labels) -> nnU-Net v2.

Published layout:
  images: picai_public_images_fold0..4.zip, each unpacked to {patient_id}/{patient_id}_{study_id}_{t2w,adc,hbv,cor,sag}.mha;
          -i is the folder holding the patient folders, or the folder holding the picai_public_images_fold* folders
  labels: the picai_labels repository; csPCa_lesion_delineations/human_expert/resampled/{patient_id}_{study_id}.nii.gz
          (human expert, resampled to the axial T2W scan: 0 background, 2..5 the lesion's ISUP grade) and
          csPCa_lesion_delineations/AI/Bosma22a/{patient_id}_{study_id}.nii.gz (AI-derived, 1 = ISUP >= 2)
This follows the PI-CAI baseline's own conversion (picai_baseline prepare_data.py with picai_prep's mha2nnunet): case
`{patient_id}_{study_id}`, channels in the order T2W, ADC, HBV, every label value >= 1 is csPCa (1), ADC and HBV resampled
onto the T2W scan with cubic B-spline (picai_prep's default; `interpolation="linear"` is offered), labels not resampled
(both label sets lie on the T2W grid: checked, and refused with both files named when not). With `labels="human"`
cases without a human-expert delineation are skipped, as the baseline does; `labels="ai"` takes the AI-derived
delineation for them, as the baseline's semi-supervised variant does, and lists those cases in dataset.json. Channel and
label names match Dataset502_PICAIToy_T2ADCHBV (T2, ADC, HBV; csPCa_lesion); the baseline itself calls the ADC channel
"CT" to get nnU-Net's global normalisation, which samplan does not copy. Studies of one patient share a cross-validation
group ("case_groups").
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from samplan.dataset.converters.common import (
    check_target, grid_difference, onto_grid, output_folder, read_volume, relabel, run_per_case, staged_folder,
    useful_case_groups, verify_converted, write_volume,
)
from samplan.dataset.dataset_json import CASE_GROUPS_KEY
from samplan.errors import DatasetError, DatasetProblems, InputError
from samplan.utils import save_json

ENDING = ".nii.gz"
MODALITIES = ("t2w", "adc", "hbv")
CHANNEL_NAMES = {"0": "T2", "1": "ADC", "2": "HBV"}
HUMAN = "csPCa_lesion_delineations/human_expert/resampled"
AI = "csPCa_lesion_delineations/AI/Bosma22a"
# picai_labels' label map: 1 = ISUP >= 2 (AI-derived), 2..5 = ISUP grade of a human-delineated lesion; all are csPCa
CSPCA = {0: 0, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
INTERPOLATORS = {"bspline": sitk.sitkBSpline, "linear": sitk.sitkLinear}
DEFAULTS = {"human": (224, "PICAI"), "ai": (225, "PICAIwithAIlabels")}
STUDY = re.compile(r"^(\d+)_(\d+)_t2w\.mha$")
EXPECTED_IMAGES = ("the PI-CAI image layout: {patient_id}/{patient_id}_{study_id}_t2w.mha (+ _adc.mha, _hbv.mha), "
                   "either directly in -i or in picai_public_images_fold0..4/ inside it")


def find_studies(source: Path) -> dict[str, dict[str, Path]]:
    """{"{patient}_{study}": {"t2w"/"adc"/"hbv": file}}; InputError naming the layout when none is found, DatasetProblems
    listing studies that lack a sequence."""
    roots = [source] + sorted(p for p in source.glob("picai_public_images_fold*") if p.is_dir())
    studies: dict[str, dict[str, Path]] = {}
    problems = []
    for root in roots:
        for patient in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
            for t2w in sorted(patient.glob("*_t2w.mha")):
                m = STUDY.match(t2w.name)
                if m is None or m.group(1) != patient.name:
                    continue
                case = f"{m.group(1)}_{m.group(2)}"
                files = {mod: patient / f"{case}_{mod}.mha" for mod in MODALITIES}
                problems += [f"{f} is missing (study {case} has {t2w.name}); unpack the fold zip completely."
                             for f in files.values() if not f.is_file()]
                if case in studies:
                    problems.append(f"{patient}: study {case} also lies in {studies[case]['t2w'].parent}; keep one copy.")
                studies[case] = files
    if not studies:
        raise InputError(f"{source} holds no PI-CAI study; expected {EXPECTED_IMAGES}. Unzip the "
                         "picai_public_images_fold*.zip files and point -i at the folder holding them.")
    if problems:
        raise DatasetProblems(str(source), problems)
    return studies


def find_labels(labels_dir: Path, mode: str) -> dict[str, dict[str, Path]]:
    """{"human"/"ai": {case: label file}} from a picai_labels folder; InputError naming the layout when it is not one."""
    if not (labels_dir / HUMAN).is_dir():
        raise InputError(f"{labels_dir / HUMAN} is not a folder; --labels-dir must be the root of the picai_labels "
                         f"repository (holding {HUMAN}/ and {AI}/). Clone github.com/DIAGNijmegen/picai_labels.")
    if mode == "ai" and not (labels_dir / AI).is_dir():
        raise InputError(f"{labels_dir / AI} is not a folder; --labels ai needs the AI-derived delineations of picai_labels.")
    folders = {"human": labels_dir / HUMAN, **({"ai": labels_dir / AI} if mode == "ai" else {})}
    return {kind: {p.name[: -len(ENDING)]: p for p in folder.glob(f"*{ENDING}") if not p.name.startswith(".")}
            for kind, folder in folders.items()}


def convert_study(files: dict[str, str], label: str, interpolation: str, images_out: str, labels_out: str,
                  case: str) -> dict[str, Any]:
    """Worker: T2W, ADC, HBV on the T2W grid and the binary csPCa label; returns the resampled sequences and lesion size."""
    t2_path = Path(files["t2w"])
    t2 = read_volume(t2_path)
    resampled = []
    for i, mod in enumerate(MODALITIES):
        dst = Path(images_out) / f"{case}_{i:04d}{ENDING}"
        image = t2 if mod == "t2w" else read_volume(Path(files[mod]))
        if mod == "t2w" or grid_difference(image, t2) is None:
            write_volume(image, dst, Path(files[mod]))
        else:
            sitk.WriteImage(onto_grid(image, t2, INTERPOLATORS[interpolation]), str(dst), useCompression=True)
            resampled.append(mod)
    label_path = Path(label)
    lab = relabel(read_volume(label_path), CSPCA, label_path,
                  "picai_labels delineations hold 0 (background), 1 (ISUP >= 2, AI-derived) and 2..5 (ISUP grade)")
    if (diff := grid_difference(lab, t2)) is not None:
        raise DatasetError(f"{label_path} and {t2_path} are on different voxel grids ({diff}); picai_labels' resampled and "
                           "AI-derived delineations lie on the axial T2W scan of their study. Check that both belong to "
                           f"study {case} and come unchanged from the published zip and repository.")
    lab.CopyInformation(t2)
    sitk.WriteImage(lab, str(Path(labels_out) / f"{case}{ENDING}"), useCompression=True)
    return {"resampled": resampled, "lesion_voxels": int(sitk.GetArrayViewFromImage(lab).sum())}


def convert_picai(source: str | Path, labels_dir: str | Path, labels: str = "human", interpolation: str = "bspline",
                  dataset_id: int | None = None, output: str | None = None, num_processes: int | None = None,
                  overwrite: bool = False) -> Path:
    """Convert unpacked PI-CAI images with picai_labels into an nnU-Net v2 raw dataset, verify it and return its folder."""
    source = Path(source).expanduser().absolute()
    labels_dir = Path(labels_dir).expanduser().absolute()
    if labels not in DEFAULTS or interpolation not in INTERPOLATORS:
        raise InputError(f"--labels {labels} --interpolation {interpolation}: choose labels from {', '.join(DEFAULTS)} and "
                         f"interpolation from {', '.join(INTERPOLATORS)}.")
    for folder, what in ((source, "the unpacked PI-CAI images"), (labels_dir, "the picai_labels repository")):
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder; give {what}.")
    target = output_folder(output, dataset_id, *DEFAULTS[labels])
    studies = find_studies(source)
    found = find_labels(labels_dir, labels)
    check_target(target, overwrite, [source, labels_dir])
    chosen: dict[str, Path] = {}
    ai_cases = []
    for case in studies:
        if case in found["human"]:
            chosen[case] = found["human"][case]
        elif case in found.get("ai", {}):
            chosen[case] = found["ai"][case]
            ai_cases.append(case)
    skipped = sorted(set(studies) - set(chosen))
    if not chosen:
        raise DatasetError(f"none of the {len(studies)} studies in {source} has a delineation in {labels_dir} (looked for "
                           f"{HUMAN}/{{patient_id}}_{{study_id}}{ENDING}); check that images and labels belong together.")
    cases = sorted(chosen)
    dataset_json: dict[str, Any] = {
        "channel_names": dict(CHANNEL_NAMES),
        "labels": {"background": 0, "csPCa_lesion": 1},
        "numTraining": len(cases),
        "file_ending": ENDING,
        "name": f"PI-CAI ({'human-expert' if labels == 'human' else 'human-expert and AI-derived'} labels)",
        "description": (f"PI-CAI bpMRI; ADC and HBV resampled onto T2W ({interpolation}) where their grid differs; label 1 "
                        "= csPCa (ISUP >= 2). Converted by samplan_convert_picai."),
        "reference": "Saha et al., Lancet Oncol 2024 (PI-CAI); doi:10.5281/zenodo.6517398; github.com/DIAGNijmegen/picai_labels",
        "licence": "PI-CAI Public Training and Development Dataset: CC BY-NC 4.0 (images and labels)",
        "label_source": {"human_expert": len(cases) - len(ai_cases), "ai_derived_cases": sorted(ai_cases)},
    }
    if pattern := useful_case_groups(r"(\d+)_", cases):
        dataset_json[CASE_GROUPS_KEY] = pattern
    with staged_folder(target, overwrite, sources=[source, labels_dir]) as out:
        (out / "imagesTr").mkdir()
        (out / "labelsTr").mkdir()
        items = [(case, ({k: str(v) for k, v in studies[case].items()}, str(chosen[case]), interpolation,
                         str(out / "imagesTr"), str(out / "labelsTr"), case)) for case in cases]
        results = run_per_case(convert_study, items, num_processes, f"converting {source.name}")
        dataset_json["resampled_to_t2w_grid"] = {c: r["resampled"] for c, r in results.items() if r["resampled"]}
        save_json(dataset_json, out / "dataset.json")
        verify_converted(out, target, source, num_processes)
    if skipped:
        what = "any delineation" if labels == "ai" else "a human-expert delineation (--labels ai adds them with AI-derived ones)"
        print(f"note: skipped {len(skipped)} of {len(studies)} studies without {what}")
    if ai_cases:
        print(f"note: {len(ai_cases)} case(s) carry AI-derived labels (listed in dataset.json under label_source)")
    return target
