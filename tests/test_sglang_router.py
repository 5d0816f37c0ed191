"""SGLangClient through the real sglang-router in front of two ``gvm-mega serve`` processes."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os

import pytest
import torch

from _rollout_helpers import build_model, post, start_router, start_server, stop, wait_http
from gvm_mega.rollout import (EmbeddedEngine, RolloutRequest, SamplingParams, SGLangClient,
                              load_hf_state_dict, save_hf_checkpoint)

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang_router") is None,
                                reason="sglang-router is not installed (pip install sglang-router)")


def _requests(counts, max_new_tokens=32):
    return [RolloutRequest([5 + i % 7, 9, 14], n, SamplingParams(
        temperature=0.9, max_new_tokens=max_new_tokens, sampling_seed=7 + i))
        for i, n in enumerate(counts)]


def test_router_failover_and_weight_sync(tmp_path):
    model_dir = str(tmp_path / "model")
    build_model(model_dir, arch="qwen2")
    (p1, u1), (p2, u2) = start_server(model_dir), start_server(model_dir)
    router = None
    try:
        wait_http(u1 + "/health", proc=p1)
        wait_http(u2 + "/health", proc=p2)
        router, rurl = start_router([u1, u2])
        wait_http(rurl + "/health", proc=router, timeout=60)
        reference = EmbeddedEngine.from_pretrained(model_dir)

        # the router passes batched input_ids but drops unknown sampling keys silently: the
        # client must never rely on it to reject a misspelt field
        status, reply = post(rurl + "/generate", {"input_ids": [[5, 9], [6]],
                                                  "sampling_params": {"max_new_tokens": 2}})
        assert status == 200 and len(reply) == 2

        # weights: control calls go to the workers, generation through the router
        state = load_hf_state_dict(model_dir)
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        new_state = {k: v * 1.25 if "mlp" in k else v for k, v in state.items()}
        path = save_hf_checkpoint(new_state, cfg, str(tmp_path / "w1"))
        client = SGLangClient([rurl], worker_urls=[u1, u2], concurrency=16, backoff_s=0.1,
                              max_retries=12)
        asyncio.run(client.update_weights_from_disk(path, "w1"))
        reqs = _requests([3, 1, 0, 4, 2])
        got = client.generate_sync(reqs)
        want = EmbeddedEngine(cfg, new_state).generate(reqs)
        assert [[s.output_ids for s in r] for r in got] == [[s.output_ids for s in r] for r in want]
        assert {s.weight_version for r in got for s in r} == {"w1"}

        # one worker killed mid-rollout: every sample still comes back exactly once
        asyncio.run(client.update_weights_from_disk(save_hf_checkpoint(
            state, cfg, str(tmp_path / "w2")), "w2"))
        seen = []

        def on_sample(i, j, sample):
            seen.append((i, j))
            if len(seen) == 5:
                p1.kill()

        client.on_sample = on_sample
        reqs = _requests([3] * 12 + [5, 0, 1], max_new_tokens=40)
        got = client.generate_sync(reqs)
        assert p1.poll() is not None
        assert len(seen) == len(set(seen)) == sum(r.n for r in reqs)
        want = reference.generate(reqs)
        assert [[s.output_ids for s in r] for r in got] == [[s.output_ids for s in r] for r in want]
        assert {s.weight_version for r in got for s in r} == {"w2"}
    finally:
        for proc in (router, p1, p2):
            if proc is not None:
                stop(proc)
