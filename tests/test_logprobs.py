"""Per-token log-probs and entropy from (vocab-parallel) logits equal a full log_softmax."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from gvm_mega.parallel import find_free_port
from gvm_mega.training import vocab_parallel_logprobs

from _training_helpers import two_rank_worker


def _reference(x: torch.Tensor, target: torch.Tensor, temperature: float, vocab: int):
    logp_all = torch.log_softmax(x[..., :vocab] / temperature, dim=-1)
    lp = logp_all.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return lp, -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("vocab", [37, 30])
def test_full_vocab_values_and_gradients(temperature, vocab):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 9, 37, generator=gen) * 4).requires_grad_()
    target = torch.randint(0, vocab, (4, 9), generator=gen)
    w_lp, w_ent = torch.randn(4, 9, generator=gen), torch.randn(4, 9, generator=gen)

    lp, ent = vocab_parallel_logprobs(logits, target, temperature=temperature, vocab_size=vocab)
    (g,) = torch.autograd.grad((lp * w_lp + ent * w_ent).sum(), logits)
    ref_lp, ref_ent = _reference(logits, target, temperature, vocab)
    (g_ref,) = torch.autograd.grad((ref_lp * w_lp + ref_ent * w_ent).sum(), logits)

    assert lp.dtype == torch.float32 and lp.shape == target.shape
    assert (lp - ref_lp).abs().max() <= 1e-6
    assert (ent - ref_ent).abs().max() <= 1e-6
    assert (g - g_ref).abs().max() <= 1e-6
    if vocab < 37:
        assert g[..., vocab:].abs().max() == 0  # padding columns get no gradient


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-50.0, -50.0, -50.0]], requires_grad=True)
    lp, ent = vocab_parallel_logprobs(logits, torch.tensor([1, 2]))
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert lp[0].item() == pytest.approx(-2e4) and lp[1].item() == pytest.approx(-1.0986123)
    assert ent[1].item() == pytest.approx(1.0986123)  # uniform over 3: log 3
    (g,) = torch.autograd.grad((lp + ent).sum(), logits)
    assert torch.isfinite(g).all()


def test_bad_input_is_named():
    logits = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="does not match target shape"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="target ids must be in"):
        vocab_parallel_logprobs(logits, torch.full((2, 3), 8))
    with pytest.raises(ValueError, match="vocab_size 9"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), vocab_size=9)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)
    with pytest.raises(TypeError, match="integer token ids"):
        vocab_parallel_logprobs(logits, torch.zeros(2, 3))


@pytest.mark.slow
def test_tensor_parallel_two_ranks_equal_full_vocab_and_dp_reductions():
    # TP=2 log-probs, entropy and gradients vs the full vocabulary and TP=1; then at DP=2 the
    # normaliser, metric and micro-batch-count reductions (see _training_helpers)
    mp.spawn(two_rank_worker, args=(find_free_port(),), nprocs=2, join=True)
