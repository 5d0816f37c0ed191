"""The reference computation: one forward and one ``torch.autograd.grad`` per response.

This is how the original GVM code obtains per-response gradient norms (batch size 1, a
backward pass each). It is the oracle for the estimator's tests and the baseline of
``gvm-mega bench gradnorm``. Tensor-parallel size must be 1 (log-softmax over full logits).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from gvm_mega.gradnorm.batch import SequenceBatch
from gvm_mega.gradnorm.estimator import ForwardFn, default_forward
from gvm_mega.gradnorm.layers import select_parameters, unwrap


def reference_sq_norms(model: nn.Module, batch: SequenceBatch, params: str,
                       forward_fn: Optional[ForwardFn] = None) -> torch.Tensor:
    """Squared norms of ``d sum_t log pi(y_t) / d params``, one response at a time."""
    forward_fn = forward_fn or default_forward
    plist = select_parameters(model, params)
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    device = plist[0].device
    out = torch.zeros(batch.size, dtype=torch.float64)
    try:
        for b in range(batch.size):
            one = batch.select([b]).to(device)
            with torch.enable_grad():
                logits = forward_fn(model, one)
                logp = F.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, -1)
                loss = (logp.gather(-1, one.targets[..., None])[..., 0] * one.loss_mask.to(logp.dtype)).sum()
                grads = torch.autograd.grad(loss, plist)
            out[b] = sum(float(g.double().pow(2).sum()) for g in grads)
    finally:
        inner.train(was_training)
    return out
