"""A small plain-torch decoder and sample sequences for the gradient-norm estimator tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=bias)
        self.proj = nn.Linear(d, d, bias=bias)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyDecoder(nn.Module):
    """Embedding, pre-norm attention + MLP blocks, output layer (optionally tied)."""

    def __init__(self, vocab=97, d=32, layers=2, heads=4, ffn=48, tied=False, bias=True,
                 max_len=64, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, ffn, bias) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


def sample_sequences(n: int, vocab: int, seed: int = 0, max_prompt: int = 9, max_response: int = 20,
                     small_ids: bool = True):
    """Prompts and responses of random lengths; ids drawn from a few values so they repeat."""
    gen = torch.Generator().manual_seed(seed)
    hi = min(vocab, 12) if small_ids else vocab
    prompts, responses = [], []
    for _ in range(n):
        lp = int(torch.randint(1, max_prompt + 1, (1,), generator=gen))
        lr = int(torch.randint(1, max_response + 1, (1,), generator=gen))
        prompts.append(torch.randint(0, hi, (lp,), generator=gen).tolist())
        responses.append(torch.randint(0, vocab, (lr,), generator=gen).tolist())
    return prompts, responses


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((x.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30)).max())


# ---------------------------------------------------------------- megatron GPTModel, two ranks
MCORE_PARAMS = ("embedding", "lm_head", "linear")


def _mcore_model(tied: bool):
    from gvm_mega.config.schema import ModelConfig
    from gvm_mega.models import build_gpt_model
    from gvm_mega.parallel import seed_everything

    seed_everything(11)  # CPU initialisation: the same weights at every TP size
    cfg = ModelConfig(vocab_size=96, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                      num_attention_heads=4, num_query_groups=2, tie_word_embeddings=tied,
                      qkv_bias=True)
    return build_gpt_model(cfg).double()


def mcore_worker(rank: int, world: int, port: int, queue) -> None:
    """TP=2 estimator norms, then TP=1 (DP=2): estimator, reference and DP-split norms."""
    import os
    import traceback
    import warnings

    warnings.filterwarnings("ignore")
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        from megatron.core import parallel_state as ps

        from gvm_mega.config.schema import ParallelConfig
        from gvm_mega.gradnorm import (GradNormEstimator, distributed_norms, make_batch,
                                       reference_sq_norms)
        from gvm_mega.parallel import init_distributed, shutdown

        batch = make_batch(*sample_sequences(6, 96, seed=1))
        res: dict = {}
        init_distributed(ParallelConfig(tp=2, backend="gloo"))
        for tied in (False, True):
            model = _mcore_model(tied)
            for params in MCORE_PARAMS:
                est = GradNormEstimator(model, params, max_tokens=48)
                res[f"tp2/{tied}/{params}"] = est.sq_norms(batch).tolist()
        init_distributed(ParallelConfig(tp=1, backend="gloo"))
        for tied in (False, True):
            model = _mcore_model(tied)
            for params in MCORE_PARAMS:
                est = GradNormEstimator(model, params, max_tokens=48)
                res[f"tp1/{tied}/{params}"] = est.sq_norms(batch).tolist()
                res[f"ref/{tied}/{params}"] = reference_sq_norms(model, batch, params).tolist()
                res[f"dp2/{tied}/{params}"] = distributed_norms(
                    est, batch, dp_group=ps.get_data_parallel_group()).pow(2).tolist()
        queue.put((rank, res))
        shutdown()
    except Exception:
        queue.put((rank, traceback.format_exc()))


def mcore_pipeline_worker(rank: int, world: int, port: int, queue) -> None:
    """Four ranks: reference norms at TP1/PP1, then the estimator at PP2 (with its DP split)
    and TP2xPP2 on the same weights (copied in HF layout, as pipeline stages draw their
    initial weights differently)."""
    import os
    import traceback
    import warnings

    warnings.filterwarnings("ignore")
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        from megatron.core import parallel_state as ps

        from gvm_mega.config.schema import ParallelConfig
        from gvm_mega.gradnorm import (GradNormEstimator, distributed_norms, make_batch,
                                       reference_sq_norms)
        from gvm_mega.models import load_hf_into_mcore, mcore_to_hf_state_dict
        from gvm_mega.parallel import init_distributed, shutdown

        batch = make_batch(*sample_sequences(7, 96, seed=2))
        res: dict = {}
        weights = {}
        init_distributed(ParallelConfig(tp=1, pp=1, backend="gloo"))
        for tied in (False, True):
            model = _mcore_model(tied)
            # on rank 0 only; fp32 in HF layout, exact: the fp64 model was initialised in fp32
            holder = [mcore_to_hf_state_dict(model)]
            torch.distributed.broadcast_object_list(holder, src=0)
            weights[tied] = holder[0]
            for params in MCORE_PARAMS:
                res[f"ref/{tied}/{params}"] = reference_sq_norms(model, batch, params).tolist()
        for tp, pp in ((1, 2), (2, 2)):
            init_distributed(ParallelConfig(tp=tp, pp=pp, backend="gloo"))
            for tied in (False, True):
                model = _mcore_model(tied)
                load_hf_into_mcore(model, weights[tied])
                for params in MCORE_PARAMS:
                    # a micro-batch budget that makes several windows of two micro-batches
                    est = GradNormEstimator(model, params, max_tokens=40)
                    res[f"tp{tp}pp{pp}/{tied}/{params}"] = est.sq_norms(batch).tolist()
                    if tp == 1:
                        res[f"tp1pp2dp2/{tied}/{params}"] = distributed_norms(
                            est, batch, dp_group=ps.get_data_parallel_group()).pow(2).tolist()
                assert all(not p.requires_grad or p.grad is None for p in model.parameters())
        queue.put((rank, res))
        shutdown()
    except Exception:
        queue.put((rank, traceback.format_exc()))
