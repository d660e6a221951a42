"""Processes of a data-parallel training (torch.distributed): who we are, starting them, reducing their numbers.

`samplan_train --num-devices N` starts N processes itself (spawned, one per GPU, or N CPU processes with the gloo
backend); under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set) each process joins the group
torchrun made. Rank 0 writes the log, the checkpoints and the tracker; every rank trains on its share of the global
batch (samplan.engine.data_parallel).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch

from samplan.errors import SamplanError

TIMEOUT = timedelta(minutes=30)  # a rank waiting for a slow final checkpoint write must not give up early


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files."""
        return self.rank == 0


def from_environment() -> DistributedContext | None:
    """The context torchrun describes in the environment, or None when this is a single-process run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return DistributedContext(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def rank_device(requested: str, ctx: DistributedContext) -> torch.device:
    """The device of a rank: cuda:LOCAL_RANK when CUDA is used, else the CPU (MPS has no multi-process training)."""
    cuda = requested in ("auto", "cuda") and torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise SamplanError("--device cuda was requested but CUDA is not available; use --device cpu.")
    if requested == "mps":
        raise SamplanError("--num-devices > 1 needs CUDA devices or the CPU; MPS trains in one process only.")
    if cuda:
        if ctx.local_rank >= torch.cuda.device_count():
            raise SamplanError(f"rank {ctx.rank} needs cuda:{ctx.local_rank} but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s); lower --num-devices.")
        torch.cuda.set_device(ctx.local_rank)
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def init_process_group(ctx: DistributedContext, device: torch.device) -> None:
    """Join the group (NCCL on CUDA, gloo on the CPU); MASTER_ADDR/MASTER_PORT come from the environment."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ctx.rank, world_size=ctx.world_size,
                                timeout=TIMEOUT)
    if device.type == "cpu":  # N processes share the cores: one thread pool each would oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))


def destroy_process_group() -> None:
    """Leave the group (no-op when none was joined)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (e.g. the precision its probe chose), or `value` outside a group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)  # between our own processes only, never a user's file
    return box[0]


def reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """The sums over the ranks of `values` (float64), or `values` themselves outside a group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for the spawned group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(num_processes: int, target: Callable[..., Any], args: tuple) -> None:
    """Run `target(rank, num_processes, *args)` in `num_processes` spawned processes and wait for all of them.

    A failing rank prints its own message; the others are stopped and SamplanError says which rank failed.
    """
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        mp.start_processes(target, args=(num_processes, *args), nprocs=num_processes, join=True, start_method="spawn")
    except mp.ProcessRaisedException as e:
        raise SamplanError(f"training rank {e.error_index} of {num_processes} failed:\n{e.msg.strip()}") from None
    except mp.ProcessExitedException as e:
        raise SamplanError(f"training rank {e.error_index} of {num_processes} exited with status {e.exit_code}; "
                           "its message is above.") from None
