"""Shared pieces of the megatron policy tests: tiny HF models and a local multi-rank launcher."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_mcore_worker.py"

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6)


def make_tiny_hf(out_dir: Path, arch: str, *, tied: bool, seed: int, theta: float = 10000.0,
                 max_shard_size: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny random transformers Qwen2/Llama model with a tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls_cfg, cls_model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                          "llama": (LlamaConfig, LlamaForCausalLM)}[arch]
    config = cls_cfg(**TINY, tie_word_embeddings=tied, rope_theta=theta)
    model = cls_model(config).eval()
    with torch.no_grad():  # non-trivial weights: unit-scale norms and biases, visible logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    _write_tokenizer(out_dir)
    return out_dir


def _write_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(TINY["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t1"}))


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def read_safetensors_dir(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def slurm_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What srun would set for task ``rank`` of a one-node job (no MASTER_ADDR)."""
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world_size),
            "SLURM_LOCALID": str(rank), "SLURM_NODELIST": "127.0.0.1",
            "SLURM_JOB_ID": "4242", "MASTER_PORT": str(port)}


def run_worker(scenario: str, world_size: int, args: dict, *, slurm: bool = False,
               timeout_s: float = 240.0) -> list:
    """Run ``tests/_mcore_worker.py SCENARIO ARGS`` as a local world; fail with the logs."""
    from gvm_mega.parallel.launch import launch_local

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    results = launch_local([sys.executable, str(WORKER), scenario, json.dumps(args)],
                           world_size, env=env, env_for_rank=slurm_env if slurm else None,
                           timeout_s=timeout_s)
    bad = [r for r in results if r.returncode != 0]
    if bad:
        logs = "\n".join(f"--- rank {r.rank} exit {r.returncode} ---\n{r.output[-4000:]}"
                         for r in results)
        raise AssertionError(f"{scenario}: ranks {[r.rank for r in bad]} failed\n{logs}")
    return results
