"""Training log: per-epoch curves (saved in checkpoints), a text log, progress.json and progress.png.

The running validation Dice is nnU-Net's "pseudo Dice": Dice of the summed tp/fp/fn over the random
validation patches of an epoch, averaged over foreground classes, and its exponential moving average
(0.9 * previous + 0.1 * new) that selects checkpoint_best. It is not the Dice of whole cases; the final
validation logs that one separately.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

from samplan.disk_space import disk_full_guard
from samplan.utils import atomic_path, save_json

# one value per completed epoch for each key; dice_per_class holds one list per epoch
CURVES = ("train_loss", "val_loss", "pseudo_dice", "ema_pseudo_dice", "dice_per_class", "lr", "epoch_time")
EMA_DECAY = 0.9


class TrainingLogger:
    """Curves of a training run plus its text log file (appended to, so a continued run keeps its history)."""

    def __init__(self, folder: str | Path, log_name: str = "training_log.txt", echo: bool = True, write: bool = True):
        self.folder = Path(folder)
        self.log_file = self.folder / log_name
        self.echo, self.write = echo, write  # write=False: a data-parallel rank other than 0 keeps only the curves
        self.curves: dict[str, list[Any]] = {k: [] for k in CURVES}

    @property
    def num_epochs_logged(self) -> int:
        """Number of epochs with a complete set of values."""
        return min(len(v) for v in self.curves.values())

    def print(self, message: str) -> None:
        """Append a timestamped line to the text log (and echo it on stdout)."""
        if not self.write:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {message}"
        with disk_full_guard(self.folder, detail=f" while appending to {self.log_file.name}"):
            with open(self.log_file, "a") as f:  # appended, not atomic: a cut-off line is harmless here
                f.write(line + "\n")
        if self.echo:
            print(line, file=sys.stdout, flush=True)

    def log_epoch(self, epoch: int, *, train_loss: float, val_loss: float, dice_per_class: list[float],
                  lr: float, epoch_time: float) -> float:
        """Record epoch `epoch` (must be the next one); returns the new EMA pseudo Dice."""
        if epoch != self.num_epochs_logged:
            raise ValueError(f"logging epoch {epoch} but {self.num_epochs_logged} epochs are logged")
        finite = [d for d in dice_per_class if not math.isnan(d)]
        pseudo = sum(finite) / len(finite) if finite else float("nan")
        previous = self.curves["ema_pseudo_dice"][-1] if self.curves["ema_pseudo_dice"] else None
        if previous is None or math.isnan(previous):
            ema = pseudo
        elif math.isnan(pseudo):
            ema = previous  # an epoch without any foreground in its patches leaves the average as it was
        else:
            ema = EMA_DECAY * previous + (1 - EMA_DECAY) * pseudo
        values = {"train_loss": train_loss, "val_loss": val_loss, "pseudo_dice": pseudo, "ema_pseudo_dice": ema,
                  "dice_per_class": [float(d) for d in dice_per_class], "lr": lr, "epoch_time": epoch_time}
        for k, v in values.items():
            self.curves[k].append(v if k == "dice_per_class" else float(v))
        return ema

    def epoch_line(self, epoch: int, num_epochs: int) -> str:
        """One line summarising a logged epoch: losses, pseudo Dice per class and its EMA, lr, time."""
        c = {k: v[epoch] for k, v in self.curves.items()}
        per_class = ", ".join(_fmt(d) for d in c["dice_per_class"])
        return (f"epoch {epoch + 1}/{num_epochs}  train loss {c['train_loss']:.4f}  val loss {c['val_loss']:.4f}  "
                f"pseudo Dice (running, patches) {_fmt(c['pseudo_dice'])} [{per_class}] EMA {_fmt(c['ema_pseudo_dice'])}  "
                f"lr {c['lr']:.2e}  {c['epoch_time']:.1f} s")

    def state_dict(self) -> dict[str, list[Any]]:
        """The curves as plain lists (for checkpoints)."""
        return {k: list(v) for k, v in self.curves.items()}

    def load_state_dict(self, state: dict[str, list[Any]]) -> None:
        """Restore curves from a checkpoint (keys this version does not know are dropped)."""
        self.curves = {k: list(state.get(k, [])) for k in CURVES}
        n = self.num_epochs_logged
        self.curves = {k: v[:n] for k, v in self.curves.items()}

    def write_progress(self, plot: bool = True) -> None:
        """Write progress.json (the curves) and progress.png (losses, Dice, lr, epoch time)."""
        if not self.write:
            return
        save_json({k: [_json_number(x) for x in v] for k, v in self.curves.items()}, self.folder / "progress.json")
        if plot and self.num_epochs_logged:
            plot_progress(self.curves, self.folder / "progress.png")


def _fmt(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{x:.4f}"


def _json_number(x: Any) -> Any:
    """NaN -> None (standard JSON), recursively for per-class lists."""
    if isinstance(x, list):
        return [_json_number(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def plot_progress(curves: dict[str, list[Any]], path: Path) -> None:
    """Three panels over epochs: train/val loss with pseudo Dice and its EMA, epoch time, learning rate."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and safe in worker threads
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = list(range(1, len(curves["train_loss"]) + 1))
    fig, axes = plt.subplots(3, 1, figsize=(9, 11), sharex=True)
    ax = axes[0]
    ax.plot(epochs, curves["train_loss"], "b-", label="train loss")
    ax.plot(epochs, curves["val_loss"], "r-", label="val loss")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, curves["pseudo_dice"], "g:", label="pseudo Dice (running, patches)")
    ax2.plot(epochs, curves["ema_pseudo_dice"], "g-", label="pseudo Dice EMA")
    ax2.set_ylabel("pseudo Dice")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", fontsize=8)
    axes[1].plot(epochs, curves["epoch_time"], "b-")
    axes[1].set_ylabel("epoch time [s]")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(epochs, curves["lr"], "b-")
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("epoch")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
