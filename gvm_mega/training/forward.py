"""Samples as the policy sees them, and megatron's pipeline schedule over packed micro-batches.

- :class:`SampleBatch`: this data-parallel rank's samples (prompt + response token ids) with
  optional per-sample advantages and per-response-token behaviour / reference log-probs.
- :func:`run_schedule`: megatron's forward(-backward) schedule over collated micro-batches;
  the training step and the forward-only log-probs share it.
- :func:`forward_logprobs`: per-token log-probs and entropy of the response tokens, forward
  only (behaviour and reference log-probs), equal to a full-vocabulary ``log_softmax``.

Every rank of one data-parallel replica (its TP x PP ranks) holds the same samples. The
log-probs are computed on the last pipeline stage and broadcast over the pipeline group, so
:func:`forward_logprobs` returns the same values on every rank of the replica.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from gvm_mega.training.logprobs import vocab_parallel_logprobs
from gvm_mega.training.packing import (
    MicroBatch,
    collate_micro_batch,
    input_lengths,
    plan_micro_batches,
)

__all__ = ["ResponseLogProbs", "SampleBatch", "broadcast_from_last_stage", "forward_logprobs",
           "pack_batch", "run_schedule", "to_device"]

TOKEN_FIELDS = ("old_logprobs", "ref_logprobs")


@dataclass
class SampleBatch:
    """This rank's samples: ``sequences[i]`` is prompt + response, the first
    ``prompt_lengths[i]`` tokens being the prompt.

    ``advantages`` has one value per sample; ``old_logprobs`` (behaviour policy) and
    ``ref_logprobs`` (frozen reference) one value per response token.
    """

    sequences: list[list[int]]
    prompt_lengths: list[int]
    advantages: Optional[list[float]] = None
    old_logprobs: Optional[list[list[float]]] = None
    ref_logprobs: Optional[list[list[float]]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sequences = [list(map(int, s)) for s in self.sequences]
        self.prompt_lengths = [int(p) for p in self.prompt_lengths]
        n = len(self.sequences)
        if len(self.prompt_lengths) != n:
            raise ValueError(f"SampleBatch: {n} sequences but {len(self.prompt_lengths)} "
                             f"prompt lengths")
        for i, (seq, plen) in enumerate(zip(self.sequences, self.prompt_lengths)):
            if not 1 <= plen < len(seq):
                raise ValueError(f"SampleBatch: sample {i} has prompt length {plen} and "
                                 f"{len(seq)} tokens; needs 1 <= prompt length < tokens "
                                 f"(at least one response token)")
        if self.advantages is not None:
            self.advantages = [float(a) for a in self.advantages]
            if len(self.advantages) != n:
                raise ValueError(f"SampleBatch: {len(self.advantages)} advantages for "
                                 f"{n} samples")
        for name in TOKEN_FIELDS:
            values = getattr(self, name)
            if values is None:
                continue
            values = [[float(v) for v in row] for row in values]
            setattr(self, name, values)
            if len(values) != n:
                raise ValueError(f"SampleBatch: {name} has {len(values)} rows for {n} samples")
            for i, row in enumerate(values):
                if len(row) != self.response_length(i):
                    raise ValueError(f"SampleBatch: {name}[{i}] has {len(row)} values for "
                                     f"{self.response_length(i)} response tokens")

    def __len__(self) -> int:
        return len(self.sequences)

    def response_length(self, i: int) -> int:
        return len(self.sequences[i]) - self.prompt_lengths[i]

    @property
    def response_lengths(self) -> list[int]:
        return [self.response_length(i) for i in range(len(self))]

    def select(self, indices: Sequence[int]) -> "SampleBatch":
        """The samples ``indices`` (e.g. this data-parallel rank's share)."""
        def pick(values):
            return None if values is None else [values[i] for i in indices]

        return SampleBatch([self.sequences[i] for i in indices],
                           [self.prompt_lengths[i] for i in indices],
                           advantages=pick(self.advantages), old_logprobs=pick(self.old_logprobs),
                           ref_logprobs=pick(self.ref_logprobs), meta=dict(self.meta))

    def with_values(self, **values: Any) -> "SampleBatch":
        """A copy with some of ``advantages``/``old_logprobs``/``ref_logprobs`` replaced."""
        fields = dict(advantages=self.advantages, old_logprobs=self.old_logprobs,
                      ref_logprobs=self.ref_logprobs)
        unknown = set(values) - set(fields)
        if unknown:
            raise ValueError(f"SampleBatch has no field(s) {sorted(unknown)}")
        fields.update(values)
        return SampleBatch(self.sequences, self.prompt_lengths, meta=dict(self.meta), **fields)


class ResponseLogProbs(NamedTuple):
    """Per-sample fp32 tensors over the response tokens (one entry per sample, in order)."""

    logprobs: list[torch.Tensor]
    entropy: list[torch.Tensor]

    def as_lists(self) -> list[list[float]]:
        return [t.tolist() for t in self.logprobs]


def pack_batch(batch: SampleBatch, budget: int, *, pad_id: int = 0,
               group: Optional[dist.ProcessGroup] = None) -> list[MicroBatch]:
    """Collated micro-batches of ``batch`` under the token ``budget``.

    With ``group`` (the data-parallel group) every rank of it gets the same count.
    """
    plan = plan_micro_batches(input_lengths(batch.sequences), budget, group=group)
    token_values = {name: getattr(batch, name) for name in TOKEN_FIELDS
                    if getattr(batch, name) is not None}
    sample_values = {} if batch.advantages is None else {"advantages": batch.advantages}
    return [collate_micro_batch(batch.sequences, batch.prompt_lengths, idx, pad_id=pad_id,
                                response_values=token_values, sample_values=sample_values)
            for idx in plan]


LossFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict]]


def _compute_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    """The micro-batch with every tensor on ``device`` (the model's)."""
    if mb.tokens.device == device:
        return mb
    return MicroBatch(mb.indices, mb.tokens.to(device), mb.targets.to(device),
                      mb.loss_mask.to(device), mb.position_ids.to(device),
                      {k: v.to(device) for k, v in mb.token_values.items()},
                      {k: v.to(device) for k, v in mb.sample_values.items()})


def run_schedule(model: torch.nn.Module, micro_batches: Sequence[MicroBatch], loss_fn: LossFn,
                 *, forward_only: bool) -> list[dict]:
    """Megatron's forward(-backward) schedule over ``micro_batches``; the loss dicts of the
    last pipeline stage (empty elsewhere).

    Micro-batches are built on the CPU and moved to the model's device one at a time.

    ``loss_fn(micro_batch, logits)`` gets this rank's vocabulary shard of the logits,
    ``[rows, length, V / tp]``, and returns ``(loss, metrics)``. Micro-batches differ in shape,
    so the model config is switched to ``variable_seq_lengths`` under pipeline parallelism.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if not micro_batches:
        raise ValueError("run_schedule needs at least one micro-batch")
    config = get_model_config(model)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        config.variable_seq_lengths = True

    device = _compute_device()

    def forward_step(data_iterator, chunk):
        mb = to_device(next(data_iterator), device)
        output = chunk(mb.tokens, mb.position_ids, attention_mask=None)
        return output, lambda logits: loss_fn(mb, logits)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches),
        seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
        micro_batch_size=max(mb.tokens.shape[0] for mb in micro_batches),
        forward_only=forward_only)


def broadcast_from_last_stage(tensor: Optional[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """``tensor`` (fp32, given on the last pipeline stage) on every rank of the pipeline group."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        assert tensor is not None
        return tensor
    group = ps.get_pipeline_model_parallel_group()
    src = ps.get_pipeline_model_parallel_last_rank()
    buf = tensor if tensor is not None else torch.empty(tuple(shape), dtype=torch.float32)
    on_gpu = dist.get_backend(group) == "nccl"
    if on_gpu:
        buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
    dist.broadcast(buf, src=src, group=group)
    return buf.cpu() if on_gpu else buf


def forward_logprobs(model: torch.nn.Module, batch: SampleBatch, *, micro_batch_tokens: int,
                     vocab_size: Optional[int] = None, temperature: float = 1.0,
                     pad_id: int = 0) -> ResponseLogProbs:
    """Log-probs and entropy of each sample's response tokens, forward only.

    ``model`` is this rank's megatron GPT model (DDP-wrapped or not). The micro-batch count
    is this replica's own (forward-only needs no data-parallel lockstep). Returned on every
    rank of the replica (last stage computes, pipeline group broadcast).
    """
    if len(batch) == 0:
        return ResponseLogProbs([], [])
    micro_batches = pack_batch(batch, micro_batch_tokens, pad_id=pad_id)

    def loss_fn(mb: MicroBatch, logits: torch.Tensor):
        lp, ent = vocab_parallel_logprobs(logits, mb.targets, temperature=temperature,
                                          vocab_size=vocab_size)
        return logits.new_zeros(()), {"logprobs": lp.detach().float(),
                                      "entropy": ent.detach().float()}

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = run_schedule(model, micro_batches, loss_fn, forward_only=True)
    finally:
        model.train(was_training)

    lengths = batch.response_lengths
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    flat = None
    if parts:  # last pipeline stage
        flat = torch.empty(2, offsets[-1], dtype=torch.float32)
        for mb, part in zip(micro_batches, parts):
            lp, ent = part["logprobs"].cpu(), part["entropy"].cpu()
            for row, i in enumerate(mb.indices):
                start = batch.prompt_lengths[i] - 1
                stop = len(batch.sequences[i]) - 1
                flat[0, offsets[i]:offsets[i + 1]] = lp[row, start:stop]
                flat[1, offsets[i]:offsets[i + 1]] = ent[row, start:stop]
    flat = broadcast_from_last_stage(flat, (2, offsets[-1]))
    return ResponseLogProbs([flat[0, offsets[i]:offsets[i + 1]].clone() for i in range(len(batch))],
                            [flat[1, offsets[i]:offsets[i + 1]].clone() for i in range(len(batch))])
