"""Where this rank sits in the pipeline, and the point-to-point sends of the estimator's passes.

Under pipeline parallelism each stage holds a slice of the layers: hidden states go forward
stage by stage, their gradients come back the same way, and each stage turns the activations
and gradients of its own layers into partial per-sequence norms that are summed over the
pipeline group at the end. With tied embeddings the first stage also sends its embedding
output gradients to the last stage, which holds the output layer's copy of the table and
computes the cross term of the two uses. With one stage every send is skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StageLinks:
    """This rank's pipeline stage and the global ranks of its neighbours."""

    first: bool = True
    last: bool = True
    size: int = 1
    group: Optional[Any] = None       # pipeline group (None with one stage)
    prev_rank: Optional[int] = None
    next_rank: Optional[int] = None
    first_rank: Optional[int] = None
    last_rank: Optional[int] = None

    @classmethod
    def from_megatron(cls) -> "StageLinks":
        """From megatron's parallel state; one stage when it is not initialised."""
        try:
            from megatron.core import parallel_state as ps
        except Exception:
            return cls()
        if not ps.model_parallel_is_initialized():
            return cls()
        size = ps.get_pipeline_model_parallel_world_size()
        if size == 1:
            return cls()
        if ps.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
            raise NotImplementedError("the gradient-norm estimator does not support virtual "
                                      "pipeline stages (interleaved schedules)")
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        return cls(first=first, last=last, size=size,
                   group=ps.get_pipeline_model_parallel_group(),
                   prev_rank=None if first else ps.get_pipeline_model_parallel_prev_rank(),
                   next_rank=None if last else ps.get_pipeline_model_parallel_next_rank(),
                   first_rank=ps.get_pipeline_model_parallel_first_rank(),
                   last_rank=ps.get_pipeline_model_parallel_last_rank())

    @property
    def single(self) -> bool:
        return self.size == 1

    # ------------------------------------------------------------- stage to stage
    def send_forward(self, hidden: torch.Tensor) -> None:
        dist.send(hidden.detach().contiguous(), self.next_rank)

    def recv_forward(self, shape: Sequence[int], dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.recv(out, self.prev_rank)
        return out

    def send_backward(self, grad: torch.Tensor) -> None:
        dist.send(grad.detach().contiguous(), self.prev_rank)

    def recv_backward(self, like: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(like)
        dist.recv(out, self.next_rank)
        return out

    # ------------------------------------------------------------- first to last (tied table)
    def send_to_last(self, tensor: torch.Tensor) -> None:
        dist.send(tensor.detach().contiguous(), self.last_rank)

    def recv_from_first(self, shape: Sequence[int], dtype: torch.dtype,
                        device: torch.device) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
        dist.recv(out, self.first_rank)
        return out

    def sum_over_stages(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Each stage's partial per-sequence norms summed over the pipeline (every stage gets
        the total)."""
        if self.single:
            return values
        on_device = values.to(device)
        dist.all_reduce(on_device, group=self.group)
        return on_device.to(values.device)
