"""The `samplan_train` job: train one fold (or write an untrained method's model folder), then validate it on the
fold's validation cases from the raw images, in the original geometry (nnU-Net's final validation)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from samplan.dataset.dataset_json import group_images_by_case
from samplan.devices import resolve_device
from samplan.errors import SamplanError
from samplan.evaluation.evaluate import dataset_settings, evaluate_folders
from samplan.inference.predictor import Predictor
from samplan.inference.prompted import PromptSource
from samplan.locks import LOCK_NAME, exclusive_lock
from samplan.models.checkpoint import load_checkpoint
from samplan.paths import raw_root
from samplan.training.logger import TrainingLogger
from samplan.training.trackers import check_tracker
from samplan.training.distributed import (DistributedContext, destroy_process_group, from_environment,
                                          init_process_group, launch, rank_device)
from samplan.training.trainer import FoldSetup, check_world_size, prepare_fold, train, write_untrained_fold


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
    save_probabilities: bool = False,
    validation_tta: bool = True,
    tracker: str | None = None,
    num_devices: int = 1,
) -> Path:
    """Train one fold of `method_name` on a preprocessed dataset, then validate it; returns the fold folder.

    `only_validate` runs only the final validation of checkpoint_final; `final_validation=False` skips it after
    training. `precision`: auto|fp32|bf16|fp16 autocast (samplan.devices). `method_overrides`: keys merged into the
    method's plan section (samplan.training.trainer.prepare_fold). `save_probabilities`: the final validation also
    writes {case}.npz probabilities in the original geometry (for ensembles); `validation_tta=False` validates without
    mirroring (faster, e.g. for benchmarks). `tracker`: also log the epochs to tensorboard|mlflow|none
    (samplan.training.trackers). A method without training gets its model folder
    (samplan.training.trainer.write_untrained_fold). `num_devices` > 1 trains data-parallel in that many spawned
    processes (one per CUDA device, or CPU processes with gloo); under torchrun the processes torchrun started train
    together, whatever `num_devices` says. The final validation runs in one process. The other arguments:
    samplan.training.trainer.train.
    """
    tracker = None if only_validate else check_tracker(tracker)  # a missing package fails before anything is written
    s = prepare_fold(dataset, method_name, configuration, fold, method_overrides)
    if only_validate:  # before the lock, which would create the fold folder of a fold never trained
        load_checkpoint(s.fold_dir / "checkpoint_final.pth")
    torchrun = from_environment()
    parallel = (torchrun is not None or num_devices > 1) and not only_validate and s.method.needs_training
    train_args = dict(epochs=epochs, iters_per_epoch=iters_per_epoch, val_iters=val_iters,
                      continue_training=continue_training, pretrained_weights=pretrained_weights, seed=seed,
                      num_workers=num_workers, precision=precision, tracker=tracker)
    if parallel:
        check_world_size(s.method.training_recipe(s.mp, s.label_manager),
                         torchrun.world_size if torchrun else num_devices)
    if torchrun is not None and not torchrun.is_main:  # rank 0 holds the fold's lock and validates
        if parallel:
            train_in_group(s, torchrun, device, train_args)
        return s.fold_dir
    # prepare_fold writes nothing; one training (or validation) of a fold at a time from here on
    with exclusive_lock(s.fold_dir / LOCK_NAME, f"training {s.model_dir.name} fold {s.fold} of {s.dataset_name}"):
        dev = resolve_device(device)
        if not s.method.needs_training:
            return write_untrained_fold(s, seed)
        if only_validate or parallel:
            if parallel and torchrun is not None:
                train_in_group(s, torchrun, device, train_args)
            elif parallel:
                launch(num_devices, train_rank, (dataset, method_name, configuration, fold, method_overrides, device,
                                                 train_args))
            logger = TrainingLogger(s.fold_dir)
            logger.load_state_dict(load_checkpoint(s.fold_dir / "checkpoint_final.pth")["logging"])
        else:
            logger = train(s, dev, **train_args)
        if final_validation or only_validate:
            run_final_validation(s, dev, logger, precision, save_probabilities, tta=validation_tta)
        return s.fold_dir


def train_rank(rank: int, world_size: int, dataset: str | int, method_name: str, configuration: str | None,
               fold: int | str, method_overrides: dict[str, Any] | None, device: str,
               train_args: dict[str, Any]) -> None:
    """A process spawned by `launch` (module level, so that it pickles): resolve the fold, then `train_in_group`."""
    ctx = DistributedContext(rank, world_size, rank)
    try:
        s = prepare_fold(dataset, method_name, configuration, fold, method_overrides)
    except SamplanError as e:
        print(f"error (training rank {rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    train_in_group(s, ctx, device, train_args)


def train_in_group(s: FoldSetup, ctx: DistributedContext, device: str, train_args: dict[str, Any]) -> None:
    """One process of a data-parallel training: join the group, train on this rank's share, leave the group.

    A SamplanError is printed by the rank that met it, which then exits with status 1 (launch stops the others).
    """
    try:
        dev = rank_device(device, ctx)
        init_process_group(ctx, dev)
        try:
            train(s, dev, dist=ctx, **train_args)
        finally:
            destroy_process_group()
    except SamplanError as e:
        print(f"error (training rank {ctx.rank}): {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def validation_images(s: FoldSetup) -> dict[str, list[Path]]:
    """The raw image files of the fold's validation cases; SamplanError naming a missing one."""
    ending = s.dataset_json["file_ending"]
    images_dir = raw_root() / s.dataset_name / "imagesTr"
    images = group_images_by_case(images_dir, ending) if images_dir.is_dir() else {}
    missing = [c for c in s.val_ids if c not in images]
    if missing:
        raise SamplanError(f"final validation needs the raw images of {len(missing)} validation case(s) in {images_dir} "
                           f"(e.g. {missing[0]}); restore them and run samplan_train again with --val.")
    return {c: images[c] for c in s.val_ids}


def run_final_validation(s: FoldSetup, dev: torch.device, logger: TrainingLogger, precision: str = "auto",
                         save_probabilities: bool = False, tta: bool = True) -> dict[str, Any]:
    """Predict the fold's validation cases from the raw images with checkpoint_final, evaluate them against
    gt_segmentations into fold_k/validation/summary.json and log the real Dice next to the last pseudo Dice."""
    ending = s.dataset_json["file_ending"]
    images = validation_images(s)
    out_dir = s.fold_dir / "validation"
    if out_dir.is_dir():  # predictions of another split must not enter this evaluation
        for old in [*out_dir.glob(f"*{ending}"), *out_dir.glob("*.npz"), out_dir / "summary.json"]:
            old.unlink(missing_ok=True)
    t0 = time.perf_counter()
    strategy = s.method.validation_prompt_strategy(s.mp)
    source = None if strategy is None else PromptSource(strategy=strategy, file_ending=ending,
                                                        reference_dir=s.preprocessed_dir / "gt_segmentations")
    predictor = Predictor.from_model_dir(s.model_dir, folds=[s.fold], checkpoint="final", device=dev, tta=tta,
                                         progress=False, precision=precision, prompt_source=source)
    # a preprocessing thread (num_processes=0) overlaps the network work at no process start-up cost
    predictor.predict_cases(images, out_dir, save_probabilities=save_probabilities, overwrite=True, num_processes=0)
    targets, ignore, _ = dataset_settings(str(s.model_dir / "dataset.json"))
    summary = evaluate_folders(s.preprocessed_dir / "gt_segmentations", out_dir, targets, ending,
                               output_file=out_dir / "summary.json", ignore_label=ignore,
                               # spawning evaluation workers costs seconds: worth it only for many cases
                               num_processes=None if len(s.val_ids) > 8 else 1, only_predicted=True, progress=False)
    per_label = ", ".join(f"{k}: {v['Dice']:.4f}" for k, v in summary["mean"].items())
    curves = logger.curves
    last = (f"{curves['pseudo_dice'][-1]:.4f} (EMA {curves['ema_pseudo_dice'][-1]:.4f})" if curves["pseudo_dice"]
            else "n/a")
    prompted = "" if strategy is None else f" with '{strategy}' boxes from the reference masks (an oracle protocol)"
    logger.print(f"final validation of {len(s.val_ids)} case(s){prompted}, whole images in the original geometry: "
                 f"mean foreground Dice {summary['foreground_mean']['Dice']:.4f} [{per_label}]; last pseudo Dice "
                 f"(running, patches) {last}; {time.perf_counter() - t0:.1f} s; {out_dir / 'summary.json'}")
    return summary
