"""The compute budget the planner plans for: device, memory and the largest SAM input, as plain JSON in plans.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from samplan.errors import SamplanError

_DEVICE_DEFAULTS = {
    # memory_gb doubles as nnU-Net's GPU memory target for the U-Net plan, whose default is 8 GB;
    # max_sam_input: CPU training of a ViT at 1024 is impractical, so CPU plans stay small
    "cpu": {"memory_gb": 8.0, "max_sam_input": 256},
    "cuda": {"memory_gb": 8.0, "max_sam_input": 1024},
}


@dataclass(frozen=True)
class ComputeBudget:
    """What the planner may assume about the training machine.

    device: "cpu" or "cuda"; memory_gb: memory one training run may use (GPU memory on cuda, RAM on
    cpu), also the memory target of the U-Net configurations; max_sam_input: largest square input
    edge (pixels) a SAM-family method may plan.
    """

    device: str = "cpu"
    memory_gb: float = _DEVICE_DEFAULTS["cpu"]["memory_gb"]
    max_sam_input: int = _DEVICE_DEFAULTS["cpu"]["max_sam_input"]

    def __post_init__(self) -> None:
        if self.device not in _DEVICE_DEFAULTS:
            raise SamplanError(f"compute budget device {self.device!r} is not known; use one of {sorted(_DEVICE_DEFAULTS)}.")
        if self.memory_gb <= 0 or self.max_sam_input < 16:
            raise SamplanError(
                f"compute budget needs memory_gb > 0 and max_sam_input >= 16, got {self.memory_gb} and {self.max_sam_input}."
            )

    @classmethod
    def for_device(cls, device: str, memory_gb: float | None = None) -> "ComputeBudget":
        """The default budget of `device` ("cpu"/"cuda"), optionally with another memory size."""
        if device not in _DEVICE_DEFAULTS:
            raise SamplanError(f"compute budget device {device!r} is not known; use one of {sorted(_DEVICE_DEFAULTS)}.")
        d = _DEVICE_DEFAULTS[device]
        return cls(device, d["memory_gb"] if memory_gb is None else float(memory_gb), d["max_sam_input"])

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ComputeBudget":
        """Inverse of `to_dict`."""
        return cls(str(d["device"]), float(d["memory_gb"]), int(d["max_sam_input"]))
