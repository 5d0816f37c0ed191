"""Architecture facts of the ``model`` config section, and its mapping to/from HF config.json.

All supported families (tiny, Llama, Qwen2) are pre-norm decoders with RMSNorm, SwiGLU MLPs,
grouped-query attention and rotary embeddings; they differ in QKV bias and sizes.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Union

from gvm_mega.config import ConfigError
from gvm_mega.config.schema import ModelConfig

__all__ = ["head_dim", "qkv_bias", "check_model_parallel_fit", "model_config_from_hf",
           "hf_config_from_model_config", "read_hf_config", "TOKENIZER_FILES"]

# Files copied alongside the weights so an exported HF directory loads with its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")

_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "float16": "float16", "half": "float16"}


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads


def qkv_bias(cfg: ModelConfig) -> bool:
    """Whether the QKV projection has a bias: explicit setting, else Qwen2-style arches."""
    return cfg.qkv_bias if cfg.qkv_bias is not None else cfg.arch in ("qwen2", "tiny")


def check_model_parallel_fit(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Raise ConfigError when the model cannot be split tp-ways (tensor) and pp-ways (layers)."""
    checks = (
        ("model.num_attention_heads", cfg.num_attention_heads, "parallel.tp", tp),
        ("model.num_query_groups", cfg.num_query_groups, "parallel.tp", tp),
        ("model.ffn_hidden_size", cfg.ffn_hidden_size, "parallel.tp", tp),
        ("model.vocab_size", cfg.vocab_size, "parallel.tp", tp),
        ("model.num_layers", cfg.num_layers, "parallel.pp", pp),
    )
    for name, value, pname, parts in checks:
        if value % parts:
            raise ConfigError(f"'{name}' ({value}) must be divisible by '{pname}' ({parts})")
    if cfg.num_attention_heads % cfg.num_query_groups:
        raise ConfigError(f"'model.num_attention_heads' ({cfg.num_attention_heads}) must be "
                          f"divisible by 'model.num_query_groups' ({cfg.num_query_groups})")
    if cfg.head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(f"'model.hidden_size' ({cfg.hidden_size}) must be divisible by "
                          f"'model.num_attention_heads' ({cfg.num_attention_heads}) "
                          f"unless 'model.head_dim' is set")


def read_hf_config(hf_dir: Union[str, Path]) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (an HF model directory needs config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _rope_theta(hf: dict, where: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for name, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ("default", None):
            raise ConfigError(f"{where}: '{name}' of type {kind!r} is not supported "
                              f"(only plain RoPE)")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(hf_dir: Union[str, Path]) -> ModelConfig:
    """The ``model`` config section describing an HF Qwen2 or Llama checkpoint directory."""
    hf = read_hf_config(hf_dir)
    where = str(Path(hf_dir) / "config.json")
    model_type = hf.get("model_type")
    if model_type not in ("qwen2", "llama"):
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported "
                          f"(expected 'qwen2' or 'llama')")
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "vocab_size"):
        if key not in hf:
            raise ConfigError(f"{where}: missing key '{key}'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(key):
            raise ConfigError(f"{where}: '{key}: true' is not supported")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    hd = hf.get("head_dim")
    dtype = _DTYPES.get(str(hf.get("torch_dtype", hf.get("dtype", "float32"))), "float32")
    directory = Path(hf_dir)
    has_tokenizer = any((directory / f).is_file()
                        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return ModelConfig(
        arch=model_type,
        hf_path=str(directory),
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=_rope_theta(hf, where),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        head_dim=int(hd) if hd and int(hd) != hidden // heads else None,
        qkv_bias=model_type == "qwen2",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        params_dtype=dtype,  # type: ignore[arg-type]
        tokenizer=str(directory) if has_tokenizer else ModelConfig().tokenizer,
    )


def hf_config_from_model_config(cfg: ModelConfig, **extra: Any) -> dict:
    """A config.json for ``cfg``: Qwen2 when the QKV projection has a bias, else Llama."""
    qwen = qkv_bias(cfg)
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": head_dim(cfg),
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": cfg.params_dtype,
        "attention_dropout": 0.0,
    }
    if not qwen:
        out.update(attention_bias=False, mlp_bias=False)
    out.update(extra)
    return out


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(data: dict, where: str = "model config") -> ModelConfig:
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown model keys {unknown}")
    return ModelConfig(**data)
