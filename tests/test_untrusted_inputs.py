"""Untrusted inputs: paths and case names that leave the dataset folder, pickles that would run code, huge JSON."""
from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from samplan.dataset.dataset_json import (group_images_by_case, list_training_cases, load_dataset_json,
                                          unsafe_path_problems)
from samplan.errors import DatasetError, DatasetProblems, SamplanError
from samplan.prompts.prompts_file import (MAX_POINTS, ImageGrid, PromptsFileError, load_prompts,
                                          read_prompts_file)
from samplan.utils import load_json

PACKAGE = Path(__file__).resolve().parents[1] / "samplan"


def _listing(ds: Path, **extra: dict) -> dict:
    """dataset.json of `ds` rewritten with an explicit "dataset" listing of its cases, plus `extra` entries."""
    dj = json.loads((ds / "dataset.json").read_text())
    ending = dj["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (ds / "labelsTr").glob(f"*{ending}"))
    dj["dataset"] = {c: {"images": [f"imagesTr/{c}_0000{ending}"], "label": f"labelsTr/{c}{ending}"} for c in cases}
    dj["dataset"].update(extra)
    (ds / "dataset.json").write_text(json.dumps(dj))
    return dj


# ---------------------------------------------------------------- (a) paths and case names


@pytest.mark.parametrize("path, why", [
    ("/etc/hostname", "is an absolute path"),
    ("imagesTr/../../outside_0000.nii.gz", 'climbs out with ".."'),
    ("imagesTr\\..\\..\\outside_0000.nii.gz", 'climbs out with ".."'),
    ("imagesTr/linked_0000.nii.gz", "outside the dataset folder"),
])
def test_listing_paths_leaving_the_dataset_are_refused(synth3d: Path, path: str, why: str) -> None:
    outside = synth3d.parent / "outside_0000.nii.gz"
    outside.write_bytes((synth3d / "imagesTr" / "case_000_0000.nii.gz").read_bytes())
    os.symlink(outside, synth3d / "imagesTr" / "linked_0000.nii.gz")
    dj = _listing(synth3d, evil={"images": [path], "label": "labelsTr/case_000.nii.gz"})
    with pytest.raises(DatasetProblems) as exc:
        list_training_cases(synth3d, dj)
    assert len(exc.value.problems) == 1  # the good cases raise nothing
    msg = exc.value.problems[0]
    assert f"dataset['evil'].images[0] {path!r}" in msg and why in msg and str(synth3d.resolve()) in msg
    assert exc.value.exit_code == 2


def test_links_inside_the_dataset_and_a_linked_dataset_folder_are_accepted(synth3d: Path, tmp_path: Path) -> None:
    store = synth3d / "store"
    store.mkdir()
    (synth3d / "labelsTr" / "case_001.nii.gz").rename(store / "case_001.nii.gz")
    os.symlink("../store/case_001.nii.gz", synth3d / "labelsTr" / "case_001.nii.gz")
    linked_root = tmp_path / "elsewhere"
    linked_root.mkdir()
    os.symlink(synth3d, linked_root / synth3d.name)  # the whole dataset folder is a link: its inside is inside
    for ds in (synth3d, linked_root / synth3d.name):
        dj = load_dataset_json(ds)
        assert unsafe_path_problems(ds, dj) == []
        assert sorted(list_training_cases(ds, dj)) == ["case_000", "case_001", "case_002", "case_003"]
    dj = _listing(synth3d, extra={"images": ["imagesTr/case_000_0000.nii.gz"], "label": "store/case_001.nii.gz"})
    assert "extra" in list_training_cases(synth3d, dj)


def test_files_and_folders_linked_from_outside_are_refused(synth3d: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.nii.gz"
    (synth3d / "labelsTr" / "case_002.nii.gz").rename(outside)
    os.symlink(outside, synth3d / "labelsTr" / "case_002.nii.gz")
    with pytest.raises(DatasetProblems) as exc:
        list_training_cases(synth3d, load_dataset_json(synth3d))
    [msg] = exc.value.problems
    assert msg.startswith("labelsTr/case_002.nii.gz is a link to") and str(outside) in msg and "Copy the file" in msg

    (synth3d / "imagesTr").rename(tmp_path / "imagesTr")
    os.symlink(tmp_path / "imagesTr", synth3d / "imagesTr")
    problems = unsafe_path_problems(synth3d, load_dataset_json(synth3d))
    assert problems[0].startswith("imagesTr/ is a link to") and "Put the real imagesTr folder" in problems[0]
    assert len(problems) == 2  # one for the folder, not one per file in it


@pytest.mark.parametrize("case", ["../escape", "a/b", "..", ".", "", "c\\d", "nul\0byte"])
def test_case_ids_that_are_not_plain_names_are_refused(synth3d: Path, case: str) -> None:
    dj = _listing(synth3d, **{case: {"images": ["imagesTr/case_000_0000.nii.gz"], "label": "labelsTr/case_000.nii.gz"}})
    with pytest.raises(DatasetProblems) as exc:
        list_training_cases(synth3d, dj)
    [msg] = exc.value.problems
    assert f'"dataset" key {case!r} cannot name a case' in msg and "Rename the case" in msg


def test_a_harmless_double_dot_inside_a_name_is_kept(synth3d: Path) -> None:
    (synth3d / "labelsTr" / "case_000.nii.gz").rename(synth3d / "labelsTr" / "scan..v2.nii.gz")
    (synth3d / "imagesTr" / "case_000_0000.nii.gz").rename(synth3d / "imagesTr" / "scan..v2_0000.nii.gz")
    assert "scan..v2" in list_training_cases(synth3d, load_dataset_json(synth3d))


def test_label_file_names_become_checked_case_ids(synth3d: Path) -> None:
    (synth3d / "labelsTr" / "case_000.nii.gz").rename(synth3d / "labelsTr" / "..nii.gz")  # hidden: never a case
    (synth3d / "labelsTr" / "case_001.nii.gz").rename(synth3d / "labelsTr" / "a\\b.nii.gz")
    problems = unsafe_path_problems(synth3d, load_dataset_json(synth3d))
    assert [p.split(":")[0] for p in problems] == ["labelsTr/a\\b.nii.gz"]
    assert "case identifier 'a\\\\b' cannot name a case" in problems[0]


def test_prediction_inputs_may_link_anywhere_but_must_reach_a_regular_file(synth3d: Path, tmp_path: Path) -> None:
    inp = tmp_path / "input"
    inp.mkdir()
    src = synth3d / "imagesTr" / "case_000_0000.nii.gz"
    os.symlink(src, inp / "mine_0000.nii.gz")  # a user picking cases by linking them: fine
    assert group_images_by_case(inp, ".nii.gz") == {"mine": [inp / "mine_0000.nii.gz"]}

    os.symlink(tmp_path / "gone.nii.gz", inp / "broken_0000.nii.gz")
    with pytest.raises(DatasetError, match=r"broken_0000\.nii\.gz \(a link to .*gone\.nii\.gz\) does not exist"):
        group_images_by_case(inp, ".nii.gz")
    (inp / "broken_0000.nii.gz").unlink()

    os.symlink("/dev/zero", inp / "endless_0000.nii.gz")  # reading it would never end
    with pytest.raises(DatasetError, match=r"endless_0000\.nii\.gz \(a link to /dev/zero\) is not a regular file"):
        group_images_by_case(inp, ".nii.gz")
    (inp / "endless_0000.nii.gz").unlink()

    (inp / "dir_0000.nii.gz").mkdir()
    with pytest.raises(DatasetError, match=r"dir_0000\.nii\.gz is not a regular file"):
        group_images_by_case(inp, ".nii.gz")
    (inp / "dir_0000.nii.gz").rmdir()

    (inp / "a\\b_0000.nii.gz").write_bytes(src.read_bytes())
    with pytest.raises(DatasetError, match=r"case identifier 'a\\\\b' cannot name a case"):
        group_images_by_case(inp, ".nii.gz")


def test_cli_refuses_an_escaping_listing_even_without_verification(synth3d: Path, samplan_env: dict,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from samplan.cli.plan_and_preprocess import main

    _listing(synth3d, evil={"images": ["/etc/hostname"], "label": "labelsTr/case_000.nii.gz"})
    assert main(["-d", synth3d.name, "--no-verify", "--plan-only", "-np", "1"]) == 2
    err = capsys.readouterr().err
    assert "dataset['evil'].images[0] '/etc/hostname' is an absolute path" in err and "Traceback" not in err
    assert not list(samplan_env["SAMPLAN_PREPROCESSED"].rglob("*.json"))


# ---------------------------------------------------------------- (b) files that would run code


class _Payload:
    """Unpickling this creates `marker`: what a hostile file would do with something worse."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_the_payload_runs_when_unpickled(tmp_path: Path) -> None:
    """The other tests are only meaningful if the payload is live: plain unpickling does create the marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()


class _BlockedModulePayload:
    """A global from a module torch blocks outright (os.system): torch words this refusal differently."""

    def __reduce__(self):
        return os.system, ("true",)


@pytest.mark.parametrize("legacy_format", [False, True])
@pytest.mark.parametrize("blocked_module", [False, True])
def test_torch_files_with_code_are_refused(tmp_path: Path, legacy_format: bool, blocked_module: bool) -> None:
    from samplan.methods.sam_common.embedding_cache import EmbeddingCache
    from samplan.models.checkpoint import REQUIRED_KEYS, load_checkpoint
    from samplan.models.weights import load_state_file
    from samplan.training.checkpoint import load_pretrained_weights

    marker = tmp_path / "ran"
    payload = _BlockedModulePayload() if blocked_module else _Payload(marker)
    state = {k: 0 for k in REQUIRED_KEYS} | {"network_weights": {"w": torch.zeros(2), "x": payload}}
    f = tmp_path / "checkpoint_final.pth"
    torch.save(state, f, _use_new_zipfile_serialization=not legacy_format)

    for load in (load_checkpoint, lambda p: load_pretrained_weights(torch.nn.Linear(2, 2), p),
                 lambda p: load_state_file(p, sha256=None)):
        with pytest.raises(SamplanError, match=r"checkpoint_final\.pth holds Python objects.*could run code") as exc:
            load(f)
        assert "\n" not in str(exc.value)  # one clear line, not torch's page of advice
    cache = EmbeddingCache(tmp_path / "cache")
    cache.root.mkdir()
    os.replace(f, cache.path("k"))
    assert cache.get("k") is None and cache.misses == 1  # a cache entry is recomputed, never trusted
    assert not marker.exists()


def test_probability_files_with_code_are_refused(tmp_path: Path) -> None:
    from samplan.inference.ensemble import load_probabilities

    marker = tmp_path / "ran"
    np.savez(tmp_path / "object_array.npz", probabilities=np.array([_Payload(marker)], dtype=object))
    (tmp_path / "plain_pickle.npz").write_bytes(pickle.dumps(_Payload(marker)))
    np.savez(tmp_path / "good.npz", probabilities=np.ones((2, 1, 3, 3), np.float16))
    for case in ("object_array", "plain_pickle"):
        with pytest.raises(SamplanError, match=rf"{case}\.npz is not a probabilities file.*pickles are refused"):
            load_probabilities(tmp_path, case)
    assert not marker.exists()
    assert load_probabilities(tmp_path, "good").dtype == np.float32


def _call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def test_no_loader_in_the_package_can_unpickle() -> None:
    """Every torch.load/np.load call states weights_only=True/allow_pickle=False; no pickle, yaml, eval or exec."""
    banned_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "yaml", "cloudpickle"}
    found = []
    for f in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            where = f"{f.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                found += [f"{where} imports {n}" for n in names if n.split(".")[0] in banned_modules]
            if not isinstance(node, ast.Call):
                continue
            name, kw = _call_name(node), {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name in ("eval", "exec", "compile", "__import__", "importlib.import_module"):
                found.append(f"{where} calls {name}")
            elif name == "torch.load" and kw.get("weights_only") != "True":
                found.append(f"{where} torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and kw.get("allow_pickle") != "False":
                found.append(f"{where} np.load without allow_pickle=False")
    assert found == []


# ---------------------------------------------------------------- (c) JSON size and the prompts file


def test_load_json_is_bounded(tmp_path: Path) -> None:
    f = tmp_path / "plans.json"
    f.write_text(json.dumps({"a": list(range(30))}))
    size = f.stat().st_size
    assert load_json(f, max_bytes=size)["a"][-1] == 29
    with pytest.raises(SamplanError, match=rf"plans\.json holds {size} bytes; samplan reads JSON files of at most {size - 1}"):
        load_json(f, max_bytes=size - 1)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(SamplanError, match="nests JSON arrays/objects too deeply"):
        load_json(deep)


def test_an_oversized_dataset_json_is_a_dataset_error(tmp_path: Path) -> None:
    from samplan.utils import MAX_JSON_BYTES

    with open(tmp_path / "dataset.json", "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # sparse: nothing of it is written or read
    with pytest.raises(DatasetError, match=r"dataset\.json holds 67108865 bytes.*at most 67108864 bytes \(64 MiB\)"):
        load_dataset_json(tmp_path)


GRID = ImageGrid((5, 30, 40), np.ones(3), np.zeros(3), np.eye(3))


def _prompts(tmp_path: Path, cases: dict) -> Path:
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"version": 1, "cases": cases}))
    return f


def test_prompts_file_rejects_wrong_types_huge_lists_and_huge_numbers(tmp_path: Path) -> None:
    entries = [
        {"label": "1", "slice": 1.5, "points": [[1, 2]]},
        {"label": 1, "slice": 0, "points": [[1, 2]] * (MAX_POINTS + 1)},
        {"label": 1, "slice": 0, "points": [[10 ** 400, 2]]},  # beyond float range: no OverflowError
        {"label": 2 ** 40, "slice": 0, "box": [0, 0, 1, 1]},
        {"label": 1, "slice": 0, "point_labels": list(range(10_000)), "points": [[1, 2]]},
    ]
    with pytest.raises(PromptsFileError) as exc:
        read_prompts_file(_prompts(tmp_path, {"c": entries}))
    text = str(exc.value)
    assert "cases['c'][0]: 'label' must be a positive integer" in text and "'slice' must be a non-negative integer" in text
    assert f"cases['c'][1]: {MAX_POINTS + 1} points in one entry, more than the {MAX_POINTS}" in text
    assert "cases['c'][2]: 'points' must be a non-empty list" in text
    assert "cases['c'][3]: 'label' must be a positive integer label value (at most 2147483647)" in text
    assert "cases['c'][4]: 'point_labels' must be a list" in text and len(text) < 3000  # long values are shortened


def test_prompts_file_rejects_coordinates_outside_the_image(tmp_path: Path) -> None:
    f = _prompts(tmp_path, {"c": [{"label": 1, "slice": 5, "points": [[1, 2]]},
                                  {"label": 1, "slice": 0, "points": [[40, 2]]},
                                  {"label": 1, "slice": 0, "box": [-1, 0, 10, 10]},
                                  {"label": 1, "slice": 0, "points": [[39.4, 29.4]]}]})
    with pytest.raises(PromptsFileError) as exc:
        load_prompts(f, {"c": GRID})
    assert [p.split(": ")[1] for p in exc.value.problems] == ["cases['c'][0]", "cases['c'][1]", "cases['c'][2]"]
    assert "slice 5 is outside the image (slices 0..4)" in exc.value.problems[0]


def test_prompts_file_size_and_report_are_bounded(tmp_path: Path) -> None:
    from samplan.prompts.prompts_file import MAX_FILE_BYTES, MAX_REPORTED

    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(PromptsFileError, match=rf"big\.json holds {MAX_FILE_BYTES + 1} bytes"):
        read_prompts_file(big)
    with pytest.raises(PromptsFileError) as exc:
        read_prompts_file(_prompts(tmp_path, {f"c{i}": [{"label": 0, "points": [[1, 1]]}] for i in range(500)}))
    assert len(exc.value.problems) == 500 and f"... and {500 - MAX_REPORTED} more" in str(exc.value)
    assert str(exc.value).count("\n  - ") == MAX_REPORTED
    with pytest.raises(PromptsFileError, match="cannot be read"):
        read_prompts_file(tmp_path)
