"""Random problems and per-sequence autograd oracles for the gradient-norm kernel tests.

Shared by the torch tests, the Triton tests (run in a subprocess with TRITON_INTERPRET=1)
and the two-process tensor-parallel check.
"""
from __future__ import annotations

import os
import traceback

import torch
import torch.nn.functional as F


def masks(B: int, T: int, gen: torch.Generator, dtype=torch.float64):
    """(token_mask, response_mask): right padding of random length, response after a prompt."""
    lengths = torch.randint(T // 2, T + 1, (B,), generator=gen)
    lengths[0] = T
    prompt = torch.randint(1, T // 3 + 1, (B,), generator=gen)
    pos = torch.arange(T)[None, :]
    token_mask = (pos < lengths[:, None]).to(dtype)
    # target at position t is token t+1: it is a response token when t+1 >= prompt, t+1 < length
    response = ((pos + 1 >= prompt[:, None]) & (pos + 1 < lengths[:, None])).to(dtype)
    return token_mask, response


def lm_head_problem(B=3, T=37, d=24, V=150, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=gen, dtype=dtype)
    weight = torch.randn(V, d, generator=gen, dtype=dtype) * 0.5
    targets = torch.randint(0, V, (B, T), generator=gen)
    token_mask, response = masks(B, T, gen, dtype)
    return hidden, weight, targets, response * token_mask


def lm_head_oracle(hidden, weight, targets, mask):
    """Reference style: one forward and one autograd.grad per sequence."""
    out = []
    w = weight.detach().clone().requires_grad_()
    for b in range(hidden.shape[0]):
        logp = F.log_softmax(hidden[b] @ w.t(), -1)
        loss = (logp.gather(-1, targets[b][:, None])[:, 0] * mask[b]).sum()
        (g,) = torch.autograd.grad(loss, w)
        out.append(g.pow(2).sum())
    return torch.stack(out)


def embedding_problem(B=3, T=37, d=20, V=11, seed=1, dtype=torch.float64):
    """Small vocabulary so that ids repeat within a sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    grads = torch.randn(B, T, d, generator=gen, dtype=dtype)
    token_mask, _ = masks(B, T, gen, dtype)
    return ids, grads, token_mask, V


def embedding_oracle(ids, grads, mask, V):
    table = torch.zeros(V, grads.shape[-1], dtype=grads.dtype, requires_grad=True)
    out = []
    for b in range(ids.shape[0]):
        loss = (F.embedding(ids[b], table) * grads[b] * mask[b][:, None]).sum()
        (g,) = torch.autograd.grad(loss, table)
        out.append(g.pow(2).sum())
    return torch.stack(out)


def linear_problem(B=3, T=37, d_in=19, d_out=23, seed=2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(B, T, d_in, generator=gen, dtype=dtype)
    grads = torch.randn(B, T, d_out, generator=gen, dtype=dtype)
    token_mask, _ = masks(B, T, gen, dtype)
    return inputs, grads, token_mask


def linear_oracle(inputs, grads, mask):
    lin = torch.nn.Linear(inputs.shape[-1], grads.shape[-1], dtype=inputs.dtype)
    w_sq, b_sq = [], []
    for b in range(inputs.shape[0]):
        loss = (lin(inputs[b]) * grads[b] * mask[b][:, None]).sum()
        gw, gb = torch.autograd.grad(loss, [lin.weight, lin.bias])
        w_sq.append(gw.pow(2).sum())
        b_sq.append(gb.pow(2).sum())
    return torch.stack(w_sq), torch.stack(b_sq)


class TiedToy(torch.nn.Module):
    """Embedding -> mixing layer -> output layer sharing the embedding table."""

    def __init__(self, V=13, d=16, seed=3, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, d, generator=gen, dtype=dtype) * 0.5)
        self.mix = torch.nn.Parameter(torch.randn(d, d, generator=gen, dtype=dtype) / d ** 0.5)

    def forward(self, ids):
        emb = F.embedding(ids, self.table)
        hidden = torch.tanh(torch.cumsum(emb, 1) @ self.mix)  # causal mixing over tokens
        return emb, hidden, hidden @ self.table.t()


def tied_oracle(model, ids, targets, mask):
    out = []
    for b in range(ids.shape[0]):
        _, _, logits = model(ids[b:b + 1])
        logp = F.log_softmax(logits[0], -1)
        loss = (logp.gather(-1, targets[b][:, None])[:, 0] * mask[b]).sum()
        (g,) = torch.autograd.grad(loss, model.table)
        out.append(g.pow(2).sum())
    return torch.stack(out)


def rel_err(x, ref):
    return float(((x.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30)).max())


# ---------------------------------------------------------------- two-process vocab sharding
def tp_worker(rank: int, world: int, port: int, queue) -> None:
    """Each rank holds a vocab shard; results must equal the unsharded ones on every rank."""
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        import kernels

        group = torch.distributed.group.WORLD
        res = {}
        hidden, weight, targets, mask = lm_head_problem(V=150)
        V = weight.shape[0]
        lo, hi = rank * V // world, (rank + 1) * V // world
        logits = hidden @ weight.t()
        full = kernels.lm_head_sq_norms(hidden, targets, mask, logits=logits, backend="torch")
        shard_lse = kernels.vocab_parallel_logsumexp(logits[..., lo:hi], group=group, chunk_size=16)
        res["lse"] = rel_err(shard_lse, torch.logsumexp(logits, -1))
        res["lm_head_logits"] = rel_err(kernels.lm_head_sq_norms(
            hidden, targets, mask, logits=logits[..., lo:hi], vocab_start=lo, group=group,
            chunk_size=16, backend="torch"), full)
        res["lm_head_weight"] = rel_err(kernels.lm_head_sq_norms(
            hidden, targets, mask, weight=weight[lo:hi], vocab_start=lo, group=group,
            chunk_size=16, backend="torch"), full)
        seed = kernels.logprob_grad_of_logits(logits[..., lo:hi], targets, mask,
                                              vocab_start=lo, group=group)
        full_seed = kernels.logprob_grad_of_logits(logits, targets, mask)
        res["grad_logits"] = float((seed - full_seed[..., lo:hi]).abs().max())

        ids, grads, tmask, Ve = embedding_problem()
        elo, ehi = rank * Ve // world, (rank + 1) * Ve // world
        full_e = kernels.embedding_sq_norms(ids, grads, tmask, backend="torch")
        res["embedding"] = rel_err(kernels.embedding_sq_norms(
            ids, grads, tmask, vocab_start=elo, vocab_end=ehi, group=group, backend="torch"), full_e)

        model = TiedToy()
        tids = torch.randint(0, 13, (3, 21), generator=torch.Generator().manual_seed(5))
        ttargets = torch.roll(tids, -1, 1)
        ttok, tresp = masks(3, 21, torch.Generator().manual_seed(6))
        emb, hid, tl = model(tids)
        tw = tresp * ttok
        full_c = kernels.tied_cross_term(hid, ttargets, tw, tids, emb, logits=tl)
        Vt = 13
        tlo, thi = rank * Vt // world, (rank + 1) * Vt // world
        res["tied_cross"] = rel_err(kernels.tied_cross_term(
            hid, ttargets, tw, tids, emb, logits=tl[..., tlo:thi], vocab_start=tlo,
            group=group, chunk_size=3), full_c)
        queue.put((rank, res))
    except Exception:
        queue.put((rank, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
