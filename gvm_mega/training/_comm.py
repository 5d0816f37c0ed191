"""All-reduce of small host tensors over any backend (NCCL only takes CUDA tensors)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_host(tensor: torch.Tensor, op: dist.ReduceOp,
                    group: dist.ProcessGroup) -> torch.Tensor:
    """All-reduce a CPU tensor over ``group`` and return the result on the CPU."""
    if dist.get_backend(group) == "nccl":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=op, group=group)
        return on_device.cpu()
    dist.all_reduce(tensor, op=op, group=group)
    return tensor
