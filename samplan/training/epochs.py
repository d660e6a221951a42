"""The epoch loop of a training: train, validate on patches, log (and track), checkpoint latest (and best).

In a data-parallel run every rank runs this loop on its share of each batch; the losses and the validation counts
are summed over the ranks before they are logged, so every rank holds the same curves and chooses the same best
checkpoint, and rank 0 writes the files.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from samplan.dataset.labels import LabelManager
from samplan.engine.data_parallel import shard, shard_batch, summing_over_ranks
from samplan.engine.optim import derived_seed, seed_everything
from samplan.engine.recipe import TrainingRecipe
from samplan.models.checkpoint import save_checkpoint
from samplan.training.distributed import reduce_sum
from samplan.training.fold_state import FoldSetup, Run
from samplan.training.trackers import Tracker, class_names, epoch_metrics


def make_loader(cache_dir: Path, case_ids: list[str], recipe: TrainingRecipe, label_manager: LabelManager, *,
                train: bool, seed: int, num_workers: int, rank: int = 0, world_size: int = 1) -> Any:
    """The patch loader of one split (module-level so that tests can substitute a stand-in); with `world_size` > 1
    its batches are rank `rank`'s share of each global batch."""
    from samplan.training.data_loader import PatchLoader

    return PatchLoader(cache_dir, case_ids, recipe, label_manager, train=train, seed=seed, num_workers=num_workers,
                       rank=rank, world_size=world_size)


class _ShardedLoader:
    """A method's own loader cut to this rank's share of each batch (ranks whose share is empty skip the batch)."""

    def __init__(self, loader: Any, rank: int, world_size: int):
        self.loader, self.rank, self.world_size = loader, rank, world_size

    def epoch(self, e: int, n_batches: int) -> Any:
        for batch in self.loader.epoch(e, n_batches):
            part = shard_batch(batch, self.rank, self.world_size)
            if len(part["keys"]):
                yield part

    def close(self) -> None:
        if callable(getattr(self.loader, "close", None)):
            self.loader.close()


def _loader(s: FoldSetup, run: Run, case_ids: list[str], train: bool, seed: int, workers: int) -> Any:
    """The method's own loader for the split (sharded in a data-parallel run), else the patch loader."""
    rank, world = (run.dist.rank, run.dist.world_size) if run.dist else (0, 1)
    own = s.method.training_loader(s.mp, s.cache_dir, case_ids, run.recipe, s.label_manager, train=train, seed=seed)
    if own is not None:
        return _ShardedLoader(own, rank, world) if world > 1 else own
    return make_loader(s.cache_dir, case_ids, run.recipe, s.label_manager, train=train, seed=seed,
                       num_workers=workers, rank=rank, world_size=world)


def local_share(run: Run) -> float:
    """This rank's fraction of each global batch (1 in a single-process run)."""
    if run.dist is None:
        return 1.0
    b = int(run.recipe.batch_size)
    return len(shard(b, run.dist.rank, run.dist.world_size)) / b


def _train_epoch(s: FoldSetup, run: Run, loader: Any, epoch: int, dev: torch.device) -> float:
    """One epoch of optimiser steps; the mean training loss (of the global batches in a data-parallel run, whose
    steps return their share's loss weighted by world_size * share: the mean over the ranks is the global mean)."""
    run.network.train()
    losses = [s.method.train_step(run.network, batch, run.recipe, run.optimizer, dev, s.mp)["loss"]
              for batch in loader.epoch(epoch, run.recipe.iterations_per_epoch)]
    total, n = reduce_sum([sum(losses), len(losses)], dev)
    return total / max(n, 1)


def _validate_epoch(s: FoldSetup, run: Run, loader: Any, epoch: int,
                    dev: torch.device) -> tuple[float, list[float]]:
    """Validation patches of one epoch: the mean loss and the pseudo Dice per foreground class (from summed counts)."""
    run.network.eval()
    n_fg = len(s.label_manager.foreground_keys)
    counts = torch.zeros(3, n_fg, dtype=torch.float64)
    loss_sum, n_losses = 0.0, 0
    # patch batches give every rank a share, so a batch Dice can sum over the ranks; a method's own loader may not
    in_step = run.dist is not None and not isinstance(loader, _ShardedLoader)
    with torch.no_grad(), summing_over_ranks(in_step):
        for batch in loader.epoch(epoch, run.recipe.val_iterations_per_epoch):
            out = s.method.validation_step(run.network, batch, run.recipe, dev, s.label_manager, s.mp)
            # the global mean weighs each rank's share by its size (true also of a batch Dice summed over the ranks)
            weight = len(batch["keys"]) if run.dist else 1
            loss_sum, n_losses = loss_sum + out["loss"] * weight, n_losses + weight
            counts += torch.tensor([out["tp"], out["fp"], out["fn"]], dtype=torch.float64)
    summed = reduce_sum([loss_sum, n_losses, *counts.flatten().tolist()], dev)
    loss_sum, n_losses = summed[:2]
    tp, fp, fn = torch.tensor(summed[2:], dtype=torch.float64).reshape(3, n_fg)
    dice = [float(2 * a / (2 * a + b + c)) if 2 * a + b + c > 0 else float("nan") for a, b, c in zip(tp, fp, fn)]
    return (loss_sum / n_losses if n_losses else float("nan")), dice


def run_epochs(s: FoldSetup, run: Run, dev: torch.device, workers: int, tracker: Tracker) -> None:
    """Epochs start_epoch..num_epochs-1: train, validate on patches, log (and track), checkpoint latest (and best)."""
    recipe, logger = run.recipe, run.logger
    main = run.dist is None or run.dist.is_main
    names = class_names(s.dataset_json, s.label_manager.foreground_keys)
    train_loader = _loader(s, run, s.train_ids, True, derived_seed(run.seed, "train"), workers)
    val_loader = _loader(s, run, s.val_ids, False, derived_seed(run.seed, "val"), workers // 2)
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
            if main:
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
