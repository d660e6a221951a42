"""Small synthetic nnU-Net-format datasets for tests that must always run (no ../shared needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image


def _blob(shape: tuple[int, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1.0


def make_dataset_3d(
    root: Path,
    name: str = "Dataset900_Synth",
    n_cases: int = 4,
    shape: tuple[int, int, int] = (12, 40, 36),
    spacing_zyx: tuple[float, float, float] = (3.0, 0.8, 0.8),
    n_channels: int = 1,
    file_ending: str = ".nii.gz",
    seed: int = 0,
) -> Path:
    """Write a 3D dataset with two labels (1: large ellipsoid, 2: small one inside a zero-padded body)."""
    rng = np.random.default_rng(seed)
    ds = Path(root) / name
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        case = f"case_{i:03d}"
        shp = tuple(s + int(rng.integers(0, 3)) for s in shape)
        body = _blob(shp, np.array(shp) / 2, np.array(shp) * 0.42)
        c1 = np.array(shp) / 2 + rng.uniform(-1, 1, 3)
        lab = np.zeros(shp, np.uint8)
        lab[_blob(shp, c1, np.array(shp) * 0.2) & body] = 1
        lab[_blob(shp, c1 + np.array([0, shp[1] * 0.15, 0]), np.array(shp) * 0.08) & body] = 2
        for c in range(n_channels):
            img = (body * (100 + 20 * c) + lab * (40 + 10 * c) + rng.normal(0, 5, shp)) * body
            _write_sitk(img.astype(np.float32), ds / "imagesTr" / f"{case}_{c:04d}{file_ending}", spacing_zyx)
        _write_sitk(lab, ds / "labelsTr" / f"{case}{file_ending}", spacing_zyx)
    _write_json(ds, {str(c): f"MR{c}" for c in range(n_channels)}, n_cases, file_ending)
    return ds


def make_dataset_2d_png(root: Path, name: str = "Dataset901_SynthPNG", n_cases: int = 4, rgb: bool = True, seed: int = 0) -> Path:
    """Write a 2D PNG dataset (RGB or grey) with one label (a disc)."""
    rng = np.random.default_rng(seed)
    ds = Path(root) / name
    (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
    (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i in range(n_cases):
        shp = (60 + 4 * i, 80)
        lab = _blob(shp, np.array(shp) / 2 + rng.uniform(-5, 5, 2), np.array([12.0, 15.0])).astype(np.uint8)
        base = rng.integers(20, 60, shp + (3,) if rgb else shp)
        img = np.clip(base + (lab[..., None] if rgb else lab) * 120, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(ds / "imagesTr" / f"img_{i:03d}_0000.png")
        Image.fromarray(lab).save(ds / "labelsTr" / f"img_{i:03d}.png")
    channels = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "grey"}
    _write_json(ds, channels, n_cases, ".png", labels={"background": 0, "disc": 1})
    return ds


def _write_sitk(arr: np.ndarray, path: Path, spacing_zyx) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin((10.0, -5.0, 2.5))
    sitk.WriteImage(img, str(path))


def _write_json(ds: Path, channels: dict, n: int, ending: str, labels: dict | None = None) -> None:
    labels = labels or {"background": 0, "big": 1, "small": 2}
    with open(ds / "dataset.json", "w") as f:
        json.dump({"channel_names": channels, "labels": labels, "numTraining": n, "file_ending": ending}, f, indent=2)
