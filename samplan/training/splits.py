"""Cross-validation splits: `splits_final.json` in nnU-Net's format, created once and then read.

Format (nnU-Net's): `[{"train": [case ids], "val": [case ids]}, ...]`, one entry per fold.

Where the splits come from, first match wins:
1. the user's `splits_final.json` in the raw dataset folder (`SAMPLAN_RAW/<dataset>/`; the planner
   also copies it into the preprocessed folder). It is validated: every case it names must exist.
2. an existing `splits_final.json` in the preprocessed dataset folder (one samplan wrote earlier, or
   one the user put there).
3. a new split, saved there: nnU-Net's KFold(5, shuffle=True, random_state=12345) over the sorted case
   ids, reproduced exactly without scikit-learn (numpy's RandomState shuffle, then consecutive
   folds of n // 5 cases with the first n % 5 folds one case larger).

Grouped splitting (off by default): datasets whose cases come in near-duplicate groups (several frames
of one video, several scans of one patient) leak between folds under a case-wise split. The optional
`case_groups` key of dataset.json names the groups (read and checked by
samplan.dataset.dataset_json.read_case_groups): either a regular expression whose first capture group (or
whole match when it has none), applied with `re.match` to a case id, names the case's group, or an object
{group: [case ids]}; a case the pattern does not match, or the object does not list, forms its own group.
Here `groups` is that pattern or the resulting {case: group} mapping. Groups are then split like
scikit-learn's GroupKFold(5, shuffle=True, random_state=12345): the sorted group names are shuffled and
cut into 5 consecutive, nearly equal runs of groups, and a fold's validation cases are those of its
groups. Example, CVC-ClinicDB (`seq01_frame001`, ...): `"case_groups": "(seq\\\\d+)_"` in dataset.json,
`groups=r"(seq\\d+)_"` here. Without groups the split is nnU-Net's KFold above, unchanged.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from samplan.dataset.dataset_json import N_FOLDS, pattern_groups
from samplan.errors import DatasetError, SamplanError
from samplan.paths import raw_root
from samplan.utils import load_json, save_json

SPLITS_FILE = "splits_final.json"
N_SPLITS = N_FOLDS  # nnU-Net's 5 folds, one number for dataset.json's checks and the splits
SEED = 12345

Splits = list[dict[str, list[str]]]


def kfold_splits(case_ids: Sequence[str], n_splits: int = N_SPLITS, seed: int = SEED) -> Splits:
    """nnU-Net's split: KFold(n_splits, shuffle=True, random_state=seed) over the sorted ids (same result as sklearn).

    Both lists are in sorted order, as sklearn's boolean-mask indices give them.
    """
    ids = sorted(case_ids)
    n = len(ids)
    if n < n_splits:
        raise SamplanError(f"cannot make {n_splits} cross-validation folds from {n} cases; use fold 'all' "
                           f"or provide your own {SPLITS_FILE}")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = [n // n_splits + (1 if k < n % n_splits else 0) for k in range(n_splits)]
    splits, start = [], 0
    for size in sizes:
        val_idx = order[start:start + size]
        in_val = np.zeros(n, bool)
        in_val[val_idx] = True
        splits.append({"train": [ids[i] for i in np.flatnonzero(~in_val)], "val": [ids[i] for i in np.flatnonzero(in_val)]})
        start += size
    return splits


def case_groups(case_ids: Sequence[str], group_pattern: str) -> list[str]:
    """Group name of each case: the first capture group (or the whole match) of `group_pattern`, else the id itself."""
    try:
        groups = pattern_groups(group_pattern, case_ids)
    except re.error as e:
        raise SamplanError(f"invalid split group pattern {group_pattern!r}: {e}") from None
    return [groups[c] for c in case_ids]


def grouped_splits(case_ids: Sequence[str], groups: str | Mapping[str, str], n_splits: int = N_SPLITS,
                   seed: int = SEED) -> Splits:
    """Splits that never put two cases of one group in different folds (same result as sklearn's shuffled GroupKFold).

    `groups`: a group pattern (see `case_groups`) or a {case: group} mapping (an unlisted case is its own group).
    """
    ids = sorted(case_ids)
    names = case_groups(ids, groups) if isinstance(groups, str) else [groups.get(c, c) for c in ids]
    group_of = np.array(names)
    unique = np.unique(group_of)
    if len(unique) < n_splits:
        what = f"group pattern {groups!r}" if isinstance(groups, str) else "the case groups"
        raise SamplanError(f"{what} gives {len(unique)} groups, fewer than {n_splits} folds")
    shuffled = unique[np.random.RandomState(seed).permutation(len(unique))]
    splits = []
    for fold_groups in np.array_split(shuffled, n_splits):
        in_val = np.isin(group_of, fold_groups)
        splits.append({"train": [ids[i] for i in np.flatnonzero(~in_val)],
                       "val": [ids[i] for i in np.flatnonzero(in_val)]})
    return splits


def validate_splits(splits: Any, case_ids: Sequence[str], source: Path) -> Splits:
    """Check a loaded splits file: a non-empty list of {"train": [...], "val": [...]} naming only existing cases."""
    fix = f'fix or delete {source}; the expected format is [{{"train": [case ids], "val": [case ids]}}, ...]'
    if not isinstance(splits, list) or not splits:
        raise DatasetError(f"{source} must hold a non-empty list of folds; {fix}")
    known = set(case_ids)
    unknown: set[str] = set()
    for k, fold in enumerate(splits):
        if not isinstance(fold, dict) or not all(isinstance(fold.get(key), list) for key in ("train", "val")):
            raise DatasetError(f"fold {k} of {source} is not a dict with 'train' and 'val' lists; {fix}")
        for key in ("train", "val"):
            if not all(isinstance(c, str) for c in fold[key]):
                raise DatasetError(f"fold {k} of {source}: '{key}' must list case ids as strings; {fix}")
            unknown.update(c for c in fold[key] if c not in known)
    if unknown:
        listed = ", ".join(sorted(unknown)[:20]) + (" ..." if len(unknown) > 20 else "")
        raise DatasetError(f"{source} names {len(unknown)} case(s) that are not in the dataset: {listed}; "
                           f"remove them or correct the ids ({fix.split(';')[0]})")
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in splits]


def user_splits_file(preprocessed_dataset_dir: str | Path) -> Path | None:
    """The user's splits file in the raw dataset folder of the same name, if there is one."""
    f = raw_root() / Path(preprocessed_dataset_dir).name / SPLITS_FILE
    return f if f.is_file() else None


def _load_splits_file(path: Path, case_ids: Sequence[str]) -> Splits:
    """Read and validate a splits file, turning unreadable JSON into an error that names the file."""
    try:
        data = load_json(path)
    except ValueError as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    return validate_splits(data, case_ids, path)


def get_splits(preprocessed_dataset_dir: str | Path, case_ids: Sequence[str], *,
               groups: str | Mapping[str, str] | None = None, group_pattern: str | None = None) -> Splits:
    """The dataset's cross-validation splits (see the module docstring for where they come from).

    `case_ids`: every training case in the preprocessed dataset. `groups` (or the older `group_pattern`): a
    group pattern or {case: group} mapping, for a grouped split. A generated split is written atomically
    to `<preprocessed_dataset_dir>/splits_final.json`; a user's raw-folder file is copied there.
    """
    groups = groups if groups is not None else (group_pattern or None)  # an empty pattern meant "no grouping"
    out_dir = Path(preprocessed_dataset_dir)
    out_file = out_dir / SPLITS_FILE
    user_file = user_splits_file(out_dir)
    if user_file is not None:
        splits = _load_splits_file(user_file, case_ids)
        save_json(splits, out_file)  # the preprocessed folder then holds the splits actually used
        return splits
    if out_file.is_file():
        existing = _load_splits_file(out_file, case_ids)
        # a file equal to samplan's own ungrouped split was written before grouping was asked for: regroup it;
        # any other file (an earlier grouped split, or one the user put there) is used as it is
        if groups is None or not _is_plain_split(existing, case_ids):
            return existing
    splits = grouped_splits(case_ids, groups) if groups is not None else kfold_splits(case_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_json(splits, out_file)
    return splits


def _is_plain_split(splits: Splits, case_ids: Sequence[str]) -> bool:
    """True when `splits` is samplan's (nnU-Net's) case-wise KFold split of `case_ids`."""
    return len(case_ids) >= N_SPLITS and splits == kfold_splits(case_ids)


def fold_cases(splits: Splits, fold: int | str, case_ids: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """`(train_ids, val_ids)` of `fold`; fold "all" trains and validates on every case.

    "Every case" is `case_ids` when given (all cases of the dataset, as nnU-Net does), else every case the splits name.
    """
    if str(fold) == "all":
        every = sorted(case_ids) if case_ids is not None else sorted({c for f in splits for k in ("train", "val") for c in f[k]})
        return every, list(every)
    try:
        k = int(fold)
    except ValueError:
        raise SamplanError(f"fold must be an integer or 'all', got {fold!r}") from None
    if not 0 <= k < len(splits):
        raise SamplanError(f"fold {k} does not exist: the splits have folds 0..{len(splits) - 1}; "
                           f"add it to {SPLITS_FILE} or pick another fold")
    return list(splits[k]["train"]), list(splits[k]["val"])
