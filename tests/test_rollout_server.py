"""``gvm-mega serve`` as a real subprocess, checked against SGLang's HTTP contract."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

from _rollout_helpers import (SCHEMA_SKIP_REASON, build_model, get, load_sglang_schema, post,
                              start_server, stop, wait_http)
from gvm_mega.rollout import (EmbeddedEngine, RolloutRequest, SamplingParams, load_hf_state_dict,
                              load_text_codec, save_hf_checkpoint)

torch.set_num_threads(1)
SCHEMA = load_sglang_schema()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("served"))
    build_model(model_dir, arch="qwen2")
    proc, url = start_server(model_dir)
    try:
        wait_http(url + "/health", proc=proc)
        yield model_dir, url
    finally:
        stop(proc)


def _long_request(rid):
    return {"input_ids": [5, 9, 14], "rid": rid, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 250, "n": 48, "ignore_eos": True}}


def _running(url):
    return get(url + "/server_info")[1]["internal_states"][0]["running_requests"]


def _in_thread(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("value", fn()))
    t.start()
    return t, box


def test_generate_reply_shapes(served):
    model_dir, url = served
    status, one = post(url + "/generate", {"text": "3 + 4 =", "return_logprob": True,
                                           "sampling_params": {"max_new_tokens": 6, "temperature": 0}})
    assert status == 200 and isinstance(one, dict)
    meta = one["meta_info"]
    assert meta["finish_reason"] in ({"type": "length", "length": 6},) or meta["finish_reason"]["type"] == "stop"
    assert meta["completion_tokens"] == len(one["output_ids"]) == len(meta["output_token_logprobs"])
    assert meta["prompt_tokens"] == len(load_text_codec(model_dir).encode("3 + 4 ="))
    assert [e[1] for e in meta["output_token_logprobs"]] == one["output_ids"]
    assert meta["weight_version"] == "default" and isinstance(one["text"], str)
    # batched input_ids with n=2: a flat, prompt-major list
    body = {"input_ids": [[5, 9, 14], [8, 200]], "rid": ["a", "b"],
            "sampling_params": {"max_new_tokens": 5, "n": 2, "sampling_seed": 4, "ignore_eos": True}}
    status, many = post(url + "/generate", body)
    assert status == 200 and isinstance(many, list) and len(many) == 4
    assert [m["meta_info"]["id"] for m in many] == ["a", "a", "b", "b"]
    assert [m["meta_info"]["prompt_tokens"] for m in many] == [3, 3, 2, 2]
    assert "output_token_logprobs" not in many[0]["meta_info"]
    # the same seeded request gives the same tokens, equal to the in-process engine's
    assert [m["output_ids"] for m in post(url + "/generate", body)[1]] == \
        [m["output_ids"] for m in many]
    engine = EmbeddedEngine.from_pretrained(model_dir)
    params = SamplingParams(max_new_tokens=5, sampling_seed=4, ignore_eos=True)
    local = engine.generate([RolloutRequest([5, 9, 14], 2, params), RolloutRequest([8, 200], 2, params)])
    assert [s.output_ids for r in local for s in r] == [m["output_ids"] for m in many]


def test_bad_requests_get_http_400(served):
    _, url = served
    cases = [
        ({"input_ids": [1, 2], "sampling_params": {"seed": 3}}, "unknown field `seed`"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 4, "bogus": 1}}, "`bogus`"),
        ({"input_ids": [1, 2], "sampling_params": {"min_p": 0.2}}, "min_p"),
        ({"input_ids": [1, 2], "sampling_params": {"temperature": "hot"}}, "temperature"),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"input_ids": [1, 2], "text": "x"}, "exactly one"),
        ({"input_ids": [1, 10 ** 7]}, "outside the vocabulary"),
        ({"input_ids": [1, 2], "stream": True}, "stream"),
        ({"input_ids": [[1, 2], [3]], "sampling_params": [{}]}, "1 values for 2 prompts"),
    ]
    for body, needle in cases:
        status, reply = post(url + "/generate", body)
        assert status == 400, body
        assert needle in reply["error"]["message"], (needle, reply)
    if SCHEMA is not None:  # SGLang's own schema rejects the same unknown keys
        with pytest.raises(SCHEMA.JsonContractError, match="unknown field `seed`"):
            SCHEMA.decode_SamplingParams({"seed": 3})


@pytest.mark.skipif(SCHEMA is None, reason=SCHEMA_SKIP_REASON)
def test_bodies_follow_sglang_schema(served):
    _, url = served
    bodies = [
        {"text": "1 + 1 =", "sampling_params": {"max_new_tokens": 4, "stop": ["\n"]},
         "return_logprob": True},
        {"input_ids": [[5, 9], [7]], "return_logprob": [True, False],
         "sampling_params": [{"max_new_tokens": 3, "n": 2, "sampling_seed": 1},
                             {"max_new_tokens": 2, "top_k": 5, "stop_token_ids": [2]}]},
    ]
    for body in bodies:
        req = SCHEMA.decode_GenerateRequest(body)  # the request is valid SGLang
        assert req.to_json_value()["sampling_params"]
        status, reply = post(url + "/generate", body)
        assert status == 200
        for item in reply if isinstance(reply, list) else [reply]:
            parsed = SCHEMA.decode_GenerateResponse(item)
            assert isinstance(parsed.meta_info.finish_reason,
                              (SCHEMA.FinishStop, SCHEMA.FinishLength))
            assert parsed.meta_info.completion_tokens == len(parsed.output_ids)
            if parsed.meta_info.output_token_logprobs is not None:
                assert [e.token_id for e in parsed.meta_info.output_token_logprobs] == \
                    list(parsed.output_ids)
    info = SCHEMA.decode_GetModelInfoResponse(get(url + "/model_info")[1])
    assert info.is_generation and info.weight_version == "default"
    server = SCHEMA.decode_GetServerInfoResponse(get(url + "/server_info")[1])
    assert server.max_context_length == 256
    SCHEMA.decode_AbortRequest({"rid": "x", "abort_all": False})


def test_health_flush_abort_pause(served):
    _, url = served
    assert get(url + "/health")[0] == 200
    assert get(url + "/health_generate")[0] == 200
    assert post(url + "/flush_cache", {})[0] == 200
    # abort one request by rid while it decodes
    t, box = _in_thread(lambda: post(url + "/generate", _long_request("long-1")))
    deadline = time.time() + 20
    while _running(url) == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert post(url + "/flush_cache", {})[0] == 400  # busy
    assert post(url + "/abort_request", {"rid": "long-1"})[0] == 200
    t.join(30)
    status, reply = box["value"]
    assert status == 200 and len(reply) == 48
    assert all(r["meta_info"]["finish_reason"]["type"] == "abort" for r in reply)
    assert all(len(r["output_ids"]) < 250 for r in reply)
    # pause in place holds new work until continue
    assert post(url + "/pause_generation", {"mode": "in_place"})[1]["status"] == "ok"
    body = {"input_ids": [5, 9], "sampling_params": {"max_new_tokens": 3}}
    t, box = _in_thread(lambda: post(url + "/generate", body))
    time.sleep(0.5)
    assert "value" not in box
    assert post(url + "/continue_generation", {})[0] == 200
    t.join(30)
    assert box["value"][0] == 200 and len(box["value"][1]["output_ids"]) == 3
    assert post(url + "/pause_generation", {"mode": "sideways"})[0] == 400


def test_update_weights_from_disk(served, tmp_path):
    model_dir, url = served
    state = load_hf_state_dict(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    new_state = {k: v * 1.3 if "mlp" in k else v for k, v in state.items()}
    path = save_hf_checkpoint(new_state, cfg, str(tmp_path / "v1"))
    status, reply = post(url + "/update_weights_from_disk", {"model_path": path, "weight_version": "v1"})
    assert status == 200 and reply["success"] is True
    assert get(url + "/model_info")[1]["weight_version"] == "v1"
    body = {"input_ids": [5, 9, 14], "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                          "ignore_eos": True}}
    out = post(url + "/generate", body)[1]
    assert out["meta_info"]["weight_version"] == "v1"
    engine = EmbeddedEngine(cfg, new_state)
    ref = engine.generate([RolloutRequest([5, 9, 14], 1, SamplingParams(
        max_new_tokens=6, temperature=0, ignore_eos=True))])[0][0]
    assert out["output_ids"] == ref.output_ids
    status, reply = post(url + "/update_weights_from_disk", {"model_path": str(tmp_path / "nope"),
                                                             "weight_version": "v2"})
    assert status == 400 and reply["success"] is False and "nope" in reply["message"]
    assert get(url + "/model_info")[1]["weight_version"] == "v1"


def test_serve_reports_bad_model_dir(tmp_path, capsys):
    from gvm_mega.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "not supported" in err


def test_serve_weight_group_timeout_reaches_the_server(tmp_path, capsys, monkeypatch):
    from gvm_mega.cli import main
    from gvm_mega.rollout import RolloutServer

    assert main(["serve", "--model", str(tmp_path), "--weight-group-timeout", "0"]) == 2
    assert "--weight-group-timeout must be > 0" in capsys.readouterr().err
    model_dir = str(tmp_path / "model")
    build_model(model_dir, arch="qwen2")
    seen = {}
    monkeypatch.setattr(RolloutServer, "run", lambda self: seen.setdefault("t", self.group_timeout_s))
    assert main(["serve", "--model", str(model_dir), "--weight-group-timeout", "12.5"]) == 0
    assert seen["t"] == 12.5


def test_client_disconnect_stops_its_generation(served):
    _, url = served
    body = {"input_ids": [5, 9, 14], "sampling_params": {"max_new_tokens": 250, "n": 64,
                                                          "ignore_eos": True}}
    start = time.time()
    with pytest.raises(Exception):
        post(url + "/generate", body, timeout=0.3)
    while _running(url) and time.time() - start < 30:
        time.sleep(0.01)
    # 64 x 250 tokens take seconds; the disconnect aborts them after the current step
    assert time.time() - start < 1.0
