"""Optimisers, learning-rate schedules (from the plan's recipe sections) and seeds for training.

The poly schedule follows torch's convention (the trainer calls `step()` once at the end of every
epoch), which gives nnU-Net's learning rate for epoch e: lr0 * (1 - e / num_epochs) ** 0.9.
"""
from __future__ import annotations

import hashlib
import math
import random
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from samplan.experiment_planning.recipe_sections import (SGD, Adam, AdamW, ConstantSchedule, OneCycleSchedule, Optimizer,
                                                         PolySchedule, Schedule)


class PolyLRScheduler(torch.optim.lr_scheduler.LRScheduler):
    """lr(e) = base_lr * (1 - e / total_epochs) ** exponent, with e the number of completed `step()` calls.

    The horizon `total_epochs` is a setting of the run, not state: it is left out of `state_dict`, so a
    continued run may extend the number of epochs and the schedule follows the new horizon.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_epochs: int, exponent: float = 0.9):
        self.total_epochs, self.exponent = int(total_epochs), float(exponent)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        """Learning rates of all parameter groups for the current epoch (`self.last_epoch`)."""
        frac = min(max(self.last_epoch, 0) / max(self.total_epochs, 1), 1.0)
        return [base * (1.0 - frac) ** self.exponent for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """Plain state: step count and base learning rates (no horizon, see the class docstring)."""
        return {"last_epoch": int(self.last_epoch), "base_lrs": [float(b) for b in self.base_lrs],
                "exponent": self.exponent, "_step_count": int(getattr(self, "_step_count", 0))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count and set the optimiser's learning rate for it under the current horizon."""
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = [float(b) for b in state_dict["base_lrs"]]
        self.exponent = float(state_dict.get("exponent", self.exponent))
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


class OneCycleLRScheduler(PolyLRScheduler):
    """One cycle per run, stepped once per epoch: cosine warm-up from base_lr / div_factor to base_lr over the first
    `pct_start` of `total_epochs`, then cosine annealing to base_lr / (div_factor * final_div_factor).

    Like the poly schedule the horizon is a setting of the run (not in `state_dict`), so a continued run may change
    the number of epochs; torch's OneCycleLR would refuse to step past its fixed total.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_epochs: int, pct_start: float, div_factor: float,
                 final_div_factor: float):
        self.pct_start, self.div_factor, self.final_div_factor = float(pct_start), float(div_factor), float(final_div_factor)
        super().__init__(optimizer, total_epochs, 0.0)

    def get_lr(self) -> list[float]:
        """Learning rates of all parameter groups for the current epoch (`self.last_epoch`)."""
        e, total = max(self.last_epoch, 0), max(self.total_epochs - 1, 1)
        peak = self.pct_start * total
        out = []
        for base in self.base_lrs:
            start, end = base / self.div_factor, base / (self.div_factor * self.final_div_factor)
            if e <= peak and peak > 0:
                lo, hi, t = start, base, e / peak
            else:
                lo, hi, t = base, end, min((e - peak) / max(total - peak, 1e-8), 1.0)
            out.append(hi + (lo - hi) * (1 + math.cos(math.pi * t)) / 2)
        return out


def make_sgd(lr: float, momentum: float, nesterov: bool, weight_decay: float) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """A factory params -> SGD with these settings (nnU-Net: lr 1e-2, momentum 0.99, Nesterov, weight decay 3e-5)."""

    def make(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    return make


def make_poly(exponent: float = 0.9) -> Callable[[torch.optim.Optimizer, int], PolyLRScheduler]:
    """A factory (optimizer, num_epochs) -> PolyLRScheduler."""

    def make(optimizer: torch.optim.Optimizer, num_epochs: int) -> PolyLRScheduler:
        return PolyLRScheduler(optimizer, num_epochs, exponent)

    return make


def make_optimizer(section: Optimizer) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """A factory params -> the planned optimiser over the trainable parameters only (frozen ones never reach it)."""
    if isinstance(section, SGD):
        return _trainable_only(make_sgd(float(section.lr), float(section.momentum), bool(section.nesterov),
                                        float(section.weight_decay)))
    if isinstance(section, AdamW):
        lr, wd = float(section.lr), float(section.weight_decay)
        return _trainable_only(lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd))
    if isinstance(section, Adam):
        lr, wd = float(section.lr), float(section.weight_decay)
        return _trainable_only(lambda params: torch.optim.Adam(params, lr=lr, weight_decay=wd))
    raise ValueError(f"no optimiser for {section!r}")


def _trainable_only(make: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
                    ) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    def make_trainable(params: Iterable[Any]) -> torch.optim.Optimizer:
        params = list(params)
        if params and isinstance(params[0], dict):  # parameter groups: "lr_scale" x the optimiser's lr
            groups = [({"params": [p for p in g["params"] if p.requires_grad]}, float(g.get("lr_scale", 1.0)))
                      for g in params]
            groups = [(g, scale) for g, scale in groups if g["params"]]
            optimizer = make([g for g, _ in groups])
            for group, (_, scale) in zip(optimizer.param_groups, groups):
                group["lr"] = group["lr"] * scale
            return optimizer
        return make([p for p in params if p.requires_grad])

    return make_trainable


def make_schedule(section: Schedule) -> Callable[[torch.optim.Optimizer, int], PolyLRScheduler]:
    """A factory (optimizer, num_epochs) -> the planned schedule: poly, one cycle, or constant (poly with exponent 0)."""
    if isinstance(section, OneCycleSchedule):
        pct, div, final = float(section.pct_start), float(section.div_factor), float(section.final_div_factor)
        return lambda optimizer, num_epochs: OneCycleLRScheduler(optimizer, num_epochs, pct, div, final)
    if isinstance(section, PolySchedule):
        return make_poly(float(section.exponent))
    if isinstance(section, ConstantSchedule):
        return make_poly(0.0)  # (1 - e / E) ** 0 == 1: the trainer's scheduler protocol with a constant rate
    raise ValueError(f"no schedule for {section!r}")


def derived_seed(*parts: int | str) -> int:
    """A 31-bit seed from a tuple (e.g. (seed, epoch, "train")): stable across processes and Python runs."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's and Python's global generators (used once per epoch, never as a stream across epochs)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
