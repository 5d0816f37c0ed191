"""Read and write HF-layout checkpoints (safetensors + config.json).

The trainer writes the policy here after each step for SGLang servers to load with
``/update_weights_from_disk``; the embedded engine and ``gvm-mega serve`` read the same files.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

_SHARD_BYTES = 2 * 1024 ** 3


def load_hf_state_dict(hf_dir: str) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in ``hf_dir`` (sharded or not)."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: model directory does not exist")
    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (only safetensors is supported)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            part = load_file(path)
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: unreadable safetensors file ({exc})") from None
        dup = state.keys() & part.keys()
        if dup:
            raise ValueError(f"{path}: tensor {sorted(dup)[0]!r} also appears in another shard")
        state.update(part)
    return state


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], config: dict, out_dir: str,
                       *, shard_bytes: int = _SHARD_BYTES, extra_files: Optional[dict] = None) -> str:
    """Write ``state_dict`` (HF names) as safetensors shards + ``config.json`` into ``out_dir``.

    Files are written to a temporary directory beside ``out_dir`` and renamed into place, so a
    server never loads a half-written checkpoint. Tied embeddings are not written twice.
    Returns ``out_dir``.
    """
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if config.get("tie_word_embeddings") and "lm_head.weight" in tensors:
        tensors.pop("lm_head.weight")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for fname, content in (extra_files or {}).items():
        with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
            f.write(content)
    if os.path.isdir(out_dir):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "x"))
        os.rename(tmp, out_dir)
        _rmtree(old)
    else:
        os.rename(tmp, out_dir)
    return out_dir


def _rmtree(path: str) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)
