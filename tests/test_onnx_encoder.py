"""The ONNX Runtime encoder engine: equal to eager torch (TinyViT, SAM ViT, promise's features), the export cache
(reused, damaged files rebuilt), the auto probe, a clear error without onnxruntime, samplan_predict torch vs onnx."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samplan.errors import SamplanError
from samplan.models import encoder_engine as ee
from samplan.models import onnx_encoder as ox
from samplan.models.backbones import build_image_encoder

CPU = torch.device("cpu")


@pytest.fixture
def onnx_cache(tmp_path, monkeypatch):
    """An empty export cache, and no session or probe remembered from other tests (a fresh process)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("SAMPLAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ee, "_SESSIONS", type(ee._SESSIONS)())
    monkeypatch.setattr(ee, "_PROBED", {})
    return tmp_path / "cache" / "onnx_encoders"


@pytest.fixture
def exports(monkeypatch):
    """Counts the exports (torch.onnx.export calls) a test causes."""
    calls = []
    real = ox._export

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(ox, "_export", counting)
    return calls


def encode(encoder: torch.nn.Module, x: torch.Tensor, engine: str) -> torch.Tensor:
    """`encoder(x)` through prediction_encoder under `engine`, as prediction runs it."""
    with torch.no_grad(), ee.encoder_engine(engine):
        return ee.prediction_encoder(encoder)(x)


def tiny_encoder(name: str = "tiny_vit", size: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_image_encoder(name, input_size=size).eval()


@pytest.mark.parametrize("name, size", [("tiny_litemedsam", 256), ("tiny_vit", 64)])
def test_onnx_encoder_equals_eager(onnx_cache, exports, name, size):
    enc = tiny_encoder(name, size)
    x = torch.randn(1, 3, size, size)  # one row: tiny LiteMedSAM still takes ~1 s per eager forward
    with torch.no_grad():
        ref = enc(x)
    out = encode(enc, x, "onnx")
    assert len(exports) == 1 and list(ee._SESSIONS.values())[0] is not None  # ONNX Runtime ran, not a fallback
    assert out.shape == ref.shape and float((out - ref).abs().max()) < 1e-3
    assert torch.equal(encode(enc, x, "onnx"), out) and len(exports) == 1  # the kept session


def test_fixed_batch_pads_the_last_chunk(onnx_cache):
    enc = tiny_encoder()
    x = torch.randn(3, 3, 64, 64)
    session = ox.export_encoder(enc, x[:2], "batch2", onnx_cache)
    assert session.batch == 2 and len(session.run_chunks(x)) == 2
    with torch.no_grad():
        assert float((session(x) - enc(x)).abs().max()) < 1e-3


def test_second_use_loads_the_cached_export(onnx_cache, exports):
    enc = tiny_encoder()
    x = torch.randn(1, 3, 64, 64)
    first = encode(enc, x, "onnx")
    ee._SESSIONS.clear()  # as a new process: only the files remain
    second = encode(enc, x, "onnx")
    assert len(exports) == 1 and torch.equal(first, second)
    with torch.no_grad():  # other weights (another fold's fine-tuned encoder), changed where no version counter sees
        enc.blocks[0].mlp.lin1.weight.data.mul_(2)
    with torch.no_grad():
        ref = enc(x)
    assert float((encode(enc, x, "onnx") - ref).abs().max()) < 1e-3 and len(exports) == 2


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no_sidecar", "other_model"])
def test_damaged_cached_export_is_rebuilt_not_trusted(onnx_cache, exports, capsys, damage):
    enc = tiny_encoder()
    x = torch.randn(1, 3, 64, 64)
    encode(enc, x, "onnx")
    ee._SESSIONS.clear()
    (onnx_file,) = onnx_cache.glob("*.onnx")
    sidecar = onnx_file.with_suffix(".json")
    if damage == "truncated":
        onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    elif damage == "flipped":  # inside the weights: the file still parses, only the sha256 tells
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
    elif damage == "no_sidecar":  # an export killed before its sidecar was written
        sidecar.unlink()
    else:  # a consistent file and sidecar of other weights: only the comparison with eager finds it
        other = ox.export_encoder(tiny_encoder(seed=1), x, "other", onnx_cache)
        onnx_file.write_bytes(other.path.read_bytes())
        sidecar.write_bytes(other.path.with_suffix(".json").read_bytes())
    with torch.no_grad():
        ref = enc(x)
    out = encode(enc, x, "onnx")
    assert float((out - ref).abs().max()) < 1e-3 and list(ee._SESSIONS.values())[0] is not None
    assert len([e for e in exports if "other" not in str(e)]) == 2  # exported again
    if damage != "no_sidecar":
        assert "exporting it again" in capsys.readouterr().err


def test_mismatching_export_falls_back_to_eager_with_a_note(onnx_cache, monkeypatch, capsys):
    enc = tiny_encoder()
    x = torch.randn(1, 3, 64, 64)
    real = ox.OnnxEncoder.run_chunks
    monkeypatch.setattr(ox.OnnxEncoder, "run_chunks", lambda self, x: [[o + 1.0 for o in c] for c in real(self, x)])
    with torch.no_grad():
        ref = enc(x)
    assert torch.equal(encode(enc, x, "onnx"), ref) and list(ee._SESSIONS.values()) == [None]
    assert "runs in torch" in capsys.readouterr().err


def test_auto_probes_once_and_follows_the_recorded_choice(onnx_cache, exports):
    enc = tiny_encoder()
    x = torch.randn(1, 3, 64, 64)
    encode(enc, x, "auto")
    (probe,) = onnx_cache.glob("probe_*.json")
    ee._SESSIONS.clear()
    ee._PROBED.clear()
    probe.write_text('{"choice": "torch"}')  # as if eager had been faster on this machine
    other = tiny_encoder(seed=2)  # same architecture, other weights: no export, eager
    with torch.no_grad():
        assert torch.equal(encode(other, x, "auto"), other(x))
    assert len(exports) == 1


def test_engine_resolution_and_onnx_without_onnxruntime(monkeypatch):
    assert ee.resolve_engine("torch", CPU) == "torch"
    assert ee.resolve_engine("auto", torch.device("cuda")) == "torch"
    assert ee.resolve_engine("auto", CPU, torch.bfloat16) == "torch"
    with pytest.raises(SamplanError, match="unknown encoder engine"):
        ee.resolve_engine("tensorrt", CPU)
    monkeypatch.setenv(ee.ENV_VAR, "torch")
    assert ee.resolve_engine(None, CPU) == "torch"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert ee.resolve_engine("auto", CPU) == "torch"
    with pytest.raises(SamplanError, match=r"needs onnxruntime.*pip install 'samplan\[onnx\]'"):
        ee.resolve_engine("onnx", CPU)


def test_onnx_engine_runs_in_float32_on_the_cpu_only(monkeypatch):
    pytest.importorskip("onnxruntime")
    from samplan import devices

    monkeypatch.setattr(devices, "cpu_bf16_speedup", lambda: 2.0)  # a CPU where precision auto picks bf16
    assert ee.engine_and_autocast("auto", CPU, "auto") == ("torch", torch.bfloat16)  # bf16 torch: as fast or faster
    assert ee.engine_and_autocast("auto", CPU, "fp32") == ("auto", None)
    assert ee.engine_and_autocast("onnx", CPU, "auto") == ("onnx", None)  # asked for: precision auto gives way
    with pytest.raises(SamplanError, match="--precision fp32"):
        ee.engine_and_autocast("onnx", CPU, "bf16")
    with pytest.raises(SamplanError, match="on the CPU"):
        ee.resolve_engine("onnx", torch.device("cuda"))


def test_training_and_gradients_stay_eager(onnx_cache, exports):
    enc = tiny_encoder()
    x = torch.randn(1, 3, 64, 64)
    with ee.encoder_engine("onnx"):
        out = ee.prediction_encoder(enc)(x)  # autograd on: the module itself
    assert out.requires_grad and not exports
    assert ee.prediction_encoder(enc) is enc  # outside a Predictor: torch


def test_promise_features_equal_eager(onnx_cache, samplan_env):
    from conftest import plan_quickly
    from method_plans import bind
    from samplan.methods import get_method
    from samplan.methods.promise.features import encode_slices
    from samplan.methods.promise.network import build_promise
    from samplan.training.trainer import merge_overrides
    from samplan.utils import load_json
    from synthetic import make_dataset_2d_png
    from test_promise import TINY  # promise's own tiny configuration (tiny ViT, narrow APM)

    ds = make_dataset_2d_png(samplan_env["SAMPLAN_RAW"], n_cases=3)
    plans = load_json(plan_quickly(ds, ["promise"], ["2d"], plan_only=True) / "plans.json")
    plans["methods"]["promise"] = merge_overrides(plans["methods"]["promise"], TINY)
    mp = bind(get_method("promise"), plans)
    torch.manual_seed(0)
    net = build_promise(mp.section, 2).eval()
    slices = [torch.rand(3, 40, 36), torch.rand(3, 40, 36)]
    with torch.no_grad():
        emb, feat = encode_slices(net, slices, mp.section, CPU)
        with ee.encoder_engine("onnx"):
            emb_o, feat_o = encode_slices(net, slices, mp.section, CPU)
    assert list(ee._SESSIONS.values())[0] is not None
    assert float((emb - emb_o).abs().max()) < 1e-3 and float((feat - feat_o).abs().max()) < 1e-3


@pytest.fixture(scope="module")
def zero_shot_model(tmp_path_factory):
    """A samzeroshot model folder (tiny ViT at 64, random weights) on a 2-case synthetic 3D dataset."""
    from conftest import plan_quickly, samplan_dirs
    from samplan.pipeline.train import train_fold
    from synthetic import make_dataset_3d

    with samplan_dirs(tmp_path_factory.mktemp("onnx_predict")) as root:
        ds = make_dataset_3d(root / "SAMPLAN_RAW", n_cases=2, shape=(6, 32, 28))
        plan_quickly(ds, ["samzeroshot"], ["2d"])
        overrides = {"backbone": "tiny_vit", "checkpoint": "none", "input_size": 64, "encoder_batch_size": 2}
        train_fold(ds.name, "samzeroshot", "2d", "all", device="cpu", method_overrides=overrides)
        yield ds


def test_samplan_predict_gives_identical_label_maps_with_torch_and_onnx(zero_shot_model, onnx_cache, tmp_path,
                                                                        exports):
    from samplan.cli import predict as predict_cli

    ds = zero_shot_model
    outs = {}
    for engine, precision in (("torch", ["--precision", "fp32"]), ("onnx", [])):  # onnx: precision auto is fp32
        outs[engine] = tmp_path / engine
        assert predict_cli.main(["-i", str(ds / "imagesTr"), "-o", str(outs[engine]), "-d", ds.name, "-m",
                                 "samzeroshot", "-f", "all", "--device", "cpu", *precision,
                                 "--prompt-strategy", "propagate", "--reference-dir", str(ds / "labelsTr"),
                                 "--no-embedding-cache", "--encoder-engine", engine]) == 0
    assert len(exports) == 1  # onnx ran (one export of the one encoder)
    files = sorted(outs["torch"].glob("*.nii.gz"))
    assert len(files) == 2
    for f in files:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(outs["onnx"] / f.name)))
        assert a.any() and np.array_equal(a, b)
