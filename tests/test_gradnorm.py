"""The batched G_i estimator against one-response-at-a-time autograd norms."""
from __future__ import annotations

import pytest
import torch

from gvm_mega.gradnorm import (
    pool_prompt_grad_norms,
    GradNormEstimator, find_layers, make_batch, micro_batches, prompt_grad_norms,
    reference_sq_norms, select_parameters,
)
from _gradnorm_helpers import TinyDecoder, rel_err, sample_sequences

TOL = 1e-6


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("params", ["embedding", "lm_head", "linear"])
def test_plain_decoder_matches_reference(params, tied):
    model = TinyDecoder(tied=tied)
    prompts, responses = sample_sequences(7, 97, seed=1)
    batch = make_batch(prompts, responses, pad_id=5)
    ref = reference_sq_norms(model, batch, params)
    est = GradNormEstimator(model, params, max_tokens=40)  # several padded micro-batches
    got = est.sq_norms(batch)
    assert (ref > 0).all()
    assert rel_err(got, ref) <= TOL
    assert rel_err(est.norms(batch), ref.sqrt()) <= TOL


def test_linear_methods_agree_and_params_untouched():
    model = TinyDecoder()
    prompts, responses = sample_sequences(5, 97, seed=2)
    batch = make_batch(prompts, responses)
    ghost = GradNormEstimator(model, "linear", linear_method="ghost").sq_norms(batch)
    mat = GradNormEstimator(model, "linear", linear_method="materialise").sq_norms(batch)
    assert rel_err(ghost, mat) <= TOL
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # mode restored


def test_float32_model_close_to_float64():
    m64 = TinyDecoder()
    m32 = TinyDecoder(dtype=torch.float32)
    batch = make_batch(*sample_sequences(4, 97, seed=3))
    a = GradNormEstimator(m64, "embedding").sq_norms(batch)
    b = GradNormEstimator(m32, "embedding").sq_norms(batch)
    assert rel_err(b, a) <= 1e-4


def test_from_config_reads_parameter_set_and_micro_batch():
    from gvm_mega.config import load_config

    cfg = load_config(None, ["gvm.grad_norm_params=lm_head", "parallel.micro_batch_tokens=64"])
    est = GradNormEstimator.from_config(TinyDecoder(), cfg)
    assert est.params == "lm_head" and est.max_tokens == 64


def test_find_layers_and_parameter_sets():
    model = TinyDecoder(tied=True)
    layers = find_layers(model)
    assert layers.tied and layers.embedding.name == "embed_tokens" and layers.output.name == "lm_head"
    assert len(layers.linears) == 8
    assert select_parameters(model, "lm_head")[0] is model.embed_tokens.weight
    assert len(select_parameters(model, "linear")) == 16
    with pytest.raises(ValueError, match="grad_norm_params must be one of"):
        GradNormEstimator(model, "attention")


def test_make_batch_masks():
    batch = make_batch([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 5], [4, 7, 8, 0]]
    assert batch.targets.tolist() == [[2, 3, 5, 6], [7, 8, 9, 0]]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert batch.token_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    with pytest.raises(ValueError, match="sequence 1: empty response"):
        make_batch([[1], [2]], [[3], []])


def test_micro_batches_respect_token_budget():
    lengths = torch.tensor([5, 30, 7, 12, 30, 2])
    groups = micro_batches(lengths, 40)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) == 1 or len(g) * max(int(lengths[i]) for i in g) <= 40


def test_prompt_grad_norms_mean_over_accepted():
    norms = torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0])
    g = prompt_grad_norms(norms, [0, 0, 0, 2, 2], 3, accepted=[True, True, False, False, True])
    assert g.tolist() == [2.0, 0.0, 4.0]
    rms = prompt_grad_norms(norms, [0, 0, 0, 2, 2], 3, accepted=[True, True, False, False, True],
                            average="rms")
    assert rms.tolist() == pytest.approx([5.0 ** 0.5, 0.0, 4.0])  # sqrt((1 + 9) / 2)
    with pytest.raises(ValueError, match="prompt indices"):
        prompt_grad_norms(norms, [0, 0, 0, 3, 2], 3)
    with pytest.raises(ValueError, match="average must be 'mean' or 'rms'"):
        prompt_grad_norms(norms, [0, 0, 0, 2, 2], 3, average="median")


@pytest.mark.parametrize("average", ["mean", "rms"])
def test_pooled_prompt_grad_norms_equal_those_of_the_union(average):
    """Stage 2 in rounds pools each round's G_i with the visit's so far: the same numbers as
    prompt_grad_norms over all the responses at once, NaN where neither set has one."""
    first = torch.tensor([1.0, 3.0, 2.0])            # prompts 0, 0, 2
    second = torch.tensor([5.0, 7.0, 4.0, 6.0])      # prompts 0, 1, 1, 2
    g1 = prompt_grad_norms(first, [0, 0, 2], 4, average=average).numpy()
    g2 = prompt_grad_norms(second, [0, 1, 1, 2], 4, average=average).numpy()
    pooled = pool_prompt_grad_norms(g1, [2, 0, 1, 0], g2, [1, 2, 1, 0], average=average)
    union = prompt_grad_norms(torch.cat([first, second]), [0, 0, 2, 0, 1, 1, 2], 4,
                              average=average).numpy()
    assert pooled[:3].tolist() == pytest.approx(union[:3].tolist())
    assert pooled[3] != pooled[3]  # NaN: no accepted response in either set
    with pytest.raises(ValueError, match="average must be 'mean' or 'rms'"):
        pool_prompt_grad_norms(g1, [2, 0, 1, 0], g2, [1, 2, 1, 0], average="max")


@pytest.mark.slow
def test_megatron_gpt_tp2_equals_tp1_equals_reference_and_dp_split():
    import multiprocessing as mp

    from gvm_mega.parallel import find_free_port
    from _gradnorm_helpers import MCORE_PARAMS, mcore_worker

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=mcore_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, res in results.items():
        assert isinstance(res, dict), f"rank {rank} failed:\n{res}"
        for tied in (False, True):
            for params in MCORE_PARAMS:
                ref = torch.tensor(res[f"ref/{tied}/{params}"])
                assert (ref > 0).all()
                for kind in ("tp1", "tp2", "dp2"):
                    got = torch.tensor(res[f"{kind}/{tied}/{params}"])
                    assert rel_err(got, ref) <= TOL, (rank, kind, tied, params)


@pytest.mark.slow
def test_megatron_gpt_pipeline_stages_equal_reference():
    """PP2 and TP2xPP2 (4 ranks), tied and untied, every parameter set, and the DP split
    under PP2: the same norms as one process computing one response at a time."""
    import multiprocessing as mp

    from gvm_mega.parallel import find_free_port
    from _gradnorm_helpers import MCORE_PARAMS, mcore_pipeline_worker

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=mcore_pipeline_worker, args=(r, 4, port, queue)) for r in range(4)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, res in results.items():
        assert isinstance(res, dict), f"rank {rank} failed:\n{res}"
        for tied in (False, True):
            for params in MCORE_PARAMS:
                ref = torch.tensor(res[f"ref/{tied}/{params}"])
                assert (ref > 0).all()
                for kind in ("tp1pp2", "tp2pp2", "tp1pp2dp2"):
                    got = torch.tensor(res[f"{kind}/{tied}/{params}"])
                    assert rel_err(got, ref) <= TOL, (rank, kind, tied, params)


@pytest.mark.slow
def test_bench_gradnorm_json_reports_equal_results():
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "gvm_mega", "bench", "gradnorm", "--json", "--responses", "6",
           "--per-prompt", "3", "--layers", "1", "--hidden", "32", "--ffn", "48", "--heads", "4",
           "--vocab", "128", "--prompt-len", "2", "5", "--response-len", "3", "9", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["responses"] == 6 and out["params"] == "embedding"
    assert out["max_rel_diff"] <= 1e-4 and out["max_rel_diff_G"] <= 1e-4
    assert out["speedup"] > 0 and out["reference_s"] > 0 and out["batched_s"] > 0
