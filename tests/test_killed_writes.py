"""A SIGKILL in the middle of a write: the target keeps its previous content and readers never see the half file.

The fast version of benchmarks/faults_kill.py's kill-during-write trials: a child process starts a real samplan
write (checkpoint, label map, cache array) and kills itself half way through, as a SIGKILL landing there would.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samplan.models.checkpoint import load_checkpoint, save_checkpoint
from samplan.preprocessing.cache import case_is_complete, open_case, write_case
from samplan.utils import remove_stale_temporaries

_CHILD = r"""
import os, signal, sys
from pathlib import Path
import numpy as np, torch
kind, target = sys.argv[1], Path(sys.argv[2])

def die_after_half(tmp):
    data = tmp.read_bytes()
    tmp.write_bytes(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "checkpoint":
    import samplan.models.checkpoint as m
    save = m.torch.save
    m.torch.save = lambda obj, f: (save(obj, f), die_after_half(Path(f)))
    m.save_checkpoint({"network_weights": {"w": torch.full((64, 64), 2.0)}, "method": "unet", "configuration": "2d",
                       "fold": 0, "plans_name": "p", "current_epoch": 2}, target)
elif kind == "label_map":
    import samplan.dataset.image_io as m
    write = m.sitk.WriteImage
    m.sitk.WriteImage = lambda img, f, *a, **k: (write(img, f, *a, **k), die_after_half(Path(f)))
    geometry = {"kind": "sitk", "spacing": [1.0, 1.0, 1.0], "origin": [0.0] * 3, "direction": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], "ndim": 3}
    m.write_seg(np.full((8, 16, 16), 2, np.uint8), target, {"geometry": geometry})
elif kind == "cache":
    import samplan.preprocessing.cache as m
    write = m._write_array
    calls = []
    def patched(arr, path, patch):
        calls.append(path)
        if len(calls) == 2:  # the seg array, after the data array was written
            os.kill(os.getpid(), signal.SIGKILL)
        return write(arr, path, patch)
    m._write_array = patched
    m.write_case(target, "c", np.full((1, 8, 16, 16), 3.0, np.float32), np.ones((1, 8, 16, 16), np.int8), {"k": 2})
"""


def _killed_child(kind: str, target: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _CHILD, kind, str(target)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _hidden_temporaries(folder: Path) -> list[Path]:
    return list(folder.glob(".*.tmp*"))


def test_checkpoint_killed_mid_write_keeps_the_previous_one(tmp_path):
    target = tmp_path / "checkpoint_latest.pth"
    save_checkpoint({"network_weights": {"w": torch.ones(64, 64)}, "method": "unet", "configuration": "2d", "fold": 0,
                     "plans_name": "p", "current_epoch": 1}, target)
    _killed_child("checkpoint", target)
    assert _hidden_temporaries(tmp_path), "the kill should have left the half-written temporary file"
    state = load_checkpoint(target)  # the previous, complete checkpoint: epoch 1, not a torn epoch 2
    assert state["current_epoch"] == 1 and torch.equal(state["network_weights"]["w"], torch.ones(64, 64))


def test_label_map_killed_mid_export_is_absent_so_continue_redoes_the_case(tmp_path):
    target = tmp_path / "case_001.nii.gz"
    _killed_child("label_map", target)
    assert not target.exists()  # --continue skips only cases whose label map exists
    (tmp_path / ".case_002.nii.gz.x.tmp.nii.gz").write_bytes(b"another case's")
    assert remove_stale_temporaries(tmp_path, "case_001.nii.gz") == 1  # what the predictor does before the case
    assert [p.name for p in _hidden_temporaries(tmp_path)] == [".case_002.nii.gz.x.tmp.nii.gz"]


@pytest.mark.parametrize("earlier", [False, True])
def test_cache_write_killed_between_arrays_leaves_an_incomplete_case(tmp_path, earlier):
    if earlier:  # an older complete version of the case must not be taken for the new one
        write_case(tmp_path, "c", np.zeros((1, 8, 16, 16), np.float32), np.zeros((1, 8, 16, 16), np.int8), {"k": 1})
        assert case_is_complete(tmp_path, "c")
    _killed_child("cache", tmp_path)
    assert not case_is_complete(tmp_path, "c")
    write_case(tmp_path, "c", np.full((1, 8, 16, 16), 3.0, np.float32), np.ones((1, 8, 16, 16), np.int8), {"k": 2})
    data, seg, props = open_case(tmp_path, "c")
    assert case_is_complete(tmp_path, "c") and float(data[:].max()) == 3.0 and props["k"] == 2
