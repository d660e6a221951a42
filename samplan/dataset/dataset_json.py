"""dataset.json (nnU-Net v2 schema): loading, label/region helpers and the list of training cases.

A dataset or an input folder may come from someone else, so the names and paths in it are checked before any
file is read (each refusal is a DatasetError naming the entry, why, and the fix):

- A case identifier becomes a file name (`{case}{file_ending}` predictions, cache files), so it must be a plain
  name: not empty, no "/", "\\" or NUL, not "." or "..". (".." inside a longer name is harmless once separators
  are refused, and such names exist.)
- Paths of the optional "dataset" listing are relative to the dataset folder: absolute paths and ".." parts
  are refused.
- Symlinks in a dataset folder (listed files, imagesTr/, labelsTr/ and the files in them) may point anywhere
  inside the dataset folder (itself resolved, so a linked dataset folder works), never outside it: a received
  dataset could otherwise make samplan read, and bake into a model, any file the user can read.
- A prediction input folder is the user's own choice of files, and linking instead of copying is a normal way
  to pick cases: its links may point anywhere, but each entry must lead to a regular file (a broken link, a
  directory, a device such as /dev/zero or a FIFO is refused: reading one would fail late or never end).
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Sequence

from samplan.errors import DatasetError, DatasetProblems, SamplanError
from samplan.utils import load_json

DatasetJson = dict[str, Any]
# case id -> {"images": [channel files in channel order], "label": label file}
CaseFiles = dict[str, dict[str, Any]]

CASE_GROUPS_KEY = "case_groups"
N_FOLDS = 5  # nnU-Net's cross-validation folds (samplan.training.splits.N_SPLITS is this number)
CASE_GROUPS_FORMS = ('a regular expression string whose first capture group (or whole match) names the group, e.g. '
                     '"(seq\\\\d+)_" (backslashes doubled in JSON), or an object mapping group names to lists of case ids')


def load_dataset_json(raw_dir: str | Path) -> DatasetJson:
    """Read `raw_dir/dataset.json`; raise DatasetError naming the file if it is missing or not JSON."""
    path = Path(raw_dir) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path} does not exist. Every raw dataset needs a dataset.json (nnU-Net v2 format).")
    try:
        data = load_json(path)
    except ValueError as e:  # JSONDecodeError, or bytes that are no text encoding
        line = f" Fix the syntax at line {e.lineno}." if hasattr(e, "lineno") else " Save it as UTF-8 JSON."
        raise DatasetError(f"{path} is not valid JSON ({e}).{line}") from e
    except SamplanError as e:  # too large or too deeply nested: a dataset error, exit code 2
        raise DatasetError(str(e)) from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def num_channels(dataset_json: DatasetJson) -> int:
    """Number of input channels declared in `channel_names`."""
    return len(dataset_json["channel_names"])


def channel_names(dataset_json: DatasetJson) -> list[str]:
    """Channel names in channel order ("0", "1", ...)."""
    cn = dataset_json["channel_names"]
    return [cn[k] for k in sorted(cn, key=int)]


def uses_regions(dataset_json: DatasetJson) -> bool:
    """True when any label is declared as a list of values (region-based training, e.g. BraTS WT/TC/ET)."""
    return any(isinstance(v, (list, tuple)) for v in dataset_json["labels"].values())


def ignore_label(dataset_json: DatasetJson) -> int | None:
    """The value of the `ignore` label, if declared."""
    v = dataset_json["labels"].get("ignore")
    return int(v) if v is not None and not isinstance(v, (list, tuple)) else None


def label_values(dataset_json: DatasetJson) -> list[int]:
    """Every integer value that may appear in a label file (background included), sorted."""
    values: set[int] = set()
    for v in dataset_json["labels"].values():
        if isinstance(v, (list, tuple)):
            values.update(int(i) for i in v)
        else:
            values.add(int(v))
    return sorted(values)


def foreground_labels(dataset_json: DatasetJson) -> list[int]:
    """Label values that are foreground (not background, not ignore), sorted."""
    ign = ignore_label(dataset_json)
    return [v for v in label_values(dataset_json) if v != 0 and v != ign]


def regions(dataset_json: DatasetJson) -> list[tuple[int, ...]]:
    """Foreground regions in `regions_class_order`; plain labels become one-value regions."""
    out = []
    for name, v in dataset_json["labels"].items():
        if name in ("background", "ignore"):
            continue
        out.append(tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else (int(v),))
    return out


def list_training_cases(raw_dir: str | Path, dataset_json: DatasetJson) -> CaseFiles:
    """Map each training case id to its channel files and label file (paths may not exist: verify checks)."""
    raw_dir = Path(raw_dir)
    ending = dataset_json["file_ending"]
    check_dataset_paths(raw_dir, dataset_json)
    if "dataset" in dataset_json:  # explicit listing, paths relative to the dataset folder
        return {
            case: {"images": [raw_dir / p for p in entry["images"]], "label": raw_dir / entry["label"]}
            for case, entry in sorted(dataset_json["dataset"].items())
        }
    labels_dir = raw_dir / "labelsTr"
    cases = sorted(p.name[: -len(ending)] for p in labels_dir.glob(f"*{ending}") if not p.name.startswith("."))
    images = _channel_files(raw_dir / "imagesTr", ending)
    # an RGB PNG holds three channels in one file, so the file count is what is on disk, not len(channel_names)
    return {case: {"images": images.get(case, []), "label": labels_dir / f"{case}{ending}"} for case in cases}


def _channel_files(folder: Path, file_ending: str) -> dict[str, list[Path]]:
    """Group `{case}_{XXXX}{ending}` files of `folder` by case id, sorted by channel index."""
    groups: dict[str, list[Path]] = {}
    for p in sorted(folder.glob(f"*{file_ending}")):
        stem = p.name[: -len(file_ending)]
        if len(stem) >= 6 and stem[-5] == "_" and stem[-4:].isdigit():
            groups.setdefault(stem[:-5], []).append(p)
    return groups


def group_images_by_case(folder: str | Path, file_ending: str) -> dict[str, list[Path]]:
    """Group the `{case}_{XXXX}{ending}` files of a prediction input folder by case id, channels in order.

    DatasetError for a misnamed file, an unsafe case id, or an entry that is not (a link to) a regular file.
    """
    folder = Path(folder)
    groups = _channel_files(folder, file_ending)
    stray = [p for p in folder.glob(f"*{file_ending}") if p not in {f for fs in groups.values() for f in fs}]
    if stray:
        raise DatasetError(
            f"{stray[0]}: input files must be named {{case}}_{{XXXX}}{file_ending} (XXXX = 4-digit channel index)."
        )
    for case, files in groups.items():
        problem = case_id_problem(case, f"{files[0]}: case identifier", file_ending)
        if problem is None:
            problem = next((q for q in map(_input_file_problem, files) if q is not None), None)
        if problem is not None:
            raise DatasetError(problem)
    return groups


def case_id_problem(case: Any, where: str, file_ending: str = "") -> str | None:
    """Why `case` cannot be a case identifier (it becomes the file name `{case}{file_ending}`), or None."""
    if isinstance(case, str) and case not in ("", ".", "..") and not any(c in case for c in "/\\\0"):
        return None
    return (f"{where} {case!r} cannot name a case: case identifiers become file names (here {str(case) + file_ending!r}), "
            'so they must be non-empty, without "/", "\\" or NUL, and not "." or "..". Rename the case.')


def _input_file_problem(p: Path) -> str | None:
    """Why the prediction input `p` cannot be read as an image (links may point anywhere), or None."""
    if p.is_file():
        return None
    link = f" (a link to {os.readlink(p)})" if p.is_symlink() else ""
    what = "does not exist" if p.is_symlink() and not p.exists() else "is not a regular file (a directory, device or FIFO)"
    return f"{p}{link} {what}. Input images must be regular files, or links to them; replace it or fix the link."


def unsafe_path_problems(raw_dir: str | Path, dataset_json: DatasetJson) -> list[str]:
    """Every case id and training file path of a dataset folder that would reach outside it (see the module docstring).

    Malformed entries are skipped (verify reports them); nothing is read but directory listings and links.
    """
    raw_dir = Path(raw_dir)
    root = Path(os.path.realpath(raw_dir))
    ending = dataset_json.get("file_ending")
    ending = ending if isinstance(ending, str) and ending else None
    listing = dataset_json.get("dataset")
    if "dataset" in dataset_json:
        return _listing_problems(raw_dir, root, listing) if isinstance(listing, dict) else []
    out: list[str] = []
    for sub in ("imagesTr", "labelsTr"):
        folder = raw_dir / sub
        if not folder.is_dir() or ending is None:
            continue
        if not _inside(folder, root):
            out.append(f"{sub}/ is a link to {os.path.realpath(folder)}, outside the dataset folder {root}; samplan reads "
                       f"training files only from inside it. Put the real {sub} folder in the dataset folder.")
            continue
        for p in sorted(folder.glob(f"*{ending}")):
            if p.name.startswith("."):
                continue
            if not _inside(p, root):
                out.append(_outside(f"{sub}/{p.name}", p, root))
            if sub == "labelsTr":
                out += filter(None, [case_id_problem(p.name[: -len(ending)], f"labelsTr/{p.name}: case identifier", ending)])
    return out


def check_dataset_paths(raw_dir: str | Path, dataset_json: DatasetJson) -> None:
    """Raise DatasetProblems listing `unsafe_path_problems` (call it before reading any file of the dataset)."""
    problems = unsafe_path_problems(raw_dir, dataset_json)
    if problems:
        raise DatasetProblems(str(raw_dir), problems)


def _listing_problems(raw_dir: Path, root: Path, listing: dict[str, Any]) -> list[str]:
    """Unsafe case ids and paths of the "dataset" listing {case: {"images": [...], "label": ...}}."""
    out: list[str] = []
    for case, entry in listing.items():
        where = f"dataset.json: dataset[{case!r}]"
        out += filter(None, [case_id_problem(case, 'dataset.json: "dataset" key')])
        if not isinstance(entry, dict):
            continue
        images = entry.get("images") if isinstance(entry.get("images"), list) else []
        fields = [(f"images[{i}]", v) for i, v in enumerate(images)] + [("label", entry.get("label"))]
        for field, rel in fields:
            if not isinstance(rel, str):
                continue
            parts = re.split(r"[/\\]", rel)
            if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
                out.append(f"{where}.{field} {rel!r} is an absolute path; listing paths are relative to the dataset "
                           f"folder {root}. Copy the file into the folder and write its path from there, e.g. "
                           f"\"imagesTr/{parts[-1]}\".")
            elif ".." in parts:
                out.append(f"{where}.{field} {rel!r} climbs out with \"..\"; listing paths must stay inside the dataset "
                           f"folder {root}. Write the path from the dataset folder without \"..\" (move the file in first).")
            elif not _inside(raw_dir / rel, root):
                out.append(_outside(f"{where}.{field} {rel!r}", raw_dir / rel, root))
    return out


def _inside(p: Path, root: Path) -> bool:
    """True when `p`, with every link followed, lies in `root` (a resolved folder)."""
    return Path(os.path.realpath(p)).is_relative_to(root)


def _outside(what: str, p: Path, root: Path) -> str:
    return (f"{what} is a link to {os.path.realpath(p)}, outside the dataset folder {root}; samplan reads training files "
            "only from inside it. Copy the file into the dataset folder in place of the link.")


def read_case_groups(dataset_json: DatasetJson, case_ids: Sequence[str] | None, source: str | Path = "dataset.json",
                     n_folds: int | None = N_FOLDS) -> dict[str, str] | None:
    """Group name of each case in `case_ids` from the optional "case_groups" key (None when absent); DatasetError if bad.

    `case_ids` None checks only the value itself; `n_folds` None skips the check that the groups can fill that many
    folds (a user's splits_final.json is used then, so the groups never split anything).
    """
    if CASE_GROUPS_KEY not in dataset_json:
        return None
    value = dataset_json[CASE_GROUPS_KEY]
    where = f"{source}: {CASE_GROUPS_KEY}"
    if isinstance(value, str):
        groups = _groups_from_pattern(value, case_ids or [], where)
    elif isinstance(value, dict):
        groups = _groups_from_mapping(value, case_ids, where)
    else:
        raise DatasetError(f"{where} is {type(value).__name__} {value!r}; it must be {CASE_GROUPS_FORMS}. "
                           f"Fix the value, or remove the key to split case by case.")
    if case_ids is not None and n_folds is not None and len(set(groups.values())) < n_folds:
        raise DatasetError(f"{where} puts the {len(case_ids)} training case(s) into {len(set(groups.values()))} group(s), "
                           f"fewer than the {n_folds} cross-validation folds. Use finer groups, remove the key, or put "
                           "your own splits_final.json beside dataset.json.")
    return groups


def pattern_groups(pattern: str, case_ids: Sequence[str]) -> dict[str, str]:
    """re.match each id: the first capture group, else the whole match; no match (or an empty name) is a group of its
    own. An invalid pattern raises re.error."""
    rx = re.compile(pattern)
    out = {}
    for c in case_ids:
        m = rx.match(c)
        name = (m.group(1) if rx.groups else m.group(0)) if m else None
        # an optional capture group that took no part, or an empty match, would lump unrelated cases together
        out[c] = name or c
    return out


def _groups_from_pattern(pattern: str, case_ids: Sequence[str], where: str) -> dict[str, str]:
    """`pattern_groups`, with dataset.json's errors."""
    if not pattern:
        raise DatasetError(f"{where} is an empty string; it must be {CASE_GROUPS_FORMS}.")
    try:
        return pattern_groups(pattern, case_ids)
    except re.error as e:
        raise DatasetError(f"{where} {pattern!r} is not a valid regular expression ({e}). Fix it (in JSON a "
                           'backslash is written twice, e.g. "(seq\\\\d+)_"), or remove the key.') from None


def _groups_from_mapping(mapping: dict[str, Any], case_ids: Sequence[str] | None, where: str) -> dict[str, str]:
    """Invert {group: [case ids]}: every listed case must exist and be in one group; unlisted cases are their own group."""
    owner: dict[str, str] = {}
    for g, members in mapping.items():
        if not (isinstance(members, list) and all(isinstance(c, str) for c in members)):
            raise DatasetError(f'{where}["{g}"] is {members!r}; each group must be a list of case ids (strings), '
                               f'e.g. {{"{g}": ["case_001", "case_002"]}}.')
        for c in members:
            if owner.get(c, g) != g:
                raise DatasetError(f'{where}: case "{c}" is in both group "{owner[c]}" and group "{g}"; a case belongs '
                                   "to one group. Remove it from one of them.")
            owner[c] = g
    if case_ids is None:
        return owner
    unknown = sorted(set(owner) - set(case_ids))
    if unknown:
        listed = ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise DatasetError(f"{where} names {len(unknown)} case(s) that are not training cases: {listed}. Correct the "
                           "ids (case ids have no channel suffix or file ending) or remove them.")
    return {c: owner.get(c, c) for c in case_ids}
