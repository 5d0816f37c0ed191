"""Weights broadcast to servers through a process group they join (SGLang's distributed update).

A real ``gvm-mega serve`` subprocess joins the trainer's gloo group; after each update its
samples and log-probs equal those of an engine built directly from the new weights. Refused
updates load nothing, unreachable servers fail by URL within the timeout, the trainer side meets
SGLang's own ``init_custom_process_group`` in both roles, and ``sync_weights`` streams a
megatron policy into a server bucket by bucket.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rollout_helpers import (build_model, free_port, get, post, start_server,  # noqa: E402
                              stop, wait_http)
from _weight_update_helpers import sglang_group_function, sglang_request_fields  # noqa: E402
from gvm_mega.rollout import (EmbeddedEngine, RolloutError, RolloutRequest,  # noqa: E402
                              SamplingParams, SGLangClient, SGLangEngine, WeightUpdateGroup,
                              join_update_group, load_hf_state_dict)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
REQUESTS = [RolloutRequest([5, 9, 14], 2, SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                         sampling_seed=21)),
            RolloutRequest([8, 200, 31, 7], 1, SamplingParams(max_new_tokens=5, temperature=0.0,
                                                              ignore_eos=True))]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("served"))
    build_model(model_dir, arch="qwen2")
    proc, url = start_server(model_dir)
    try:
        wait_http(url + "/health", proc=proc)
        cfg = json.loads(Path(model_dir, "config.json").read_text())
        yield cfg, load_hf_state_dict(model_dir), url
    finally:
        stop(proc)


def scaled(state: dict, factor: float, part: str = "mlp") -> dict:
    return {k: v * factor if part in k else v.clone() for k, v in state.items()}


def served_gap(url: str, cfg: dict, state: dict, version: str) -> float:
    """Largest |log-prob| gap between the server's samples and an engine built from ``state``
    (same seeds, so the same tokens are required too)."""
    client = SGLangClient([url], request_timeout_s=30)
    got = client.generate_sync(REQUESTS)
    ref = EmbeddedEngine(cfg, state).generate(REQUESTS)
    assert all(s.weight_version == version for group in got for s in group)
    gap = 0.0
    for g_group, r_group in zip(got, ref):
        for g, r in zip(g_group, r_group):
            if g.output_ids != r.output_ids:
                return float("inf")
            gap = max(gap, max(abs(a - b) for a, b in zip(g.logprobs, r.logprobs)))
    return gap


def test_updates_through_the_group(served):
    cfg, state, url = served
    group = WeightUpdateGroup(SGLangClient([url], request_timeout_s=30), backend="gloo",
                              timeout_s=20)
    v1, v2 = scaled(state, 1.3), scaled(state, 0.7, "self_attn")
    names = list(v1)
    try:
        group.send({k: v1[k] for k in names[:5]})  # a bucket before the last: no new version
        assert get(url + "/model_info")[1]["weight_version"] == "default"
        group.send({k: v1[k] for k in names[5:]}, "v1")
        assert get(url + "/model_info")[1]["weight_version"] == "v1"
        assert served_gap(url, cfg, v1, "v1") <= 1e-5 < served_gap(url, cfg, state, "v1")
        first_name = group.group_name
        group.send({k: v.to(torch.bfloat16).float() for k, v in v2.items()}, "v2")
        assert group.group_name == first_name and group.stats["inits"] == 1
        v2 = {k: v.to(torch.bfloat16).float() for k, v in v2.items()}
        assert served_gap(url, cfg, v2, "v2") <= 1e-5

        # refused buckets load nothing, not even their valid tensors, and keep the group in step
        for bad, culprit in (({"model.norm.weight": torch.ones(48) * 3,
                               "model.layers.0.mlp.bogus.weight": torch.zeros(4)},
                              "'model.layers.0.mlp.bogus.weight'"),
                             ({"model.layers.1.mlp.up_proj.weight": torch.zeros(96, 48),
                               "model.norm.weight": torch.ones(47)}, "model.norm.weight")):
            with pytest.raises(RolloutError) as err:
                group.send(bad, "v3")
            message = str(err.value)
            assert url in message and "HTTP 400" in message and culprit in message, message
            assert group.is_open
            assert get(url + "/model_info")[1]["weight_version"] == "v2"
        assert served_gap(url, cfg, v2, "v2") <= 1e-5
        group.send(v1, "v3")
        assert served_gap(url, cfg, v1, "v3") <= 1e-5 and group.stats["inits"] == 1

        # a server that lost the group (as after a restart) refuses by URL; the next update
        # opens a new group
        assert post(url + "/destroy_weights_update_group", {"group_name": first_name})[0] == 200
        start = time.monotonic()
        with pytest.raises(RolloutError, match=re.escape(url) + ".*does not exist"):
            group.send(v2, "v4")
        assert time.monotonic() - start < 5 and not group.is_open
        group.send(v2, "v4")
        assert group.stats["inits"] == 2 and group.group_name != first_name
        assert served_gap(url, cfg, v2, "v4") <= 1e-5
        first_name = group.group_name

        # the server refuses a backend it cannot run, by its URL, before any rendezvous
        with pytest.raises(RolloutError, match=re.escape(url) + ".*nccl"):
            asyncio.run(SGLangClient([url]).init_weights_update_group(
                "127.0.0.1", free_port(), 2, [1], group_name="nccl-group", backend="nccl",
                timeout_s=5))
    finally:
        group.close()
    assert not group.is_open
    status, reply = post(url + "/destroy_weights_update_group", {"group_name": first_name})
    assert status == 400 and reply["success"] is False  # the server dropped it on close


def test_engine_streams_buckets_and_keeps_its_group(served):
    cfg, state, url = served
    engine = SGLangEngine(SGLangClient([url], request_timeout_s=30), cfg, "/nonexistent",
                          weight_sync="distributed", sync_backend="gloo", sync_timeout_s=20,
                          bucket_bytes=20_000)
    v4 = scaled(state, 1.1, "embed")
    try:
        for version in ("e1", "e2"):
            detail = engine.update_weights(v4, version)
            assert detail["buckets"] > 3 and detail["send_s"] > 0
            assert engine.weight_version == version
            samples = engine.generate(REQUESTS)
            assert all(s.weight_version == version for g in samples for s in g)
        assert engine.update_group.stats["inits"] == 1
        assert served_gap(url, cfg, v4, "e2") <= 1e-5
    finally:
        engine.close()
    assert not os.path.exists("/nonexistent")


def test_config_selects_the_distributed_path():
    from gvm_mega.config.loader import ConfigError, load_config
    from gvm_mega.rollout import build_engine

    cfg = load_config(None, ["rollout.engine=sglang", "rollout.urls=[http://127.0.0.1:9]",
                             "rollout.weight_sync=distributed", "rollout.weight_sync_backend=gloo"])
    engine = build_engine(cfg.rollout, {"vocab_size": 8})
    assert isinstance(engine, SGLangEngine) and engine.weight_sync == "distributed"
    assert load_config().rollout.weight_sync == "disk"
    with pytest.raises(ConfigError, match="weight_sync"):
        load_config(None, ["rollout.weight_sync=nfs"])


def test_unreachable_servers_fail_by_url_within_the_timeout():
    refused = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RolloutError, match=re.escape(refused)):  # /server_info first
        WeightUpdateGroup(SGLangClient([refused]), backend="gloo", timeout_s=3).open()
    with pytest.raises(RolloutError, match=re.escape(refused + "/init_weights_update_group")):
        WeightUpdateGroup(SGLangClient([refused]), backend="gloo", timeout_s=3,
                          ranks_per_server=[1]).open()
    assert time.monotonic() - start < 3
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RolloutError, match=re.escape(url) + ".*no answer within 1.5"):
            WeightUpdateGroup(SGLangClient([url]), backend="gloo", timeout_s=1.5,
                              ranks_per_server=[1]).open()
        assert 1.4 < time.monotonic() - start < 4.5


SGLANG_FN, SGLANG_HOW = sglang_group_function()


@pytest.mark.skipif(SGLANG_FN is None, reason=f"SGLang's group function unavailable: {SGLANG_HOW}")
def test_meets_sglangs_own_process_group_in_both_roles():
    """Our rank 0 with SGLang's server-side join, and SGLang's rank 0 (as SGLang-based trainers
    open it) with our server-side join: the tensors arrive intact, in order."""
    payload = [torch.randn(3, 5), torch.arange(7, dtype=torch.int64), torch.randn(4).bfloat16()]
    out: dict = {}

    def theirs(rank: int, port: int, name: str) -> None:
        pg = SGLANG_FN(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2,
                       rank=rank, group_name=name, timeout=timedelta(seconds=20))
        got = []
        for t in payload:
            buf = t.clone() if rank == 0 else torch.empty_like(t)
            dist.broadcast(buf, src=0, group=pg)
            got.append(buf)
        out[(name, rank)] = got

    def run(our_rank: int, name: str) -> None:
        port = free_port()
        peer = threading.Thread(target=theirs, args=(1 - our_rank, port, name), daemon=True)
        peer.start()
        if our_rank == 1:
            time.sleep(0.2)  # their rank 0 hosts the store
        member = join_update_group("127.0.0.1", port, our_rank, 2, name, "gloo", 20.0)
        try:
            got = [member.broadcast(t.clone() if our_rank == 0 else torch.empty_like(t))
                   for t in payload]
        finally:
            peer.join(30)
            member.close()
        out[(name, our_rank)] = got

    run(0, "ours-send")
    run(1, "theirs-send")
    for key in [("ours-send", 1), ("theirs-send", 1), ("ours-send", 0), ("theirs-send", 0)]:
        assert key in out, (key, SGLANG_HOW)
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(out[key], payload))


REQUEST_CLASSES = {"/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
                   "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
                   "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput"}


@pytest.mark.skipif(sglang_request_fields("InitWeightsUpdateGroupReqInput") is None,
                    reason="sglang/srt/managers/io_struct.py is not installed "
                           "(pip install 'sglang==0.5.23' --no-deps)")
def test_request_bodies_carry_sglangs_fields(monkeypatch):
    """The client sends only fields of SGLang's request classes, and every required one."""
    sent: dict = {}

    async def record(self, session, url, path, body, timeout_s=None):
        sent[path] = body
        return {"success": True}

    monkeypatch.setattr(SGLangClient, "_control", record)
    monkeypatch.setattr(SGLangClient, "_verify_version", lambda *a: asyncio.sleep(0))
    client = SGLangClient(["http://127.0.0.1:9"])
    asyncio.run(client.init_weights_update_group("10.0.0.1", 29500, 3, [1], backend="gloo"))
    asyncio.run(client.update_weights_from_distributed(["a"], ["float32"], [[2, 3]], "v9", None))
    asyncio.run(client.destroy_weights_update_group("g"))
    assert sorted(sent) == sorted(REQUEST_CLASSES)
    for path, class_name in REQUEST_CLASSES.items():
        fields, required = sglang_request_fields(class_name)
        assert required <= set(sent[path]) <= fields, (path, sent[path], fields)


def test_sync_weights_streams_a_megatron_policy_into_a_server(tmp_path):
    from gvm_mega.parallel.launch import launch_local
    from test_weight_sync import write_hf_model

    hf_dir = write_hf_model(tmp_path / "model", arch="llama", tied=False, seed=2)
    proc, url = start_server(str(hf_dir))
    try:
        wait_http(url + "/health", timeout=90, proc=proc)
        args = {"hf_dir": str(hf_dir), "url": url, "out": str(tmp_path),
                "refused_url": f"http://127.0.0.1:{free_port()}",
                "weights_dir": str(tmp_path / "weights")}
        env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        results = launch_local([sys.executable, str(ROOT / "tests" / "_weight_update_helpers.py"),
                                json.dumps(args)], 1, env=env, timeout_s=120)
        assert results[0].returncode == 0, results[0].output[-4000:]
    finally:
        stop(proc)
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert all(gap <= 1e-4 for gap in report["gaps"]) and report["stale_gap"] > 1e-3, report
    assert report["inits"] == 1 and report["written"] == []  # one group, nothing on disk
    for sync in report["syncs"]:
        assert sync["mode"] == "distributed" and sync["buckets"] >= 3
        assert sync["engine"]["buckets"] == sync["buckets"] and sync["engine"]["send_s"] > 0
    assert report["syncs"][0]["engine"]["init_s"] > 0 == report["syncs"][1]["engine"]["init_s"]
