"""benchmarks/encoder_engines.py on tiny encoders: every engine row is printed and ONNX Runtime equals eager torch."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "encoder_engines.py"


def test_tiny_run_prints_every_engine_row(capsys, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    monkeypatch.setenv("SAMPLAN_CACHE", str(tmp_path))
    spec = importlib.util.spec_from_file_location("benchmark_encoder_engines", _PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--encoders", "tiny_vit", "tiny_sam2", "--size", "64", "--repeats", "1", "--onnx-batches", "1",
                       "2", "--dynamic"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny_")]
    engines = {(r[0], " ".join(r[2:-7])) for r in rows}  # 7 number columns follow the engine
    for name in ("tiny_vit", "tiny_sam2"):
        assert {e for n, e in engines if n == name} == {"torch", "torch cl", "onnxruntime b1", "onnxruntime b2",
                                                         "onnxruntime dyn (b2)"}
    assert all(float(r[-2]) < 1e-3 for r in rows)  # max |diff| from eager
