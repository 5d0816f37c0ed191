"""A plain-torch Llama/Qwen2 decoder over an HF-layout state dict, with a KV cache.

The rollout engine owns no ``nn.Module``: it keeps the HF tensors by name so that a weight
update is a dictionary swap. Numerics follow transformers' Llama/Qwen2 (RMSNorm in fp32,
rotate-half RoPE, SwiGLU, grouped-query attention, optional QKV bias, tied embeddings).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class DecoderConfig:
    """The fields of an HF ``config.json`` the decoder needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    architecture: str
    raw: dict

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "DecoderConfig":
        """Parse an HF config dict; unsupported architectures or RoPE scaling fail loudly."""
        arch = (cfg.get("architectures") or [None])[0]
        model_type = cfg.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES and model_type not in ("llama", "qwen2"):
            raise ValueError(f"{source}: architecture {arch!r} (model_type {model_type!r}) is not "
                             f"supported; expected one of {SUPPORTED_ARCHITECTURES}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"{source}: missing key {key!r}")
        rope_scaling = cfg.get("rope_scaling")
        rope_params = cfg.get("rope_parameters") or {}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
            raise ValueError(f"{source}: rope_scaling {rope_scaling!r} is not supported")
        if rope_params.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters {rope_params!r} are not supported")
        theta = cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv_heads}")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=kv_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(theta), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids, architecture=arch or model_type, raw=dict(cfg))

    @classmethod
    def from_dir(cls, hf_dir: str) -> "DecoderConfig":
        path = os.path.join(hf_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no config.json in the model directory")
        with open(path, encoding="utf-8") as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: invalid JSON ({exc})") from None
        return cls.from_hf(cfg, source=path)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Required HF tensor names and shapes (biases are optional and checked when present)."""
        h, d = self.hidden_size, self.head_dim
        shapes = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.num_heads * d, h),
                p + "self_attn.k_proj.weight": (self.num_kv_heads * d, h),
                p + "self_attn.v_proj.weight": (self.num_kv_heads * d, h),
                p + "self_attn.o_proj.weight": (h, self.num_heads * d),
                p + "mlp.gate_proj.weight": (self.intermediate_size, h),
                p + "mlp.up_proj.weight": (self.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, self.intermediate_size),
            })
        return shapes


def check_state_dict(cfg: DecoderConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming every missing, misshapen or unexpected tensor."""
    expected = cfg.expected_shapes()
    problems = []
    for name, shape in expected.items():
        if name not in state_dict:
            problems.append(f"missing {name}")
        elif tuple(state_dict[name].shape) != shape:
            problems.append(f"{name} has shape {tuple(state_dict[name].shape)}, expected {shape}")
    bias_ok = (".self_attn.q_proj.bias", ".self_attn.k_proj.bias", ".self_attn.v_proj.bias",
               ".self_attn.o_proj.bias", ".mlp.gate_proj.bias", ".mlp.up_proj.bias",
               ".mlp.down_proj.bias")
    for name in state_dict:
        if name in expected or name.endswith(".rotary_emb.inv_freq"):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if not name.endswith(bias_ok):
            problems.append(f"unexpected tensor {name}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise ValueError(f"state dict does not match the {cfg.architecture} config: {shown}")


class KVCache:
    """Per-layer key/value tensors of shape [batch, kv_heads, capacity, head_dim]."""

    def __init__(self, cfg: DecoderConfig, batch: int, capacity: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.length = 0  # filled slots (the same for every row; padding is masked)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (drop finished sequences from the batch)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]


class Decoder:
    """Forward passes of a Llama/Qwen2 model given as HF-named tensors."""

    def __init__(self, cfg: DecoderConfig, state_dict: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        d = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (
            torch.arange(0, d, 2, dtype=torch.int64, device=self.device).float() / d))
        self.load(state_dict)

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        check_state_dict(self.cfg, state_dict)
        # copy=True: the engine must not alias tensors the trainer keeps updating in place
        w = {k: v.detach().to(device=self.device, dtype=self.dtype, copy=True).contiguous()
             for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.cfg.tie_word_embeddings:
            w["lm_head.weight"] = w["model.embed_tokens.weight"]
        self.w = w

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return weight * x.to(dtype)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None]

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                cache: Optional[KVCache] = None, last_only: bool = False) -> torch.Tensor:
        """Logits for ``input_ids`` [B, T].

        ``positions`` [B, T] are RoPE positions; ``key_mask`` [B, K] marks real (non-pad)
        tokens among all K keys (cached + new). With a cache, the new keys/values are written
        at slots ``cache.length .. cache.length + T``.
        """
        cfg = self.cfg
        bsz, t = input_ids.shape
        x = F.embedding(input_ids, self.w["model.embed_tokens.weight"])
        cos, sin = self._rope(positions)
        start = cache.length if cache is not None else 0
        n_keys = start + t
        # causal over slots, plus the key padding mask; a query always sees itself so that
        # rows of left padding never have an empty softmax.
        q_slot = torch.arange(start, n_keys, device=self.device)[:, None]
        k_slot = torch.arange(n_keys, device=self.device)[None, :]
        mask = (k_slot <= q_slot)[None] & key_mask[:, None, :n_keys]
        mask = (mask | (k_slot == q_slot)[None])[:, None]  # [B, 1, T, K]
        groups = cfg.num_heads // cfg.num_kv_heads
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            h = self._rms(x, self.w[p + "input_layernorm.weight"])
            q = self._linear(h, p + "self_attn.q_proj").view(bsz, t, cfg.num_heads, -1).transpose(1, 2)
            k = self._linear(h, p + "self_attn.k_proj").view(bsz, t, cfg.num_kv_heads, -1).transpose(1, 2)
            v = self._linear(h, p + "self_attn.v_proj").view(bsz, t, cfg.num_kv_heads, -1).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            if cache is not None:
                cache.k[i][:, :, start:n_keys] = k
                cache.v[i][:, :, start:n_keys] = v
                k, v = cache.k[i][:, :, :n_keys], cache.v[i][:, :, :n_keys]
            if groups > 1:
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                  scale=1.0 / math.sqrt(cfg.head_dim))
            attn = attn.transpose(1, 2).reshape(bsz, t, -1)
            x = x + self._linear(attn, p + "self_attn.o_proj")
            h = self._rms(x, self.w[p + "post_attention_layernorm.weight"])
            h = F.silu(self._linear(h, p + "mlp.gate_proj")) * self._linear(h, p + "mlp.up_proj")
            x = x + self._linear(h, p + "mlp.down_proj")
        if cache is not None:
            cache.length = n_keys
        if last_only:
            x = x[:, -1:]
        x = self._rms(x, self.w["model.norm.weight"])
        return F.linear(x, self.w["lm_head.weight"]).float()
