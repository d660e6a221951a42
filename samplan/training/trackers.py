"""Optional experiment trackers (TensorBoard, MLflow) that receive the per-epoch numbers of the training log.

Off by default (`--logger none`, or the environment variable SAMPLAN_LOGGER). A tracker mirrors the curves the
trainer already keeps for training_log.txt and progress.png (samplan.training.logger.CURVES): nothing is computed
here. The packages are optional extras (`pip install 'samplan[tensorboard]'` / `'samplan[mlflow]'`) imported only
when asked for, and a missing one is reported when the tracker is made, before training writes anything.

Steps are epoch numbers as the log line shows them (1 = the first epoch). A run continued with --c continues the
same TensorBoard folder (fold_k/tensorboard, events from the continued epoch on replace older ones) or the same
MLflow run (its id is kept in fold_k/tracker.json).
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

from samplan.errors import SamplanError
from samplan.utils import load_json, save_json

TRACKER_ENV = "SAMPLAN_LOGGER"
TRACKER_NAMES = ("none", "tensorboard", "mlflow")
STATE_FILE = "tracker.json"
TENSORBOARD_DIR = "tensorboard"
# the pip package each tracker needs, and the samplan extra that pulls it in
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


class Tracker:
    """No tracking: the interface the trainer calls (start once, log_epoch after each epoch, close at the end)."""

    def start(self, run_name: str, params: Mapping[str, Any], resume_epoch: int | None = None) -> str | None:
        """Open the run; `resume_epoch` (epochs already done) continues an earlier one. Returns a line for the log."""
        return None

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Record the metrics of epoch number `epoch` (1-based, as in the log line)."""

    def close(self) -> None:
        """Flush and close the run (a later --c continues it)."""


class TensorBoardTracker(Tracker):
    """Scalars in `fold_dir/tensorboard/` through torch.utils.tensorboard.SummaryWriter."""

    def __init__(self, fold_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # ImportError without the tensorboard package

        self._writer_class = SummaryWriter
        self.log_dir = Path(fold_dir) / TENSORBOARD_DIR
        self.writer: Any = None

    def start(self, run_name: str, params: Mapping[str, Any], resume_epoch: int | None = None) -> str | None:
        """A new run replaces the folder's old events; a continued one rewrites the epochs from resume_epoch + 1."""
        if resume_epoch is None:
            shutil.rmtree(self.log_dir, ignore_errors=True)  # the old run's curves must not mix with this one's
        # purge_step: TensorBoard drops older events of the epochs logged again (killed after logging, before saving)
        self.writer = self._writer_class(log_dir=str(self.log_dir),
                                         purge_step=None if resume_epoch is None else resume_epoch + 1)
        if resume_epoch is None:
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.writer.add_text("params", f"**{run_name}**\n\n| parameter | value |\n|---|---|\n{table}", 0)
        return f"TensorBoard: {self.log_dir} (view with: tensorboard --logdir {self.log_dir})"

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """One scalar per metric at step `epoch`, flushed so that a killed run keeps its finished epochs."""
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=epoch)
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowTracker(Tracker):
    """One MLflow run per fold: URI from MLFLOW_TRACKING_URI, else `fold_dir/mlruns`; run id kept in tracker.json."""

    def __init__(self, fold_dir: Path):
        import mlflow  # ImportError without the mlflow package

        self.mlflow = mlflow
        self.fold_dir = Path(fold_dir)
        self.state_file = self.fold_dir / STATE_FILE
        self.active = False

    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI, else a local store beside the checkpoints."""
        return os.environ.get("MLFLOW_TRACKING_URI") or (self.fold_dir / "mlruns").resolve().as_uri()

    def _stored_run(self, uri: str) -> str | None:
        """The run id of tracker.json when it was made in the store at `uri`; SamplanError when it is elsewhere."""
        stored = load_json(self.state_file).get("mlflow", {}) if self.state_file.is_file() else {}
        if not stored.get("run_id"):
            return None
        # the local default is stored as None, so a moved model folder still finds its runs
        where = stored.get("tracking_uri") or (self.fold_dir / "mlruns").resolve().as_uri()
        if where != uri:
            raise SamplanError(f"{self.state_file}: this training's MLflow run {stored['run_id']} is in {where}, but "
                               f"the tracking URI is now {uri}; set MLFLOW_TRACKING_URI={where} to continue that run, "
                               f"or delete {self.state_file} to continue in a new MLflow run.")
        return str(stored["run_id"])

    def start(self, run_name: str, params: Mapping[str, Any], resume_epoch: int | None = None) -> str | None:
        """Continue the run of tracker.json when resuming, else start a new one (named `run_name`) with `params`."""
        uri = self.tracking_uri()
        run_id = self._stored_run(uri) if resume_epoch is not None else None
        self.mlflow.set_tracking_uri(uri)
        if run_id is not None:
            self.mlflow.start_run(run_id=run_id)
            self.active = True
            return f"MLflow: continuing run {run_id} ({run_name}) in {uri}"
        if not (os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID")):
            self.mlflow.set_experiment(run_name.split("/")[0])  # one experiment per dataset
        run = self.mlflow.start_run(run_name=run_name)
        self.active = True
        self.mlflow.log_params(dict(params))
        custom = os.environ.get("MLFLOW_TRACKING_URI") or None
        save_json({"mlflow": {"run_id": run.info.run_id, "tracking_uri": custom}}, self.state_file)
        return f"MLflow: run {run.info.run_id} ({run_name}) in {uri}"

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """All metrics of the epoch at step `epoch`."""
        self.mlflow.log_metrics(dict(metrics), step=epoch)

    def close(self) -> None:
        """End the run (status FINISHED; a --c later reopens it)."""
        if self.active:
            self.mlflow.end_run()
            self.active = False


_TRACKERS = {"none": lambda fold_dir: Tracker(), "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


def tracker_name(name: str | None = None) -> str:
    """`name`, else $SAMPLAN_LOGGER, else "none"; SamplanError for an unknown name."""
    value = (name or os.environ.get(TRACKER_ENV) or "none").strip().lower()
    if value not in TRACKER_NAMES:
        source = "--logger" if name else TRACKER_ENV
        raise SamplanError(f"{source} {value!r} is not a tracker; use one of {', '.join(TRACKER_NAMES)}.")
    return value


def make_tracker(name: str | None, fold_dir: str | Path) -> Tracker:
    """The tracker `name` (see tracker_name) for a fold; writes nothing. SamplanError when its package is missing."""
    name = tracker_name(name)
    try:
        return _TRACKERS[name](Path(fold_dir))
    except ImportError as e:
        package = _PACKAGES[name]
        raise SamplanError(f"--logger {name} needs the '{package}' package, which is not installed ({e}). Install it "
                           f"with: pip install {package}   (or pip install 'samplan[{name}]'), or train with "
                           f"--logger none (unset {TRACKER_ENV}).") from None


def check_tracker(name: str | None) -> str:
    """The resolved tracker name once its package is known to import (a start-up check); SamplanError otherwise."""
    make_tracker(name, ".")
    return tracker_name(name)


def class_names(dataset_json: Mapping[str, Any], foreground_keys: list[str]) -> list[str]:
    """dataset.json's label name of each foreground key ("1", "(1, 2)"), made safe for metric names."""
    by_key = {}
    for name, v in dataset_json["labels"].items():
        key = str(tuple(int(i) for i in v)) if isinstance(v, (list, tuple)) else str(int(v))
        by_key[key] = re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(name))
    return [by_key.get(k, k) for k in foreground_keys]


def epoch_metrics(curves: Mapping[str, list[Any]], epoch: int, names: list[str]) -> dict[str, float]:
    """The logged values of 0-based `epoch` (TrainingLogger.curves): losses, pseudo Dice (mean, EMA, per label as
    `pseudo_dice/<label name>`), learning rate and epoch time."""
    metrics = {k: float(curves[k][epoch]) for k in ("train_loss", "val_loss", "pseudo_dice", "ema_pseudo_dice", "lr",
                                                    "epoch_time")}
    for name, dice in zip(names, curves["dice_per_class"][epoch]):
        metrics[f"pseudo_dice/{name}"] = float("nan") if dice is None else float(dice)
    return metrics


# `s` and `run` are samplan.training.trainer's FoldSetup and Run (not imported: the trainer imports this module)
def fold_run_name(s: Any) -> str:
    """`<dataset>/<method>/<configuration>/fold_<k>` of a FoldSetup."""
    return f"{s.dataset_name}/{s.method.name}/{s.configuration}/fold_{s.fold}"


def fold_params(s: Any, run: Any) -> dict[str, Any]:
    """The main choices of the plan and the run, flat: patch and batch size, learning rate, lengths, backbone."""
    r, group = run.recipe, run.optimizer.param_groups[0]
    params = {"dataset": s.dataset_name, "method": s.method.name, "configuration": s.configuration, "fold": s.fold,
              "patch_size": list(r.patch_size), "batch_size": r.batch_size, "spacing": s.mp.config.get("spacing"),
              "initial_lr": group.get("initial_lr", group["lr"]), "num_epochs": r.num_epochs,
              "iterations_per_epoch": r.iterations_per_epoch, "val_iterations_per_epoch": r.val_iterations_per_epoch,
              "seed": run.seed, "train_cases": len(s.train_ids), "val_cases": len(s.val_ids)}
    backbone = getattr(s.mp.section, "backbone", None)
    if backbone is not None:
        params["backbone"] = backbone
    return {k: v for k, v in params.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
