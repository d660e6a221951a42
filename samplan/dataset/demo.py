"""A small generated MR-like 3D dataset (Dataset999_Demo) in the nnU-Net raw format, for demos and tests.

Every case is an anisotropic volume (about 24 x 96 x 96 voxels of 3 x 0.8 x 0.8 mm, numpy (Z, Y, X)
order) showing a body with a bright fat rim, two soft-tissue classes, an "organ" (label 1) and a
smaller "lesion" (label 2) on the organ's edge. Shapes are built in millimetres so that the anatomy
looks the same whatever the voxel size, then imaged like an MR scan: partial-volume blur (thicker
along Z), a smooth multiplicative bias field, Rician noise, and zero outside the body.

Case `i` depends only on `(seed, i)`, so `--cases 20` extends `--cases 12` without changing its cases.
"""
from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from samplan.errors import SamplanError
from samplan.utils import atomic_path

DEMO_NAME = "Dataset999_Demo"
DEMO_LABELS = {"background": 0, "organ": 1, "lesion": 2}
FILE_ENDING = ".nii.gz"
# relative mean intensity of each tissue before the per-case gain (T2-like: fat bright, lesion dark in the organ)
TISSUE_MEANS = {"fat": 0.95, "soft_a": 0.40, "soft_b": 0.52, "organ": 0.72, "lesion": 0.26}
_MARKER = "samplan_demo"
_FILE_MODE = 0o644  # dataset.json key that tells our own folder from a user's Dataset999


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, sigma_mm: float) -> np.ndarray:
    """Gaussian random field of unit std, correlated over about `sigma_mm`; float64 (Z, Y, X)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_mm / spacing, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-12)


def _grid_mm(shape: tuple[int, ...], spacing: np.ndarray) -> list[np.ndarray]:
    """Voxel-centre coordinates in mm relative to the volume centre, one (Z, Y, X) array per axis."""
    return np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij", sparse=True)


def _blob(grid: list[np.ndarray], center: np.ndarray, radii: np.ndarray, angle: float, wobble: np.ndarray) -> np.ndarray:
    """Boolean (Z, Y, X) ellipsoid (mm centre/radii, rotated in-plane by `angle`) with a wavy surface."""
    z, y, x = (g - c for g, c in zip(grid, center))
    yr = np.cos(angle) * y - np.sin(angle) * x
    xr = np.sin(angle) * y + np.cos(angle) * x
    level = (z / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (xr / radii[2]) ** 2
    return level <= 1.0 + wobble


def _draw_anatomy(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One draw of the body mask and label map, both (Z, Y, X): bool and uint8 (0, 1 organ, 2 lesion)."""
    grid = _grid_mm(shape, spacing)
    fov = np.array(shape) * spacing
    # body: an elliptic cylinder that narrows towards both ends of the Z field of view, like a trunk or head
    body_r = fov[1:] * rng.uniform(0.34, 0.42, 2)
    taper = 1.0 - 0.25 * (grid[0] / (fov[0] / 2)) ** 2
    body_level = (grid[1] / (body_r[0] * taper)) ** 2 + (grid[2] / (body_r[1] * taper)) ** 2
    body = body_level <= 1.0 + 0.12 * _smooth_field(rng, shape, spacing, 12.0)

    organ_r = np.array([rng.uniform(10, 18), rng.uniform(10, 16), rng.uniform(10, 16)])
    room = np.maximum(np.array([fov[0] / 2 - organ_r[0] - 6, *(body_r * 0.9 - organ_r[1:] - 6)]), 0.0)
    organ_c = rng.uniform(-room, room)
    organ = _blob(grid, organ_c, organ_r, rng.uniform(0, np.pi), 0.25 * _smooth_field(rng, shape, spacing, 8.0))

    # lesion: centred between half and all of the organ radius away from its centre, so it sits inside or on the edge
    direction = rng.standard_normal(3) * np.array([0.5, 1.0, 1.0])
    direction /= np.linalg.norm(direction)
    lesion_c = organ_c + direction * organ_r * rng.uniform(0.5, 0.95)
    lesion_r = np.array([rng.uniform(4.5, 7.0), *rng.uniform(3.5, 7.0, 2)])
    lesion = _blob(grid, lesion_c, lesion_r, rng.uniform(0, np.pi), 0.2 * _smooth_field(rng, shape, spacing, 4.0))

    label = np.zeros(shape, np.uint8)
    label[organ & body] = 1
    label[lesion & body] = 2
    return body, label


def make_demo_case(seed: int, index: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Case `index` of the demo set: int16 image (Z, Y, X) >= 0, uint8 labels (Z, Y, X), spacing (z, y, x) mm."""
    rng = np.random.default_rng([seed, index])
    spacing = np.array([rng.uniform(2.8, 3.3), *([rng.uniform(0.76, 0.84)] * 2)]).round(3)
    shape = (int(rng.integers(22, 27)), int(rng.integers(88, 105)), int(rng.integers(88, 105)))
    for _ in range(20):  # redraw in the rare case where a structure came out (nearly) empty
        body, label = _draw_anatomy(rng, shape, spacing)
        if (label == 1).sum() >= 200 and (label == 2).sum() >= 30:
            break
    else:  # pragma: no cover - the ranges above make this practically impossible
        raise SamplanError(f"demo case {index} (seed {seed}): could not place both structures; try another --seed")

    # tissue classes: subcutaneous fat within a few mm of the skin, two soft tissues split by a smooth field
    depth = ndimage.distance_transform_edt(body, sampling=spacing)
    soft_split = _smooth_field(rng, shape, spacing, 6.0) > 0.3
    means = {k: v * rng.uniform(0.95, 1.05) for k, v in TISSUE_MEANS.items()}
    clean = np.where(soft_split, means["soft_b"], means["soft_a"])
    clean = np.where(depth < rng.uniform(3.0, 6.0), means["fat"], clean)
    clean = np.where(label == 1, means["organ"], clean)
    clean = np.where(label == 2, means["lesion"], clean)
    clean = clean * (1.0 + 0.04 * _smooth_field(rng, shape, spacing, 2.0)) * body

    # imaging: partial volume (slice profile wider than the in-plane one), bias field, Rician noise, scanner gain
    clean = ndimage.gaussian_filter(clean, sigma=[0.5, 0.7, 0.7])
    clean *= np.exp(0.15 * _smooth_field(rng, shape, spacing, 40.0))
    sigma = 0.035
    noisy = np.hypot(clean + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape))
    gain = rng.uniform(600, 1400)
    image = np.clip(np.round(noisy * gain * body), 0, np.iinfo(np.int16).max).astype(np.int16)
    return image, label, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


class _Unchanged(Exception):
    """Internal signal: the freshly written file equals the existing one."""


def _save(write: Callable[[Path], None], target: Path) -> None:
    """Write via `write(tmp_path)` and rename onto `target`, unless the bytes equal the existing file's.

    Leaving an identical file alone keeps re-runs idempotent down to modification times.
    """
    try:
        with atomic_path(target) as tmp:
            write(tmp)
            os.chmod(tmp, _FILE_MODE)  # the temporary file is private (0600); a dataset is meant to be shared
            if target.is_file() and filecmp.cmp(tmp, target, shallow=False):
                raise _Unchanged  # atomic_path deletes the temporary file and skips the rename
    except _Unchanged:
        pass


def _sitk_writer(arr: np.ndarray, spacing_zyx: tuple[float, float, float]) -> Callable[[Path], None]:
    """A `write(path)` callable storing `arr` (Z, Y, X) with `spacing_zyx` (mm), identity direction, zero origin."""

    def write(path: Path) -> None:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK wants (x, y, z)
        sitk.WriteImage(img, str(path), useCompression=True)

    return write


def demo_dataset_json(n_cases: int, seed: int) -> dict:
    """The dataset.json of the demo set (nnU-Net v2 keys plus a description and licence)."""
    return {
        "channel_names": {"0": "MRI"},
        "labels": dict(DEMO_LABELS),
        "numTraining": n_cases,
        "file_ending": FILE_ENDING,
        "name": DEMO_NAME,
        "description": (
            "Generated MR-like volumes (T2-like contrast) for samplan demos and tests: body with fat rim and two "
            "soft tissues, an organ-like smooth blob (label 1) and a darker lesion-like blob on its edge (label 2). "
            "Anisotropic, about 3 x 0.8 x 0.8 mm; bias field, Rician noise, zero outside the body. Not real anatomy."
        ),
        "licence": "CC0-1.0 (generated data, no rights reserved)",
        "reference": f"samplan.dataset.demo (samplan_make_demo_dataset --cases {n_cases} --seed {seed})",
        _MARKER: {"seed": seed, "cases": n_cases, "generator_version": 1},
    }


def write_demo_dataset(out_raw_dir: str | Path, n_cases: int = 12, seed: int = 0, n_test_cases: int = 0) -> Path:
    """Write (or refresh) `out_raw_dir/Dataset999_Demo` with `n_cases` cases; return the dataset folder.

    `n_test_cases` held-out cases (drawn after the training ones) go to imagesTs/ and labelsTs/, for
    demonstrating prediction and evaluation on cases the model never saw.

    Re-running with the same arguments leaves every file byte-identical (and untouched); cases left over
    from an earlier run with more cases are removed. Refuses to touch a Dataset999_Demo that it did not write.
    """
    if n_cases < 1:
        raise SamplanError(f"--cases must be at least 1 (got {n_cases})")
    ds = Path(out_raw_dir) / DEMO_NAME
    meta_file = ds / "dataset.json"
    if meta_file.is_file():
        try:
            ours = _MARKER in json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            ours = False
        if not ours:
            raise SamplanError(f"{ds} exists and was not written by samplan_make_demo_dataset; move it away or choose another -o folder.")
    splits = {"Tr": range(n_cases), "Ts": range(n_cases, n_cases + n_test_cases)}
    for split, indices in splits.items():
        cases = [f"demo_{i:03d}" for i in indices]
        for i, case in zip(indices, cases):
            image, label, spacing = make_demo_case(seed, i)
            _save(_sitk_writer(image, spacing), ds / f"images{split}" / f"{case}_0000{FILE_ENDING}")
            _save(_sitk_writer(label, spacing), ds / f"labels{split}" / f"{case}{FILE_ENDING}")
        keep = {f"{c}_0000{FILE_ENDING}" for c in cases} | {f"{c}{FILE_ENDING}" for c in cases}
        for folder in (ds / f"images{split}", ds / f"labels{split}"):
            for stale in folder.glob(f"demo_*{FILE_ENDING}"):
                if stale.name not in keep:
                    stale.unlink()
    text = json.dumps(demo_dataset_json(n_cases, seed), indent=2) + "\n"
    _save(lambda p: p.write_text(text), meta_file)
    return ds
