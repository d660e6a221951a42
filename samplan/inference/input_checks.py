"""Checks of the images given to samplan_predict: the folders, each case's files, and the problems of a run.

A bad case must not stop the good ones: `case_problems` reads only file headers (numbering, channel count,
unreadable files, 2D against 3D) before any work; reading a case for preprocessing (samplan.dataset.image_io)
refuses what only the whole file shows (NaN/Inf, truncation, channels on different grids); the predictor collects
every refusal and raises one `CaseProblems` after the good cases are written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import SimpleITK as sitk
from PIL import Image

from samplan.dataset.dataset_json import group_images_by_case
from samplan.dataset.image_io import NATURAL_ENDINGS
from samplan.errors import DatasetError, InputError, SamplanError
from samplan.inference.export import case_stem

# PIL modes of one channel; every other mode is read as RGB (see samplan.dataset.image_io)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# how many ignored file names a note shows before "..."
_SHOWN_NAMES = 8


class CaseProblems(DatasetError):
    """Cases of a prediction run that were skipped, each with its reason (the others were predicted)."""

    def __init__(self, problems: Mapping[str, str], n_cases: int, output_dir: str | Path):
        self.problems = dict(problems)
        lines = "\n".join(f"  - case '{c}': {m}" for c, m in sorted(self.problems.items()))
        done = n_cases - len(self.problems)
        where = f"the other {done} are in {output_dir}" if done else "nothing was written"
        super().__init__(f"{len(self.problems)} of {n_cases} case(s) were not predicted ({where}); fix or remove "
                         f"their files and re-run with --continue to predict only them:\n{lines}")


def check_folders(input_dir: str | Path, output_dir: str | Path) -> None:
    """InputError unless `input_dir` is a folder and `output_dir` is another folder (or does not exist yet)."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise InputError(f"input folder {input_dir} does not exist or is not a folder; check -i.")
    if output_dir.resolve() == input_dir.resolve():
        raise InputError(f"output folder {output_dir} is the input folder: the label maps would be mixed with the "
                         "images (and read as images by the next run). Choose another -o.")
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output folder {output_dir} is a file; choose another -o or remove the file.")


def list_input_cases(input_dir: str | Path, file_ending: str) -> tuple[dict[str, list[Path]], list[str]]:
    """({case: channel files}, names of the visible files without `file_ending`, which the run ignores)."""
    input_dir = Path(input_dir)
    cases = group_images_by_case(input_dir, file_ending)
    # hidden files (.DS_Store, editor backups) are never images; folders may hold earlier outputs
    ignored = sorted(p.name for p in input_dir.iterdir()
                     if not p.name.startswith(".") and not p.is_dir() and not p.name.endswith(file_ending))
    if not cases:
        other = (f" It holds {len(ignored)} other file(s) ({shown_names(ignored)}): convert them to {file_ending}."
                 if ignored else "")
        raise DatasetError(f"{input_dir} holds no images named {{case}}_{{XXXX}}{file_ending} (the file ending of the "
                           f"model's dataset).{other}")
    return cases, ignored


def shown_names(names: Sequence[str]) -> str:
    """The first few names, comma-separated, with '...' when there are more."""
    return ", ".join(names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")


def trained_on_2d(plans: Mapping[str, Any]) -> bool | None:
    """True when the model's training images were 2D (a median shape with one voxel along an axis); None when the
    plans do not tell (then input dimensions are not checked)."""
    shape = plans.get("original_median_shape_after_transp")
    return int(min(shape)) == 1 if shape else None


def case_problems(cases: Mapping[str, Sequence[str | Path]], num_channels: int,
                  trained_2d: bool | None) -> dict[str, str]:
    """{case: what is wrong} for the cases whose files, read as headers only, cannot be predicted by the model."""
    out = {}
    for case, files in cases.items():
        problem = _case_problem([Path(f) for f in files], num_channels, trained_2d)
        if problem is not None:
            out[case] = problem
    return out


def _case_problem(files: list[Path], num_channels: int, trained_2d: bool | None) -> str | None:
    names = ", ".join(f.name for f in files) or "(none)"
    expected = ("1 channel (one file, _0000)" if num_channels == 1
                else f"{num_channels} channels, one file each: _0000 ... _{num_channels - 1:04d}")
    if [case_stem(f)[-4:] for f in files] != [f"{i:04d}" for i in range(len(files))]:
        return f"channel files must be numbered _0000, _0001, ... without gaps; found {names}. The model expects {expected}."
    found = 0
    for f in files:
        try:
            channels, size = _header(f)
        except DatasetError as e:
            return str(e)
        if len(size) == 3 and min(size) > 1 and trained_2d is True:
            return (f"{f}: a 3D volume of {'x'.join(map(str, size))} voxels, but this model was trained on 2D images. "
                    "Give 2D images (one slice per file), or predict with a model trained on 3D volumes.")
        if (len(size) == 2 or min(size) == 1) and trained_2d is False:
            return (f"{f}: a 2D image of {'x'.join(map(str, size))} pixels, but this model was trained on 3D volumes. "
                    "Give the whole volume, or predict with a model trained on 2D images.")
        found += channels
    if found != num_channels:
        fix = "Add the missing channel files" if found < num_channels else "Remove the extra files"
        return f"{found} channel(s) in {names}, but the model expects {expected}. {fix}, or use a model trained on {found}."
    return None


def _header(path: Path) -> tuple[int, tuple[int, ...]]:
    """(channels, spatial size) of one input file from its header; DatasetError when it cannot be read."""
    damaged = "it is damaged, truncated or not an image; replace it with an intact copy"
    if path.name.lower().endswith(NATURAL_ENDINGS):
        try:
            with Image.open(path) as im:
                return (1 if im.mode in _GREY_MODES else 3), tuple(im.size)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path} cannot be read ({e}): {damaged}.") from e
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].replace("sitk::ERROR: ", "").replace(f' for "{path}"', "")
        raise DatasetError(f"{path} cannot be read ({reason}): {damaged}.") from e
    return int(reader.GetNumberOfComponents()), tuple(int(s) for s in reader.GetSize())


def select_part(cases: dict[str, list[Path]], part_id: int = 0, num_parts: int = 1) -> dict[str, list[Path]]:
    """The sorted cases part_id, part_id + num_parts, ... (nnU-Net's --part_id/--num_parts split)."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SamplanError(f"part {part_id} of {num_parts} does not exist; use --part-id 0..{max(num_parts, 1) - 1}.")
    return cases if num_parts == 1 else {c: cases[c] for c in sorted(cases)[part_id::num_parts]}
