"""The policy: a megatron GPT model with DDP, megatron's optimizer and lr schedule, and a step.

:class:`Policy` owns the model, optimizer and scheduler of this rank and exposes what one
iteration needs::

    old = policy.logprobs(batch)                       # behaviour log-probs (forward only)
    report = policy.train_step(batch.with_values(old_logprobs=old.as_lists(), advantages=adv))

One :meth:`Policy.train_step` is one optimizer update: the samples are packed into micro-batches
by the token budget (the same count on every data-parallel rank), run through megatron's
forward-backward schedule with :func:`compute_loss` under the global :class:`Normaliser`, and
the update is applied only if the loss and the gradient norm are finite on every rank; else the
gradients are zeroed, neither optimizer nor scheduler steps, and the report says why.

A frozen reference policy is ``Policy(..., trainable=False)``: the same model, no optimizer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from gvm_mega.config.schema import ModelConfig, OptimConfig
from gvm_mega.training._comm import all_reduce_host
from gvm_mega.training.forward import (
    ResponseLogProbs,
    SampleBatch,
    forward_logprobs,
    pack_batch,
    run_schedule,
)
from gvm_mega.training.logprobs import vocab_parallel_logprobs
from gvm_mega.training.losses import (
    LossSpec,
    Normaliser,
    compute_loss,
    megatron_loss_scale,
    reduce_metrics,
)
from gvm_mega.training.schedule import build_lr_scheduler

if TYPE_CHECKING:
    from gvm_mega.config.schema import Config

__all__ = ["Policy", "StepReport", "mark_tensor_parallel_weights", "optimizer_config"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StepReport:
    """What one train step did. Metrics are global (all micro-batches, all DP ranks)."""

    skipped: bool
    reason: Optional[str]
    loss: float
    grad_norm: float
    lr: float
    num_micro_batches: int
    num_samples: int
    num_loss_tokens: float
    update: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def kl(self) -> Optional[float]:
        return self.metrics.get("kl")

    @property
    def entropy(self) -> Optional[float]:
        return self.metrics.get("entropy")

    @property
    def clip_fraction(self) -> Optional[float]:
        return self.metrics.get("clip_fraction")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("metrics"))
        return out


def optimizer_config(optim: OptimConfig, params_dtype: str = "float32"):
    """Megatron ``OptimizerConfig`` for the ``optim`` section: Adam with decoupled weight decay
    (AdamW), global grad-norm clipping (0 disables)."""
    from megatron.core.optimizer import OptimizerConfig

    dtype = _DTYPES[params_dtype]
    return OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr,
                           weight_decay=optim.weight_decay, adam_beta1=optim.adam_beta1,
                           adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                           clip_grad=optim.clip_grad, bf16=dtype is torch.bfloat16,
                           fp16=dtype is torch.float16, params_dtype=dtype,
                           use_distributed_optimizer=False)


def mark_tensor_parallel_weights(module: torch.nn.Module) -> int:
    """Tag vocabulary/column/row-parallel weights as tensor-parallel shards; returns how many
    were untagged.

    megatron-core only sets ``tensor_model_parallel`` on these weights inside its weight
    initialisers, so a model built with ``perform_initialization=False`` (weights loaded next)
    has none: the optimizer then takes every shard for a TP duplicate and counts only TP rank
    0's in the gradient norm, which under-reports it and makes clipping layout-dependent.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    fixed = 0
    for sub in module.modules():
        if isinstance(sub, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(sub, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not getattr(weight, "tensor_model_parallel",
                                                                  False):
            weight.tensor_model_parallel = True
            weight.partition_dim = dim
            weight.partition_stride = getattr(weight, "partition_stride", 1)
            fixed += 1
    return fixed


class Policy:
    """This rank's share of the policy model, with its optimizer and lr scheduler.

    Call after :func:`gvm_mega.parallel.init_distributed`. ``total_steps`` is the number of
    optimizer updates the lr schedule spans (see ``planned_optimizer_steps``).
    """

    def __init__(self, model_cfg: ModelConfig, *, optim: Optional[OptimConfig] = None,
                 loss: Optional[LossSpec] = None, micro_batch_tokens: int = 4096,
                 total_steps: int = 1, temperature: float = 1.0, trainable: bool = True,
                 pad_id: int = 0, perform_initialization: bool = True) -> None:
        from megatron.core.distributed import (DistributedDataParallel,
                                               DistributedDataParallelConfig,
                                               finalize_model_grads)
        from megatron.core.optimizer import get_megatron_optimizer

        from gvm_mega.models import build_gpt_model

        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model_cfg = model_cfg
        self.optim_cfg = optim or OptimConfig()
        self.loss_spec = loss
        self.micro_batch_tokens = int(micro_batch_tokens)
        self.temperature = float(temperature)
        self.trainable = trainable
        self.pad_id = pad_id
        self.updates = 0          # optimizer updates applied
        self.skipped_updates = 0  # steps whose update was dropped (non-finite)
        module = build_gpt_model(model_cfg, perform_initialization=perform_initialization)
        mark_tensor_parallel_weights(module)
        self.optimizer = None
        self.scheduler = None
        if trainable:
            ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                    overlap_grad_reduce=False,
                                                    use_distributed_optimizer=False)
            self.model = DistributedDataParallel(module.config, ddp_cfg, module)
            module.config.finalize_model_grads_func = finalize_model_grads
            self.optimizer = get_megatron_optimizer(
                optimizer_config(self.optim_cfg, model_cfg.params_dtype), [self.model])
            self.scheduler = build_lr_scheduler(self.optimizer, self.optim_cfg, total_steps)
        else:
            self.model = module
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()

    @classmethod
    def from_config(cls, cfg: "Config", *, total_steps: Optional[int] = None,
                    trainable: bool = True, **kwargs: Any) -> "Policy":
        """A policy for the whole run config (loss from ``algorithm``, schedule from ``optim``)."""
        from gvm_mega.training.schedule import planned_optimizer_steps

        steps = planned_optimizer_steps(cfg.train, cfg.algorithm) if total_steps is None \
            else total_steps
        return cls(cfg.model, optim=cfg.optim, loss=LossSpec.from_config(cfg.algorithm),
                   micro_batch_tokens=cfg.parallel.micro_batch_tokens, total_steps=steps,
                   temperature=cfg.rollout.temperature or 1.0, trainable=trainable, **kwargs)

    # ------------------------------------------------------------------ model access
    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped GPTModel of this rank (what checkpoints and weight export read)."""
        return getattr(self.model, "module", self.model)

    @property
    def lr(self) -> float:
        if self.optimizer is None:
            return 0.0
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ forward only
    def logprobs(self, batch: SampleBatch) -> ResponseLogProbs:
        """Response-token log-probs and entropy under the current weights (every replica rank)."""
        return forward_logprobs(self.model, batch, micro_batch_tokens=self.micro_batch_tokens,
                                vocab_size=self.model_cfg.vocab_size,
                                temperature=self.temperature, pad_id=self.pad_id)

    # ------------------------------------------------------------------ update
    def train_step(self, batch: SampleBatch) -> StepReport:
        """One optimizer update on this data-parallel rank's ``batch`` (collective)."""
        from megatron.core import parallel_state as ps

        if not self.trainable:
            raise RuntimeError("train_step on a frozen policy (built with trainable=False)")
        spec = self.loss_spec
        if spec is None:
            raise RuntimeError("Policy has no loss: pass loss=LossSpec(...) or use from_config")
        if spec.kind == "ppo-clip" and batch.old_logprobs is None:
            raise ValueError("the PPO clip loss needs batch.old_logprobs (behaviour log-probs; "
                             "Policy.logprobs gives them under the current weights)")
        if spec.uses_group_advantages and batch.advantages is None:
            raise ValueError("GRPO needs batch.advantages (see sample_advantages)")
        if spec.kl_coef and batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs batch.ref_logprobs (reference-policy log-probs)")

        dp_group = ps.get_data_parallel_group()
        dp_size = ps.get_data_parallel_world_size()
        micro_batches = pack_batch(batch, self.micro_batch_tokens, pad_id=self.pad_id,
                                   group=dp_group)
        norm = Normaliser.from_masks([mb.loss_mask for mb in micro_batches], group=dp_group)
        num_samples = self._sum_over_dp(len(batch), dp_group)
        if norm.tokens == 0:  # e.g. RAFT with nothing accepted: momentum alone must not move
            self.skipped_updates += 1
            return StepReport(skipped=True, reason="no loss tokens in the batch", loss=0.0,
                              grad_norm=0.0, lr=self.lr, num_micro_batches=len(micro_batches),
                              num_samples=num_samples, num_loss_tokens=0.0,
                              update=self.updates)
        scale = megatron_loss_scale(len(micro_batches), dp_size)

        def loss_fn(mb, logits):
            lp, ent = vocab_parallel_logprobs(logits, mb.targets, temperature=self.temperature,
                                              vocab_size=self.model_cfg.vocab_size)
            out = compute_loss(spec, logprobs=lp, loss_mask=mb.loss_mask,
                               old_logprobs=mb.token_values.get("old_logprobs"),
                               advantages=mb.sample_values.get("advantages"),
                               ref_logprobs=mb.token_values.get("ref_logprobs"),
                               entropy=ent, normaliser=norm)
            return out.loss * scale, out.metrics

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        parts = run_schedule(self.model, micro_batches, loss_fn, forward_only=False)
        metrics = self._global_metrics(parts, dp_group)
        lr = self.lr

        # the norm over every gradient shard; grads are already reduced over data parallel
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        loss = metrics.get("loss", float("nan"))
        reason = None
        if not math.isfinite(loss):
            reason = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm ({grad_norm})"
        elif found_inf:
            reason = "non-finite gradients found by the loss scaler"
        if reason is None:
            self._clip_grads(grad_norm)
            if not self.optimizer.step_with_ready_grads():
                reason = "the optimizer rejected the update"
        if reason is None:
            self.scheduler.step(1)
            self.updates += 1
        else:
            self.skipped_updates += 1
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        return StepReport(skipped=reason is not None, reason=reason, loss=loss,
                          grad_norm=grad_norm, lr=lr, num_micro_batches=len(micro_batches),
                          num_samples=num_samples, num_loss_tokens=norm.tokens,
                          update=self.updates, metrics=metrics)

    def _clip_grads(self, grad_norm: float) -> None:
        """Scale gradients to ``optim.clip_grad`` by the global norm already computed (what
        megatron's ``optimizer.step()`` does, without computing the norm a second time)."""
        import megatron.core.optimizer.optimizer as moptimizer  # patched on CPU by cpu_compat

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if getattr(opt, "is_stub_optimizer", False) or opt.config.clip_grad <= 0:
                continue
            params = opt.get_parameters()
            if params:
                decoupled = getattr(opt.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8",
                                    False)
                moptimizer.clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad,
                                                        total_norm=grad_norm,
                                                        use_decoupled_grad=decoupled)

    def _global_metrics(self, parts: list[dict], dp_group) -> dict[str, float]:
        """Metrics reduced over micro-batches and data parallel, on every rank of the world."""
        from megatron.core import parallel_state as ps

        metrics = reduce_metrics(parts, group=dp_group) if ps.is_pipeline_last_stage() else None
        if ps.get_pipeline_model_parallel_world_size() > 1:
            holder = [metrics]
            dist.broadcast_object_list(holder, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            metrics = holder[0]
        return metrics

    @staticmethod
    def _sum_over_dp(n: int, dp_group) -> int:
        t = all_reduce_host(torch.tensor([n], dtype=torch.int64), dist.ReduceOp.SUM, dp_group)
        return int(t)

    # ------------------------------------------------------------------ state
    def counters(self) -> dict[str, int]:
        return {"updates": self.updates, "skipped_updates": self.skipped_updates}

    def load_counters(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
        self.skipped_updates = int(state.get("skipped_updates", 0))
