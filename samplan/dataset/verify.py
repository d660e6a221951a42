"""Dataset verification: find every problem of a raw nnU-Net-format dataset before anything is written.

nnU-Net stops at the first failed check; here all problems are collected (dataset.json schema, missing
or stray files, unreadable or damaged files (see `integrity`), shape/geometry mismatches, undeclared label
values, NaN/Inf) and reported at once. Each problem names the case and the file, says what is wrong and how to fix it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
from PIL import Image

from samplan.dataset.dataset_json import (
    N_FOLDS, DatasetJson, check_dataset_paths, label_values, load_dataset_json, read_case_groups,
)
from samplan.dataset.image_io import NATURAL_ENDINGS, SUPPORTED_ENDINGS, read_images, read_seg
from samplan.dataset.integrity import file_problems
from samplan.errors import DatasetError, DatasetProblems
from samplan.parallel import default_num_processes, map_cases

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
# the tolerance image_io applies between the channels of one case: what passes here also reads later
GEOMETRY_TOLERANCE = 1e-4
_CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})$")


# a per-case computation verification can run on the arrays it has read anyway:
# (function(data, properties, seg, *args) -> result, {case: args}, bytes one case's analysis may need)
CaseAnalysis = tuple[Callable[..., Any], dict[str, tuple], float]


def verify_dataset(raw_dir: Path, num_processes: int | None = None,
                   analysis: CaseAnalysis | None = None) -> dict[str, Any]:
    """Check a raw dataset folder; raise DatasetProblems (exit code 2) listing every problem found.

    With `analysis`, each case that has no problem is also passed to its function (float32 `(C, Z, Y, X)` images,
    their properties, the `(1, Z, Y, X)` label map, then the case's args) while its arrays are in memory, so that
    a caller such as the fingerprint reads every file once; returns `{case: result}` (empty without `analysis`).
    """
    raw_dir = Path(raw_dir)
    try:
        dj = load_dataset_json(raw_dir)
    except DatasetError as e:
        raise DatasetProblems(str(raw_dir), [str(e)]) from e
    check_dataset_paths(raw_dir, dj)  # before any file is read: nothing outside the dataset folder is opened
    cn_problems, label_problems = _check_channel_names(dj), _check_labels(dj)
    problems = cn_problems + label_problems + _check_other_keys(dj)
    ending = dj.get("file_ending")
    if not (isinstance(ending, str) and ending.lower() in SUPPORTED_ENDINGS):
        # without a valid ending no file can be found: check case_groups without the case ids
        raise DatasetProblems(str(raw_dir), problems + _check_case_groups(dj, None, raw_dir))
    n_channels = None if cn_problems else len(dj["channel_names"])
    allowed = None if label_problems else label_values(dj)
    if "dataset" in dj:
        cases, file_problems, channels_ok = _collect_listed_cases(raw_dir, dj)
    else:
        cases, file_problems, channels_ok = _collect_folder_cases(raw_dir, ending, n_channels, dj.get("channel_names"))
    problems += file_problems + _check_case_groups(dj, None if cases is None else sorted(cases), raw_dir)
    n_train = dj.get("numTraining")
    if _is_int(n_train) and cases is not None and n_train != len(cases):
        found = "the 'dataset' listing holds" if "dataset" in dj else f"labelsTr holds {ending} label files for"
        problems.append(f"dataset.json: numTraining is {n_train} but {found} {len(cases)} case(s). Set numTraining to {len(cases)}.")

    fn, args, analysis_bytes = analysis if analysis is not None else (None, {}, 0)
    items = [
        (case, (case, [str(f) for f in imgs], str(label), n_channels if channels_ok[case] else None, allowed, str(raw_dir),
                fn, args.get(case)))
        for case, (imgs, label) in sorted((cases or {}).items())
    ]
    analysed: dict[str, Any] = {}
    if items:
        nproc = default_num_processes(num_processes, max(_bytes_per_case(items) or 0, analysis_bytes) or None, len(items))
        results = map_cases(_check_case, items, nproc, desc="verifying dataset")
        for case, _ in items:
            problems += results[case][0]
            if results[case][1] is not None:
                analysed[case] = results[case][1]
    if problems:
        raise DatasetProblems(str(raw_dir), problems)
    print(f"verified {raw_dir.name}: {len(items)} case(s), no problems found")
    return analysed


# ---------------------------------------------------------------- dataset.json schema


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false are not label values


def _missing(key: str, dj: DatasetJson) -> list[str]:
    hint = " (found nnU-Net v1 'modality': rename it to 'channel_names')" if key == "channel_names" and "modality" in dj else ""
    return [f"dataset.json: required key '{key}' is missing{hint}. nnU-Net v2 needs {', '.join(REQUIRED_KEYS)}."]


def _check_channel_names(dj: DatasetJson) -> list[str]:
    """channel_names must map "0".."n-1" to names."""
    if "channel_names" not in dj:
        return _missing("channel_names", dj)
    cn = dj["channel_names"]
    example = 'e.g. {"0": "T2", "1": "ADC"}'
    if not isinstance(cn, dict) or not cn:
        return [f"dataset.json: channel_names must be a non-empty object mapping channel indices to names, {example}."]
    out = []
    expected = [str(i) for i in range(len(cn))]
    if sorted(cn, key=lambda k: (len(k), k)) != expected:
        out.append(f"dataset.json: channel_names keys must be {expected} (consecutive from \"0\"), found {list(cn)}. Renumber them.")
    out += [f"dataset.json: channel_names['{k}'] is {v!r}; it must be a string, {example}." for k, v in cn.items() if not isinstance(v, str)]
    return out


def _check_labels(dj: DatasetJson) -> list[str]:
    """labels: background 0, int or list-of-int values, consecutive, ignore last, regions with regions_class_order."""
    if "labels" not in dj:
        return _missing("labels", dj)
    labels = dj["labels"]
    if not isinstance(labels, dict) or not labels:
        return ['dataset.json: labels must be a non-empty object, e.g. {"background": 0, "tumour": 1}.']
    out = []
    bg = labels.get("background")
    if "background" not in labels:
        out.append('dataset.json: labels has no "background" entry. Add "background": 0.')
    elif not (_is_int(bg) and bg == 0):
        out.append(f'dataset.json: labels["background"] is {bg!r}; it must be the integer 0.')
    plain: dict[int, str] = {}
    for name, v in labels.items():
        if _is_int(v):
            if v < 0:
                out.append(f"dataset.json: labels['{name}'] is {v}; label values must be >= 0.")
            elif v in plain:
                out.append(f"dataset.json: labels '{plain[v]}' and '{name}' both use value {v}; give each label its own value.")
            plain.setdefault(v, name)
        elif isinstance(v, list) and v and all(_is_int(i) and i >= 0 for i in v) and name not in ("background", "ignore"):
            continue  # a region: the union of these label values
        elif name != "background":
            kind = "an integer" if name == "ignore" else "an integer or a non-empty list of integers (a region)"
            out.append(f"dataset.json: labels['{name}'] is {v!r}; it must be {kind}.")
    if out:
        return out
    values = label_values(dj)
    gaps = sorted(set(range(max(values) + 1)) - set(values))
    if gaps:
        out.append(f"dataset.json: label values must be consecutive (0, 1, 2, ...); {gaps} are not declared. Renumber the labels.")
    ign = labels.get("ignore")
    if ign is not None and any(v >= ign for k, v in labels.items() if k != "ignore" for v in np.atleast_1d(v)):
        out.append(f"dataset.json: the 'ignore' label ({ign}) must have the highest value, above every other label.")
    n_regions = sum(1 for k, v in labels.items() if k not in ("background", "ignore") and v != 0 and set(np.atleast_1d(v)) != {0})
    if any(isinstance(v, list) for v in labels.values()):
        rco = dj.get("regions_class_order")
        if not (isinstance(rco, list) and all(_is_int(i) for i in rco) and len(rco) == n_regions):
            out.append(
                f"dataset.json: labels declares regions (lists of values), so regions_class_order must be a list of "
                f"{n_regions} integers (one per region, in the order of labels); found {rco!r}."
            )
    return out


def _check_other_keys(dj: DatasetJson) -> list[str]:
    """numTraining, file_ending and the optional explicit 'dataset' listing."""
    out = []
    for key in ("numTraining", "file_ending"):
        if key not in dj:
            out += _missing(key, dj)
    if "numTraining" in dj and not (_is_int(dj["numTraining"]) and dj["numTraining"] >= 0):
        out.append(f"dataset.json: numTraining is {dj['numTraining']!r}; it must be a non-negative integer (the number of training cases).")
    ending = dj.get("file_ending")
    if "file_ending" in dj and not (isinstance(ending, str) and ending.lower() in SUPPORTED_ENDINGS):
        out.append(f"dataset.json: file_ending {ending!r} is not supported. Use one of {', '.join(SUPPORTED_ENDINGS)} (with the dot).")
    listing = dj.get("dataset", {})
    if not isinstance(listing, dict):
        out.append('dataset.json: "dataset" must be an object {case: {"images": [...], "label": "..."}}.')
    out += [f"dataset.json: dataset['{case}'] must be {{\"images\": [file, ...], \"label\": file}} with paths relative to the "
            "dataset folder." for case, e in (listing.items() if isinstance(listing, dict) else ()) if not _entry_ok(e)]
    return out


def _check_case_groups(dj: DatasetJson, case_ids: list[str] | None, raw_dir: Path) -> list[str]:
    """The optional case_groups key (cross-validation groups), as the trainer will read it: at most one problem."""
    # a user's splits_final.json replaces the grouped split, so then the groups need not fill 5 folds
    n_folds = None if (raw_dir / "splits_final.json").is_file() else N_FOLDS
    try:
        read_case_groups(dj, case_ids, "dataset.json", n_folds=n_folds)
    except DatasetError as e:
        return [str(e)]
    return []


# ---------------------------------------------------------------- file listing


def _collect_folder_cases(raw_dir: Path, ending: str, n_channels: int | None, cn: Any) -> tuple[dict | None, list[str], dict]:
    """Cases from imagesTr/labelsTr: {case: (image files, label file)}, file problems, {case: channel files complete}."""
    out: list[str] = []
    images_dir, labels_dir = raw_dir / "imagesTr", raw_dir / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            out.append(f"{d.name}/: folder is missing. Put images in imagesTr/{{case}}_XXXX{ending} and labels in labelsTr/{{case}}{ending}.")
    if not labels_dir.is_dir():
        return None, out, {}
    labels = {n[: -len(ending)]: p for n, p in _files(labels_dir, ending, out)}
    images: dict[str, dict[int, Path]] = {}
    for name, p in _files(images_dir, ending, out):
        m = _CHANNEL_FILE.match(name[: -len(ending)])
        if not m:
            out.append(f"imagesTr/{name}: name does not follow {{case}}_XXXX{ending} (XXXX = 4-digit channel index, 0000 first). Rename it.")
            continue
        images.setdefault(m.group(1), {})[int(m.group(2))] = p
    for case in sorted(set(images) - set(labels)):
        files = ", ".join(p.name for p in images[case].values())
        out.append(f"case '{case}', imagesTr/{files}: no label labelsTr/{case}{ending}. Add the label, or move the images to imagesTs.")

    natural = ending.lower() in NATURAL_ENDINGS
    cases, ok = {}, {}
    for case, label in sorted(labels.items()):
        idx = images.get(case, {})
        if not idx and images_dir.is_dir():  # a missing imagesTr was reported once above
            out.append(f"case '{case}', labelsTr/{label.name}: no image files imagesTr/{case}_XXXX{ending}. Add the images or remove the label.")
        # one file per channel for volumes; a natural image file may hold 3 (RGB), so only gaps are known here
        expected = range(max(idx, default=-1) + 1) if natural or n_channels is None else range(n_channels)
        names = cn if isinstance(cn, dict) else {}
        for i in [i for i in expected if i not in idx] if idx else []:
            out.append(f"case '{case}': imagesTr/{case}_{i:04d}{ending} is missing (channel {i}, '{names.get(str(i), '?')}'). "
                       "Every case needs one file per channel declared in channel_names, numbered from 0000.")
        for i in sorted(set(idx) - set(expected)):
            out.append(f"case '{case}', imagesTr/{idx[i].name}: unexpected channel file; channel_names declares {n_channels} channel(s). "
                       "Remove the file or declare the channel in channel_names.")
        ok[case] = bool(idx) and set(idx) == set(expected)
        cases[case] = ([idx[i] for i in sorted(idx)], label)
    return cases, out, ok


def _files(folder: Path, ending: str, out: list[str]) -> list[tuple[str, Path]]:
    """Non-hidden files of `folder` with `ending`; files with another image ending are reported as problems."""
    found = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.name.endswith(ending):
            found.append((p.name, p))
        elif p.name.lower().endswith(SUPPORTED_ENDINGS):
            out.append(f"{folder.name}/{p.name}: file ending differs from file_ending '{ending}' in dataset.json, so the "
                       f"file would be ignored. Convert it to {ending} (or remove it).")
    return found


def _collect_listed_cases(raw_dir: Path, dj: DatasetJson) -> tuple[dict | None, list[str], dict]:
    """Cases from the explicit 'dataset' listing of dataset.json (malformed entries were reported already)."""
    listing = dj["dataset"] if isinstance(dj["dataset"], dict) else None
    cases = {case: ([raw_dir / i for i in e["images"]], raw_dir / e["label"]) for case, e in (listing or {}).items() if _entry_ok(e)}
    return (cases if listing is not None else None), [], {case: True for case in cases}


def _entry_ok(e: Any) -> bool:
    return isinstance(e, dict) and isinstance(e.get("images"), list) and bool(e["images"]) \
        and all(isinstance(i, str) for i in e["images"]) and isinstance(e.get("label"), str)


# ---------------------------------------------------------------- per-case checks (worker)


def _check_case(case: str, image_files: list[str], label_file: str, n_channels: int | None,
                allowed: list[int] | None, raw_dir: str, analyse: Callable[..., Any] | None = None,
                args: tuple | None = None) -> tuple[list[str], Any]:
    """All problems of one case, and `analyse(data, properties, seg, *args)` when it has none (None otherwise);
    each file is read once. Runs in a worker process."""
    problems: list[str] = []
    kept: list[np.ndarray] = []  # the channels, only while an analysis needs them

    def add(file: str, msg: str) -> None:
        problems.append(f"case '{case}', {_rel(file, raw_dir)}: {msg}")

    ref = None  # (file, spatial shape, properties) of the first readable image
    n_read, all_read = 0, True
    for f in image_files:
        got = _read(f, read_images, add)
        if got is None:
            all_read = False
            continue
        arr, props = got
        n_read += arr.shape[0]
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            add(f, f"{bad} NaN/Inf voxel(s) ({bad / arr.size:.2%} of the image). Replace them with a finite value "
                   "(e.g. the image minimum) and save the file again.")
        if ref is None:
            ref = (f, arr.shape[1:], props)
        else:
            _compare_grid(ref, (f, arr.shape[1:], props), raw_dir, add)
        if analyse is not None and args is not None:
            kept.append(arr)
        del arr
    if n_channels is not None and all_read and image_files and n_read != n_channels:
        add(image_files[0], f"the image file(s) of this case hold {n_read} channel(s) but channel_names declares {n_channels}. "
                            "Fix channel_names or the images (an RGB PNG holds 3 channels, a grey one 1).")

    got = _read(label_file, read_seg, add)
    if got is not None:
        seg, sprops = got
        if ref is not None:
            _compare_grid(ref, (label_file, seg.shape[1:], sprops), raw_dir, add)
        if allowed is not None:
            unexpected = [int(v) for v in np.unique(seg) if int(v) not in allowed]
            if unexpected:
                add(label_file, f"label value(s) {unexpected} are not declared in dataset.json labels (declared: {allowed}). "
                                "Declare them in labels or fix the label map.")
    if problems or not kept or got is None or ref is None:
        return problems, None
    return problems, analyse(np.vstack(kept), ref[2], got[0], *args)


def _read(file: str, reader: Callable, add: Callable[[str, str], None]) -> tuple[np.ndarray, dict] | None:
    """Check one file for damage and read it with `reader`; on failure record the problem(s) and return None."""
    p = Path(file)
    if not p.is_file():
        add(file, "file does not exist. Add it, or fix its name/path.")
        return None
    if p.stat().st_size == 0:
        add(file, "file is empty (0 bytes). Export it again.")
        return None
    # the readers accept many damaged files silently (truncated .nii.gz, bad checksums): report each damage found
    damage = file_problems(p)
    for msg in damage:
        add(file, _without_path(msg, p))
    if damage:
        return None
    try:
        return reader([p], check=False) if reader is read_images else reader(p, check=False)
    except DatasetError as e:
        msg = _without_path(str(e), p)
        fix = " Check that the file is complete and in the format its ending says; re-export it." if "cannot be read" in msg else ""
        add(file, msg + fix)
        return None


def _without_path(msg: str, p: Path) -> str:
    """A reader's message without its leading file path (the caller names the file relative to the dataset)."""
    for prefix in (f"{p}: ", f"{p} "):
        msg = msg[len(prefix):] if msg.startswith(prefix) else msg
    return msg


def _compare_grid(ref: tuple, other: tuple, raw_dir: str, add: Callable[[str, str], None]) -> None:
    """Record a problem when `other` is not on the voxel grid of `ref` (shape, spacing, origin, direction)."""
    (rf, rshape, rprops), (f, shape, props) = ref, other
    if tuple(shape) != tuple(rshape):
        add(f, f"shape {tuple(shape)} differs from {_rel(rf, raw_dir)} {tuple(rshape)}. All channels and the label of a case "
               "must have the same size (a transposed or 2D/3D mix-up is a common cause); re-export or resample this file.")
        return
    ga, gb = rprops["geometry"], props["geometry"]
    if ga["kind"] != "sitk" or gb["kind"] != "sitk":
        return  # natural images carry no geometry beyond their shape
    diffs = [
        f"{k} {_fmt(gb[k])} vs {_fmt(ga[k])}"
        for k in ("spacing", "origin", "direction")
        if len(ga[k]) != len(gb[k]) or not np.allclose(ga[k], gb[k], atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE)
    ]
    if diffs:
        add(f, f"geometry differs from {_rel(rf, raw_dir)} ({'; '.join(diffs)}; tolerance {GEOMETRY_TOLERANCE}). All channels and "
               "the label of a case must share one voxel grid: resample this file onto that grid, or copy the header if only it is wrong.")


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def _rel(file: str, raw_dir: str) -> str:
    """File name relative to the dataset folder (absolute when it lies outside)."""
    try:
        return str(Path(file).relative_to(raw_dir))
    except ValueError:
        return str(file)


def _bytes_per_case(items: list[tuple[str, tuple]]) -> float | None:
    """Rough peak memory of checking the largest case (by file size): its voxels x channels x float32, with copies."""
    try:
        _, (_case, imgs, *_rest) = max(items, key=lambda it: sum(Path(f).stat().st_size for f in it[1][1] if Path(f).is_file()))
        first = next(f for f in imgs if Path(f).is_file())
    except (StopIteration, ValueError, OSError):
        return None
    try:
        if first.lower().endswith(NATURAL_ENDINGS):
            with Image.open(first) as im:
                voxels = im.size[0] * im.size[1] * len(im.getbands())
        else:
            r = sitk.ImageFileReader()
            r.SetFileName(first)
            r.ReadImageInformation()
            voxels = int(np.prod(r.GetSize())) * r.GetNumberOfComponents()
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the worker; no estimate then
        return None
    # float32 per channel file plus the label, and about two temporaries while reading and checking
    return voxels * 4.0 * (len(imgs) + 1) * 3
