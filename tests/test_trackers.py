"""Experiment trackers of samplan_train: TensorBoard events and MLflow calls equal the training log, --c continues the
same run, and a missing package is one clear error before anything is written."""
from __future__ import annotations

import importlib.util
import math
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from samplan.cli.train import main as train_main
from samplan.errors import SamplanError
from samplan.paths import model_dir
from samplan.pipeline.train import train_fold
from samplan.training import logger as logger_module
from samplan.training import trainer as trainer_module
from samplan.training.trackers import MlflowTracker, tracker_name
from samplan.utils import load_json, save_json
from conftest import plan_quickly, samplan_dirs
from synthetic import make_dataset_3d

DATASET = "Dataset900_Synth"
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
# dataset.json of make_dataset_3d: {"background": 0, "big": 1, "small": 2}
DICE_TAGS = ["pseudo_dice/big", "pseudo_dice/small"]
CURVE_TAGS = ["train_loss", "val_loss", "pseudo_dice", "ema_pseudo_dice", "lr", "epoch_time"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two small synthetic cases planned and preprocessed once (3d_fullres), the U-Net shrunk to a few features."""
    root = tmp_path_factory.mktemp("trackers")
    with samplan_dirs(root):
        raw = make_dataset_3d(root / "SAMPLAN_RAW", n_cases=2, shape=(8, 28, 24))
        pre = plan_quickly(raw, ["unet"], ["3d_fullres"])
    plans = load_json(pre / "plans.json")
    kw = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kw["features_per_stage"] = [4 * 2**i for i in range(kw["n_stages"])]
    save_json(plans, pre / "plans.json")
    return root


@pytest.fixture
def env(prepared, tmp_path, monkeypatch):
    """The prepared folders, a fresh results folder and no tracker settings from the caller's environment."""
    for var in ("SAMPLAN_RAW", "SAMPLAN_PREPROCESSED"):
        monkeypatch.setenv(var, str(prepared / var))
    monkeypatch.setenv("SAMPLAN_RESULTS", str(tmp_path / "results"))
    for var in ("SAMPLAN_LOGGER", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    # progress.png costs half a second per epoch and is not what these tests look at (progress.json still is written)
    monkeypatch.setattr(logger_module, "plot_progress", lambda curves, path: None)
    return tmp_path / "results"


def _train(epochs: int, **kw):
    """Fold 'all' (needs no splits), one iteration per epoch, no final validation."""
    return train_fold(DATASET, "unet", "3d_fullres", "all", epochs=epochs, iters_per_epoch=1, val_iters=1,
                      device="cpu", num_workers=0, final_validation=False, precision="fp32", **kw)


def _expected(fold_dir) -> dict[str, list[float]]:
    """The trainer's own log (checkpoint_final's curves, which progress.json/png show) as tag -> values per epoch."""
    curves = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)["logging"]
    out = {tag: [float(v) for v in curves[tag]] for tag in CURVE_TAGS}
    for i, tag in enumerate(DICE_TAGS):
        out[tag] = [float(d[i]) for d in curves["dice_per_class"]]
    return out


def _same(a: list[float], b: list[float]) -> bool:
    """Equal as float32 (TensorBoard stores scalars in single precision); NaN equals NaN."""
    a32, b32 = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    return a32.shape == b32.shape and bool(torch.equal(a32.isnan(), b32.isnan()) and
                                           torch.equal(a32.nan_to_num(), b32.nan_to_num()))


# ------------------------------------------------------------------------------------------------ tensorboard


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install tensorboard)")
def test_tensorboard_events_equal_the_log_and_continue_in_the_same_folder(env, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def events(fold_dir):
        acc = EventAccumulator(str(fold_dir / "tensorboard"))
        acc.Reload()
        return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    fold_dir = _train(2, tracker="tensorboard")
    acc, scalars = events(fold_dir)
    expected = _expected(fold_dir)
    assert sorted(scalars) == sorted(expected)
    for tag, values in expected.items():
        assert [s for s, _ in scalars[tag]] == [1, 2], tag  # steps are the epoch numbers of the log lines
        assert _same([v for _, v in scalars[tag]], values), (tag, scalars[tag], values)
    assert not math.isnan(expected["pseudo_dice/big"][0])  # a real number was compared, not NaN with NaN
    assert "params" in "".join(acc.Tags()["tensors"])  # the plan's choices as a text summary
    log = (fold_dir / "training_log.txt").read_text()
    assert f"TensorBoard: {fold_dir / 'tensorboard'}" in log
    for step, (loss, dice) in enumerate(zip(expected["train_loss"], expected["pseudo_dice/big"]), 1):  # the log lines
        assert re.search(rf"epoch {step}/2  train loss {loss:.4f} .* \[{dice:.4f}, ", log), (step, loss, dice)

    # the run dies after logging epoch 3 but before its checkpoint; --c redoes epoch 3 into the same folder, and
    # TensorBoard keeps one value per epoch (purge_step drops the orphaned one)
    real_save = trainer_module.save_checkpoint

    def dying_save(state, path):
        if path.name == "checkpoint_latest.pth" and state["current_epoch"] == 3:
            raise KeyboardInterrupt
        real_save(state, path)

    with monkeypatch.context() as m:
        m.setattr(trainer_module, "save_checkpoint", dying_save)
        with pytest.raises(KeyboardInterrupt):
            _train(3, tracker="tensorboard", continue_training=True)
    assert len(list((fold_dir / "tensorboard").iterdir())) == 2
    _train(3, tracker="tensorboard", continue_training=True)
    assert len(list((fold_dir / "tensorboard").iterdir())) == 3  # one event file per session, one folder
    _, scalars = events(fold_dir)
    for tag, values in _expected(fold_dir).items():
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
        assert _same([v for _, v in scalars[tag]], values), tag

    # a new training (no --c) starts a new curve: the old events are gone
    _train(1, tracker="tensorboard")
    _, scalars = events(fold_dir)
    assert [s for s, _ in scalars["train_loss"]] == [1]


# ------------------------------------------------------------------------------------------------ mlflow


class FakeMlflow:
    """Records the fluent-API calls samplan makes; start_run hands out run ids r1, r2, ..."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.runs = 0

    def set_tracking_uri(self, uri):
        self.calls.append(("set_tracking_uri", uri))

    def set_experiment(self, name):
        self.calls.append(("set_experiment", name))

    def start_run(self, run_id=None, run_name=None):
        if run_id is None:
            self.runs += 1
            run_id = f"r{self.runs}"
        self.calls.append(("start_run", run_id, run_name))
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_params(self, params):
        self.calls.append(("log_params", dict(params)))

    def log_metrics(self, metrics, step=None):
        self.calls.append(("log_metrics", dict(metrics), step))

    def end_run(self):
        self.calls.append(("end_run",))

    def of(self, name):
        return [c for c in self.calls if c[0] == name]


def test_mlflow_run_gets_the_log_and_continue_reopens_it(env, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setenv("SAMPLAN_LOGGER", "mlflow")  # the environment variable instead of --logger
    fold_dir = _train(2)
    run_name = f"{DATASET}/unet/3d_fullres/fold_all"
    assert fake.of("set_tracking_uri") == [("set_tracking_uri", (fold_dir / "mlruns").resolve().as_uri())]
    assert fake.of("set_experiment") == [("set_experiment", DATASET)]
    assert fake.of("start_run") == [("start_run", "r1", run_name)]
    params = fake.of("log_params")[0][1]
    plans = load_json(model_dir(DATASET, "unet", "3d_fullres") / "plans.json")
    config = plans["configurations"]["3d_fullres"]
    assert params["patch_size"] == config["patch_size"] and params["batch_size"] == config["batch_size"]
    assert (params["num_epochs"], params["initial_lr"], params["fold"], params["method"]) == (2, 1e-2, "all", "unet")
    assert "backbone" not in params  # the U-Net has none
    expected = _expected(fold_dir)
    logged = fake.of("log_metrics")
    assert [step for _, _, step in logged] == [1, 2]
    for tag, values in expected.items():
        assert _same([m[tag] for _, m, _ in logged], values), tag
    assert sorted(logged[0][1]) == sorted(expected)
    assert fake.calls[-1] == ("end_run",)
    assert load_json(fold_dir / "tracker.json") == {"mlflow": {"run_id": "r1", "tracking_uri": None}}

    # --c continues run r1: no new run, no second set of params, only the new epoch's metrics
    fake.calls.clear()
    _train(3, continue_training=True)
    assert fake.of("start_run") == [("start_run", "r1", None)] and not fake.of("log_params")
    assert [step for _, _, step in fake.of("log_metrics")] == [3]
    assert _same([fake.of("log_metrics")[0][1]["train_loss"]], _expected(fold_dir)["train_loss"][2:])
    assert "MLflow: continuing run r1" in (fold_dir / "training_log.txt").read_text()

    # a new training is a new run, in the store MLFLOW_TRACKING_URI names
    fake.calls.clear()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    _train(1)
    assert fake.of("set_tracking_uri") == [("set_tracking_uri", "http://tracking.example:5000")]
    assert fake.of("start_run") == [("start_run", "r2", run_name)]
    assert load_json(fold_dir / "tracker.json")["mlflow"] == {"run_id": "r2",
                                                              "tracking_uri": "http://tracking.example:5000"}
    # continuing it against another store would log into a run that is not there: one clear error instead
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    with pytest.raises(SamplanError, match="MLFLOW_TRACKING_URI=http://tracking.example:5000"):
        MlflowTracker(fold_dir).start(run_name, {}, resume_epoch=1)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("logger,module,package", [("mlflow", "mlflow", "mlflow"),
                                                   ("tensorboard", "torch.utils.tensorboard", "tensorboard")])
def test_a_missing_package_is_one_error_before_training(env, monkeypatch, capsys, logger, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail as if the package were absent
    argv = ["-d", "900", "-m", "unet", "-f", "0", "--epochs", "1", "--device", "cpu", "-np", "0", "--no-val"]
    assert train_main([*argv, "--logger", logger]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"'{package}' package" in err and f"pip install {package}" in err
    assert "Traceback" not in err and not env.exists()  # nothing was written
    monkeypatch.setenv("SAMPLAN_LOGGER", logger)
    assert train_main(argv) == 1 and f"pip install {package}" in capsys.readouterr().err


def test_tracker_names(monkeypatch):
    monkeypatch.delenv("SAMPLAN_LOGGER", raising=False)
    assert tracker_name() == "none" and tracker_name("TensorBoard") == "tensorboard"
    monkeypatch.setenv("SAMPLAN_LOGGER", "mlflow")
    assert tracker_name() == "mlflow" and tracker_name("none") == "none"  # the flag wins over the environment
    monkeypatch.setenv("SAMPLAN_LOGGER", "wandb")
    with pytest.raises(SamplanError, match="SAMPLAN_LOGGER 'wandb' is not a tracker; use one of none, tensorboard"):
        tracker_name()
