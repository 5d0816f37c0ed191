"""HF (Llama/Qwen2 naming) weights in and out of a TP/PP-split megatron GPTModel.

Import: every rank reads, from the safetensors files (single file or sharded with an index),
only the tensors its own parameters need and slices its tensor-parallel share. Export: shards
are merged over the TP group, later pipeline stages send theirs to global rank 0, which gets the
HF-named tensors in buckets of bounded size (:func:`iter_mcore_to_hf_buckets`, what weight
sync streams into rollout engines) or all at once (:func:`mcore_to_hf_state_dict`, written with
config.json and tokenizer files by :func:`export_mcore_to_hf`).

Layout facts used here (megatron local and transformer-engine specs):
* ``linear_qkv`` rows are grouped per key/value head: for each group, its query heads, then
  its key head, then its value head; TP ranks own contiguous groups.
* ``linear_fc1`` of a gated MLP holds ``[gate; up]`` of the rank's own FFN slice.
* column-parallel weights split rows, row-parallel weights (``linear_proj``, ``linear_fc2``)
  split columns, embedding and output layer split the vocabulary.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_BUCKET_BYTES", "HFBucketPlan", "HFCheckpointReader", "HFUnit",
           "export_mcore_to_hf", "hf_param_names", "iter_mcore_to_hf_buckets",
           "load_hf_into_mcore", "mcore_to_hf_state_dict", "plan_hf_buckets",
           "save_hf_state_dict"]

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# transformer-engine fuses the pre-norms into the following linear layer.
_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class _Shape:
    """What the conversion needs to know about the model, read from the model itself."""

    num_layers: int
    heads: int
    groups: int
    head_dim: int
    qkv_bias: bool
    tied: bool
    tp: int
    tp_rank: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model: torch.nn.Module) -> "_Shape":
        from megatron.core import parallel_state as ps

        c = model.config
        return cls(num_layers=c.num_layers, heads=c.num_attention_heads,
                   groups=c.num_query_groups or c.num_attention_heads, head_dim=c.kv_channels,
                   qkv_bias=bool(c.add_qkv_bias),
                   tied=bool(model.share_embeddings_and_output_weights),
                   tp=ps.get_tensor_model_parallel_world_size(),
                   tp_rank=ps.get_tensor_model_parallel_rank(), dtype=c.params_dtype)


def hf_param_names(num_layers: int, qkv_bias: bool, tied: bool) -> list[str]:
    """Every tensor name an HF Llama/Qwen2 checkpoint of this shape holds."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not tied:
        names.append("lm_head.weight")
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                  p + "self_attn.v_proj.weight", p + "self_attn.o_proj.weight",
                  p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                  p + "mlp.down_proj.weight"]
        if qkv_bias:
            names += [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias",
                      p + "self_attn.v_proj.bias"]
    return names


class HFCheckpointReader:
    """Lazy access to the tensors of an HF safetensors checkpoint directory."""

    def __init__(self, hf_dir: Union[str, Path]):
        self.dir = Path(hf_dir)
        index = self.dir / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' "
                                 f"({exc})") from None
            self.files = {name: self.dir / f for name, f in weight_map.items()}
        elif (self.dir / SAFE_SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(str(self.dir / SAFE_SINGLE), framework="pt") as f:
                self.files = {name: self.dir / SAFE_SINGLE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no {SAFE_SINGLE} or {SAFE_INDEX} "
                                    f"(only safetensors checkpoints are supported)")
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{self.dir}: tensor '{name}' is not in the checkpoint")
        path = self.files[name]
        if path not in self._handles:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {SAFE_INDEX} but missing")
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)  # type: ignore[attr-defined]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / mixed-precision wrappers (they keep it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _local_to_global_names(model: torch.nn.Module) -> dict[str, str]:
    """Local parameter name -> layout-free name (global layer index, local-spec names)."""
    layers = model.decoder.layers
    out: dict[str, str] = {}
    for name, _ in model.named_parameters():
        m = _LAYER.match(name)
        if m:
            rest = _ALIASES.get(m.group(2), m.group(2))
            out[name] = f"layers.{layers[int(m.group(1))].layer_number - 1}.{rest}"
        else:
            out[name] = name
    return out


def _tp_chunk(t: torch.Tensor, s: _Shape, dim: int) -> torch.Tensor:
    return t.chunk(s.tp, dim=dim)[s.tp_rank]


def _hf_to_local(gname: str, get: Callable[[str], torch.Tensor], s: _Shape) -> torch.Tensor:
    """The local (TP-sliced) megatron tensor for layout-free name ``gname``."""
    if gname == "embedding.word_embeddings.weight":
        return _tp_chunk(get("model.embed_tokens.weight"), s, 0)
    if gname == "output_layer.weight":
        return _tp_chunk(get("model.embed_tokens.weight" if s.tied else "lm_head.weight"), s, 0)
    if gname == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    m = re.match(r"^layers\.(\d+)\.(.+)$", gname)
    if not m:
        raise ValueError(f"no HF counterpart for megatron parameter '{gname}'")
    p, rest = f"model.layers.{m.group(1)}.", m.group(2)
    simple = {"input_layernorm.weight": (p + "input_layernorm.weight", None),
              "pre_mlp_layernorm.weight": (p + "post_attention_layernorm.weight", None),
              "self_attention.linear_proj.weight": (p + "self_attn.o_proj.weight", 1),
              "mlp.linear_fc2.weight": (p + "mlp.down_proj.weight", 1)}
    if rest in simple:
        hf_name, dim = simple[rest]
        t = get(hf_name)
        return t if dim is None else _tp_chunk(t, s, dim)
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = (get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv")
        per = s.heads // s.groups
        tail = q.shape[1:]
        grouped = torch.cat([q.reshape(s.groups, per * s.head_dim, *tail),
                             k.reshape(s.groups, s.head_dim, *tail),
                             v.reshape(s.groups, s.head_dim, *tail)], dim=1)
        mine = _tp_chunk(grouped, s, 0)
        return mine.reshape(-1, *tail)
    if rest == "mlp.linear_fc1.weight":
        gate, up = get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")
        return torch.cat([_tp_chunk(gate, s, 0), _tp_chunk(up, s, 0)], dim=0)
    raise ValueError(f"no HF counterpart for megatron parameter '{gname}'")


def load_hf_into_mcore(model: torch.nn.Module,
                       source: Union[str, Path, Mapping[str, torch.Tensor]]) -> None:
    """Copy HF-named weights (a checkpoint directory or a state dict) into this rank's model.

    Every parameter of the model must be covered; unexpected HF tensors are an error too (they
    mean the checkpoint is not the architecture the model was built for).
    """
    model = _unwrap(model)
    s = _Shape.of(model)
    if isinstance(source, (str, Path)):
        reader: Union[HFCheckpointReader, Mapping[str, torch.Tensor]] = HFCheckpointReader(source)
        where = str(source)
    else:
        reader, where = source, "state dict"
    expected = set(hf_param_names(s.num_layers, s.qkv_bias, s.tied))
    unexpected = sorted(k for k in reader.keys() if k not in expected
                        and not _IGNORED_HF.search(k) and not (s.tied and k == "lm_head.weight"))
    if unexpected:
        raise ValueError(f"{where}: tensors not in a {s.num_layers}-layer model of this shape "
                         f"(qkv_bias={s.qkv_bias}, tied={s.tied}): {unexpected[:8]}")

    def get(name: str) -> torch.Tensor:
        if name not in reader:
            raise KeyError(f"{where}: missing tensor '{name}'")
        return reader[name]

    names = _local_to_global_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = _hf_to_local(names[name], get, s)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{where}: shape {tuple(value.shape)} from HF for megatron "
                                 f"parameter '{name}' does not match {tuple(param.shape)} "
                                 f"(tp={s.tp})")
            param.copy_(value.to(dtype=param.dtype))


def _gather_tp(t: torch.Tensor, s: _Shape, group) -> list[torch.Tensor]:
    """Every TP rank's shard of one parameter, in TP-rank order (merged by _local_to_hf)."""
    if s.tp == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(s.tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _local_to_hf(gname: str, parts: list[torch.Tensor], s: _Shape) -> dict[str, torch.Tensor]:
    """HF tensors from the TP shards (in rank order) of one megatron parameter."""
    if gname == "embedding.word_embeddings.weight":
        return {"model.embed_tokens.weight": torch.cat(parts, 0)}
    if gname == "output_layer.weight":
        return {} if s.tied else {"lm_head.weight": torch.cat(parts, 0)}
    if gname == "decoder.final_layernorm.weight":
        return {"model.norm.weight": parts[0]}
    m = re.match(r"^layers\.(\d+)\.(.+)$", gname)
    if not m:
        raise ValueError(f"no HF counterpart for megatron parameter '{gname}'")
    p, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest == "input_layernorm.weight":
        return {p + "input_layernorm.weight": parts[0]}
    if rest == "pre_mlp_layernorm.weight":
        return {p + "post_attention_layernorm.weight": parts[0]}
    if rest == "self_attention.linear_proj.weight":
        return {p + "self_attn.o_proj.weight": torch.cat(parts, 1)}
    if rest == "mlp.linear_fc2.weight":
        return {p + "mlp.down_proj.weight": torch.cat(parts, 1)}
    if rest == "mlp.linear_fc1.weight":
        halves = [t.chunk(2, dim=0) for t in parts]
        return {p + "mlp.gate_proj.weight": torch.cat([h[0] for h in halves], 0),
                p + "mlp.up_proj.weight": torch.cat([h[1] for h in halves], 0)}
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        full = torch.cat(parts, 0)
        per = s.heads // s.groups
        tail = full.shape[1:]
        grouped = full.reshape(s.groups, (per + 2) * s.head_dim, *tail)
        q, k, v = grouped.split([per * s.head_dim, s.head_dim, s.head_dim], dim=1)
        return {f"{p}self_attn.q_proj.{kind}": q.reshape(-1, *tail),
                f"{p}self_attn.k_proj.{kind}": k.reshape(-1, *tail),
                f"{p}self_attn.v_proj.{kind}": v.reshape(-1, *tail)}
    raise ValueError(f"no HF counterpart for megatron parameter '{gname}'")


_REPLICATED = ("layernorm.weight", "final_layernorm.weight")
# Default bucket of the streamed export: large enough that per-bucket overhead is noise, small
# enough that the driver never holds more than a fraction of a multi-GB model at once.
DEFAULT_BUCKET_BYTES = 512 * 1024 ** 2


@dataclass(frozen=True)
class HFUnit:
    """One megatron parameter as the HF tensors it becomes (q/k/v and gate/up stay together)."""

    gname: str                                   # layout-free megatron name
    pp_rank: int                                 # pipeline stage that holds it
    src_rank: int                                # global rank that sends it (tp 0, dp 0)
    tensors: tuple[tuple[str, tuple[int, ...]], ...]  # (HF name, shape)
    nbytes: int


@dataclass(frozen=True)
class HFBucketPlan:
    """The same bucket split on every rank: which parameters travel together, in what order."""

    bucket_bytes: int
    dtype: torch.dtype
    buckets: tuple[tuple[HFUnit, ...], ...]

    @property
    def total_bytes(self) -> int:
        return sum(u.nbytes for b in self.buckets for u in b)

    @property
    def num_tensors(self) -> int:
        return sum(len(u.tensors) for b in self.buckets for u in b)

    def bucket_bytes_of(self, index: int) -> int:
        return sum(u.nbytes for u in self.buckets[index])


def _is_replicated(gname: str) -> bool:
    rest = gname.split(".", 2)[-1] if gname.startswith("layers.") else gname
    return rest.endswith(_REPLICATED)


def _local_units(model: torch.nn.Module, s: _Shape) -> list[tuple[str, tuple]]:
    """(layout-free name, HF (name, shape) pairs) for this rank's parameters, in model order.

    Shapes come from running the merge on meta tensors, so no data moves for planning.
    """
    names = _local_to_global_names(model)
    out = []
    for name, param in model.named_parameters():
        gname = names[name]
        meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
        parts = [meta] if _is_replicated(gname) else [meta] * s.tp
        hf = _local_to_hf(gname, parts, s)
        if hf:  # a tied output layer on the last stage has no HF tensor of its own
            out.append((gname, tuple((k, tuple(v.shape)) for k, v in hf.items())))
    return out


def plan_hf_buckets(model: torch.nn.Module,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> HFBucketPlan:
    """Split the HF export into buckets of at most ``bucket_bytes`` (collective, every rank).

    Parameters are packed greedily in model order (embedding, layers, final norm, head); one
    whose HF tensors alone exceed the limit travels in a bucket of its own.
    """
    from megatron.core import parallel_state as ps

    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
    model = _unwrap(model)
    s = _Shape.of(model)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    mine = None
    if s.tp_rank == 0 and ps.get_data_parallel_rank() == 0:
        mine = (pp_rank, dist.get_rank(), _local_units(model, s))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    stages = sorted(x for x in everyone if x is not None)
    if not stages or stages[0][1] != 0:
        raise RuntimeError("weight export expects global rank 0 to be the first pipeline stage "
                           "of data-parallel replica 0 at tensor-parallel rank 0")
    itemsize = torch.empty((), dtype=s.dtype).element_size()
    buckets: list[list[HFUnit]] = [[]]
    size = 0
    for stage, src, units in stages:
        for gname, tensors in units:
            nbytes = itemsize * sum(math.prod(shape) for _, shape in tensors)
            if buckets[-1] and size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(HFUnit(gname, stage, src, tensors, nbytes))
            size += nbytes
    return HFBucketPlan(bucket_bytes, s.dtype,
                        tuple(tuple(b) for b in buckets if b))


def _own_cpu_copy(t: torch.Tensor, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a CPU tensor with storage of its own (not the live parameter, not a view that
    safetensors would refuse to save beside its siblings), copied only when needed."""
    t = t.to(device="cpu", dtype=dtype)
    if t._base is not None or t.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
        t = t.clone()
    return t


def iter_mcore_to_hf_buckets(model: torch.nn.Module, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                             *, plan: Optional[HFBucketPlan] = None
                             ) -> Iterator[dict[str, torch.Tensor]]:
    """Stream the HF-named weights to global rank 0, one bucket of CPU tensors at a time.

    Collective: every rank of the world must iterate it to the end (other ranks get one empty
    dict per bucket). A bucket is gathered only when asked for, so the driver holds one bucket,
    not the model. TP shards are all-gathered in their TP group and merged on TP rank 0 of
    data-parallel replica 0; later pipeline stages send their tensors to rank 0 point to point.
    """
    from megatron.core import parallel_state as ps

    if plan is None:
        plan = plan_hf_buckets(model, bucket_bytes)
    model = _unwrap(model)
    s = _Shape.of(model)
    rank = dist.get_rank()
    active = ps.get_data_parallel_rank() == 0
    pp_rank = ps.get_pipeline_model_parallel_rank()
    tp_group = ps.get_tensor_model_parallel_group()
    names = _local_to_global_names(model)
    params = {names[n]: p for n, p in model.named_parameters()}
    device = next(iter(params.values())).device if params else torch.device("cpu")
    for bucket in plan.buckets:
        out: dict[str, torch.Tensor] = {}
        for unit in bucket if active else ():
            if unit.pp_rank == pp_rank:
                param = params[unit.gname].detach()
                parts = [param] if _is_replicated(unit.gname) else _gather_tp(param, s, tp_group)
                if s.tp_rank != 0:
                    continue
                for hf_name, t in _local_to_hf(unit.gname, parts, s).items():
                    if rank == 0:  # params_dtype is the checkpoint's dtype (norms may be fp32)
                        out[hf_name] = _own_cpu_copy(t, param, s.dtype)
                    else:
                        dist.send(t.to(dtype=s.dtype).contiguous(), dst=0)
            elif rank == 0:
                for hf_name, shape in unit.tensors:
                    buf = torch.empty(shape, dtype=s.dtype, device=device)
                    dist.recv(buf, src=unit.src_rank)
                    out[hf_name] = buf.cpu()
        yield out if rank == 0 else {}


def mcore_to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full HF-named state dict (CPU tensors) on global rank 0; ``{}`` on other ranks.

    Collective: every rank of the world must call it. Only the first data-parallel replica
    contributes (see :func:`iter_mcore_to_hf_buckets`, here with one bucket per model).
    """
    out: dict[str, torch.Tensor] = {}
    for bucket in iter_mcore_to_hf_buckets(model, bucket_bytes=1 << 62):
        out.update(bucket)
    return out


def save_hf_state_dict(state: Mapping[str, torch.Tensor], out_dir: Union[str, Path], *,
                       max_shard_bytes: int = 5 * 1024 ** 3) -> list[Path]:
    """Write tensors as HF safetensors: one file, or shards plus an index when larger."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in state:
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name].contiguous()
        size += nbytes
    if len(shards) == 1:
        path = out / SAFE_SINGLE
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / SAFE_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return paths


def copy_hf_side_files(src_dir: Union[str, Path], out_dir: Union[str, Path],
                       names: Optional[Iterable[str]] = None) -> list[str]:
    """Copy config.json and tokenizer/generation files that exist in ``src_dir``."""
    from gvm_mega.models.arch import TOKENIZER_FILES

    src, out = Path(src_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names or ("config.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def export_mcore_to_hf(model: torch.nn.Module, out_dir: Union[str, Path], *,
                       hf_side_dir: Optional[Union[str, Path]] = None,
                       max_shard_bytes: int = 5 * 1024 ** 3) -> Optional[Path]:
    """Write the model as an HF checkpoint directory from rank 0 (collective).

    config.json and tokenizer files are copied from ``hf_side_dir`` when given (an HF source
    directory); otherwise config.json is generated from ``model.gvm_model_config``.
    Returns the output directory on rank 0, None elsewhere.
    """
    from gvm_mega.models.arch import hf_config_from_model_config

    state = mcore_to_hf_state_dict(model)
    result = None
    if dist.get_rank() == 0:
        out = Path(out_dir)
        save_hf_state_dict(state, out, max_shard_bytes=max_shard_bytes)
        copied = copy_hf_side_files(hf_side_dir, out) if hf_side_dir else []
        if "config.json" not in copied:
            cfg = getattr(_unwrap(model), "gvm_model_config", None)
            if cfg is None:
                raise ValueError("export needs an HF directory with config.json or a model "
                                 "built by build_gpt_model (which records its config)")
            (out / "config.json").write_text(
                json.dumps(hf_config_from_model_config(cfg), indent=2) + "\n", encoding="utf-8")
        result = out
    dist.barrier()
    return result
