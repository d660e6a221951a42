"""samplan.locks: one run per folder across processes; dead holders are taken over; the lock goes with the block."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samplan.errors import AlreadyRunningError
from samplan.locks import LOCK_NAME, REMOTE_STALE_AFTER_S, exclusive_lock, read_record

# a second process that takes the lock, says so, and holds it until killed
HOLDER = """
import sys, time
from samplan.locks import exclusive_lock
with exclusive_lock(sys.argv[1], "holding for the test"):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate Python process holding the lock tmp_path/run/.samplan.lock; yields (process, lock path)."""
    lock = tmp_path / "run" / LOCK_NAME
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "--marker-arg"], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc, lock
    finally:
        proc.kill()
        proc.wait()


def test_a_second_process_stops_at_once_naming_the_first(holder):
    proc, lock = holder
    t0 = time.perf_counter()
    with pytest.raises(AlreadyRunningError) as e:
        with exclusive_lock(lock, "testing"):
            pytest.fail("the block must not run while another process holds the lock")
    msg = str(e.value)
    assert time.perf_counter() - t0 < 1.0  # no waiting
    assert f"pid {proc.pid}" in msg and str(lock) in msg and "--marker-arg" in msg and "holding for the test" in msg
    assert "run this command again" in msg and e.value.exit_code == 75
    assert read_record(lock)["pid"] == proc.pid  # the holder's record is untouched


def test_a_sigkilled_holder_is_taken_over_with_a_note(holder, capsys):
    proc, lock = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock.is_file()  # SIGKILL leaves the file; the kernel dropped the flock
    with exclusive_lock(lock, "testing"):
        assert read_record(lock)["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the lock {lock}" in err and f"pid {proc.pid}" in err and "no longer running" in err
    assert err.count("\n") == 1  # a one-line note


def test_a_record_of_a_dead_pid_is_taken_over(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": os.uname().nodename, "argv": ["samplan_train", "-d", "4"],
                                "started": "earlier", "started_unix": time.time() - 60}))
    with exclusive_lock(lock, "testing"):
        pass
    assert f"pid {pid}" in capsys.readouterr().err
    assert not lock.exists()


def test_the_lock_is_released_after_the_block_and_after_an_exception(tmp_path):
    lock = tmp_path / "sub" / LOCK_NAME
    with exclusive_lock(lock, "first"):
        assert read_record(lock)["what"] == "first"
    assert not lock.exists()
    with pytest.raises(ValueError):
        with exclusive_lock(lock, "second"):
            raise ValueError("boom")
    assert not lock.exists()
    with exclusive_lock(lock, "third"):  # free again
        # and held: a nested attempt from this very process is refused too
        with pytest.raises(AlreadyRunningError, match="This process holds it already"):
            with exclusive_lock(lock, "nested"):
                pass


@pytest.mark.parametrize("age_h, taken_over", [(1, False), (REMOTE_STALE_AFTER_S / 3600 + 1, True)])
def test_a_lock_from_another_host_is_kept_until_it_is_old(tmp_path, capsys, age_h, taken_over):
    lock = tmp_path / LOCK_NAME
    record = {"pid": 4242, "host": "some-other-node", "argv": ["samplan_plan_and_preprocess", "-d", "4"],
              "started": "then", "started_unix": time.time() - age_h * 3600}
    lock.write_text(json.dumps(record))
    if taken_over:
        with exclusive_lock(lock, "testing"):
            pass
        assert "another host more than" in capsys.readouterr().err
    else:
        with pytest.raises(AlreadyRunningError) as e:
            with exclusive_lock(lock, "testing"):
                pass
        assert "some-other-node" in str(e.value) and f"delete {lock}" in str(e.value)
        assert read_record(lock) == record  # the other host's record stays


def test_plan_and_preprocess_cli_refuses_while_another_run_holds_the_dataset(synth3d, samplan_env, capsys):
    from samplan.cli.plan_and_preprocess import main

    out = samplan_env["SAMPLAN_PREPROCESSED"] / synth3d.name
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout.readline().strip() == "held"
        code = main(["-d", synth3d.name, "-np", "1", "--plan-only"])
    finally:
        proc.kill()
        proc.wait()
    err = capsys.readouterr().err
    assert code == 75 and f"pid {proc.pid}" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing of this run was written


def test_train_fold_takes_the_fold_lock_before_writing(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import samplan.pipeline.train as pipeline_train

    model = tmp_path / "Dataset900_Synth" / "unet__samplanPlans__3d_fullres"
    setup = SimpleNamespace(fold_dir=model / "fold_0", model_dir=model, fold=0, dataset_name="Dataset900_Synth")
    monkeypatch.setattr(pipeline_train, "prepare_fold", lambda *a, **k: setup)
    monkeypatch.setattr(pipeline_train, "resolve_device", lambda d: pytest.fail("ran although the fold is locked"))
    with exclusive_lock(setup.fold_dir / LOCK_NAME, "training elsewhere"):
        with pytest.raises(AlreadyRunningError) as e:
            pipeline_train.train_fold("900", "unet", None, 0)
    assert str(setup.fold_dir / LOCK_NAME) in str(e.value) and "already training elsewhere" in str(e.value)
