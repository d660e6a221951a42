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
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import torch

from samplan.dataset.dataset_json import read_case_groups
from samplan.dataset.labels import LabelManager
from samplan.devices import autocast_dtype
from samplan.engine.optim import seed_everything
from samplan.engine.recipe import TrainingRecipe
from samplan.errors import SamplanError
from samplan.experiment_planning.plans import PLANS_NAME
from samplan.methods import METHODS, get_method
from samplan.methods.base import PromptedMethod, TrainableMethod, trainable_names
from samplan.models.checkpoint import load_checkpoint, save_checkpoint
from samplan.paths import model_dir, preprocessed_root, resolve_dataset_name
from samplan.engine.data_parallel import attach, detach, shard
from samplan.training.checkpoint import load_pretrained_weights
from samplan.training.distributed import DistributedContext, broadcast
from samplan.training.epochs import local_share, run_epochs
from samplan.training.fold_state import FoldSetup, Run, identity
from samplan.training.logger import TrainingLogger
from samplan.training.trackers import fold_params, fold_run_name, make_tracker
from samplan.utils import load_json, remove_stale_temporaries, save_json

DEFAULT_SEED = 12345
MODEL_FILES = ("plans.json", "dataset.json", "fingerprint.json")


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


def default_num_workers(device: torch.device) -> int:
    """Background loader processes: half the cores on CPU (the network needs the rest), up to 12 with a GPU."""
    cores = os.cpu_count() or 1
    return max(1, min(cores // 2, 4)) if device.type == "cpu" else max(1, min(cores - 1, 12))


def _resume_state(fold_dir: Path, logger: TrainingLogger) -> dict[str, Any] | None:
    """The newest checkpoint to continue from (latest, else final, else best), or None with a note."""
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth", "checkpoint_best.pth"):
        if (fold_dir / name).is_file():
            logger.print(f"continuing from {fold_dir / name}")
            return load_checkpoint(fold_dir / name)
    logger.print(f"--c: no checkpoint in {fold_dir}; starting a new training")
    return None


def _open_log(s: FoldSetup, continue_training: bool,
              dist: DistributedContext | None = None) -> tuple[TrainingLogger, dict[str, Any] | None]:
    """The fold's log (a new run starts a new one, and drops the old run's best) and the state to continue from;
    ranks other than 0 of a data-parallel run get a log that writes nothing, and only read the checkpoint."""
    if dist is not None and not dist.is_main:
        logger = TrainingLogger(s.fold_dir, echo=False, write=False)
        return logger, _resume_state(s.fold_dir, logger) if continue_training else None
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
          precision: str = "auto", tracker: str | None = None,
          dist: DistributedContext | None = None) -> TrainingLogger:
    """Train (or continue) one fold of a TrainableMethod up to checkpoint_final; returns the run's log.

    `epochs`/`iters_per_epoch`/`val_iters` override the recipe (a continued run keeps the values it was started
    with unless they are given again). `seed` defaults to 12345, or to the checkpoint's seed when continuing.
    `num_workers`: background loader processes (0: load in this process; default from the device).
    `tracker`: also log each epoch to tensorboard|mlflow|none (default: $SAMPLAN_LOGGER, else none; trackers.py).
    `dist`: this process's rank in a data-parallel run (its process group initialised; samplan.training.distributed):
    the network is wrapped in DistributedDataParallel, each rank trains on its share of every global batch of
    `recipe.batch_size`, and rank 0 alone writes the log, the tracker and the checkpoints.
    """
    if continue_training and pretrained_weights is not None:
        raise SamplanError("--pretrained-weights starts a new training; it cannot be combined with --c.")
    workers = default_num_workers(dev) if num_workers is None else max(int(num_workers), 0)
    main = dist is None or dist.is_main
    # a missing package fails here, before anything is written
    tracking = make_tracker(tracker if main else "none", s.fold_dir)
    logger, state = _open_log(s, continue_training, dist)
    if main:
        copy_model_files(s, continuing=state is not None)
    seed = int(seed if seed is not None else state["seed"] if state else DEFAULT_SEED)
    recipe = _recipe(s, state, epochs, iters_per_epoch, val_iters)
    if dist is not None:
        check_world_size(recipe, dist.world_size)
    run = _start(s, recipe, logger, state, seed, dev, precision, pretrained_weights)
    run.dist = dist
    if dist is not None:  # after loading: DDP broadcasts rank 0's weights to every rank
        recipe.autocast_dtype = broadcast(recipe.autocast_dtype)  # one precision probe decides for all ranks
        attach(run.network, dev, loss_weight=dist.world_size * local_share(run))
    n_params = sum(p.numel() for p in run.network.parameters())
    precision_name = str(recipe.autocast_dtype or torch.float32).replace("torch.", "")
    logger.print(f"{s.method.name} {s.configuration} fold {s.fold} of {s.dataset_name}: {len(s.train_ids)} training / "
                 f"{len(s.val_ids)} validation cases, patch {list(recipe.patch_size)}, batch {recipe.batch_size}, "
                 f"{recipe.num_epochs} epochs x {recipe.iterations_per_epoch} iterations "
                 f"(+{recipe.val_iterations_per_epoch} validation), device {dev} ({precision_name}), {workers} loader "
                 f"worker(s), seed {seed}, {n_params / 1e6:.2f} M parameters"
                 + (f"; {dist.world_size} data-parallel processes, {len(shard(recipe.batch_size, 0, dist.world_size))} "
                    "or fewer samples of each batch per process" if dist else ""))
    try:
        if run.start_epoch < recipe.num_epochs:
            line = tracking.start(fold_run_name(s), fold_params(s, run), run.start_epoch if state else None)
            if line:
                logger.print(line)
            run_epochs(s, run, dev, workers, tracking)
    finally:
        detach(run.network)
    if main:
        save_checkpoint(run.checkpoint(s, max(run.start_epoch, recipe.num_epochs)), s.fold_dir / "checkpoint_final.pth")
        logger.write_progress()
        logger.print(f"training done: {s.fold_dir / 'checkpoint_final.pth'}")
    return logger


def check_world_size(recipe: TrainingRecipe, world_size: int) -> None:
    """Every rank needs at least one sample of each global batch."""
    if world_size > int(recipe.batch_size):
        raise SamplanError(f"{world_size} data-parallel processes need a batch of at least {world_size}, but the "
                           f"plan's batch is {recipe.batch_size}; use --num-devices {recipe.batch_size} or fewer (or "
                           "raise batch_size in the plan).")


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
    state = {"network_weights": network.state_dict(), **identity(s), "mirror_axes": [], "needs_training": False,
             "seed": seed, "current_epoch": 0}
    save_checkpoint(state, s.fold_dir / "checkpoint_final.pth")
    logger.print(f"{s.method.name} needs no training: wrote {s.fold_dir / 'checkpoint_final.pth'}; predict with "
                 "samplan_predict")
    return s.fold_dir
