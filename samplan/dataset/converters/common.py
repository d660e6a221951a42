"""What the converters share: where the output goes, writing a folder atomically, verifying a converted dataset, and
reading, comparing, resampling and relabelling the volumes of a case."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from glob import escape as glob_escape
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import SimpleITK as sitk

from samplan.dataset.dataset_json import N_FOLDS, pattern_groups
from samplan.dataset.integrity import file_problems, too_large
from samplan.dataset.verify import GEOMETRY_TOLERANCE, verify_dataset
from samplan.disk_space import disk_full_guard
from samplan.errors import DatasetError, DatasetProblems, InputError
from samplan.locks import exclusive_lock
from samplan.parallel import default_num_processes, map_cases
from samplan.paths import preprocessed_root, raw_root, results_root

R = TypeVar("R")

# the names samplan's dataset lookup accepts (samplan.paths), kept to characters that are safe in every shell and
# filesystem, since the name becomes a folder and is typed as `-d` on the command line
DATASET_NAME = re.compile(r"^Dataset(\d{3})_([A-Za-z0-9][A-Za-z0-9_.+-]*)$")
_ANY_DATASET = re.compile(r"^Dataset(\d{3})_")
_STAGING_SUFFIX = ".converting"


def visible_files(folder: Path, endings: Sequence[str]) -> list[Path]:
    """Files of `folder` whose name ends with one of `endings` (any case), sorted; hidden files are skipped.

    Hidden files include the macOS AppleDouble `._name.nii.gz` files that the MSD tarballs contain: they carry the
    image ending but hold only Finder metadata.
    """
    lowered = tuple(e.lower() for e in endings)
    return sorted(p for p in Path(folder).iterdir()
                  if not p.name.startswith(".") and p.name.lower().endswith(lowered) and p.is_file())


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """`DatasetXXX_Name` for an id in 1..999; InputError when the id or the name cannot make such a folder name."""
    if not 1 <= dataset_id <= 999:
        raise InputError(f"dataset id {dataset_id} is outside 1..999; nnU-Net and samplan number datasets with 3 digits. "
                         "Choose another id with -d.")
    full = f"Dataset{dataset_id:03d}_{name}"
    if not DATASET_NAME.match(full):
        raise InputError(f"{full!r} cannot be a dataset folder name: after DatasetXXX_ use letters, digits and _ . + - "
                         "only, starting with a letter or digit. Rename the source folder (or choose another name).")
    return full


def check_dataset_id_free(name: str) -> None:
    """InputError when a dataset with another name but the same id as `name` exists in SAMPLAN_RAW/_PREPROCESSED/_RESULTS.

    Two folders with one id make `-d ID` ambiguous for every later command, so the conversion is refused before it starts.
    """
    m = DATASET_NAME.match(name)
    if m is None:
        return
    taken = set()
    for root in (raw_root(), preprocessed_root(), results_root()):
        if root.is_dir():
            taken.update(p.name for p in root.iterdir()
                         if p.is_dir() and p.name != name and (o := _ANY_DATASET.match(p.name)) and o.group(1) == m.group(1))
    if taken:
        raise InputError(f"dataset id {m.group(1)} is taken by {', '.join(sorted(taken))} (in SAMPLAN_RAW, _PREPROCESSED or "
                         f"_RESULTS), so `-d {int(m.group(1))}` would become ambiguous. Choose a free id for {name}.")


def resolve_output(spec: str) -> Path:
    """`-o NAME_OR_DIR`: a bare `DatasetXXX_Name` goes into SAMPLAN_RAW; anything that looks like a path is used as is."""
    if "/" in spec or os.sep in spec or spec.startswith((".", "~")):
        return Path(spec).expanduser().absolute()
    if not DATASET_NAME.match(spec):
        raise InputError(f"-o {spec!r} is neither a dataset name of the form DatasetXXX_Name (e.g. Dataset510_KvasirSEG, "
                         f"written into SAMPLAN_RAW) nor a path (e.g. ./{spec}). Give one of them.")
    check_dataset_id_free(spec)
    return raw_root() / spec


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise InputError(f"{target} exists already. Choose another output, move it away, or pass --overwrite to "
                         "replace it (it is replaced only once the new one is complete).")
    if target.is_symlink() or not target.is_dir():
        raise InputError(f"{target} exists and is not a folder; --overwrite replaces folders only. Move it away.")


def _refuse_overlap(target: Path, sources: Sequence[Path]) -> None:
    """The output must not be, or contain, an input: replacing it would delete the input."""
    real_target = Path(os.path.realpath(target))
    for s in sources:
        real = Path(os.path.realpath(s))
        if real == real_target or real.is_relative_to(real_target):
            raise InputError(f"the output {target} is, or contains, the input {s}; writing it would replace the input. "
                             "Choose an output folder outside the input.")


def check_target(target: str | Path, overwrite: bool = False, sources: Sequence[Path] = ()) -> None:
    """InputError when `target` exists (unless `overwrite`) or is, or contains, one of `sources` (call it before slow
    work; `staged_folder` checks again)."""
    target = Path(target).expanduser().absolute()
    _refuse_overlap(target, sources)
    _refuse_existing(target, overwrite)


@contextmanager
def staged_folder(target: str | Path, overwrite: bool = False, sources: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield an empty folder named like `target` to write into; it becomes `target` only when the block succeeds.

    The staging folder lies beside `target` (one filesystem, so the final rename is atomic) and is deleted on any
    failure. An existing `target` is refused unless `overwrite`, and then replaced only after the new folder is
    complete. A lock per target keeps two runs apart and lets a run delete the staging folders killed runs left.
    """
    target = Path(target).expanduser().absolute()
    check_target(target, overwrite, sources)
    parent = target.parent
    with disk_full_guard(parent, detail=f" while creating {parent}"):
        parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(parent / f".{target.name}.convert.lock", f"converting into {target}"):
        for stale in parent.glob(f".{glob_escape(target.name)}.*{_STAGING_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
        with disk_full_guard(parent, detail=f" while creating a staging folder for {target.name}"):
            stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_STAGING_SUFFIX, dir=parent))
        try:
            out = stage / target.name
            out.mkdir()
            with disk_full_guard(parent, detail=f" while writing {target.name} (nothing of it was kept)"):
                yield out
            _refuse_existing(target, overwrite)  # another program may have created it meanwhile
            _move_into_place(out, target, stage)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _move_into_place(out: Path, target: Path, stage: Path) -> None:
    """Rename `out` onto `target`; an old `target` is moved into `stage` first (deleted with it) and restored on failure."""
    if not target.exists():
        os.rename(out, target)
        return
    previous = stage / ".previous"
    os.rename(target, previous)
    try:
        os.rename(out, target)
    except OSError:
        os.rename(previous, target)
        raise


def verify_converted(staged: Path, target: Path, source: Path, num_processes: int | None = None) -> None:
    """samplan's dataset verification of a staged conversion; problems are re-raised naming `target` and `source`."""
    try:
        verify_dataset(staged, num_processes=num_processes)
    except DatasetProblems as e:
        raise DatasetProblems(f"{target} (converted from {source})", e.problems) from None


def run_per_case(fn: Callable[..., R], items: list[tuple[str, tuple]], num_processes: int | None, desc: str,
                 bytes_per_case: float | None = None) -> dict[str, R]:
    """`fn(*args)` for every `(case, args)` item in worker processes bounded by cores and free memory."""
    n = default_num_processes(num_processes, bytes_per_case, len(items))
    return map_cases(fn, items, n, desc=desc)


def output_folder(output: str | None, dataset_id: int | None, default_id: int, name: str) -> Path:
    """The folder a converter writes: `-o` (a DatasetXXX_Name in SAMPLAN_RAW, or a path) when given, else
    `$SAMPLAN_RAW/DatasetXXX_{name}` with `dataset_id` (default `default_id`); InputError for both or a taken id."""
    if output is not None:
        if dataset_id is not None:
            raise InputError(f"give either -d {dataset_id} or -o {output}, not both (-o names the whole output folder).")
        return resolve_output(output)
    full = dataset_folder_name(default_id if dataset_id is None else dataset_id, name)
    check_dataset_id_free(full)
    return raw_root() / full


def useful_case_groups(pattern: str, case_ids: Sequence[str]) -> str | None:
    """`pattern` for dataset.json's case_groups when it joins some cases (two studies of one patient) and still leaves
    the groups cross-validation needs; None when every case is its own group or too few groups remain."""
    n_groups = len(set(pattern_groups(pattern, case_ids).values()))
    return pattern if N_FOLDS <= n_groups < len(case_ids) else None


# ------------------------------------------------------------------ volumes of a case (SimpleITK)


def read_volume(path: Path) -> sitk.Image:
    """A 3D one-channel image read with SimpleITK after samplan's damage and size checks; DatasetError naming the file."""
    if problems := file_problems(path):
        raise DatasetError(" Also: ".join(problems))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        one = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
        # refuse an absurd header before ITK allocates it
        if msg := too_large(int(np.prod(reader.GetSize(), dtype=np.int64)) * sitk.GetArrayViewFromImage(one).nbytes,
                            "its header"):
            raise DatasetError(f"{path}: {msg}")
        image = reader.Execute()
    except RuntimeError as e:
        raise DatasetError(f"{path}: cannot be read by SimpleITK ({str(e).strip().splitlines()[-1]}). Copy it again "
                           "from the source.") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DatasetError(f"{path}: a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} value(s) "
                           "per voxel; a 3D volume with one value per voxel was expected. Check that it is the right file.")
    return image


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def grid_difference(image: sitk.Image, reference: sitk.Image) -> str | None:
    """What differs between the voxel grids of two images ("size 64x64x12 vs 32x32x8; spacing ..."), or None when they
    agree within the tolerance samplan's dataset verification applies."""
    if image.GetSize() != reference.GetSize():
        return f"size {'x'.join(map(str, image.GetSize()))} vs {'x'.join(map(str, reference.GetSize()))}"
    diffs = [f"{name} {_fmt(get(image))} vs {_fmt(get(reference))}"
             for name, get in (("spacing", sitk.Image.GetSpacing), ("origin", sitk.Image.GetOrigin),
                               ("direction", sitk.Image.GetDirection))
             if not np.allclose(get(image), get(reference), atol=GEOMETRY_TOLERANCE, rtol=GEOMETRY_TOLERANCE)]
    return "; ".join(diffs) or None


def onto_grid(image: sitk.Image, reference: sitk.Image, interpolator: int, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
    """`image` resampled onto the voxel grid of `reference` through physical space (no registration, identity transform),
    as `pixel_type`; voxels of `reference` outside `image` become 0."""
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0, pixel_type)


def relabel(image: sitk.Image, mapping: dict[int, int], path: Path, expected: str) -> sitk.Image:
    """uint8 label image (same geometry) with each value v replaced by mapping[v]; DatasetError naming `path` when it
    holds a value outside `mapping` or a non-integer one (`expected` says which values its layout uses)."""
    arr = sitk.GetArrayViewFromImage(image)
    values = np.unique(arr)
    bad = [v.item() for v in values if v != np.round(v) or int(v) not in mapping]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
        raise DatasetError(f"{path}: label value(s) {shown} found; {expected}. Check that it is the right file of the "
                           "published layout, or fix it.")
    out = np.zeros(arr.shape, np.uint8)
    for old, new in mapping.items():
        if new:
            out[arr == old] = new
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def write_volume(image: sitk.Image, dst: Path, source: Path | None = None) -> None:
    """Write `image` as a compressed file; a `source` that is already .nii.gz is copied byte for byte instead (its header
    stays exactly as published)."""
    if source is not None and source.name.lower().endswith(".nii.gz"):
        shutil.copyfile(source, dst)
    else:
        sitk.WriteImage(image, str(dst), useCompression=True)
