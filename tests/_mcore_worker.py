"""One rank of the multi-process policy tests (started by tests/_mcore_helpers.run_worker).

usage: python tests/_mcore_worker.py SCENARIO ARGS_JSON
Each scenario runs several checks in one world (starting ranks is the expensive part), asserts
on every rank, and writes what it measured to ARGS["out"]/rank{R}.json for the test to check.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]  # (tp, pp) at world size 4


def forward_logits(model, tokens: torch.Tensor):
    """Full-vocabulary logits through megatron's pipeline schedule; None off the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    b, s = tokens.shape
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    store = {}

    def step(data_iter, m):
        out = m(next(data_iter), positions, attention_mask=None)

        def loss_func(logits):
            store["logits"] = gather_from_tensor_model_parallel_region(logits).detach().clone()
            return logits.sum() * 0.0, {}

        return out, loss_func

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]),
                                model=[model], num_microbatches=1, seq_length=s,
                                micro_batch_size=b, forward_only=True)
    return store.get("logits")


def scenario_runtime(args: dict) -> dict:
    """Layout errors, TP / PP / DP groups, re-initialisation, seeding, CPU training steps."""
    import torch.distributed as dist

    from gvm_mega.config import ConfigError
    from gvm_mega.config.schema import ModelConfig, ParallelConfig
    from gvm_mega.parallel import cpu_compat, detect_launch_env, init_distributed, seed_everything

    env = detect_launch_env()
    assert env.source == "slurm" and env.world_size == 2, env
    report: dict = {"rank": env.rank}
    # a world that does not factor fails before any rendezvous, naming the numbers
    for bad, needle in ((ParallelConfig(tp=3), "world size 2"),
                        (ParallelConfig(tp=2, pp=1, dp=2), "'parallel.dp' is 2")):
        try:
            init_distributed(bad)
        except ConfigError as exc:
            assert needle in str(exc), str(exc)
            report.setdefault("errors", []).append(str(exc))
        else:
            raise AssertionError(f"{bad} was accepted at world size 2")
    assert not dist.is_initialized()

    layout = init_distributed(ParallelConfig(tp=2), seed=1234)
    assert (layout.tp, layout.pp, layout.dp, layout.world_size) == (2, 1, 1, 2), layout
    assert layout.backend == "gloo" and layout.device == "cpu"
    assert layout.is_driver == (dist.get_rank() == 0) and layout.tp_rank == dist.get_rank()
    everyone = [None] * 2
    dist.all_gather_object(everyone, layout)
    assert sum(l.is_driver for l in everyone) == 1
    from megatron.core import parallel_state as ps

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    assert t.item() == 3.0
    report["tp2"] = {"tp_rank": layout.tp_rank,
                     "tp_group": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())}

    # seeding: same default stream everywhere; the TP-region stream differs across TP ranks
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    seed_everything(77)
    before = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(3)
    after = torch.rand(3)
    seed_everything(77)
    plain = torch.rand(6)
    assert torch.equal(torch.cat([before, after]), plain), "fork leaked into the default stream"
    draws = [None] * 2
    dist.all_gather_object(draws, (before.tolist(), tp_draw.tolist()))
    assert draws[0][0] == draws[1][0] and draws[0][1] != draws[1][1]

    # CPU layer: cuda device strings map to CPU, enable() is idempotent
    assert cpu_compat.is_enabled() and cpu_compat.enable()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    torch.cuda.synchronize()

    # a training step with megatron DDP and its optimizer (grad clipping on), under TP2 ...
    cfg = ModelConfig(num_layers=2, vocab_size=64)
    report["train_tp2"] = _train_step(cfg)
    # ... and, after re-initialising in the same process, under PP2
    layout = init_distributed(ParallelConfig(pp=2))
    assert (layout.tp, layout.pp, layout.dp, layout.pp_rank) == (1, 2, 1, dist.get_rank())
    report["train_pp2"] = _train_step(cfg)
    layout = init_distributed(ParallelConfig())
    assert (layout.tp, layout.pp, layout.dp, layout.dp_rank) == (1, 1, 2, dist.get_rank())
    assert ps.get_data_parallel_world_size() == 2
    report["train_dp2"] = _train_step(cfg)

    # disable() restores torch's own CUDA behaviour; enable() brings the CPU layer back
    cpu_compat.disable()
    try:
        torch.zeros(1, device="cuda")
    except (RuntimeError, AssertionError):
        pass
    else:
        raise AssertionError("a CUDA tensor was created with the CPU layer disabled")
    assert cpu_compat.enable() and torch.zeros(1, device="cuda").device.type == "cpu"
    return report


def random_hf_state_dict(cfg, seed: int) -> dict:
    """HF-named random weights for a ModelConfig (norm weights near 1)."""
    from gvm_mega.models import head_dim, hf_param_names, qkv_bias

    h, f, v, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, head_dim(cfg)
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes = {"embed_tokens": (v, h), "lm_head": (v, h), "norm": (h,), "q_proj.weight": (q, h),
              "k_proj.weight": (kv, h), "v_proj.weight": (kv, h), "q_proj.bias": (q,),
              "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj": (h, q),
              "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in hf_param_names(cfg.num_layers, qkv_bias(cfg), cfg.tie_word_embeddings):
        shape = next(shp for key, shp in shapes.items() if f"{key}." in name or
                     name.endswith(key) or f".{key}." in name)
        t = 0.2 * torch.randn(shape, generator=gen)
        out[name] = 1.0 + t if name.endswith("norm.weight") else t
    return out


def _train_step(cfg) -> dict:
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core import parallel_state as ps

    from gvm_mega.models import (build_gpt_model, hf_param_names, load_hf_into_mcore,
                                 mcore_to_hf_state_dict)

    model = build_gpt_model(cfg, perform_initialization=False)
    load_hf_into_mcore(model, random_hf_state_dict(cfg, seed=21))  # same weights at any layout
    model = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1e-3,
                                                 bf16=False, fp16=False), [model])
    first = [p.detach().clone() for p in model.parameters()]
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(8).unsqueeze(0).expand(2, 8)

    def step(data_iter, m):
        batch = next(data_iter)
        out = m(batch[:, :-1], positions, attention_mask=None, labels=batch[:, 1:])

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    model.zero_grad_buffer()
    opt.zero_grad()
    losses = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]),
                                         model=[model], num_microbatches=1, seq_length=8,
                                         micro_batch_size=2, forward_only=False)
    ok, grad_norm, _ = opt.step()
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(first, model.parameters()))
    assert ok and grad_norm is not None and grad_norm > 1e-3, (ok, grad_norm)
    assert changed, "optimizer step changed no parameter"
    loss = float(losses[0]["loss"]) if losses else None
    if ps.is_pipeline_last_stage():
        assert loss is not None and torch.isfinite(torch.tensor(loss))
    # the trained weights gather to HF names through the DDP wrapper
    exported = mcore_to_hf_state_dict(model)
    if torch.distributed.get_rank() == 0:
        names = hf_param_names(cfg.num_layers, qkv_bias=True, tied=cfg.tie_word_embeddings)
        assert sorted(exported) == sorted(names), sorted(set(exported) ^ set(names))
        mine = model.module.embedding.word_embeddings.weight.detach()
        assert torch.equal(exported["model.embed_tokens.weight"][: mine.shape[0]], mine)
    else:
        assert exported == {}
    return {"grad_norm": float(grad_norm), "loss": loss}


def scenario_layouts(args: dict) -> dict:
    """Same HF weights at TP1/TP2/PP2/TP2xPP2: logits vs transformers and across layouts,
    and the gathered HF export equals the source checkpoint bit for bit."""
    from safetensors.torch import load_file

    from gvm_mega.config.schema import ParallelConfig
    from gvm_mega.models import (build_gpt_model, load_hf_into_mcore, mcore_to_hf_state_dict,
                                 model_config_from_hf)
    from gvm_mega.parallel import init_distributed

    tokens = torch.load(args["tokens"])
    report: dict = {"checks": []}
    baseline: dict = {}
    for tp, pp in LAYOUTS:
        layout = init_distributed(ParallelConfig(tp=tp, pp=pp), seed=5)
        for name, hf_dir in args["models"].items():
            cfg = model_config_from_hf(hf_dir)
            model = build_gpt_model(cfg, perform_initialization=False)
            load_hf_into_mcore(model, hf_dir)
            with torch.no_grad():
                logits = forward_logits(model, tokens)
            check = {"model": name, "tp": tp, "pp": pp, "rank": layout.rank, "dp": layout.dp,
                     "grid": [layout.tp_rank, layout.pp_rank, layout.dp_rank]}
            if layout.is_last_stage:
                ref = torch.load(args["reference"][name])
                check["vs_hf"] = (logits - ref).abs().max().item()
                if (tp, pp) == LAYOUTS[0]:
                    baseline[name] = logits
                check["vs_tp1"] = (logits - baseline[name]).abs().max().item()
                assert check["vs_hf"] <= 1e-4 and check["vs_tp1"] <= 1e-5, check
            else:
                assert logits is None
            exported = mcore_to_hf_state_dict(model)
            if layout.is_driver:
                original = {}
                for f in sorted(Path(hf_dir).glob("*.safetensors")):
                    original.update(load_file(str(f)))
                assert sorted(exported) == sorted(original), \
                    sorted(set(exported) ^ set(original))
                same = [k for k in original if exported[k].dtype == original[k].dtype
                        and torch.equal(exported[k], original[k])]
                check["export_exact"] = len(same) == len(original)
                check["export_tensors"] = len(original)
                assert check["export_exact"], sorted(set(original) - set(same))
            else:
                assert exported == {}
            report["checks"].append(check)
        _check_fresh_models(args, layout, tp, pp, report)
        if (tp, pp) == LAYOUTS[0]:
            report["load_errors"] = _check_load_errors(args)
    return report


FRESH = {"tiny": dict(arch="tiny", rope_theta=5000.0),
         "llama": dict(arch="llama", tie_word_embeddings=False, norm_epsilon=1e-5)}


def _check_fresh_models(args: dict, layout, tp: int, pp: int, report: dict) -> None:
    """Models initialised by megatron: CPU init is the same at TP1 and TP2 (PP1); at TP2xPP2
    they are exported as HF directories (generated config.json) for transformers to load."""
    from gvm_mega.config.schema import ModelConfig
    from gvm_mega.models import build_gpt_model, export_mcore_to_hf, mcore_to_hf_state_dict
    from gvm_mega.parallel import seed_everything

    tokens = torch.load(args["tokens"])
    for name, overrides in FRESH.items():
        cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, vocab_size=96,
                          **overrides)
        seed_everything(7)
        model = build_gpt_model(cfg)
        if pp == 1:
            state = mcore_to_hf_state_dict(model)
            if layout.is_driver:
                path = Path(args["out"], f"fresh-{name}-tp1.pt")
                if tp == 1:
                    torch.save(state, path)
                else:
                    ref = torch.load(path)
                    same = sorted(ref) == sorted(state) and all(
                        torch.equal(ref[k], state[k]) for k in ref)
                    report[f"fresh_{name}_init_tp2_equals_tp1"] = same
        if (tp, pp) == (2, 2):
            with torch.no_grad():
                logits = forward_logits(model, tokens)
            if layout.is_last_stage and layout.tp_rank == 0:
                torch.save(logits, Path(args["out"], f"fresh-{name}.logits.pt"))
            export_mcore_to_hf(model, Path(args["out"], f"fresh-{name}-hf"))


def _check_load_errors(args: dict) -> list:
    """Wrong checkpoints are refused with the offending tensor named."""
    from gvm_mega.models import build_gpt_model, load_hf_into_mcore, model_config_from_hf
    from gvm_mega.models import HFCheckpointReader

    qwen, llama = args["models"]["qwen2"], args["models"]["llama"]
    llama_model = build_gpt_model(model_config_from_hf(llama), perform_initialization=False)
    state = {k: HFCheckpointReader(llama)[k] for k in HFCheckpointReader(llama).keys()}
    cases = [
        (qwen, "tensors not in a 2-layer model"),  # QKV biases the Llama model lacks
        ({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"},
         "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        ({**state, "model.norm.weight": torch.ones(7)},
         "shape (7,) from HF for megatron parameter 'decoder.final_layernorm.weight'"),
    ]
    seen = []
    for source, needle in cases:
        try:
            load_hf_into_mcore(llama_model, source)
        except (KeyError, ValueError) as exc:
            assert needle in str(exc), (needle, str(exc))
            seen.append(needle)
        else:
            raise AssertionError(f"accepted a bad checkpoint ({needle})")
    return seen


SCENARIOS = {"runtime": scenario_runtime, "layouts": scenario_layouts}


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2])
    from gvm_mega.parallel import shutdown

    try:
        report = SCENARIOS[scenario](args)
    finally:
        shutdown()
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    Path(args["out"], f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
