"""The trainer: a short loop around the method's hooks, the patch loaders, checkpoints and the log.

`prepare_fold` resolves and checks everything before anything is written; `train` runs (or continues) a training;
`write_untrained_fold` writes the model folder of a method without training. Training followed by the final
validation is samplan.pipeline.train (the trainer does not import the predictor).

Reproducibility: the network is initialised from `seed`; every random choice of epoch e (patch sampling,
augmentation, dropout) is seeded from (seed, e[, batch]) and never drawn from a stream that runs across
epochs, so continuing from checkpoint_latest (written at the end of every epoch) reproduces an
uninterrupted run exactly on CPU.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from samplan.dataset.dataset_json import read_case_groups
from samplan.dataset.labels import LabelManager
from samplan.devices import autocast_dtype
from samplan.engine.optim import derived_seed, seed_everything
from samplan.engine.recipe import TrainingRecipe
from samplan.errors import SamplanError
from samplan.experiment_planning.plans import PLANS_NAME
from samplan.methods import METHODS, get_method
from samplan.methods.base import Method, MethodPlan, PromptedMethod, TrainableMethod, trainable_names
from samplan.models.checkpoint import load_checkpoint, save_checkpoint
from samplan.paths import model_dir, preprocessed_root, resolve_dataset_name
from samplan.training.checkpoint import load_pretrained_weights
from samplan.training.logger import TrainingLogger
from samplan.training.trackers import Tracker, class_names, epoch_metrics, fold_params, fold_run_name, make_tracker
from samplan.utils import load_json, remove_stale_temporaries, save_json

DEFAULT_SEED = 12345
MODEL_FILES = ("plans.json", "dataset.json", "fingerprint.json")


@dataclass
class FoldSetup:
    """Everything resolved for training one fold: files read, the method and its checked plan, cases and folders."""

    dataset_name: str
    preprocessed_dir: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    method: Method
    mp: MethodPlan
    fold: int | str
    label_manager: LabelManager
    train_ids: list[str]
    val_ids: list[str]
    cache_dir: Path
    model_dir: Path
    fold_dir: Path
    num_input_channels: int

    @property
    def configuration(self) -> str:
        """The configuration being trained."""
        return self.mp.configuration


def merge_overrides(section: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`section` with `overrides` merged in, nested objects key by key (a nested override keeps its siblings)."""
    out = dict(section)
    for k, v in overrides.items():
        out[k] = merge_overrides(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def prepare_fold(dataset: str | int, method_name: str, configuration: str | None, fold: int | str,
                 method_overrides: dict[str, Any] | None = None) -> FoldSetup:
    """Resolve the dataset, read plans/dataset.json/fingerprint, check the method's plan, the cache and the fold.

    `method_overrides` (e.g. {"backbone": "tiny_vit", "checkpoint": "/path"} from --backbone/--checkpoint) are
    merged into plans["methods"][method]: the model folder's plans.json records them, so prediction uses them too.
    """
    method = get_method(method_name)  # a typo is reported before anything else, with the available names
    if not isinstance(method, (TrainableMethod, PromptedMethod)):
        raise SamplanError(f"method {method_name!r} is planned but cannot be trained yet; trainable methods: "
                           f"{', '.join(trainable_names(METHODS))}.")
    name = resolve_dataset_name(dataset)
    pre = preprocessed_root() / name
    for f in MODEL_FILES:
        if not (pre / f).is_file():
            raise SamplanError(f"{pre / f} is missing; run samplan_plan_and_preprocess -d {name} first.")
    plans, dataset_json, fingerprint = (load_json(pre / f) for f in MODEL_FILES)
    if method.name not in plans.get("methods", {}):
        raise SamplanError(f"{pre / 'plans.json'} has no section for {method.name!r}; re-plan with "
                           f"samplan_plan_and_preprocess -d {name} -m {method.name}.")
    if method_overrides:
        plans["methods"][method.name] = merge_overrides(plans["methods"][method.name], method_overrides)
    mp = method.check_plan(plans, configuration, plans_file=pre / "plans.json")
    cache_dir = pre / plans["configurations"][mp.configuration]["data_identifier"]
    cases = sorted(fingerprint["case_identifiers"])
    missing = [c for c in cases if not (cache_dir / f"{c}.json").is_file()]
    if missing:
        raise SamplanError(f"{len(missing)} case(s) are not preprocessed in {cache_dir} (e.g. {missing[0]}); run "
                           f"samplan_plan_and_preprocess -d {name} -c {mp.configuration}.")
    train_ids, val_ids = fold_ids(pre, dataset_json, cases, fold)
    mdir = model_dir(name, method.name, mp.configuration, plans.get("plans_name", PLANS_NAME))
    fold = "all" if str(fold) == "all" else int(fold)
    return FoldSetup(name, pre, plans, dataset_json, method, mp, fold, LabelManager.from_dataset_json(dataset_json),
                     train_ids, val_ids, cache_dir, mdir, mdir / f"fold_{fold}", len(dataset_json["channel_names"]))


def fold_ids(preprocessed_dir: Path, dataset_json: Mapping[str, Any], cases: list[str],
             fold: int | str) -> tuple[list[str], list[str]]:
    """`(train_ids, val_ids)` of `fold`: from the splits file, else a 5-fold split grouped by dataset.json's case_groups."""
    from samplan.training.splits import N_SPLITS, fold_cases, get_splits, user_splits_file

    if str(fold) == "all":  # needs no splits (and works with fewer cases than folds)
        return list(cases), list(cases)
    # the planner's copy of the raw dataset.json; a user's splits file wins, so its groups need not fill 5 folds
    n_folds = None if user_splits_file(preprocessed_dir) else N_SPLITS
    groups = read_case_groups(dataset_json, cases, preprocessed_dir / "dataset.json", n_folds=n_folds)
    return fold_cases(get_splits(preprocessed_dir, cases, groups=groups), fold, cases)


def copy_model_files(s: FoldSetup, continuing: bool) -> None:
    """Copy plans (with the method overrides)/dataset.json/fingerprint into the model folder (self-describing);
    a continued run must find them unchanged."""
    for f in MODEL_FILES:
        src, dst = s.preprocessed_dir / f, s.model_dir / f
        content = s.plans if f == "plans.json" else load_json(src)
        if continuing and f == "plans.json" and dst.is_file() and load_json(dst) != content:
            raise SamplanError(f"{src} (or the --backbone/--checkpoint overrides) changed since this training started "
                               f"({dst}); continue with the old plans and the same overrides, or start a new training "
                               "without --c.")
        save_json(content, dst)


def make_loader(cache_dir: Path, case_ids: list[str], recipe: TrainingRecipe, label_manager: LabelManager, *,
                train: bool, seed: int, num_workers: int) -> Any:
    """The patch loader of one split (module-level so that tests can substitute a stand-in)."""
    from samplan.training.data_loader import PatchLoader

    return PatchLoader(cache_dir, case_ids, recipe, label_manager, train=train, seed=seed, num_workers=num_workers)


def default_num_workers(device: torch.device) -> int:
    """Background loader processes: half the cores on CPU (the network needs the rest), up to 12 with a GPU."""
    cores = os.cpu_count() or 1
    return max(1, min(cores // 2, 4)) if device.type == "cpu" else max(1, min(cores - 1, 12))


def _identity(s: FoldSetup) -> dict[str, Any]:
    """The checkpoint keys that say what was trained."""
    return {"method": s.method.name, "configuration": s.configuration, "fold": s.fold,
            "plans_name": s.plans.get("plans_name", PLANS_NAME), "dataset_name": s.dataset_name,
            "num_input_channels": s.num_input_channels, "num_outputs": s.label_manager.num_outputs}


@dataclass
class Run:
    """A training in progress: the network, its optimiser and schedule, the recipe, the log and the position."""

    network: torch.nn.Module
    optimizer: Any
    scheduler: Any
    recipe: TrainingRecipe
    logger: TrainingLogger
    seed: int
    start_epoch: int = 0
    best_ema: float | None = None

    def checkpoint(self, s: FoldSetup, epoch: int) -> dict[str, Any]:
        """Plain-data checkpoint after `epoch` completed epochs (loadable with weights_only=True)."""
        r = self.recipe
        return {
            "network_weights": self.network.state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "grad_scaler_state": r.grad_scaler.state_dict() if r.grad_scaler is not None else None,
            "logging": self.logger.state_dict(), "best_ema": self.best_ema, "seed": self.seed,
            "num_epochs": r.num_epochs, "iterations_per_epoch": r.iterations_per_epoch,
            "val_iterations_per_epoch": r.val_iterations_per_epoch, "current_epoch": epoch, **_identity(s),
            "mirror_axes": list(r.mirror_axes),
        }


def _resume_state(fold_dir: Path, logger: TrainingLogger) -> dict[str, Any] | None:
    """The newest checkpoint to continue from (latest, else final, else best), or None with a note."""
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth", "checkpoint_best.pth"):
        if (fold_dir / name).is_file():
            logger.print(f"continuing from {fold_dir / name}")
            return load_checkpoint(fold_dir / name)
    logger.print(f"--c: no checkpoint in {fold_dir}; starting a new training")
    return None


def _open_log(s: FoldSetup, continue_training: bool) -> tuple[TrainingLogger, dict[str, Any] | None]:
    """The fold's log (a new run starts a new one, and drops the old run's best) and the state to continue from."""
    s.fold_dir.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth"):  # we hold the fold's lock
        remove_stale_temporaries(s.fold_dir, name)
    earlier = [n for n in ("checkpoint_latest.pth", "checkpoint_final.pth") if (s.fold_dir / n).is_file()]
    if not continue_training:
        (s.fold_dir / "training_log.txt").unlink(missing_ok=True)
        (s.fold_dir / "checkpoint_best.pth").unlink(missing_ok=True)  # the old run's best must not outlive it
    logger = TrainingLogger(s.fold_dir)
    if earlier and not continue_training:
        logger.print(f"starting a new training: the earlier run's {', '.join(earlier)} will be replaced (--c "
                     "continues it instead)")
    return logger, _resume_state(s.fold_dir, logger) if continue_training else None


def _recipe(s: FoldSetup, state: dict[str, Any] | None, epochs: int | None, iters_per_epoch: int | None,
            val_iters: int | None) -> TrainingRecipe:
    """The method's recipe with the run lengths of the flags, else of the continued run, else of the recipe."""
    def pick(flag: int | None, key: str, default: int, minimum: int = 1) -> int:
        value = int(flag if flag is not None else state.get(key, default) if state else default)
        if value < minimum:
            raise SamplanError(f"{key.replace('_', ' ')} must be at least {minimum}, got {value}.")
        return value

    recipe = s.method.training_recipe(s.mp, s.label_manager)
    return replace(recipe, num_epochs=pick(epochs, "num_epochs", recipe.num_epochs),
                   iterations_per_epoch=pick(iters_per_epoch, "iterations_per_epoch", recipe.iterations_per_epoch),
                   val_iterations_per_epoch=pick(val_iters, "val_iterations_per_epoch",
                                                 recipe.val_iterations_per_epoch, 0))


def _start(s: FoldSetup, recipe: TrainingRecipe, logger: TrainingLogger, state: dict[str, Any] | None, seed: int,
           dev: torch.device, precision: str, pretrained_weights: str | Path | None) -> Run:
    """Network, optimiser and schedule: restored from `state`, or new (pretrained weights of the method's
    `initialize_pretrained`, then --pretrained-weights)."""
    seed_everything(seed)  # the initial weights depend on the seed only
    network = s.method.build_network(s.mp, s.num_input_channels, s.label_manager.num_outputs).to(dev)
    optimizer = recipe.make_optimizer(recipe.param_groups(network) if recipe.param_groups else network.parameters())
    run = Run(network, optimizer, recipe.make_scheduler(optimizer, recipe.num_epochs), recipe, logger, seed)
    recipe.autocast_dtype = autocast_dtype(dev, precision)
    if recipe.autocast_dtype == torch.float16:  # bf16 has float32's range: no loss scaling needed
        recipe.grad_scaler = torch.amp.GradScaler("cuda")
    if state is not None:
        network.load_state_dict(state["network_weights"])
        optimizer.load_state_dict(state["optimizer_state"])
        run.scheduler.load_state_dict(state["scheduler_state"])
        if recipe.grad_scaler is not None and state.get("grad_scaler_state"):
            recipe.grad_scaler.load_state_dict(state["grad_scaler_state"])
        logger.load_state_dict(state["logging"])
        run.start_epoch, run.best_ema = int(state["current_epoch"]), state["best_ema"]
        return run
    line = s.method.initialize_pretrained(network, s.mp)
    if line:
        logger.print(line)
    if pretrained_weights is not None:
        loaded, kept = load_pretrained_weights(network, pretrained_weights)
        logger.print(f"pretrained weights {pretrained_weights}: {len(loaded)} tensors loaded, {len(kept)} left as "
                     f"initialised ({', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''})")
    return run


def train(s: FoldSetup, dev: torch.device, *, epochs: int | None = None, iters_per_epoch: int | None = None,
          val_iters: int | None = None, continue_training: bool = False,
          pretrained_weights: str | Path | None = None, seed: int | None = None, num_workers: int | None = None,
          precision: str = "auto", tracker: str | None = None) -> TrainingLogger:
    """Train (or continue) one fold of a TrainableMethod up to checkpoint_final; returns the run's log.

    `epochs`/`iters_per_epoch`/`val_iters` override the recipe (a continued run keeps the values it was started
    with unless they are given again). `seed` defaults to 12345, or to the checkpoint's seed when continuing.
    `num_workers`: background loader processes (0: load in this process; default from the device).
    `tracker`: also log each epoch to tensorboard|mlflow|none (default: $SAMPLAN_LOGGER, else none; trackers.py).
    """
    if continue_training and pretrained_weights is not None:
        raise SamplanError("--pretrained-weights starts a new training; it cannot be combined with --c.")
    workers = default_num_workers(dev) if num_workers is None else max(int(num_workers), 0)
    tracking = make_tracker(tracker, s.fold_dir)  # a missing package fails here, before anything is written
    logger, state = _open_log(s, continue_training)
    copy_model_files(s, continuing=state is not None)
    seed = int(seed if seed is not None else state["seed"] if state else DEFAULT_SEED)
    recipe = _recipe(s, state, epochs, iters_per_epoch, val_iters)
    run = _start(s, recipe, logger, state, seed, dev, precision, pretrained_weights)
    n_params = sum(p.numel() for p in run.network.parameters())
    precision_name = str(recipe.autocast_dtype or torch.float32).replace("torch.", "")
    logger.print(f"{s.method.name} {s.configuration} fold {s.fold} of {s.dataset_name}: {len(s.train_ids)} training / "
                 f"{len(s.val_ids)} validation cases, patch {list(recipe.patch_size)}, batch {recipe.batch_size}, "
                 f"{recipe.num_epochs} epochs x {recipe.iterations_per_epoch} iterations "
                 f"(+{recipe.val_iterations_per_epoch} validation), device {dev} ({precision_name}), {workers} loader "
                 f"worker(s), seed {seed}, {n_params / 1e6:.2f} M parameters")
    if run.start_epoch < recipe.num_epochs:
        line = tracking.start(fold_run_name(s), fold_params(s, run), run.start_epoch if state else None)
        if line:
            logger.print(line)
        _run_epochs(s, run, dev, workers, tracking)
    save_checkpoint(run.checkpoint(s, max(run.start_epoch, recipe.num_epochs)), s.fold_dir / "checkpoint_final.pth")
    logger.write_progress()
    logger.print(f"training done: {s.fold_dir / 'checkpoint_final.pth'}")
    return logger


def write_untrained_fold(s: FoldSetup, seed: int | None = None) -> Path:
    """A method without training: the model folder (plans, dataset.json, fingerprint) and checkpoint_final holding
    the pretrained network's state dict (from the method's `initialize_pretrained`), so the predictor serves it."""
    s.fold_dir.mkdir(parents=True, exist_ok=True)
    (s.fold_dir / "training_log.txt").unlink(missing_ok=True)
    logger = TrainingLogger(s.fold_dir)
    copy_model_files(s, continuing=False)
    seed = int(seed if seed is not None else DEFAULT_SEED)
    seed_everything(seed)  # random-weights backbones (tests) are reproducible
    network = s.method.build_network(s.mp, s.num_input_channels, s.label_manager.num_outputs)
    line = s.method.initialize_pretrained(network, s.mp)
    if line:
        logger.print(line)
    state = {"network_weights": network.state_dict(), **_identity(s), "mirror_axes": [], "needs_training": False,
             "seed": seed, "current_epoch": 0}
    save_checkpoint(state, s.fold_dir / "checkpoint_final.pth")
    logger.print(f"{s.method.name} needs no training: wrote {s.fold_dir / 'checkpoint_final.pth'}; predict with "
                 "samplan_predict")
    return s.fold_dir


def _train_epoch(s: FoldSetup, run: Run, loader: Any, epoch: int, dev: torch.device) -> float:
    """One epoch of optimiser steps; the mean training loss."""
    run.network.train()
    losses = [s.method.train_step(run.network, batch, run.recipe, run.optimizer, dev, s.mp)["loss"]
              for batch in loader.epoch(epoch, run.recipe.iterations_per_epoch)]
    return sum(losses) / max(len(losses), 1)


def _validate_epoch(s: FoldSetup, run: Run, loader: Any, epoch: int, dev: torch.device) -> tuple[float, list[float]]:
    """Validation patches of one epoch: the mean loss and the pseudo Dice per foreground class (from summed counts)."""
    run.network.eval()
    counts = torch.zeros(3, len(s.label_manager.foreground_keys), dtype=torch.float64)
    losses = []
    with torch.no_grad():
        for batch in loader.epoch(epoch, run.recipe.val_iterations_per_epoch):
            out = s.method.validation_step(run.network, batch, run.recipe, dev, s.label_manager, s.mp)
            losses.append(out["loss"])
            counts += torch.tensor([out["tp"], out["fp"], out["fn"]], dtype=torch.float64)
    tp, fp, fn = counts
    dice = [float(2 * a / (2 * a + b + c)) if 2 * a + b + c > 0 else float("nan") for a, b, c in zip(tp, fp, fn)]
    return (sum(losses) / len(losses) if losses else float("nan")), dice


def _loader(s: FoldSetup, case_ids: list[str], recipe: TrainingRecipe, train: bool, seed: int, workers: int) -> Any:
    """The method's own loader for the split, else the patch loader."""
    own = s.method.training_loader(s.mp, s.cache_dir, case_ids, recipe, s.label_manager, train=train, seed=seed)
    if own is not None:
        return own
    return make_loader(s.cache_dir, case_ids, recipe, s.label_manager, train=train, seed=seed, num_workers=workers)


def _run_epochs(s: FoldSetup, run: Run, dev: torch.device, workers: int, tracker: Tracker) -> None:
    """Epochs start_epoch..num_epochs-1: train, validate on patches, log (and track), checkpoint latest (and best)."""
    recipe, logger = run.recipe, run.logger
    names = class_names(s.dataset_json, s.label_manager.foreground_keys)
    train_loader = _loader(s, s.train_ids, recipe, True, derived_seed(run.seed, "train"), workers)
    val_loader = _loader(s, s.val_ids, recipe, False, derived_seed(run.seed, "val"), workers // 2)
    try:
        for epoch in range(run.start_epoch, recipe.num_epochs):
            t0 = time.perf_counter()
            seed_everything(derived_seed(run.seed, epoch, "epoch"))  # dropout etc. of this epoch only
            lr = run.optimizer.param_groups[0]["lr"]
            train_loss = _train_epoch(s, run, train_loader, epoch, dev)
            val_loss, dice = _validate_epoch(s, run, val_loader, epoch, dev)
            run.scheduler.step()
            ema = logger.log_epoch(epoch, train_loss=train_loss, val_loss=val_loss, dice_per_class=dice, lr=lr,
                                   epoch_time=time.perf_counter() - t0)
            logger.print(logger.epoch_line(epoch, recipe.num_epochs))
            tracker.log_epoch(epoch + 1, epoch_metrics(logger.curves, epoch, names))
            improved = ema == ema and (run.best_ema is None or ema > run.best_ema)  # ema == ema: not NaN
            run.best_ema = ema if improved else run.best_ema
            state = run.checkpoint(s, epoch + 1)
            save_checkpoint(state, s.fold_dir / "checkpoint_latest.pth")
            if improved:
                save_checkpoint(state, s.fold_dir / "checkpoint_best.pth")
                logger.print(f"new best EMA pseudo Dice {ema:.4f}: checkpoint_best.pth")
            logger.write_progress()
    finally:
        tracker.close()
        for loader in (train_loader, val_loader):
            if callable(getattr(loader, "close", None)):
                loader.close()
