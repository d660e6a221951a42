"""A data-parallel smoke check that every trainable method's tests share: two gloo CPU processes train one fold."""
from __future__ import annotations

import math

import torch

from samplan.engine.optim import seed_everything
from samplan.pipeline.train import train_fold
from samplan.training.trainer import DEFAULT_SEED, prepare_fold


def check_two_process_training(dataset: str, method: str, configuration: str | None, overrides: dict,
                               fold: int | str = 0) -> None:
    """Train 1 epoch of 2 steps in two gloo processes: the trainable weights moved, the frozen ones did not, the loss
    is finite and rank 0 alone wrote the log."""
    s = prepare_fold(dataset, method, configuration, fold, overrides)
    seed_everything(DEFAULT_SEED)  # the trainer's initial network
    network = s.method.build_network(s.mp, s.num_input_channels, s.label_manager.num_outputs)
    s.method.initialize_pretrained(network, s.mp)
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    fold_dir = train_fold(dataset, method, configuration, fold, epochs=1, iters_per_epoch=2, val_iters=1,
                          num_workers=0, precision="fp32", method_overrides=overrides, final_validation=False,
                          num_devices=2, device="cpu")
    state = torch.load(fold_dir / "checkpoint_final.pth", weights_only=True)
    weights = state["network_weights"]
    moved = {n for n in trainable if not torch.equal(weights[n], initial[n])}
    assert len(moved) > len(trainable) // 2, f"{len(moved)} of {len(trainable)} trainable tensors changed"
    frozen = [n for n, _ in network.named_parameters() if n not in trainable]
    assert all(torch.equal(weights[n], initial[n]) for n in frozen)
    assert all(math.isfinite(x) for x in state["logging"]["train_loss"])
    log = (fold_dir / "training_log.txt").read_text()
    assert "2 data-parallel processes" in log and log.count("epoch 1/1 ") == 1
