"""Cross-validation splits: identical to scikit-learn's (KFold and shuffled GroupKFold), user files win and are validated."""
from __future__ import annotations

import json
import re

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


# ---------------------------------------------------------------- case_groups in dataset.json

CVC_PATTERN = r"(seq\d+)_"


def _cvc_ids() -> list[str]:
    """The real CVC-ClinicDB case ids (imagesTr names without `_0000.png`)."""
    src = shared_dataset("Dataset511_CVCClinicDB")
    return sorted(p.name[: -len("_0000.png")] for p in (src / "imagesTr").glob("*_0000.png"))


def _assert_sequences_never_split(splits, ids):
    """Every case validated exactly once, and no seqNN prefix in two folds' validation sets (nor in train and val)."""
    vals = [c for f in splits for c in f["val"]]
    assert sorted(vals) == sorted(ids) and len(splits) == 5
    seq_folds = {}
    for k, f in enumerate(splits):
        assert sorted(f["train"] + f["val"]) == sorted(ids)
        assert not {c.split("_")[0] for c in f["val"]} & {c.split("_")[0] for c in f["train"]}
        for c in f["val"]:
            seq_folds.setdefault(c.split("_")[0], set()).add(k)
    assert all(len(folds) == 1 for folds in seq_folds.values())


def test_cvc_case_groups_pattern_keeps_each_sequence_in_one_fold(samplan_env):
    from samplan.dataset.dataset_json import read_case_groups

    ids = _cvc_ids()
    groups = read_case_groups({"case_groups": CVC_PATTERN}, ids)
    assert groups == {c: c.split("_")[0] for c in ids}
    splits = get_splits(samplan_env["SAMPLAN_PREPROCESSED"] / "Dataset511_CVCClinicDB", ids, groups=groups)
    _assert_sequences_never_split(splits, ids)
    assert splits == grouped_splits(ids, CVC_PATTERN)  # the mapping and the pattern give one split


def test_cvc_case_groups_mapping_gives_the_same_split(samplan_env):
    from samplan.dataset.dataset_json import read_case_groups

    ids = _cvc_ids()
    mapping = {}
    for c in ids:
        mapping.setdefault(c.split("_")[0], []).append(c)
    groups = read_case_groups({"case_groups": mapping}, ids)
    splits = get_splits(samplan_env["SAMPLAN_PREPROCESSED"] / "Dataset511_CVCClinicDB", ids, groups=groups)
    _assert_sequences_never_split(splits, ids)
    assert splits == grouped_splits(ids, CVC_PATTERN)
    # cases left out of the mapping are groups of their own
    partial = read_case_groups({"case_groups": {"seq01": mapping["seq01"]}}, ids)
    assert partial == {c: ("seq01" if c.startswith("seq01_") else c) for c in ids}


@pytest.mark.parametrize("value, needle", [
    (42, "must be a regular expression string"),
    (["seq01_frame001"], "must be a regular expression string"),
    ("(seq", "not a valid regular expression"),
    ("", "empty string"),
    ({"g": "seq01_frame001"}, "must be a list of case ids"),
    ({"g": ["seq01_frame001", "ghost_frame999"]}, "ghost_frame999"),
    ({"a": ["seq01_frame001"], "b": ["seq01_frame001"]}, 'in both group "a" and group "b"'),
    ("seq", "into 1 group(s), fewer than the 5"),
    ({"all": "__ids__"}, "into 1 group(s), fewer than the 5"),
])
def test_bad_case_groups_raise_dataset_error_naming_dataset_json(value, needle):
    from samplan.dataset.dataset_json import read_case_groups

    ids = [f"seq{s:02d}_frame{f:03d}" for s in range(1, 11) for f in (1, 2)]
    value = {"all": ids} if value == {"all": "__ids__"} else value
    source = "/data/Dataset511_X/dataset.json"
    with pytest.raises(DatasetError) as e:
        read_case_groups({"case_groups": value}, ids, source)
    assert str(e.value).startswith(f"{source}: case_groups") and needle in str(e.value)


def test_absent_case_groups_keep_nnunets_kfold(samplan_env):
    from samplan.dataset.dataset_json import read_case_groups

    ids = [f"seq{s:02d}_frame{f:03d}" for s in range(1, 11) for f in (1, 2)]
    groups = read_case_groups({"file_ending": ".png"}, ids)
    assert groups is None
    assert get_splits(samplan_env["SAMPLAN_PREPROCESSED"] / "Dataset511_X", ids, groups=groups) == kfold_splits(ids) \
        == _sklearn_kfold(ids)


def test_trainer_fold_ids_use_dataset_json_case_groups(samplan_env):
    from samplan.training.trainer import fold_ids

    name = "Dataset512_Videos"
    pre = samplan_env["SAMPLAN_PREPROCESSED"] / name
    ids = [f"vid{s:02d}_frame{f:03d}" for s in range(1, 9) for f in range(3)]
    dj = {"case_groups": r"(vid\d+)_"}
    plain = get_splits(pre, ids)  # samplan's own ungrouped split, written before the key was added...
    assert plain == kfold_splits(ids)
    seen = []
    for fold in range(5):
        train, val = fold_ids(pre, dj, ids, fold)  # ...is regrouped
        assert not {c[:5] for c in train} & {c[:5] for c in val}
        seen += val
    assert sorted(seen) == ids
    assert json.loads((pre / SPLITS_FILE).read_text()) == grouped_splits(ids, r"(vid\d+)_")
    assert fold_ids(pre, dj, ids, "all") == (ids, ids)
    with pytest.raises(DatasetError, match=re.escape(f"{pre / 'dataset.json'}: case_groups")):
        fold_ids(pre, {"case_groups": "(vid"}, ids, 0)
    # a user's splits file wins, even when the groups could not fill 5 folds
    user = [{"train": ids[3:], "val": ids[:3]}]
    (samplan_env["SAMPLAN_RAW"] / name).mkdir()
    (samplan_env["SAMPLAN_RAW"] / name / SPLITS_FILE).write_text(json.dumps(user))
    assert fold_ids(pre, {"case_groups": "vid"}, ids, 0) == (ids[3:], ids[:3])


def test_verification_rejects_bad_case_groups_before_anything_is_written(samplan_env):
    from synthetic import make_dataset_2d_png

    from samplan.dataset.verify import verify_dataset
    from samplan.errors import DatasetProblems
    from samplan.pipeline.planning import plan_and_preprocess

    raw = make_dataset_2d_png(samplan_env["SAMPLAN_RAW"], n_cases=6)
    meta = json.loads((raw / "dataset.json").read_text())
    for value, needle in (("(img", "not a valid regular expression"), ({"g": ["img_000", "nope"]}, "nope"),
                          ("img_00", "fewer than the 5")):
        (raw / "dataset.json").write_text(json.dumps({**meta, "case_groups": value}))
        with pytest.raises(DatasetProblems) as e:
            plan_and_preprocess(raw.name, num_processes=1)
        assert len(e.value.problems) == 1 and e.value.problems[0].startswith("dataset.json: case_groups")
        assert needle in e.value.problems[0]
        assert not (samplan_env["SAMPLAN_PREPROCESSED"] / raw.name).exists()
    (raw / "dataset.json").write_text(json.dumps({**meta, "case_groups": r"(img_\d+)"}))
    verify_dataset(raw, num_processes=1)  # six groups of one: valid
