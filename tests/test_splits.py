"""Cross-validation splits: identical to scikit-learn's (KFold and shuffled GroupKFold), user files win and are validated."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.model_selection import GroupKFold, KFold

from conftest import shared_dataset
from samplan.errors import DatasetError, SamplanError
from samplan.training.splits import SPLITS_FILE, case_groups, fold_cases, get_splits, grouped_splits, kfold_splits


def _sklearn_kfold(ids):
    ids = sorted(ids)
    arr = np.array(ids)
    return [{"train": list(arr[tr]), "val": list(arr[va])}
            for tr, va in KFold(5, shuffle=True, random_state=12345).split(ids)]


@pytest.mark.parametrize("n", [5, 6, 8, 13, 40, 200, 394])
def test_kfold_equals_sklearn(n):
    rng = np.random.default_rng(n)
    ids = [f"case_{i:04d}" for i in rng.choice(10000, n, replace=False)]  # unsorted on purpose
    ours = kfold_splits(ids)
    assert ours == _sklearn_kfold(ids)
    vals = [c for f in ours for c in f["val"]]
    assert sorted(vals) == sorted(ids)  # every case validated exactly once


def test_grouped_equals_sklearn_groupkfold_and_keeps_groups_together():
    rng = np.random.default_rng(3)
    ids = sorted({f"seq{int(s):02d}_frame{int(f):03d}" for s, f in zip(rng.integers(1, 30, 90), rng.integers(0, 600, 90))})
    ours = grouped_splits(ids, r"(seq\d+)_")
    groups = [c.split("_")[0] for c in ids]
    arr = np.array(ids)
    ref = [{"train": list(arr[tr]), "val": list(arr[va])}
           for tr, va in GroupKFold(5, shuffle=True, random_state=12345).split(ids, groups=groups)]
    assert ours == ref
    for f in ours:
        assert not {c.split("_")[0] for c in f["val"]} & {c.split("_")[0] for c in f["train"]}


def test_case_groups_unmatched_cases_are_their_own_group():
    assert case_groups(["seq01_a", "seq01_b", "other"], r"(seq\d+)_") == ["seq01", "seq01", "other"]
    assert case_groups(["ab12", "ab13"], r"ab1") == ["ab1", "ab1"]  # no capture group: the whole match
    with pytest.raises(SamplanError, match="invalid split group pattern"):
        case_groups(["a"], "(")


def test_cvc_clinicdb_grouped_split_never_separates_a_sequence():
    src = shared_dataset("Dataset511_CVCClinicDB")
    ids = sorted(p.name[:-4] for p in (src / "labelsTr").glob("*.png"))
    plain = kfold_splits(ids)
    leaks = sum(bool({c[:5] for c in f["val"]} & {c[:5] for c in f["train"]}) for f in plain)
    assert leaks > 0  # the case-wise split does leak sequences between folds here...
    for f in grouped_splits(ids, r"(seq\d+)_"):  # ...the grouped one never does
        assert not {c[:5] for c in f["val"]} & {c[:5] for c in f["train"]}


def test_get_splits_creates_then_reuses_the_file(samplan_env):
    pre = samplan_env["SAMPLAN_PREPROCESSED"] / "Dataset900_Synth"
    ids = [f"c{i:02d}" for i in range(12)]
    splits = get_splits(pre, ids)
    on_disk = json.loads((pre / SPLITS_FILE).read_text())
    assert on_disk == splits == _sklearn_kfold(ids)
    assert all(set(f) == {"train", "val"} for f in on_disk)  # nnU-Net's format
    # an existing file (e.g. edited by the user in the preprocessed folder) is used as it is
    custom = [{"train": ids[:6], "val": ids[6:]}]
    (pre / SPLITS_FILE).write_text(json.dumps(custom))
    assert get_splits(pre, ids) == custom


def test_user_file_in_raw_folder_wins_and_is_copied(samplan_env):
    name = "Dataset900_Synth"
    pre = samplan_env["SAMPLAN_PREPROCESSED"] / name
    ids = [f"c{i:02d}" for i in range(10)]
    get_splits(pre, ids)  # samplan's own split exists already
    user = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:8], "val": ids[8:]}]
    (samplan_env["SAMPLAN_RAW"] / name).mkdir()
    (samplan_env["SAMPLAN_RAW"] / name / SPLITS_FILE).write_text(json.dumps(user))
    assert get_splits(pre, ids) == user
    assert json.loads((pre / SPLITS_FILE).read_text()) == user
    assert fold_cases(user, 1) == (ids[:8], ids[8:])


def test_bad_user_file_names_file_and_unknown_cases(samplan_env):
    name = "Dataset900_Synth"
    pre = samplan_env["SAMPLAN_PREPROCESSED"] / name
    ids = [f"c{i:02d}" for i in range(10)]
    raw_file = samplan_env["SAMPLAN_RAW"] / name / SPLITS_FILE
    raw_file.parent.mkdir()
    raw_file.write_text(json.dumps([{"train": ids[:5] + ["ghost_1"], "val": ids[5:] + ["ghost_2"]}]))
    with pytest.raises(DatasetError) as e:
        get_splits(pre, ids)
    msg = str(e.value)
    assert str(raw_file) in msg and "ghost_1" in msg and "ghost_2" in msg and "c00" not in msg
    assert not (pre / SPLITS_FILE).exists()  # nothing written from a bad file
    raw_file.write_text(json.dumps({"train": ids}))
    with pytest.raises(DatasetError, match="non-empty list of folds"):
        get_splits(pre, ids)
    raw_file.write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        get_splits(pre, ids)


def test_group_pattern_replaces_samplans_own_ungrouped_split(samplan_env):
    pre = samplan_env["SAMPLAN_PREPROCESSED"] / "Dataset511_X"
    ids = [f"seq{s:02d}_frame{f:03d}" for s in range(1, 11) for f in (1, 2)]
    assert get_splits(pre, ids) == kfold_splits(ids)
    grouped = get_splits(pre, ids, group_pattern=r"(seq\d+)_")
    assert grouped == grouped_splits(ids, r"(seq\d+)_") != kfold_splits(ids)
    assert json.loads((pre / SPLITS_FILE).read_text()) == grouped


def test_fold_cases_all_and_errors():
    ids = [f"c{i}" for i in range(7)]
    splits = kfold_splits(ids)
    tr, va = fold_cases(splits, 0)
    assert sorted(tr + va) == sorted(ids) and not set(tr) & set(va)
    assert fold_cases(splits, "all") == (sorted(ids), sorted(ids))
    assert fold_cases(splits[:1], "all", case_ids=ids + ["c9"])[0] == sorted(ids + ["c9"])
    with pytest.raises(SamplanError, match="folds 0..4"):
        fold_cases(splits, 5)
    with pytest.raises(SamplanError, match="cannot make 5"):
        kfold_splits(ids[:3])
