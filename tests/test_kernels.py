"""Torch ghost norms against fp64 per-sequence autograd, and vocab sharding over two ranks."""
from __future__ import annotations

import multiprocessing as mp
import socket

import pytest
import torch
import torch.nn.functional as F

import kernels
from _kernels_helpers import (
    TiedToy, embedding_oracle, embedding_problem, linear_oracle, linear_problem,
    lm_head_oracle, lm_head_problem, masks, rel_err, tied_oracle, tp_worker,
)

TOL = 1e-6


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_lm_head_from_logits_matches_autograd(chunk):
    hidden, weight, targets, mask = lm_head_problem()
    ref = lm_head_oracle(hidden, weight, targets, mask)
    got = kernels.lm_head_sq_norms(hidden, targets, mask, logits=hidden @ weight.t(),
                                   chunk_size=chunk, backend="torch")
    assert got.dtype == torch.float64
    assert rel_err(got, ref) <= TOL


def test_lm_head_from_weight_matches_autograd():
    hidden, weight, targets, mask = lm_head_problem(seed=4)
    ref = lm_head_oracle(hidden, weight, targets, mask)
    got = kernels.lm_head_sq_norms(hidden, targets, mask, weight=weight, chunk_size=32)
    assert rel_err(got, ref) <= TOL


def test_lm_head_masked_sequence_is_zero_and_padding_ignored():
    hidden, weight, targets, mask = lm_head_problem()
    mask[1] = 0
    logits = hidden @ weight.t()
    got = kernels.lm_head_sq_norms(hidden, targets, mask, logits=logits)
    assert got[1] == 0
    # garbage in padded positions (mask 0) must not change anything
    hidden2, logits2 = hidden.clone(), logits.clone()
    pad = mask == 0
    hidden2[pad] = 1e3
    logits2[pad] = -7.0
    got2 = kernels.lm_head_sq_norms(hidden2, targets, mask, logits=logits2)
    assert rel_err(got2, got) <= TOL


def test_logprob_grad_of_logits_is_autograd_gradient():
    hidden, weight, targets, mask = lm_head_problem()
    logits = (hidden @ weight.t()).requires_grad_()
    loss = (F.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0] * mask).sum()
    (ref,) = torch.autograd.grad(loss, logits)
    got = kernels.logprob_grad_of_logits(logits.detach(), targets, mask)
    assert float((got - ref).abs().max()) <= 1e-12


def test_embedding_matches_autograd_with_repeated_ids():
    ids, grads, mask, V = embedding_problem()
    assert len(torch.unique(ids[0])) < ids.shape[1]  # ids repeat: rows interact
    ref = embedding_oracle(ids, grads, mask, V)
    got = kernels.embedding_sq_norms(ids, grads, mask, backend="torch")
    assert rel_err(got, ref) <= TOL


def test_embedding_shards_sum_to_whole():
    ids, grads, mask, V = embedding_problem()
    whole = kernels.embedding_sq_norms(ids, grads, mask)
    parts = sum(kernels.embedding_sq_norms(ids, grads, mask, vocab_start=lo, vocab_end=lo + 4)
                for lo in range(0, V, 4))
    assert rel_err(parts, whole) <= TOL


@pytest.mark.parametrize("method", ["ghost", "materialise", "auto"])
def test_linear_matches_autograd(method):
    inputs, grads, mask = linear_problem()
    ref_w, ref_b = linear_oracle(inputs, grads, mask)
    w_sq, b_sq = kernels.linear_sq_norms(inputs, grads, mask, method=method, backend="torch")
    assert rel_err(w_sq, ref_w) <= TOL
    assert rel_err(b_sq, ref_b) <= TOL


def test_linear_materialise_in_groups_of_sequences():
    inputs, grads, mask = linear_problem(B=5)
    ref_w, _ = linear_oracle(inputs, grads, mask)
    w_sq, _ = kernels.linear_sq_norms(inputs, grads, mask, method="materialise",
                                      max_materialised=2 * 19 * 23)
    assert rel_err(w_sq, ref_w) <= TOL


def test_choose_linear_method_follows_cost_rule():
    assert kernels.choose_linear_method(16, 256, 256) == "ghost"       # 16*512 < 65536
    assert kernels.choose_linear_method(200, 256, 256) == "materialise"
    assert kernels.choose_linear_method(127, 256, 256) == "ghost"
    assert kernels.choose_linear_method(128, 256, 256) == "materialise"


def test_tied_weight_norm_is_embedding_plus_output_plus_cross():
    model = TiedToy()
    B, T = 3, 21
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 13, (B, T), generator=gen)
    targets = torch.roll(ids, -1, 1)
    tok, resp = masks(B, T, gen)
    mask = tok * resp
    ref = tied_oracle(model, ids, targets, mask)
    emb, hidden, logits = model(ids)
    seed = kernels.logprob_grad_of_logits(logits.detach(), targets, mask)
    (g_emb,) = torch.autograd.grad(logits, emb, grad_outputs=seed)
    h, lg = hidden.detach(), logits.detach()
    total = (kernels.lm_head_sq_norms(h, targets, mask, logits=lg)
             + kernels.embedding_sq_norms(ids, g_emb, tok)
             + kernels.tied_cross_term(h, targets, mask, ids, g_emb, logits=lg, token_mask=tok,
                                       chunk_size=5))
    assert rel_err(total, ref) <= TOL


def test_bad_shapes_raise_clear_errors():
    hidden, weight, targets, mask = lm_head_problem()
    with pytest.raises(ValueError, match="mask must have shape"):
        kernels.lm_head_sq_norms(hidden, targets, mask[:, :-1], weight=weight)
    with pytest.raises(ValueError, match="exactly one of logits"):
        kernels.lm_head_sq_norms(hidden, targets, mask)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.embedding_sq_norms(targets, hidden, backend="cuda")
    with pytest.raises(ValueError, match="method must be"):
        kernels.linear_sq_norms(hidden, hidden, method="fast")


def test_auto_backend_is_torch_on_cpu():
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_vocab_sharding_equals_one_rank():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=tp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, res in results.items():
        assert isinstance(res, dict), f"rank {rank} failed:\n{res}"
        for key in ("lse", "lm_head_logits", "lm_head_weight", "embedding", "tied_cross"):
            assert res[key] <= TOL, (rank, key, res[key])
        assert res["grad_logits"] <= 1e-12, (rank, res["grad_logits"])
