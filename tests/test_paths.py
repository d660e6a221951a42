"""samplan.paths: environment folders with defaults under home, and dataset id/name lookup."""
from __future__ import annotations

import pytest

from samplan import paths
from samplan.errors import SamplanError

ENV_VARS = ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS")


def _make(root, *names):
    for n in names:
        (root / n).mkdir(parents=True)


@pytest.mark.parametrize("spec", ["4", "004", 4, "Dataset004_Hippocampus", "hippocampus", "HIPPOCAMPUS", " Hippocampus "])
def test_resolve_dataset_name_forms(samplan_env, spec):
    _make(samplan_env["SAMPLAN_RAW"], "Dataset004_Hippocampus", "Dataset005_Prostate", "Dataset040_Other")
    (samplan_env["SAMPLAN_RAW"] / "Dataset006_NotAFolder").write_text("a file, not a dataset")
    assert paths.resolve_dataset_name(spec) == "Dataset004_Hippocampus"


def test_resolve_finds_datasets_in_preprocessed_and_results(samplan_env):
    _make(samplan_env["SAMPLAN_PREPROCESSED"], "Dataset007_Liver")
    _make(samplan_env["SAMPLAN_RESULTS"], "Dataset008_Spleen")
    assert paths.resolve_dataset_name("7") == "Dataset007_Liver"
    assert paths.resolve_dataset_name("spleen") == "Dataset008_Spleen"


def test_no_match_lists_candidates(samplan_env):
    _make(samplan_env["SAMPLAN_RAW"], "Dataset004_Hippocampus", "Dataset005_Prostate")
    for spec in ("9", "Liver", "Dataset004_Prostate"):
        with pytest.raises(SamplanError) as e:
            paths.resolve_dataset_name(spec)
        msg = str(e.value)
        assert f"'{spec}'" in msg
        assert "Dataset004_Hippocampus" in msg and "Dataset005_Prostate" in msg
        assert str(samplan_env["SAMPLAN_RAW"]) in msg  # says where it looked


def test_no_datasets_at_all(samplan_env):
    with pytest.raises(SamplanError, match=r"\(none\)"):
        paths.resolve_dataset_name("4")


def test_several_matches_listed(samplan_env):
    _make(samplan_env["SAMPLAN_RAW"], "Dataset004_Hippocampus", "Dataset104_Hippocampus", "Dataset005_Prostate")
    _make(samplan_env["SAMPLAN_PREPROCESSED"], "Dataset005_ProstateV2")
    with pytest.raises(SamplanError) as e:
        paths.resolve_dataset_name("hippocampus")
    assert "Dataset004_Hippocampus" in str(e.value) and "Dataset104_Hippocampus" in str(e.value)
    assert "full folder name" in str(e.value)
    with pytest.raises(SamplanError) as e:
        paths.resolve_dataset_name("5")  # same id in two roots under different names
    assert "Dataset005_Prostate" in str(e.value) and "Dataset005_ProstateV2" in str(e.value)
    # the full name still picks exactly one
    assert paths.resolve_dataset_name("Dataset104_Hippocampus") == "Dataset104_Hippocampus"


def test_defaults_under_home_with_one_note(tmp_path, monkeypatch, capsys):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(paths, "_noted", set())  # the note is printed once per process; start fresh

    assert paths.raw_root() == tmp_path / "samplan_data" / "raw"
    assert paths.preprocessed_root() == tmp_path / "samplan_data" / "preprocessed"
    assert paths.results_root() == tmp_path / "samplan_data" / "results"
    err = capsys.readouterr().err
    for var, sub in zip(ENV_VARS, ("raw", "preprocessed", "results")):
        assert f"{var} is not set" in err and str(tmp_path / "samplan_data" / sub) in err

    paths.raw_root()
    assert capsys.readouterr().err == ""  # not repeated

    _make(tmp_path / "samplan_data" / "raw", "Dataset004_Hippocampus")
    assert paths.resolve_dataset_name("4") == "Dataset004_Hippocampus"


def test_env_var_wins_and_expands_user(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SAMPLAN_RAW", "~/my_raw")
    monkeypatch.setattr(paths, "_noted", set())
    assert paths.raw_root() == tmp_path / "my_raw"
    assert "SAMPLAN_RAW" not in capsys.readouterr().err


def test_empty_env_var_counts_as_unset(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SAMPLAN_RESULTS", "")
    monkeypatch.setattr(paths, "_noted", set())
    assert paths.results_root() == tmp_path / "samplan_data" / "results"
    assert "SAMPLAN_RESULTS is not set" in capsys.readouterr().err


def test_dataset_id():
    assert paths.dataset_id("Dataset004_Hippocampus") == 4
    assert paths.dataset_id("Dataset510_KvasirSEG") == 510
    with pytest.raises(SamplanError, match="Hippocampus"):
        paths.dataset_id("Hippocampus")
