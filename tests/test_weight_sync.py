"""Weight sync from the megatron policy (TP/PP shards) into rollout engines.

After one real optimizer step the weights are streamed in buckets into an embedded engine
(TP2, PP2, TP1 x DP2 in a world of two ranks; TP1 in one process) and, through
SGLangEngine, written to disk and loaded by a ``gvm-mega serve`` subprocess. Checked: the
engine holds exactly the gathered weights, buckets respect the limit and carry every tensor
once, the engine's log-probs of its own samples equal the policy's, and samples carry the new
weight version.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _rollout_helpers import start_server, stop, wait_http  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_weight_sync_worker.py"
# the shape the train-step helpers build batches for (vocabulary 96)
SHAPE = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
             num_query_groups=2, vocab_size=96, max_position_embeddings=64)


def write_hf_model(out_dir: Path, *, arch: str, tied: bool, seed: int) -> Path:
    """A random HF checkpoint of the test shape (distinct, non-flat logits)."""
    from gvm_mega.config.schema import ModelConfig
    from gvm_mega.models import hf_config_from_model_config
    from gvm_mega.rollout import save_hf_checkpoint
    from gvm_mega.rollout.decoder import DecoderConfig

    cfg = hf_config_from_model_config(ModelConfig(arch=arch, tie_word_embeddings=tied, **SHAPE))
    gen = torch.Generator().manual_seed(seed)
    shapes = dict(DecoderConfig.from_hf(cfg).expected_shapes())
    if arch == "qwen2":  # QKV biases (optional for the engine, part of the megatron model)
        for i in range(SHAPE["num_layers"]):
            for x, heads in (("q", "num_attention_heads"), ("k", "num_query_groups"),
                             ("v", "num_query_groups")):
                shapes[f"model.layers.{i}.self_attn.{x}_proj.bias"] = (
                    SHAPE[heads] * SHAPE["hidden_size"] // SHAPE["num_attention_heads"],)
    state = {}
    for name, shape in shapes.items():
        t = 0.2 * torch.randn(shape, generator=gen)
        state[name] = 1.0 + t if name.endswith("norm.weight") else t
    return Path(save_hf_checkpoint(state, cfg, str(out_dir)))


def run_world(scenario: str, world_size: int, args: dict) -> dict:
    from gvm_mega.parallel.launch import launch_local

    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = launch_local([sys.executable, str(WORKER), scenario, json.dumps(args)],
                           world_size, env=env, timeout_s=240)
    if any(r.returncode != 0 for r in results):
        logs = "\n".join(f"--- rank {r.rank} exit {r.returncode} ---\n{r.output[-4000:]}"
                         for r in results)
        raise AssertionError(f"{scenario}: a rank failed\n{logs}")
    return json.loads(Path(args["out"], "rank0.json").read_text())


def _check_layout_report(entry: dict) -> None:
    assert entry["exact"] and entry["changed"] > 0
    assert entry["gap"] <= 1e-4 < entry["stale_gap"]
    assert entry["oversized"] >= 1  # the embedding alone exceeds the tiny bucket limit
    assert entry["tokens"] == 27
    assert "driver" in entry["no_engine_error"]
    assert "down_proj" in entry["mismatch_error"]
    sync = entry["sync"]
    assert sync["weight_sync/buckets"] == len(entry["bucket_bytes"]) >= 3
    assert sync["weight_sync/total_s"] >= sync["weight_sync/gather_s"] > 0


def test_sync_into_embedded_engine_at_tp2_and_pp2(tmp_path):
    """Two ranks, Qwen2-style (QKV bias): TP2 and TP1 x DP2 (an idle replica) with tied
    embeddings, PP2 with an untied head (stage 1 sends its tensors to the driver)."""
    dirs = {"untied": write_hf_model(tmp_path / "untied", arch="qwen2", tied=False, seed=3),
            "tied": write_hf_model(tmp_path / "tied", arch="qwen2", tied=True, seed=1)}
    report = run_world("grid", 2, {**{k: str(v) for k, v in dirs.items()}, "out": str(tmp_path)})
    layouts = {(e["tp"], e["pp"], e["dp"]): e for e in report["layouts"]}
    assert sorted(layouts) == [(1, 1, 2), (1, 2, 1), (2, 1, 1)]
    assert layouts[(1, 2, 1)]["model"] == "untied"
    for entry in layouts.values():
        _check_layout_report(entry)


def test_sync_at_tp1_and_through_a_server_from_disk(tmp_path):
    """Llama-style (untied head) in one process: embedded engine, then a gvm-mega serve
    subprocess through SGLangEngine (/update_weights_from_disk with the new version)."""
    hf_dir = write_hf_model(tmp_path / "model", arch="llama", tied=False, seed=2)
    proc, url = start_server(str(hf_dir))
    try:
        wait_http(url + "/health", timeout=90, proc=proc)
        report = run_world("single", 1, {"hf_dir": str(hf_dir), "url": url, "out": str(tmp_path),
                                         "weights_dir": str(tmp_path / "weights")})
    finally:
        stop(proc)
    _check_layout_report(report["layouts"][0])
    disk = report["disk_sync"]
    assert disk["weight_sync/engine_write_s"] > 0 and disk["weight_sync/engine_load_s"] > 0
    assert report["server_gap"] <= 1e-4 < report["server_stale_gap"]
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["weights-step-9"]


def test_rollout_benchmark_times_the_sync(tmp_path):
    """``gvm-mega bench rollout --sync`` on a small model reports both paths of a real sync."""
    import subprocess

    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "gvm_mega", "bench", "rollout", "--skip-client", "--sync",
         "--hidden", "64", "--layers", "1", "--vocab", "256", "--batch", "2", "--prompt-len", "4",
         "--new-tokens", "2", "--sync-hidden", "128", "--sync-layers", "2", "--sync-vocab", "512",
         "--sync-bucket-mb", "1", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sync_weights from megatron" in proc.stdout
    sync = json.loads(out.read_text())["sync"]
    mem, disk = sync["memory"], sync["disk"]
    assert mem["bytes"] == disk["bytes"] > 0 and mem["buckets"] == disk["buckets"] >= 2
    assert disk["engine_write_s"] > 0 and disk["engine_load_s"] > 0
    assert mem["total_s"] > 0 and disk["total_s"] >= disk["engine_total_s"]
