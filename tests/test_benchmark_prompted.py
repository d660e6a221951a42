"""Helpers of benchmarks/prompted.py: the world-coordinate prompts file it writes maps back onto the reference boxes,
and its default cases are fold 0's validation cases of samplan's split."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samplan.prompts.boxes import box_from_mask
from samplan.prompts.prompts_file import ImageGrid, load_prompts
from samplan.training.splits import kfold_splits

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "prompted.py"
_spec = importlib.util.spec_from_file_location("benchmark_prompted", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _oblique_label(path: Path, seed: int) -> np.ndarray:
    """A two-label (Z, Y, X) map on an oblique, anisotropic grid, written to `path`; the array."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((7, 30, 26), np.uint8)
    for z in range(1, 6):
        y, x = rng.integers(3, 15, 2)
        seg[z, y:y + rng.integers(3, 10), x:x + rng.integers(3, 10)] = 1
        seg[z, 22:25, 20 - z:24 - z] = 2
    img = sitk.GetImageFromArray(seg)
    img.SetSpacing((0.7, 0.9, 3.5))
    img.SetOrigin((-12.0, 40.5, 7.25))
    c, s = np.cos(0.4), np.sin(0.4)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]])
    img.SetDirection(tuple(rotation.ravel().tolist()))
    sitk.WriteImage(img, str(path))
    return seg


def test_world_boxes_prompts_file_maps_back_to_the_reference_boxes(tmp_path: Path) -> None:
    ds = tmp_path / "Dataset900_Oblique"
    (ds / "labelsTr").mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    segs = {f"case_{i}": _oblique_label(ds / "labelsTr" / f"case_{i}.nii.gz", i) for i in range(2)}
    out = tmp_path / "prompts.json"
    n = bench.world_boxes_prompts_file(ds, sorted(segs), out)
    assert n == sum(len(np.unique(s[z])) - 1 for s in segs.values() for z in range(s.shape[0]))
    grids = {}
    for case in segs:
        img = sitk.ReadImage(str(ds / "labelsTr" / f"{case}.nii.gz"))
        grids[case] = ImageGrid(segs[case].shape, np.array(img.GetSpacing()), np.array(img.GetOrigin()),
                                np.array(img.GetDirection()).reshape(3, 3))
    loaded = load_prompts(out, grids)
    for case, seg in segs.items():
        got = {(p.slice, p.label): p.box for p in loaded[case]}
        want = {(z, v): box_from_mask(seg[z] == v) for z in range(seg.shape[0]) for v in np.unique(seg[z]) if v > 0}
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-6)


def test_default_cases_are_fold_0_validation(tmp_path: Path) -> None:
    src = tmp_path / "Dataset901_Ids"
    (src / "labelsTr").mkdir(parents=True)
    (src / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    ids = [f"hip_{i:03d}" for i in range(23)]
    for c in ids:
        (src / "labelsTr" / f"{c}.nii.gz").touch()
    got = bench.fold0_validation_cases(src)
    assert got == kfold_splits(ids)[0]["val"] and len(got) == 5
