"""One rank of the weight-sync tests.

usage: python tests/_weight_sync_worker.py SCENARIO ARGS_JSON
Each scenario runs several checks in one world (starting ranks is the expensive part), asserts
on every rank and writes what it measured to ARGS["out"]/rank{R}.json for the test to check.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUCKET_BYTES = 6 * 1024  # several buckets for the tiny models, the embedding alone is larger


def recording_engine(hf_dir: str):
    """An EmbeddedEngine that records every ``update_weights`` call it gets."""
    from gvm_mega.rollout import EmbeddedEngine

    class Recording(EmbeddedEngine):
        def update_weights(self, state_dict, version=None, *, strict=True):
            self.calls.append({"names": sorted(state_dict), "version": version,
                               "strict": strict,
                               "bytes": sum(t.numel() * t.element_size()
                                            for t in state_dict.values())})
            return super().update_weights(state_dict, version, strict=strict)

    engine = Recording.from_pretrained(hf_dir, max_batch_size=8)
    engine.calls = []
    return engine


def make_policy(hf_dir: str):
    from gvm_mega.config.schema import OptimConfig
    from gvm_mega.models import load_hf_into_mcore, model_config_from_hf
    from gvm_mega.training import Policy
    from _train_worker import loss_spec

    optim = OptimConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.0, clip_grad=1.0, warmup_steps=0)
    policy = Policy(model_config_from_hf(hf_dir), optim=optim, loss=loss_spec(),
                    micro_batch_tokens=48, total_steps=4, temperature=1.0,
                    perform_initialization=False)
    load_hf_into_mcore(policy.module, hf_dir)
    return policy


REQUESTS_SEED = 11


def requests():
    from gvm_mega.rollout import RolloutRequest, SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=9, ignore_eos=True,
                            sampling_seed=REQUESTS_SEED)
    return [RolloutRequest([5, 17, 3, 44], 2, params),
            RolloutRequest([9, 8, 70, 1, 2, 33, 6], 1, params.replace(sampling_seed=4))]


def share(obj):
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def policy_gap(policy, reqs, samples) -> float:
    """Largest |engine log-prob - policy log-prob| over every generated token (every rank)."""
    from gvm_mega.training import SampleBatch

    seqs, plens, engine_lp = [], [], []
    for req, group in zip(reqs, samples):
        for s in group:
            seqs.append(list(req.prompt_ids) + list(s.output_ids))
            plens.append(len(req.prompt_ids))
            engine_lp.append(s.logprobs)
    out = policy.logprobs(SampleBatch(seqs, plens))
    return max(float((lp - torch.tensor(ref, dtype=torch.float64)).abs().max())
               for lp, ref in zip(out.logprobs, engine_lp))


def unit_of(name: str) -> str:
    """The megatron parameter an HF tensor comes from (q/k/v and gate/up are fused there)."""
    name = re.sub(r"self_attn\.[qkv]_proj\.", "self_attn.qkv.", name)
    return re.sub(r"mlp\.(gate|up)_proj\.", "mlp.fc1.", name)


def check_layout(hf_dir: str, tp: int, pp: int, version: str) -> dict:
    """TP/PP layout: one optimizer step, then stream into an embedded engine on rank 0."""
    import torch.distributed as dist

    from gvm_mega.config.schema import ParallelConfig
    from gvm_mega.models import hf_param_names, mcore_to_hf_state_dict, qkv_bias
    from gvm_mega.models.hf_weights import iter_mcore_to_hf_buckets, plan_hf_buckets
    from gvm_mega.parallel import init_distributed
    from gvm_mega.rollout import sync_weights
    from _train_worker import train

    layout = init_distributed(ParallelConfig(tp=tp, pp=pp), seed=3)
    rank = dist.get_rank()
    policy = make_policy(hf_dir)
    engine = recording_engine(hf_dir) if rank == 0 else None
    reqs = requests()
    before = share(engine.generate(reqs) if rank == 0 else None)
    initial = mcore_to_hf_state_dict(policy.model)
    report = {"tp": tp, "pp": pp, "dp": layout.dp}

    step = train(policy, [0])[0]
    assert not step["skipped"], step
    # the stale engine no longer matches the policy: the log-prob check below can fail
    report["stale_gap"] = policy_gap(policy, reqs, before)
    assert report["stale_gap"] > 1e-3, report

    sync = sync_weights(policy.model, engine, version, bucket_bytes=BUCKET_BYTES)
    report["sync"] = sync.as_metrics()
    assert sync.mode == "memory" and sync.version == version
    assert sync.buckets >= 3 and sync.bytes > 0, sync

    # (a) the engine holds exactly the gathered weights, which the step changed
    full = mcore_to_hf_state_dict(policy.model)
    if rank == 0:
        cfg = policy.model_cfg
        names = hf_param_names(cfg.num_layers, qkv_bias(cfg), cfg.tie_word_embeddings)
        assert sorted(full) == sorted(names), sorted(set(full) ^ set(names))
        w = engine.decoder.w
        report["exact"] = all(torch.equal(w[k], full[k]) for k in full)
        assert report["exact"], [k for k in full if not torch.equal(w[k], full[k])]
        report["changed"] = sum(not torch.equal(initial[k], full[k]) for k in full)
        assert report["changed"] >= len(full) // 2, report["changed"]
        assert sync.bytes == sum(t.numel() * t.element_size() for t in full.values())
        assert sync.tensors == len(full)

        # (b) buckets: within the limit unless one parameter alone exceeds it; each tensor once
        calls = engine.calls
        streamed, marks = calls[:-1], calls[-1]
        assert len(streamed) == sync.buckets
        assert all(not c["strict"] and c["version"] is None for c in streamed)
        assert marks["names"] == [] and marks["version"] == version
        seen = [n for c in streamed for n in c["names"]]
        assert sorted(seen) == sorted(full), "a tensor was sent twice or not at all"
        oversized = [c for c in streamed if c["bytes"] > BUCKET_BYTES]
        assert all(len({unit_of(n) for n in c["names"]}) == 1 for c in oversized), oversized
        assert max(c["bytes"] for c in streamed) == sync.max_bucket_bytes
        report["bucket_bytes"] = [c["bytes"] for c in streamed]
        report["oversized"] = len(oversized)
    else:
        assert full == {}

    # the generator yields the same number of buckets everywhere, data on rank 0 only
    plan = plan_hf_buckets(policy.model, 3 * BUCKET_BYTES)
    got = [len(b) for b in iter_mcore_to_hf_buckets(policy.model, plan=plan)]
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, got)
    assert all(len(c) == len(plan.buckets) for c in counts), counts
    if rank == 0:
        assert sum(got) == len(full)
    else:
        assert sum(got) == 0

    # (c) + (d): samples of the synced engine carry the new version and the policy's log-probs
    after = share(engine.generate(reqs) if rank == 0 else None)
    assert all(s.weight_version == version for g in after for s in g)
    assert all(s.weight_version == "default" for g in before for s in g)
    report["gap"] = policy_gap(policy, reqs, after)
    assert report["gap"] <= 1e-4, report["gap"]
    report["tokens"] = sum(len(s.output_ids) for g in after for s in g)

    # a driver without an engine fails on every rank, not only on the driver
    try:
        sync_weights(policy.model, None, "x")
    except ValueError as exc:
        assert "driver" in str(exc), str(exc)
        report["no_engine_error"] = str(exc)
    else:
        raise AssertionError("sync_weights ran without an engine on the driver")
    # an engine of another shape is refused on every rank before any weight moves
    other = recording_engine(hf_dir) if rank == 0 else None
    if other is not None:
        other.decoder.w.pop("model.layers.1.mlp.down_proj.weight")
    try:
        sync_weights(policy.model, other, "x")
    except ValueError as exc:
        assert "model.layers.1.mlp.down_proj.weight" in str(exc), str(exc)
        report["mismatch_error"] = str(exc)
    else:
        raise AssertionError("sync_weights streamed into an engine of another shape")
    assert other is None or other.calls == []
    try:
        sync_weights(policy.model, engine, "x", bucket_bytes=0)
    except ValueError as exc:
        assert "bucket_bytes" in str(exc)
    else:
        raise AssertionError("bucket_bytes=0 accepted")
    dist.barrier()
    return report


def scenario_grid(args: dict) -> dict:
    """TP2, PP2 (untied head: the last stage sends it) and TP1 x DP2, in one world of two."""
    plan = (((2, 1), "tied"), ((1, 2), "untied"), ((1, 1), "tied"))
    return {"layouts": [dict(check_layout(args[key], tp, pp, f"step-tp{tp}-pp{pp}"), model=key)
                        for (tp, pp), key in plan]}


def scenario_single(args: dict) -> dict:
    """One process: TP1 into the embedded engine, then through SGLangEngine to a real server."""
    from gvm_mega.models import mcore_to_hf_state_dict
    from gvm_mega.rollout import SGLangClient, SGLangEngine, load_hf_state_dict, sync_weights
    from _train_worker import train

    report = {"layouts": [check_layout(args["hf_dir"], 1, 1, "step-1")]}
    policy = make_policy(args["hf_dir"])
    hf_config = json.loads(Path(args["hf_dir"], "config.json").read_text())
    client = SGLangClient([args["url"]], request_timeout_s=60.0)
    remote = SGLangEngine(client, hf_config, args["weights_dir"])
    reqs = requests()
    before = remote.generate(reqs)
    assert all(s.weight_version == "default" for g in before for s in g)
    train(policy, [0])
    sync = sync_weights(policy.model, remote, "step-9", bucket_bytes=BUCKET_BYTES)
    assert sync.mode == "disk" and sync.buckets >= 3
    assert set(sync.engine_detail) >= {"write_s", "load_s"}, sync.engine_detail
    report["disk_sync"] = sync.as_metrics()
    written = Path(args["weights_dir"], "weights-step-9")
    on_disk = load_hf_state_dict(str(written))
    full = mcore_to_hf_state_dict(policy.model)
    expect = {k: v for k, v in full.items()
              if not (hf_config["tie_word_embeddings"] and k == "lm_head.weight")}
    assert sorted(on_disk) == sorted(expect)
    assert all(torch.equal(on_disk[k], expect[k]) for k in expect)
    after = remote.generate(reqs)
    assert all(s.weight_version == "step-9" for g in after for s in g)
    assert remote.weight_version == "step-9"
    report["server_gap"] = policy_gap(policy, reqs, after)
    report["server_stale_gap"] = policy_gap(policy, reqs, before)
    assert report["server_gap"] <= 1e-4 < report["server_stale_gap"], report
    return report


SCENARIOS = {"grid": scenario_grid, "single": scenario_single}


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    from gvm_mega.parallel import shutdown

    try:
        report = SCENARIOS[scenario](args)
    finally:
        shutdown()
    rank = int(os.environ.get("RANK", "0"))
    Path(args["out"], f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
