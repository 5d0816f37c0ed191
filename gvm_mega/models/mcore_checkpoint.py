"""Megatron dist-checkpoint of the policy weights, with the model config beside it.

Layout of a checkpoint directory::

    DIR/gvm_mega_model.json   format version, the ``model`` config section, the TP/PP layout
                              it was written from, the megatron-core version
    DIR/model/                megatron ``dist_checkpointing`` files (loadable at any TP/PP)
    DIR/hf/                   config.json and tokenizer files of the HF source, when known

``dist_checkpointing`` starts worker processes while saving: scripts that save must guard
their entry point with ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.distributed as dist

from gvm_mega.config import ConfigError
from gvm_mega.config.schema import ModelConfig

if TYPE_CHECKING:
    from gvm_mega.tokenizer import Tokenizer

__all__ = ["save_mcore_checkpoint", "load_mcore_checkpoint", "read_mcore_metadata",
           "METADATA_FILE", "WEIGHTS_DIR", "HF_SIDE_DIR"]

METADATA_FILE = "gvm_mega_model.json"
WEIGHTS_DIR = "model"
HF_SIDE_DIR = "hf"
FORMAT_VERSION = 1


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def save_mcore_checkpoint(model: torch.nn.Module, out_dir: Union[str, Path],
                          model_cfg: Optional[ModelConfig] = None, *,
                          hf_side_dir: Optional[Union[str, Path]] = None,
                          tokenizer: Optional["Tokenizer"] = None) -> Path:
    """Save this rank's share of the weights (collective over the whole world).

    ``hf_side_dir`` (an HF model directory) and ``tokenizer`` are written to ``hf/`` beside the
    weights, so that ``gvm-mega convert mcore-to-hf`` gives a directory that loads with its
    tokenizer.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    import megatron.core

    from gvm_mega.models.arch import model_config_to_dict
    from gvm_mega.models.hf_weights import copy_hf_side_files

    model = _unwrap(model)
    cfg = model_cfg or getattr(model, "gvm_model_config", None)
    if cfg is None:
        raise ValueError("save_mcore_checkpoint needs model_cfg for a model not built by "
                         "build_gpt_model")
    out = Path(out_dir)
    weights = out / WEIGHTS_DIR
    if dist.get_rank() == 0:
        weights.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "model": model_config_to_dict(cfg),
                "saved_layout": {"tp": ps.get_tensor_model_parallel_world_size(),
                                 "pp": ps.get_pipeline_model_parallel_world_size()},
                "megatron_core": getattr(megatron.core, "__version__", "unknown")}
        (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if hf_side_dir:
            copy_hf_side_files(hf_side_dir, out / HF_SIDE_DIR)
        if tokenizer is not None:
            tokenizer.save(out / HF_SIDE_DIR)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(weights))
    dist.barrier()
    return out


def read_mcore_metadata(ckpt_dir: Union[str, Path]) -> tuple[ModelConfig, dict]:
    """The model config recorded in a checkpoint directory, and the raw metadata."""
    from gvm_mega.models.arch import model_config_from_dict

    path = Path(ckpt_dir) / METADATA_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: not found; {ckpt_dir} is not a gvm-mega megatron checkpoint")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("model"), dict):
        raise ConfigError(f"{path}: unsupported format {meta.get('format')!r} "
                          f"(expected {FORMAT_VERSION} with a 'model' object)")
    return model_config_from_dict(meta["model"], where=str(path)), meta


def load_mcore_checkpoint(model: torch.nn.Module, ckpt_dir: Union[str, Path]) -> None:
    """Load weights saved by :func:`save_mcore_checkpoint` into ``model`` at any TP/PP layout."""
    from megatron.core import dist_checkpointing

    model = _unwrap(model)
    weights = Path(ckpt_dir) / WEIGHTS_DIR
    if not (weights / "metadata.json").is_file():
        raise FileNotFoundError(f"{weights}: no megatron dist checkpoint (metadata.json missing)")
    state = dist_checkpointing.load(model.sharded_state_dict(), str(weights))
    model.load_state_dict(state, strict=True)
