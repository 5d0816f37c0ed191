"""SGLangClient against ``gvm-mega serve`` subprocesses: counts, failover, aborts, weights."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import pytest
import torch

from _rollout_helpers import (SCHEMA_SKIP_REASON, build_model, free_port, get, load_sglang_schema,
                              post, start_server, stop, wait_http)
from gvm_mega.rollout import (EmbeddedEngine, RolloutError, RolloutRequest, SamplingParams,
                              SGLangClient, SGLangEngine, load_hf_state_dict, save_hf_checkpoint)

torch.set_num_threads(1)
SCHEMA = load_sglang_schema()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("client-model"))
    build_model(out, arch="llama")
    return out


@pytest.fixture(scope="module")
def servers(model_dir):
    procs = [start_server(model_dir) for _ in range(2)]
    try:
        for proc, url in procs:
            wait_http(url + "/health", proc=proc)
        yield procs
    finally:
        for proc, _ in procs:
            stop(proc)


@pytest.fixture(scope="module")
def reference(model_dir):
    return EmbeddedEngine.from_pretrained(model_dir)


def _requests(counts, max_new_tokens=24, seed=100):
    return [RolloutRequest([5 + i % 7, 9, 14 + i % 3], n, SamplingParams(
        temperature=1.0, top_p=0.95, max_new_tokens=max_new_tokens, sampling_seed=seed + i))
        for i, n in enumerate(counts)]


def _assert_same(got, want):
    assert [len(r) for r in got] == [len(r) for r in want]
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            assert g.output_ids == w.output_ids
            assert g.finish_reason == w.finish_reason and g.matched == w.matched
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs),
                                       atol=1e-4, rtol=0)


def test_per_prompt_counts_are_exact(servers, reference):
    url = servers[0][1]
    counts = [0, 1, 3, 5, 2, 8]
    reqs = _requests(counts)
    client = SGLangClient([url], concurrency=8)
    got = client.generate_sync(reqs)
    _assert_same(got, reference.generate(reqs))
    assert client.stats["http_requests"] == sum(counts)  # seeded: one sample per request
    # unseeded requests go out with n, split at max_n_per_request
    free = [RolloutRequest([5, 9], n, SamplingParams(max_new_tokens=6)) for n in (7, 0, 4)]
    client = SGLangClient([url], max_n_per_request=3)
    got = client.generate_sync(free)
    assert [len(r) for r in got] == [7, 0, 4]
    assert client.stats["http_requests"] == 3 + 2
    assert all(len(s.output_ids) == len(s.logprobs) > 0 for r in got for s in r)
    assert len({tuple(s.output_ids) for s in got[0]}) > 1


def test_server_killed_mid_rollout_loses_and_duplicates_nothing(model_dir, servers, reference):
    p1, u1 = start_server(model_dir)
    u2 = servers[1][1]
    try:
        wait_http(u1 + "/health", proc=p1)
        seen = []

        def on_sample(i, j, sample):
            seen.append((i, j))
            if len(seen) == 6:
                p1.kill()

        reqs = _requests([4] * 16 + [1, 0, 7], max_new_tokens=40)
        client = SGLangClient([u1, u2], concurrency=16, backoff_s=0.05, on_sample=on_sample)
        got = client.generate_sync(reqs)
        assert p1.poll() is not None
        assert sorted(seen) == sorted(set(seen)) and len(seen) == sum(r.n for r in reqs)
        assert client.stats["retries"] > 0 and client.stats["failovers"] > 0
        _assert_same(got, reference.generate(reqs))
    finally:
        stop(p1)


def test_aborted_samples_are_resubmitted(servers, reference):
    url = servers[0][1]
    reqs = _requests([6] * 8, max_new_tokens=120)

    def abort_when_busy():
        deadline = time.time() + 30
        while time.time() < deadline:
            state = get(url + "/server_info")[1]["internal_states"][0]
            if state["running_requests"] > 0:
                post(url + "/abort_request", {"abort_all": True})
                return
            time.sleep(0.005)

    t = threading.Thread(target=abort_when_busy)
    t.start()
    client = SGLangClient([url], concurrency=48, backoff_s=0.05)
    got = client.generate_sync(reqs)
    t.join()
    assert client.stats["aborts_resubmitted"] > 0
    _assert_same(got, reference.generate(reqs))


def test_weight_updates_and_version_checks(servers, model_dir, tmp_path):
    urls = [u for _, u in servers]
    state = load_hf_state_dict(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    new_state = {k: v * 1.2 if "mlp" in k else v for k, v in state.items()}
    client = SGLangClient(urls, backoff_s=0.05)
    engine = SGLangEngine(client, cfg, str(tmp_path))
    timings = engine.update_weights(new_state, "step-3")
    assert set(timings) == {"write_s", "load_s", "total_s"} and timings["total_s"] > 0
    for url in urls:
        assert get(url + "/model_info")[1]["weight_version"] == "step-3"
    reqs = _requests([2, 3])
    got = engine.generate(reqs)
    assert all(s.weight_version == "step-3" for r in got for s in r)
    _assert_same(got, EmbeddedEngine(cfg, new_state).generate(reqs))
    # a server answering with another version is an error, not a silent mix of policies
    client.expected_weight_version = "step-4"
    with pytest.raises(RolloutError, match="weight version 'step-3', expected 'step-4'"):
        client.generate_sync(reqs)
    # back to the original weights
    path = save_hf_checkpoint(state, cfg, str(tmp_path / "orig"))
    asyncio.run(client.update_weights_from_disk(path, "default"))
    with pytest.raises(RolloutError, match="update_weights_from_disk failed"):
        asyncio.run(client.update_weights_from_disk(str(tmp_path / "missing"), "x"))


def test_failures_raise_clear_errors(servers):
    url = servers[0][1]
    dead = f"http://127.0.0.1:{free_port()}"
    client = SGLangClient([dead], max_retries=2, backoff_s=0.01)
    with pytest.raises(RolloutError, match="gave up after 3 failed attempts"):
        client.generate_sync(_requests([1]))
    bad = [RolloutRequest([10 ** 7], 1, SamplingParams(max_new_tokens=2))]
    with pytest.raises(RolloutError, match=r"rejected the request \(HTTP 400\).*vocabulary"):
        SGLangClient([url]).generate_sync(bad)
    slow = SGLangClient([url], request_timeout_s=0.05, max_retries=1, backoff_s=0.01)
    long = [RolloutRequest([5, 9], 32, SamplingParams(max_new_tokens=250, ignore_eos=True))]
    with pytest.raises(RolloutError, match="no reply within 0.05s"):
        slow.generate_sync(long)
    with pytest.raises(ValueError, match="at least one"):
        SGLangClient([])


@pytest.mark.skipif(SCHEMA is None, reason=SCHEMA_SKIP_REASON)
def test_client_bodies_follow_sglang_schema():
    client = SGLangClient(["http://127.0.0.1:1"])
    params = SamplingParams(temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=8,
                            stop=("\n\n",), stop_token_ids=(2,), sampling_seed=9)
    for req, slots in ((RolloutRequest([1, 2], 3, params), [1]),
                       (RolloutRequest([1, 2], 5, params.replace(sampling_seed=None)), [0, 1, 2])):
        body = client._body(req, slots, "rid-1")
        parsed = SCHEMA.decode_GenerateRequest(body)
        sp = SCHEMA.decode_SamplingParams(body["sampling_params"])  # rejects unknown keys
        assert parsed.return_logprob is True and parsed.input_ids == [1, 2]
        assert "seed" not in body["sampling_params"]
        assert sp.n == len(slots) and sp.top_k == 20
