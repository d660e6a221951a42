"""The trainer: a short loop around the method's hooks, the patch loaders, checkpoints, the log and a final validation.

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
from typing import Any

import torch

from samplan.dataset.labels import LabelManager
from samplan.errors import SamplanError
from samplan.experiment_planning.plans import PLANS_NAME
from samplan.methods import METHODS, get_method
from samplan.methods.base import TrainableMethod
from samplan.paths import model_dir, preprocessed_root, raw_root, resolve_dataset_name
from samplan.training.checkpoint import load_checkpoint, load_pretrained_weights, save_checkpoint
from samplan.training.logger import TrainingLogger
from samplan.devices import autocast_dtype, resolve_device
from samplan.training.optim import derived_seed, seed_everything
from samplan.training.recipe import TrainingRecipe
from samplan.utils import load_json, save_json

DEFAULT_SEED = 12345
MODEL_FILES = ("plans.json", "dataset.json", "fingerprint.json")


@dataclass
class FoldSetup:
    """Everything resolved for training one fold: files read, method, cases and folders."""

    dataset_name: str
    preprocessed_dir: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    method: TrainableMethod
    configuration: str
    fold: int | str
    label_manager: LabelManager
    train_ids: list[str]
    val_ids: list[str]
    cache_dir: Path
    model_dir: Path
    fold_dir: Path
    num_input_channels: int


def prepare_fold(dataset: str | int, method_name: str, configuration: str | None, fold: int | str,
                 method_overrides: dict[str, Any] | None = None) -> FoldSetup:
    """Resolve the dataset, read plans/dataset.json/fingerprint, check the method, the cache and the fold's cases.

    `method_overrides` (e.g. {"backbone": "tiny_vit", "checkpoint": "/path"} from --backbone/--checkpoint) are
    merged into plans["methods"][method]: the model folder's plans.json records them, so prediction uses them too.
    """
    from samplan.training.splits import fold_cases, get_splits

    method = get_method(method_name)  # a typo is reported before anything else, with the available names
    if not isinstance(method, TrainableMethod):
        trainable = [n for n, m in METHODS.items() if isinstance(m, TrainableMethod)]
        raise SamplanError(f"method {method_name!r} is planned but cannot be trained yet; trainable methods: {', '.join(trainable)}.")
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
        plans["methods"][method.name] = {**plans["methods"][method.name], **method_overrides}
    method.check_plan(plans)
    configs = method.configurations(plans)
    configuration = configuration or configs[0]
    if configuration not in configs:
        raise SamplanError(f"configuration {configuration!r} is not planned for {method.name} on {name}; planned: {', '.join(configs)}.")
    cache_dir = pre / plans["configurations"][configuration]["data_identifier"]
    cases = sorted(fingerprint["case_identifiers"])
    missing = [c for c in cases if not (cache_dir / f"{c}.json").is_file()]
    if missing:
        raise SamplanError(f"{len(missing)} case(s) are not preprocessed in {cache_dir} (e.g. {missing[0]}); run "
                           f"samplan_plan_and_preprocess -d {name} -c {configuration}.")
    # fold "all" needs no splits (and works with fewer cases than folds)
    train_ids, val_ids = (cases, cases) if str(fold) == "all" else fold_cases(get_splits(pre, cases), fold, cases)
    mdir = model_dir(name, method.name, configuration, plans.get("plans_name", PLANS_NAME))
    fold = "all" if str(fold) == "all" else int(fold)
    return FoldSetup(name, pre, plans, dataset_json, method, configuration, fold, LabelManager.from_dataset_json(dataset_json),
                     train_ids, val_ids, cache_dir, mdir, mdir / f"fold_{fold}", len(dataset_json["channel_names"]))


def copy_model_files(s: FoldSetup, continuing: bool) -> None:
    """Copy plans (with the method overrides)/dataset.json/fingerprint into the model folder (self-describing);
    a continued run must find them unchanged."""
    for f in MODEL_FILES:
        src, dst = s.preprocessed_dir / f, s.model_dir / f
        content = s.plans if f == "plans.json" else load_json(src)
        if continuing and f == "plans.json" and dst.is_file() and load_json(dst) != content:
            raise SamplanError(f"{src} (or the --backbone/--checkpoint overrides) changed since this training started ({dst}); "
                               "continue with the old plans and the same overrides, or start a new training without --c.")
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


def _checkpoint(s: FoldSetup, network: torch.nn.Module, optimizer: Any, scheduler: Any, recipe: TrainingRecipe,
                logger: TrainingLogger, epoch: int, best_ema: float | None, seed: int) -> dict[str, Any]:
    """Plain-data checkpoint after `epoch` completed epochs (loadable with weights_only=True)."""
    return {
        "network_weights": network.state_dict(), "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "grad_scaler_state": recipe.grad_scaler.state_dict() if recipe.grad_scaler is not None else None,
        "logging": logger.state_dict(), "best_ema": best_ema, "seed": seed, "num_epochs": recipe.num_epochs,
        "iterations_per_epoch": recipe.iterations_per_epoch, "val_iterations_per_epoch": recipe.val_iterations_per_epoch,
        "current_epoch": epoch, "method": s.method.name, "configuration": s.configuration, "fold": s.fold,
        "plans_name": s.plans.get("plans_name", PLANS_NAME), "dataset_name": s.dataset_name,
        "num_input_channels": s.num_input_channels, "num_outputs": s.label_manager.num_outputs,
        "mirror_axes": list(recipe.mirror_axes),
    }


def _resume_state(fold_dir: Path, logger: TrainingLogger) -> dict[str, Any] | None:
    """The newest checkpoint to continue from (latest, else final, else best), or None with a note."""
    for name in ("checkpoint_latest.pth", "checkpoint_final.pth", "checkpoint_best.pth"):
        if (fold_dir / name).is_file():
            logger.print(f"continuing from {fold_dir / name}")
            return load_checkpoint(fold_dir / name)
    logger.print(f"--c: no checkpoint in {fold_dir}; starting a new training")
    return None


def train_fold(
    dataset: str | int,
    method_name: str,
    configuration: str | None = None,
    fold: int | str = 0,
    *,
    epochs: int | None = None,
    iters_per_epoch: int | None = None,
    val_iters: int | None = None,
    device: str = "auto",
    continue_training: bool = False,
    only_validate: bool = False,
    pretrained_weights: str | Path | None = None,
    seed: int | None = None,
    num_workers: int | None = None,
    final_validation: bool = True,
    precision: str = "auto",
    method_overrides: dict[str, Any] | None = None,
) -> Path:
    """Train one fold of `method_name` on a preprocessed dataset, then validate it; returns the fold folder.

    `epochs`/`iters_per_epoch`/`val_iters` override the method's recipe (a continued run keeps the values it
    was started with unless they are given again). `seed` defaults to 12345, or to the checkpoint's seed
    when continuing. `num_workers`: background loader processes (0: load in this process; default from the
    device). `only_validate` runs only the final validation of checkpoint_final; `final_validation=False`
    skips it after training. `precision`: auto|fp32|bf16|fp16 autocast (see samplan.devices). `method_overrides`:
    keys merged into the method's plan section (see prepare_fold). A new training calls the method's optional
    `initialize_pretrained(network, plans, configuration) -> log line` hook (e.g. pretrained SAM encoder weights).
    """
    s = prepare_fold(dataset, method_name, configuration, fold, method_overrides)
    dev = resolve_device(device)
    if not s.method.needs_training:
        return write_untrained_fold(s, seed)
    workers = default_num_workers(dev) if num_workers is None else max(int(num_workers), 0)
    if only_validate:
        logger = TrainingLogger(s.fold_dir)
        logger.load_state_dict(load_checkpoint(s.fold_dir / "checkpoint_final.pth")["logging"])
        run_final_validation(s, dev, logger, precision)
        return s.fold_dir
    if continue_training and pretrained_weights is not None:
        raise SamplanError("--pretrained-weights starts a new training; it cannot be combined with --c.")
    s.fold_dir.mkdir(parents=True, exist_ok=True)
    earlier = [n for n in ("checkpoint_latest.pth", "checkpoint_final.pth") if (s.fold_dir / n).is_file()]
    if not continue_training:
        (s.fold_dir / "training_log.txt").unlink(missing_ok=True)  # a new run starts a new log
        (s.fold_dir / "checkpoint_best.pth").unlink(missing_ok=True)  # the old run's best must not outlive it
    logger = TrainingLogger(s.fold_dir)
    if earlier and not continue_training:
        logger.print(f"starting a new training: the earlier run's {', '.join(earlier)} will be replaced (--c continues it instead)")
    state = _resume_state(s.fold_dir, logger) if continue_training else None
    copy_model_files(s, continuing=state is not None)
    seed = int(seed if seed is not None else state["seed"] if state else DEFAULT_SEED)

    def pick(flag: int | None, key: str, default: int, minimum: int = 1) -> int:
        value = int(flag if flag is not None else state.get(key, default) if state else default)
        if value < minimum:
            raise SamplanError(f"{key.replace('_', ' ')} must be at least {minimum}, got {value}.")
        return value

    recipe = s.method.training_recipe(s.plans, s.configuration, s.label_manager)
    recipe = replace(recipe, num_epochs=pick(epochs, "num_epochs", recipe.num_epochs),
                     iterations_per_epoch=pick(iters_per_epoch, "iterations_per_epoch", recipe.iterations_per_epoch),
                     val_iterations_per_epoch=pick(val_iters, "val_iterations_per_epoch", recipe.val_iterations_per_epoch, 0))
    seed_everything(seed)  # the initial weights depend on the seed only
    network = s.method.build_network(s.plans, s.configuration, s.num_input_channels, s.label_manager.num_outputs).to(dev)
    optimizer = recipe.make_optimizer(network.parameters())
    scheduler = recipe.make_scheduler(optimizer, recipe.num_epochs)
    recipe.autocast_dtype = autocast_dtype(dev, precision)
    if recipe.autocast_dtype == torch.float16:  # bf16 has float32's range: no loss scaling needed
        recipe.grad_scaler = torch.amp.GradScaler("cuda")
    start_epoch, best_ema = 0, None
    if state is not None:
        network.load_state_dict(state["network_weights"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        if recipe.grad_scaler is not None and state.get("grad_scaler_state"):
            recipe.grad_scaler.load_state_dict(state["grad_scaler_state"])
        logger.load_state_dict(state["logging"])
        start_epoch, best_ema = int(state["current_epoch"]), state["best_ema"]
    elif callable(getattr(s.method, "initialize_pretrained", None)):
        logger.print(s.method.initialize_pretrained(network, s.plans, s.configuration))
    if state is None and pretrained_weights is not None:
        loaded, kept = load_pretrained_weights(network, pretrained_weights)
        logger.print(f"pretrained weights {pretrained_weights}: {len(loaded)} tensors loaded, {len(kept)} left as "
                     f"initialised ({', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''})")
    n_params = sum(p.numel() for p in network.parameters())
    logger.print(f"{s.method.name} {s.configuration} fold {s.fold} of {s.dataset_name}: {len(s.train_ids)} training / "
                 f"{len(s.val_ids)} validation cases, patch {list(recipe.patch_size)}, batch {recipe.batch_size}, "
                 f"{recipe.num_epochs} epochs x {recipe.iterations_per_epoch} iterations (+{recipe.val_iterations_per_epoch} "
                 f"validation), device {dev} ({str(recipe.autocast_dtype or torch.float32).replace('torch.', '')}), {workers} loader worker(s), seed {seed}, {n_params / 1e6:.2f} M parameters")
    if start_epoch < recipe.num_epochs:
        best_ema = _run_epochs(s, network, optimizer, scheduler, recipe, logger, dev, workers, seed, start_epoch, best_ema)
    final = _checkpoint(s, network, optimizer, scheduler, recipe, logger, max(start_epoch, recipe.num_epochs), best_ema, seed)
    save_checkpoint(final, s.fold_dir / "checkpoint_final.pth")
    logger.write_progress()
    logger.print(f"training done: {s.fold_dir / 'checkpoint_final.pth'}")
    if final_validation:
        run_final_validation(s, dev, logger, precision)
    return s.fold_dir


def write_untrained_fold(s: FoldSetup, seed: int | None = None) -> Path:
    """A method without training: the model folder (plans, dataset.json, fingerprint) and checkpoint_final holding
    the pretrained network's state dict (from the method's `initialize_pretrained`), so the predictor serves it."""
    s.fold_dir.mkdir(parents=True, exist_ok=True)
    (s.fold_dir / "training_log.txt").unlink(missing_ok=True)
    logger = TrainingLogger(s.fold_dir)
    copy_model_files(s, continuing=False)
    seed = int(seed if seed is not None else DEFAULT_SEED)
    seed_everything(seed)  # random-weights backbones (tests) are reproducible
    network = s.method.build_network(s.plans, s.configuration, s.num_input_channels, s.label_manager.num_outputs)
    if callable(getattr(s.method, "initialize_pretrained", None)):
        logger.print(s.method.initialize_pretrained(network, s.plans, s.configuration))
    state = {"network_weights": network.state_dict(), "method": s.method.name, "configuration": s.configuration,
             "fold": s.fold, "plans_name": s.plans.get("plans_name", PLANS_NAME), "dataset_name": s.dataset_name,
             "num_input_channels": s.num_input_channels, "num_outputs": s.label_manager.num_outputs,
             "mirror_axes": [], "needs_training": False, "seed": seed, "current_epoch": 0}
    save_checkpoint(state, s.fold_dir / "checkpoint_final.pth")
    logger.print(f"{s.method.name} needs no training: wrote {s.fold_dir / 'checkpoint_final.pth'}; predict with samplan_predict")
    return s.fold_dir


def _run_epochs(s: FoldSetup, network: torch.nn.Module, optimizer: Any, scheduler: Any, recipe: TrainingRecipe,
                logger: TrainingLogger, dev: torch.device, workers: int, seed: int, start_epoch: int,
                best_ema: float | None) -> float | None:
    """Epochs start_epoch..num_epochs-1: train, validate on patches, log, checkpoint latest (and best); returns the best EMA."""
    train_loader = make_loader(s.cache_dir, s.train_ids, recipe, s.label_manager, train=True,
                               seed=derived_seed(seed, "train"), num_workers=workers)
    val_loader = make_loader(s.cache_dir, s.val_ids, recipe, s.label_manager, train=False,
                             seed=derived_seed(seed, "val"), num_workers=workers // 2)
    n_fg = len(s.label_manager.foreground_keys)
    try:
        for epoch in range(start_epoch, recipe.num_epochs):
            t0 = time.perf_counter()
            seed_everything(derived_seed(seed, epoch, "epoch"))  # dropout etc. of this epoch only
            lr = optimizer.param_groups[0]["lr"]
            network.train()
            losses = [s.method.train_step(network, batch, recipe, optimizer, dev)["loss"]
                      for batch in train_loader.epoch(epoch, recipe.iterations_per_epoch)]
            network.eval()
            counts, val_losses = torch.zeros(3, n_fg, dtype=torch.float64), []
            with torch.no_grad():
                for batch in val_loader.epoch(epoch, recipe.val_iterations_per_epoch):
                    out = s.method.validation_step(network, batch, recipe, dev, s.label_manager)
                    val_losses.append(out["loss"])
                    counts += torch.tensor([out["tp"], out["fp"], out["fn"]], dtype=torch.float64)
            scheduler.step()
            tp, fp, fn = counts
            dice = [float(2 * a / (2 * a + b + c)) if 2 * a + b + c > 0 else float("nan") for a, b, c in zip(tp, fp, fn)]
            ema = logger.log_epoch(epoch, train_loss=sum(losses) / max(len(losses), 1),
                                   val_loss=sum(val_losses) / len(val_losses) if val_losses else float("nan"),
                                   dice_per_class=dice, lr=lr, epoch_time=time.perf_counter() - t0)
            logger.print(logger.epoch_line(epoch, recipe.num_epochs))
            improved = ema == ema and (best_ema is None or ema > best_ema)  # ema == ema: not NaN
            best_ema = ema if improved else best_ema
            state = _checkpoint(s, network, optimizer, scheduler, recipe, logger, epoch + 1, best_ema, seed)
            save_checkpoint(state, s.fold_dir / "checkpoint_latest.pth")
            if improved:
                save_checkpoint(state, s.fold_dir / "checkpoint_best.pth")
                logger.print(f"new best EMA pseudo Dice {ema:.4f}: checkpoint_best.pth")
            logger.write_progress()
    finally:
        for loader in (train_loader, val_loader):
            if callable(getattr(loader, "close", None)):
                loader.close()
    return best_ema


def run_final_validation(s: FoldSetup, dev: torch.device, logger: TrainingLogger, precision: str = "auto") -> dict[str, Any]:
    """Predict the fold's validation cases from the raw images with checkpoint_final, evaluate them against
    gt_segmentations into fold_k/validation/summary.json and log the real Dice next to the last pseudo Dice."""
    from samplan.dataset.dataset_json import group_images_by_case
    from samplan.evaluation.evaluate import dataset_settings, evaluate_folders
    from samplan.inference.predictor import Predictor
    from samplan.inference.prompted import PromptSource

    ending = s.dataset_json["file_ending"]
    images_dir = raw_root() / s.dataset_name / "imagesTr"
    images = group_images_by_case(images_dir, ending) if images_dir.is_dir() else {}
    missing = [c for c in s.val_ids if c not in images]
    if missing:
        raise SamplanError(f"final validation needs the raw images of {len(missing)} validation case(s) in {images_dir} "
                           f"(e.g. {missing[0]}); restore them and run samplan_train again with --val.")
    out_dir = s.fold_dir / "validation"
    if out_dir.is_dir():  # predictions of another split must not enter this evaluation
        for old in [*out_dir.glob(f"*{ending}"), out_dir / "summary.json"]:
            old.unlink(missing_ok=True)
    t0 = time.perf_counter()
    strategy = s.method.validation_prompt_strategy(s.plans)
    source = None if strategy is None else PromptSource(strategy=strategy, reference_dir=s.preprocessed_dir / "gt_segmentations",
                                                        file_ending=ending)
    predictor = Predictor.from_model_dir(s.model_dir, folds=[s.fold], checkpoint="final", device=dev, tta=True,
                                         progress=False, precision=precision, prompt_source=source)
    # a preprocessing thread (num_processes=0) overlaps the network work at no process start-up cost
    predictor.predict_cases({c: images[c] for c in s.val_ids}, out_dir, overwrite=True, num_processes=0)
    targets, ignore, _ = dataset_settings(str(s.model_dir / "dataset.json"))
    summary = evaluate_folders(s.preprocessed_dir / "gt_segmentations", out_dir, targets, ending,
                               output_file=out_dir / "summary.json", ignore_label=ignore,
                               # spawning evaluation workers costs seconds: worth it only for many cases
                               num_processes=None if len(s.val_ids) > 8 else 1, only_predicted=True, progress=False)
    per_label = ", ".join(f"{k}: {v['Dice']:.4f}" for k, v in summary["mean"].items())
    curves = logger.curves
    last = f"{curves['pseudo_dice'][-1]:.4f} (EMA {curves['ema_pseudo_dice'][-1]:.4f})" if curves["pseudo_dice"] else "n/a"
    prompted = "" if strategy is None else f" with '{strategy}' boxes from the reference masks (an oracle protocol)"
    logger.print(f"final validation of {len(s.val_ids)} case(s){prompted}, whole images in the original geometry: mean foreground "
                 f"Dice {summary['foreground_mean']['Dice']:.4f} [{per_label}]; last pseudo Dice (running, patches) "
                 f"{last}; {time.perf_counter() - t0:.1f} s; {out_dir / 'summary.json'}")
    return summary
