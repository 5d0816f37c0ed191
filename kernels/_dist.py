"""Collectives over an optional process group (``None`` means no tensor parallelism)."""
from __future__ import annotations

from typing import Any, Optional

import torch


def group_active(group: Optional[Any]) -> bool:
    """True when ``group`` spans more than one process and needs a collective."""
    if group is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size(group) > 1


def all_reduce_(tensor: torch.Tensor, group: Optional[Any], op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum`` or ``max``) over ``group``; a no-op without one."""
    if group_active(group):
        red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(tensor, op=red, group=group)
    return tensor
