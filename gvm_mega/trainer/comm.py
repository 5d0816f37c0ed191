"""Driver-to-ranks hand-off: the driver (global rank 0) decides, every rank receives.

Every call is a collective: all ranks call it in the same order, the driver with the value,
the others with ``None``.
"""
from __future__ import annotations

from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def from_driver(value: T) -> T:
    """The driver's ``value`` on every rank (a picklable object)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box: list[Any] = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
