"""DistributedDataParallel for methods whose training steps do more than `network(x)`.

DDP averages gradients only for what runs through its own forward. samplan's methods call submodules directly
(`network.image_encoder(...)`, a prompt encoder, a SAM branch on selected slices), so the trainer wraps a small module
whose forward runs a closure on the network, and the steps compute their training loss with `training_loss(network,
compute)`: through DDP when the trainer attached one, a plain call otherwise. The same step code serves one process
and many.

Each rank trains on its share of the global batch; its loss is weighted by `world_size * local_batch /
global_batch` so that the averaged gradient is the gradient of the global batch's mean loss even when the batch does
not divide evenly. A loss that sums over the batch before dividing (nnU-Net's batch Dice) sums over all ranks with
`sum_over_ranks`, whose gradient flows back to every rank's samples: the result is the global batch's loss exactly.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

_ATTACHED = "_samplan_data_parallel"  # kept in the network's __dict__: not a submodule, never in its state dict
_IN_TRAINING_FORWARD = contextvars.ContextVar("samplan_data_parallel_forward", default=False)


class _ClosureModule(nn.Module):
    """A module whose forward is `compute(network)`, so DDP sees every parameter the closure uses."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, compute: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:  # noqa: D102 - see class
        return compute(self.network)


def attach(network: nn.Module, device: torch.device, loss_weight: float = 1.0) -> nn.Module:
    """Wrap `network` in DistributedDataParallel (the process group must be initialised); returns the wrapper.

    Parameters a step leaves unused (e.g. a SAM branch on a batch without selected slices) are allowed. On CUDA the
    BatchNorm layers (promise's APM head, TinyViT) become SyncBatchNorm in place, keeping their parameters, so their
    statistics are those of the global batch; torch has no SyncBatchNorm for the CPU, where each rank normalises its
    own share.
    """
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(network)  # replaces the children; the Parameter objects stay
    ddp = DistributedDataParallel(_ClosureModule(network), device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=True)
    network.__dict__[_ATTACHED] = (ddp, float(loss_weight))
    return ddp


def detach(network: nn.Module) -> None:
    """Forget the DDP wrapper (the network keeps its trained parameters)."""
    network.__dict__.pop(_ATTACHED, None)


def training_loss(network: nn.Module, compute: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
    """`compute(network)` (a scalar loss); with gradients on and DDP attached, run through DDP and weighted by the
    rank's share of the global batch, so `backward()` leaves every rank with the global batch's mean gradient."""
    attached = network.__dict__.get(_ATTACHED)
    if attached is None or not torch.is_grad_enabled():
        return compute(network)
    ddp, weight = attached
    with summing_over_ranks():
        loss = ddp(compute)
    return loss * weight if weight != 1.0 else loss


@contextlib.contextmanager
def summing_over_ranks(active: bool = True) -> Iterator[None]:
    """Let `sum_over_ranks` sum outside `training_loss` too (validation batches that every rank has a share of)."""
    token = _IN_TRAINING_FORWARD.set(active)
    try:
        yield
    finally:
        _IN_TRAINING_FORWARD.reset(token)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Inside a data-parallel training forward: `t` summed over the ranks, differentiable (each rank's gradient
    reaches its own samples); elsewhere `t` itself.

    The rank weights of `training_loss` sum to world_size, so a loss built from these sums gets exactly the
    single-process gradient after DDP's averaging, for even and uneven splits alike.
    """
    if not _IN_TRAINING_FORWARD.get():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.stack(all_gather(t)).sum(0)


def shard(n: int, rank: int, world_size: int) -> range:
    """Indices of the global batch (0..n-1) that rank `rank` of `world_size` trains on: contiguous, sizes differ by at
    most one, their union in rank order is range(n)."""
    bounds = np.linspace(0, n, world_size + 1).round().astype(int) if world_size > 1 else np.array([0, n])
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def shard_batch(batch: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Rank `rank`'s share of a method loader's batch dict: tensors and lists as long as `keys` are cut along the batch
    (lists are per sample; the patch loader, whose deep-supervision targets are lists per level, shards itself)."""
    if world_size == 1:
        return batch
    n = len(batch["keys"])
    idx = shard(n, rank, world_size)

    def part(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n:
            return v[idx.start:idx.stop]
        if isinstance(v, list) and len(v) == n:
            return v[idx.start:idx.stop]
        return v

    return {k: part(v) for k, v in batch.items()}
