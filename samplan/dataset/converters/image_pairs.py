"""Folders of 2D image/mask pairs (Kvasir-SEG, CVC-ClinicDB, ISIC 2018, ...) -> an nnU-Net 2D PNG dataset.

Published layouts, recognised under the input folder (any other pair of folders is named with `images`/`masks`):
- Kvasir-SEG: `images/{id}.jpg` + `masks/{id}.jpg` (JPEG masks, so their edges hold grey values);
- CVC-ClinicDB: `Original/{n}.tif` + `Ground Truth/{n}.tif` (the PNG redistribution uses the same folder names);
- ISIC 2018 task 1: `ISIC2018_Task1-2_Training_Input/ISIC_{id}.jpg` + `ISIC2018_Task1_Training_GroundTruth/
  ISIC_{id}_segmentation.png` (the Validation/Test folders follow the same pattern); text files beside them are ignored;
- one flat folder holding both, the mask named `{id}_segmentation` (or `_Segmentation`, `_mask`).
A mask belongs to the image of the same name, or of the same name plus one of those suffixes.

Result: `imagesTr/{case}_0000.png`, 8-bit RGB (grey and palette images are expanded to RGB, so that every case has
the same three channels R, G, B like Dataset510_KvasirSEG), and `labelsTr/{case}.png`, 0/1 grey: a mask pixel is
foreground when it is above half the mask's maximum, which binarises 0/1, 0/255, anti-aliased and JPEG-blurred
masks alike. The case id is the image file's name without its ending. `case_groups` (a pattern or {group: [ids]},
the schema of samplan.dataset.dataset_json.read_case_groups) is checked against the cases before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from samplan.dataset.converters.common import (
    check_target, resolve_output, run_per_case, staged_folder, verify_converted, visible_files,
)
from samplan.dataset.dataset_json import CASE_GROUPS_KEY, case_id_problem, read_case_groups
from samplan.dataset.integrity import file_problems, max_image_pixels
from samplan.dataset.integrity_natural import pil_pixel_limit
from samplan.errors import DatasetError, DatasetProblems, InputError
from samplan.utils import load_json, save_json

IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = ("", "_segmentation", "_Segmentation", "_mask")
# 8-bit modes PIL converts to RGB without losing values; 16-bit and float images would be cut to 8 bits
RGB_CONVERTIBLE = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"}
_WIDE_MASK_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class Layout:
    """A published folder layout: glob patterns of the image and mask folders and the name of the foreground label."""

    name: str
    images: str
    masks: str
    label: str


LAYOUTS = (
    Layout("Kvasir-SEG", "images", "masks", "polyp"),
    Layout("CVC-ClinicDB", "Original", "Ground Truth", "polyp"),
    Layout("ISIC 2018", "*_Input", "*_GroundTruth", "lesion"),
)


def find_layout(source: Path) -> tuple[Path, Path, str, str]:
    """(image folder, mask folder, layout name, label name) of a published layout under `source`; InputError if none fits."""
    for layout in LAYOUTS:
        images = sorted(p for p in source.glob(layout.images) if p.is_dir())
        masks = sorted(p for p in source.glob(layout.masks) if p.is_dir())
        if len(images) == 1 and len(masks) == 1:
            return images[0], masks[0], layout.name, layout.label
        if images and masks:
            raise InputError(f"{source} holds several {layout.name} folders ({', '.join(p.name for p in images + masks)}). "
                             "Choose one pair with --images and --masks.")
    if visible_files(source, IMAGE_ENDINGS):
        return source, source, "flat folder", "foreground"
    known = "; ".join(f"{lay.name}: {lay.images}/ + {lay.masks}/" for lay in LAYOUTS)
    raise InputError(f"{source} holds none of the known layouts ({known}; or images and *_segmentation masks in one "
                     "folder). Name the folders with --images DIR --masks DIR.")


def _by_stem(files: list[Path]) -> tuple[dict[str, Path], list[str]]:
    """{name without ending: file}, and a problem for each name that two files share (a.jpg and a.png)."""
    out: dict[str, Path] = {}
    problems = []
    for f in files:
        stem = f.name[: -len(f.suffix)]
        if stem in out:
            problems.append(f"{f} and {out[stem].name} share the name {stem!r}; keep one of them.")
        out.setdefault(stem, f)
    return out, problems


def pair_files(images_dir: Path, masks_dir: Path, mask_suffix: str | None = None) -> dict[str, tuple[Path, Path]]:
    """{case: (image, mask)}; DatasetProblems listing every image without a mask, mask without an image and ambiguity."""
    suffixes: Sequence[str] = (mask_suffix,) if mask_suffix is not None else MASK_SUFFIXES
    same = images_dir.resolve() == masks_dir.resolve()
    files, problems = _by_stem(visible_files(images_dir, IMAGE_ENDINGS))
    if same:  # one folder: a mask is a file named like another file plus a (non-empty) suffix
        suffixes = [s for s in suffixes if s] or ["_segmentation"]
        is_mask = {stem for stem in files for s in suffixes if stem.endswith(s) and stem[: -len(s)] in files}
        images = {k: v for k, v in files.items() if k not in is_mask}
        masks = {k: v for k, v in files.items() if k in is_mask}
    else:
        images = files
        masks, more = _by_stem(visible_files(masks_dir, IMAGE_ENDINGS))
        problems += more
    pairs: dict[str, tuple[Path, Path]] = {}
    for stem, image in images.items():
        found = [masks[stem + s] for s in suffixes if stem + s in masks]
        if len(found) == 1:
            pairs[stem] = (image, found[0])
        elif found:
            problems.append(f"{image}: several masks match ({', '.join(m.name for m in found)}); give --mask-suffix.")
        else:
            names = " or ".join(f"{stem}{s}.*" for s in suffixes)
            problems.append(f"{image}: no mask {names} in {masks_dir}. Add the mask or remove the image.")
        problems += filter(None, [case_id_problem(stem, f"{image}: case identifier")])
    used = {m for _, m in pairs.values()} | {m for stem in images for s in suffixes if (m := masks.get(stem + s))}
    problems += [f"{m}: no image of that name in {images_dir}. Add the image or remove the mask." for m in masks.values()
                 if m not in used]
    if problems:
        raise DatasetProblems(str(images_dir if same else images_dir.parent), problems)
    if not pairs:
        raise DatasetError(f"{images_dir} holds no {'/'.join(IMAGE_ENDINGS)} images; nothing to convert.")
    return dict(sorted(pairs.items()))


def _open(path: Path) -> Image.Image:
    """Open an image lazily (header only) under samplan's pixel limit; DatasetError naming the file if it is unreadable."""
    limit = max_image_pixels()
    try:
        with pil_pixel_limit(limit):
            return Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: image is larger than the limit of {limit} pixels ({e}); if it really is that "
                           "large, set SAMPLAN_MAX_IMAGE_PIXELS higher.") from e
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot be read as an image ({e}). Copy it again from the source.") from e


def check_pairs(pairs: dict[str, tuple[Path, Path]]) -> None:
    """From the headers only: every image can become 8-bit RGB and has its mask's size; DatasetProblems listing all."""
    problems = []
    for image, mask in pairs.values():
        try:
            with _open(image) as im, _open(mask) as m:
                if im.mode not in RGB_CONVERTIBLE:
                    problems.append(f"{image}: pixel mode {im.mode} (16-bit or float); this converter writes 8-bit RGB "
                                    "PNGs, which would cut its values. Convert the images to 8 bits first.")
                if im.size != m.size:
                    problems.append(f"{image} is {im.size[0]} x {im.size[1]} pixels but its mask {mask} is {m.size[0]} x "
                                    f"{m.size[1]}; an image and its mask must have the same size. Fix or remove the pair.")
        except DatasetError as e:
            problems.append(str(e))
    if problems:
        raise DatasetProblems(str(next(iter(pairs.values()))[0].parent), problems)


def binarise(mask: np.ndarray) -> np.ndarray:
    """0/1 uint8 mask: pixels above half the mask's maximum are foreground (an all-zero mask stays empty)."""
    peak = float(mask.max(initial=0))
    if peak <= 0:
        return np.zeros(mask.shape, np.uint8)
    return (mask > peak / 2).astype(np.uint8)


def _load(path: Path) -> Image.Image:
    """Decode a whole image after the damage check (PIL decodes some truncated files without complaint)."""
    if problems := file_problems(path):
        raise DatasetError(f"{path}: " + " Also: ".join(problems))
    im = _open(path)
    try:
        im.load()
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot be decoded ({e}). Copy it again from the source.") from e
    return im


def mask_values(im: Image.Image) -> np.ndarray:
    """(H, W) intensities of a mask: 16-bit/float values as stored, everything else as 8-bit grey (colour -> luminance)."""
    return np.asarray(im) if im.mode in _WIDE_MASK_MODES else np.asarray(im.convert("L"))


def _convert_pair(image: str, mask: str, images_out: str, labels_out: str, case: str) -> int:
    """Worker: write one case's RGB PNG and 0/1 mask PNG; returns its number of foreground pixels."""
    with _load(Path(image)) as im, _load(Path(mask)) as m:
        if im.size != m.size:  # checked from the headers already; the decoded sizes are what is written
            raise DatasetError(f"{image} is {im.size[0]} x {im.size[1]} pixels but its mask {mask} is {m.size[0]} x "
                               f"{m.size[1]}; an image and its mask must have the same size. Fix or remove the pair.")
        im.convert("RGB").save(Path(images_out) / f"{case}_0000.png", format="PNG")
        binary = binarise(mask_values(m))
    Image.fromarray(binary).save(Path(labels_out) / f"{case}.png", format="PNG")
    return int(binary.sum())


def read_groups_option(value: str, case_ids: list[str]) -> str | dict[str, Any]:
    """`--case-groups`: a regular expression, or a JSON file {group: [case ids]}; checked like dataset.json's key."""
    groups: str | dict[str, Any] = value
    if value.lower().endswith(".json") and Path(value).is_file():
        try:
            groups = load_json(value)
        except ValueError as e:
            raise InputError(f"--case-groups {value}: not valid JSON ({e}).") from None
    read_case_groups({CASE_GROUPS_KEY: groups}, case_ids, source=f"--case-groups {value}")
    return groups


def convert_image_pairs(source: str | Path, output: str, images: str | None = None, masks: str | None = None,
                        mask_suffix: str | None = None, label_name: str | None = None, case_groups: str | None = None,
                        num_processes: int | None = None, overwrite: bool = False) -> Path:
    """Convert image/mask folders into the dataset `output` (a DatasetXXX_Name in SAMPLAN_RAW, or a path); return it."""
    source = Path(source).expanduser().absolute()
    if not source.is_dir():
        raise InputError(f"{source} is not a folder; give the folder that holds the images and masks.")
    if (images is None) != (masks is None):
        raise InputError("give both --images and --masks, or neither (a known layout is then found under -i).")
    if images is not None:
        images_dir, masks_dir, layout, label = source / images, source / masks, "image/mask folders", "foreground"
        for d in (images_dir, masks_dir):
            if not d.is_dir():
                raise InputError(f"{d} is not a folder; --images and --masks name folders inside -i (or absolute paths).")
    else:
        images_dir, masks_dir, layout, label = find_layout(source)
    target = resolve_output(output)
    check_target(target, overwrite, [source])
    pairs = pair_files(images_dir, masks_dir, mask_suffix)
    groups = read_groups_option(case_groups, list(pairs)) if case_groups else None
    check_pairs(pairs)
    dataset_json: dict[str, Any] = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, label_name or label: 1},
        "numTraining": len(pairs),
        "file_ending": ".png",
        "name": target.name,
        "description": f"{layout} ({images_dir.name}/, {masks_dir.name}/) converted by samplan_convert_2d",
    }
    if groups is not None:
        dataset_json[CASE_GROUPS_KEY] = groups
    with staged_folder(target, overwrite, sources=[source]) as out:
        (out / "imagesTr").mkdir()
        (out / "labelsTr").mkdir()
        items = [(case, (str(img), str(msk), str(out / "imagesTr"), str(out / "labelsTr"), case))
                 for case, (img, msk) in pairs.items()]
        foreground = run_per_case(_convert_pair, items, num_processes, f"converting {source.name}")
        save_json(dataset_json, out / "dataset.json")
        verify_converted(out, target, source, num_processes)
    empty = sum(1 for n in foreground.values() if n == 0)
    if empty:
        print(f"note: {empty} of {len(pairs)} mask(s) are empty (no foreground pixel)")
    return target
