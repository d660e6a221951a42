"""Shared fixtures: isolated SAMPLAN_* folders, synthetic datasets, and the path to ../shared/data."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import make_dataset_2d_png, make_dataset_3d  # noqa: E402

SHARED_RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"


@pytest.fixture(scope="session", autouse=True)
def encoder_engine_torch(tmp_path_factory):
    """Every test runs SAM image encoders in eager torch and caches nothing under ~/.cache: tests of the ONNX engine
    (test_onnx_encoder.py) choose it explicitly. Session-wide, so that module-scoped fixtures get it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAMPLAN_ENCODER_ENGINE", "torch")
        mp.setenv("SAMPLAN_CACHE", str(tmp_path_factory.mktemp("samplan_cache")))
        yield


@pytest.fixture
def samplan_env(tmp_path, monkeypatch):
    """Point SAMPLAN_RAW/PREPROCESSED/RESULTS at empty folders under tmp_path and return them."""
    dirs = {k: tmp_path / k.lower() for k in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS")}
    for k, d in dirs.items():
        d.mkdir()
        monkeypatch.setenv(k, str(d))
    return dirs


@pytest.fixture
def synth3d(samplan_env):
    """A small anisotropic 3D dataset with two labels, inside SAMPLAN_RAW."""
    return make_dataset_3d(samplan_env["SAMPLAN_RAW"])


@pytest.fixture
def synth2d(samplan_env):
    """A small RGB PNG dataset with one label, inside SAMPLAN_RAW."""
    return make_dataset_2d_png(samplan_env["SAMPLAN_RAW"])


def shared_dataset(name: str) -> Path:
    """Path of a dataset under ../shared/data/raw, or skip the test with a message when it is absent."""
    p = SHARED_RAW / name
    if not (p / "dataset.json").is_file():
        pytest.skip(f"{p} not found: the real-data tests need ../shared/data beside the project")
    return p


def copy_shared_subset(name: str, dest_root: Path, n_cases: int | None = None) -> Path:
    """Copy the first `n_cases` cases of a shared dataset (images, labels, dataset.json) into dest_root."""
    import json
    import shutil

    src = shared_dataset(name)
    dst = Path(dest_root) / name
    meta = json.loads((src / "dataset.json").read_text())
    ending = meta["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (src / "labelsTr").glob(f"*{ending}"))[:n_cases]
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir(parents=True)
    for c in cases:
        shutil.copy(src / "labelsTr" / f"{c}{ending}", dst / "labelsTr")
        for f in (src / "imagesTr").glob(f"{c}_[0-9][0-9][0-9][0-9]{ending}"):
            shutil.copy(f, dst / "imagesTr")
    meta["numTraining"] = len(cases)
    (dst / "dataset.json").write_text(json.dumps(meta, indent=2))
    return dst


@contextmanager
def samplan_dirs(root: Path, extra: tuple[str, ...] = ()) -> Iterator[Path]:
    """SAMPLAN_RAW / _PREPROCESSED / _RESULTS (and the `extra` variables) set to new folders under `root` while the
    block runs, for module-scoped fixtures (the function-scoped `samplan_env` cannot serve them)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS", *extra):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        yield root


def plan_quickly(raw: Path, methods: list[str] | None, configurations: list[str] | None = None,
                 plan_only: bool = False) -> Path:
    """plan_and_preprocess of a raw dataset after a fingerprint with few intensity samples (fast; the percentiles
    barely move); returns the preprocessed folder."""
    from samplan.experiment_planning.fingerprint import extract_fingerprint
    from samplan.paths import preprocessed_root
    from samplan.pipeline.planning import plan_and_preprocess
    from samplan.utils import save_json

    pre = preprocessed_root() / raw.name
    pre.mkdir(parents=True, exist_ok=True)
    save_json(extract_fingerprint(raw, num_processes=1, progress=False, total_intensity_samples=1e5),
              pre / "fingerprint.json")
    return plan_and_preprocess(raw.name, methods=methods, configurations=configurations, num_processes=1,
                               plan_only=plan_only)
