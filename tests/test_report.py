"""samplan_report: the HTML page from a synthetic find_best.json (tables, embedded PNGs, notes, nulls, errors, CLI)."""
from __future__ import annotations

import base64
import json
from io import BytesIO
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from synthetic import make_dataset_2d_png

from samplan.cli.report import main as report_main
from samplan.errors import SamplanError
from samplan.evaluation.report import _display, case_dice, pick_slice, trained_models, write_report

DATASET = "Dataset950_ReportTest"
SHAPE = (8, 24, 20)
LABELS = ["1", "2"]
NOTE = "medsam 2d: only fold 'all' is trained; cross-validation needs folds 0..4"
FOLD_OF = {"case_000": "0", "case_001": "0", "case_002": "1"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.5))
    sitk.WriteImage(img, str(path))


def _blob(center: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii)) <= 1.0


def _dice(ref: np.ndarray, pred: np.ndarray) -> float | None:
    total = int(ref.sum() + pred.sum())
    return None if total == 0 else 2.0 * int((ref & pred).sum()) / total


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _candidate(name: str, kind: str, members: list[dict], folders: dict[str, Path], refs: dict[str, np.ndarray],
               shift: int) -> dict:
    """Write predictions (the reference shifted by `shift + case index` voxels along x) and score them."""
    per_case = []
    for i, (case, ref) in enumerate(refs.items()):
        pred = np.roll(ref, shift + i, axis=2)
        fold = FOLD_OF[case]
        _write(pred, folders[fold] / f"{case}.nii.gz")
        metrics = {}
        for k in LABELS:
            d = _dice(ref == int(k), pred == int(k))
            metrics[k] = {"Dice": d, "HD95": float(shift + i), "NSD": d}
        per_case.append({"fold": fold, "case": case, "metrics": metrics})
    mean = {k: {m: _mean(c["metrics"][k][m] for c in per_case) for m in ("Dice", "HD95", "NSD")} for k in LABELS}
    fg = {m: _mean(mean[k][m] for k in LABELS) for m in ("Dice", "HD95", "NSD")}
    per_fold = {f: _mean(case_dice(c, LABELS) for c in per_case if c["fold"] == f) for f in ("0", "1")}
    return {"name": name, "kind": kind, "postprocessing": {"keep_largest_component": []}, "members": members,
            "folders": {f: str(d) for f, d in folders.items()}, "mean": mean, "foreground_mean": fg,
            "per_fold_dice": per_fold, "per_case": per_case}


def build_setup(raw: Path, pre: Path, results: Path) -> dict:
    """Raw and preprocessed dataset, two candidates' predictions, one model's progress.json, find_best.json."""
    meta = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 3,
            "file_ending": ".nii.gz"}
    rng = np.random.default_rng(0)
    refs = {}
    for i, case in enumerate(FOLD_OF):
        lab = np.zeros(SHAPE, np.uint8)
        lab[_blob((4, 11 + i, 9), (2.5, 6, 5))] = 1
        lab[_blob((4, 11 + i, 15), (1.5, 3, 2))] = 2
        refs[case] = lab
        image = (100 + 40 * lab + rng.normal(0, 5, SHAPE)).astype(np.float32)
        _write(image, raw / DATASET / "imagesTr" / f"{case}_0000.nii.gz")
        _write(lab, raw / DATASET / "labelsTr" / f"{case}.nii.gz")
        _write(lab, pre / DATASET / "gt_segmentations" / f"{case}.nii.gz")
    for root in (raw, pre):
        (root / DATASET / "dataset.json").write_text(json.dumps(meta))
    unet_dir = results / DATASET / "unet__samplanPlans__3d_fullres"
    sam_dir = results / DATASET / "samzeroshot__samplanPlans__2d"
    unet = {"name": "unet 3d_fullres", "kind": "single", "method": "unet", "configuration": "3d_fullres",
            "plans_name": "samplanPlans", "model_dir": str(unet_dir), "folds": ["0", "1"]}
    cascade = {"name": "samzeroshot 2d <- unet 3d_fullres", "kind": "cascade", "method": "samzeroshot",
               "configuration": "2d", "plans_name": "samplanPlans", "model_dir": str(sam_dir), "folds": ["0", "1"],
               "first_stage": unet}
    for f in ("0", "1"):
        epochs, k = 6, 1 + 0.3 * int(f)
        (unet_dir / f"fold_{f}").mkdir(parents=True)
        (unet_dir / f"fold_{f}" / "progress.json").write_text(json.dumps({
            "train_loss": [k / (e + 1) for e in range(epochs)], "val_loss": [1.2 * k / (e + 1) for e in range(epochs)],
            "pseudo_dice": [None] + [0.1 * e / k for e in range(1, epochs)],
            "ema_pseudo_dice": [None] + [0.08 * e / k for e in range(1, epochs)],
            "lr": [0.01 * 0.9 ** e for e in range(epochs)]}))
    find_best = results / DATASET / "find_best"
    cands = [
        _candidate("unet 3d_fullres", "single", [unet], {f: unet_dir / f"fold_{f}" / "validation" for f in "01"},
                   refs, 0),
        _candidate("samzeroshot 2d <- unet 3d_fullres", "cascade", [cascade],
                   {f: find_best / "cascades" / "samzeroshot__2d__from__unet__3d_fullres" / f"fold_{f}" for f in "01"},
                   refs, 1),
    ]
    cands[1]["vs_best"] = {"difference": -0.0123, "standard_error": 0.0045, "cases": 6}  # the first has none: n/a
    report = {"dataset": DATASET, "folds": ["0", "1"], "labels": LABELS, "notes": [NOTE], "best": cands[0]["name"],
              "candidates": cands}
    (find_best / "find_best.json").write_text(json.dumps(report, indent=1))
    return report


@pytest.fixture
def report_setup(samplan_env) -> dict:
    """build_setup in the isolated SAMPLAN_* folders."""
    return build_setup(samplan_env["SAMPLAN_RAW"], samplan_env["SAMPLAN_PREPROCESSED"], samplan_env["SAMPLAN_RESULTS"])


class _Collector(HTMLParser):
    """Tags with their attributes, and the page's text (character references resolved)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Collector:
    p = _Collector()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


def test_report_page(report_setup, samplan_env):
    out = write_report(DATASET)
    assert out == samplan_env["SAMPLAN_RESULTS"] / DATASET / "find_best" / "report.html"
    page = _parse(out)
    text = " ".join(" ".join(page.text).split())  # whitespace normalised: tags split the text into pieces
    tags = [t for t, _ in page.tags]
    assert "table" in tags and "script" not in tags and "link" not in tags  # self-contained: nothing fetched
    for c in report_setup["candidates"]:
        assert c["name"] in text
        assert f"{c['foreground_mean']['Dice']:.4f}" in text
        for k in LABELS:
            assert f"{c['mean'][k]['Dice']:.4f}" in text
    assert f"best: {report_setup['best']}" in text
    assert "vs best (SE)" in text and "-0.0123 (0.0045)" in text and "n/a" in text
    assert NOTE in text
    # header, table, box plots, overlays, curves in this order
    positions = [text.index(h) for h in ("samplan_find_best report", "Candidates", "Dice per case",
                                         "Best and worst validation case", "Training curves")]
    assert positions == sorted(positions)
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    # 2 box plots (labels) + best and worst case of 2 candidates + 1 trained model with progress.json
    assert len(imgs) == 2 + 2 * 2 + 1
    assert all(s.startswith("data:image/png;base64,") for s in imgs)
    assert base64.b64decode(imgs[0].split(",", 1)[1]).startswith(PNG_SIGNATURE)
    assert "samzeroshot 2d: no progress.json for fold 0, 1 (untrained methods have none)" in text
    assert "best case case_000" in text and "worst case case_002" in text
    assert out.stat().st_size < 10_000_000


def test_null_metrics_do_not_crash(report_setup, samplan_env, tmp_path):
    path = samplan_env["SAMPLAN_RESULTS"] / DATASET / "find_best" / "find_best.json"
    report = json.loads(path.read_text())
    c = report["candidates"][1]
    c["foreground_mean"] = {"Dice": None, "HD95": None, "NSD": None}
    c["mean"]["2"] = {"Dice": None, "HD95": None, "NSD": None}
    c["per_fold_dice"]["1"] = None
    for entry in c["per_case"]:
        entry["metrics"]["1"]["HD95"] = None
        entry["metrics"]["2"]["Dice"] = None
    c["per_case"][0]["metrics"]["1"]["Dice"] = None  # a case whose every label is null
    path.write_text(json.dumps(report))
    out = write_report(950, tmp_path / "other" / "r.html")
    text = " ".join(_parse(out).text)
    assert out.is_file() and "–" in text and c["name"] in text


def test_missing_find_best(samplan_env):
    (samplan_env["SAMPLAN_RAW"] / DATASET).mkdir()
    with pytest.raises(SamplanError, match=r"samplan_find_best -d 950") as e:
        write_report(950)
    assert "find_best.json" in str(e.value)


def test_cli(report_setup, samplan_env, capsys):
    assert report_main(["-d", "950"]) == 0
    out = samplan_env["SAMPLAN_RESULTS"] / DATASET / "find_best" / "report.html"
    assert out.is_file() and str(out) in capsys.readouterr().out
    (samplan_env["SAMPLAN_RESULTS"] / DATASET / "find_best" / "find_best.json").unlink()
    assert report_main(["-d", "950"]) == 1
    assert "samplan_find_best" in capsys.readouterr().err


def test_rgb_png_dataset(samplan_env, tmp_path):
    """A 2D RGB PNG dataset: the overlay shows the photograph in colour, without a slice number."""
    name = "Dataset901_SynthPNG"
    raw = make_dataset_2d_png(samplan_env["SAMPLAN_RAW"], name=name, n_cases=2)
    gt = samplan_env["SAMPLAN_PREPROCESSED"] / name / "gt_segmentations"
    gt.mkdir(parents=True)
    (gt.parent / "dataset.json").write_text((raw / "dataset.json").read_text())
    pred = tmp_path / "pred"
    pred.mkdir()
    for f in sorted((raw / "labelsTr").glob("*.png")):
        (gt / f.name).write_bytes(f.read_bytes())
        Image.fromarray(np.roll(np.asarray(Image.open(f)), 3, axis=1)).save(pred / f.name)
    per_case = [{"fold": "0", "case": c, "metrics": {"1": {"Dice": d, "HD95": None, "NSD": None}}}
                for c, d in (("img_000", 0.9), ("img_001", 0.7))]
    cand = {"name": "unet 2d", "kind": "single", "members": [], "folders": {"0": str(pred)}, "per_case": per_case,
            "mean": {"1": {"Dice": 0.8, "HD95": None, "NSD": None}}, "foreground_mean": {"Dice": 0.8},
            "per_fold_dice": {"0": 0.8}, "postprocessing": {"keep_largest_component": []}}
    find_best = samplan_env["SAMPLAN_RESULTS"] / name / "find_best" / "find_best.json"
    find_best.parent.mkdir(parents=True)
    find_best.write_text(json.dumps({"dataset": name, "folds": ["0"], "labels": ["1"], "notes": [], "best": "unet 2d",
                                     "candidates": [cand]}))
    page = _parse(write_report(name))
    text = " ".join(" ".join(page.text).split())
    assert "best case img_000 (fold 0)" in text and "worst case img_001 (fold 0)" in text
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(imgs) == 1 + 2  # one label's box plot, best and worst case
    overlay = np.asarray(Image.open(BytesIO(base64.b64decode(imgs[1].split(",", 1)[1]))).convert("RGB")).astype(int)
    assert (np.abs(overlay[..., 0] - overlay[..., 1]) > 20).mean() > 0.2  # colour pixels everywhere, not grey


def test_helpers():
    ref = np.zeros((3, 4, 4), np.int8)
    ref[2, 1:3, 1:3] = 1
    assert pick_slice(ref) == 2 and pick_slice(np.zeros_like(ref)) == 1
    rgb = np.stack([np.full((1, 4, 5), v, np.float32) for v in (0, 128, 255)])
    shown = _display(rgb, 0)
    assert shown.shape == (4, 5, 3) and np.allclose(shown[0, 0], [0, 128 / 255, 1])
    assert _display(rgb[:1], 0).shape == (4, 5)
    member = {"model_dir": "/m/b", "method": "b", "configuration": "2d", "folds": ["0"],
              "first_stage": {"model_dir": "/m/a", "method": "a", "configuration": "3d", "folds": ["0", "1"]}}
    assert trained_models([{"members": [member]}, {"members": [member["first_stage"]]}]) == {
        "/m/b": ("b 2d", ["0"]), "/m/a": ("a 3d", ["0", "1"])}
