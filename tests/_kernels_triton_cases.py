"""Triton kernels against the fp64 autograd oracles; run as a script with TRITON_INTERPRET=1.

Prints one JSON object ``{case: relative error or error text}``. It runs in its own process
because the interpreter flag must be set before triton is first imported.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import torch  # noqa: E402

import kernels  # noqa: E402
from _kernels_helpers import (  # noqa: E402
    embedding_oracle, embedding_problem, linear_oracle, linear_problem, lm_head_oracle,
    lm_head_problem, rel_err,
)


def cases():
    import kernels.triton_impl as impl

    # T=37, d=24, V=150: none a multiple of the blocks; block 16 gives a 3x3 tile grid
    hidden, weight, targets, mask = lm_head_problem()
    ref = lm_head_oracle(hidden, weight, targets, mask)
    logits = hidden @ weight.t()
    yield "lm_head_fp64", rel_err(kernels.lm_head_sq_norms(
        hidden, targets, mask, logits=logits, backend="triton"), ref)
    yield "lm_head_fp64_small_blocks", rel_err(impl.lm_head_ghost(
        hidden, targets, mask, logits, None, 0, None, block_t=16, block_k=16, block_v=16), ref)
    yield "lm_head_fp32", rel_err(kernels.lm_head_sq_norms(
        hidden.float(), targets, mask.float(), logits=logits.float(), backend="triton"), ref)
    half = weight.shape[0] // 2  # two vocab shards summed by hand equal the whole
    lse = torch.logsumexp(logits, -1)
    parts = sum(impl.lm_head_ghost(hidden, targets, mask, logits[..., lo:hi], lse, lo, None)
                for lo, hi in ((0, half), (half, weight.shape[0])))
    yield "lm_head_shards", rel_err(parts, ref)

    ids, grads, tmask, V = embedding_problem(T=45)
    ref_e = embedding_oracle(ids, grads, tmask, V)
    yield "embedding_fp64", rel_err(kernels.embedding_sq_norms(ids, grads, tmask, backend="triton"), ref_e)
    yield "embedding_fp64_small_blocks", rel_err(impl.embedding_ghost(
        ids, grads, tmask, 0, None, None, block_t=16, block_k=16), ref_e)
    yield "embedding_fp32", rel_err(kernels.embedding_sq_norms(
        ids, grads.float(), tmask, backend="triton"), ref_e)
    shard = sum(kernels.embedding_sq_norms(ids, grads, tmask, vocab_start=lo, vocab_end=lo + 4,
                                           backend="triton") for lo in range(0, V, 4))
    yield "embedding_shards", rel_err(shard, ref_e)

    inputs, lgrads, lmask = linear_problem(T=70)
    ref_w, ref_b = linear_oracle(inputs, lgrads, lmask)
    w_sq, b_sq = kernels.linear_sq_norms(inputs, lgrads, lmask, method="ghost", backend="triton")
    yield "linear_weight_fp64", rel_err(w_sq, ref_w)
    yield "linear_bias_fp64", rel_err(b_sq, ref_b)
    m = lmask[..., None]
    yield "linear_weight_fp64_small_blocks", rel_err(impl.linear_weight_ghost(
        inputs * m, lgrads * m, block_t=16, block_k=16), ref_w)
    w32, _ = kernels.linear_sq_norms(inputs.float(), lgrads.float(), lmask, method="ghost",
                                     backend="triton")
    yield "linear_weight_fp32", rel_err(w32, ref_w)

    # the estimator on a small decoder with every norm taken by the Triton kernels
    from _gradnorm_helpers import TinyDecoder, sample_sequences
    from gvm_mega.gradnorm import GradNormEstimator, make_batch, reference_sq_norms

    batch = make_batch(*sample_sequences(4, 97, seed=1))
    for tied in (False, True):
        model = TinyDecoder(tied=tied)
        for params in ("embedding", "lm_head", "linear"):
            est = GradNormEstimator(model, params, backend="triton", linear_method="ghost")
            yield f"estimator_{params}_{'tied' if tied else 'untied'}_fp64", rel_err(
                est.sq_norms(batch), reference_sq_norms(model, batch, params))


def main() -> int:
    out = {}
    try:
        for name, err in cases():
            out[name] = err
    except Exception:
        out["error"] = traceback.format_exc()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
