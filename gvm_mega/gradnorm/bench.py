"""``gvm-mega bench gradnorm``: batched estimator vs the per-response autograd loop.

Both run on the same megatron-core GPTModel (single process, TP=1) and the same random
prompt + response sequences; the figure of merit is the wall time ratio at equal norms.
Process CPU time is reported too: on a shared machine it is the steadier of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Callable

DESCRIPTION = ("per-response gradient norms: batched ghost-norm estimator vs one autograd "
               "pass per response (speedup, max relative difference, peak memory)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--responses", type=int, default=256, help="responses to score (default 256)")
    p.add_argument("--per-prompt", type=int, default=8, help="responses per prompt (default 8)")
    p.add_argument("--params", default="embedding", choices=("embedding", "lm_head", "linear"),
                   help="parameter set (gvm.grad_norm_params)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--query-groups", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tied", action="store_true", help="tie embedding and output weights")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    p.add_argument("--response-len", type=int, nargs=2, default=(64, 128), metavar=("MIN", "MAX"))
    p.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per micro-batch")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--repeats", type=int, default=1, help="time each side this often, keep the best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")


class _PeakRSS:
    """Peak resident memory above the starting level, sampled every 5 ms (CPU runs)."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> "_PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def _timed(fn: Callable, device, repeats: int) -> tuple[object, float, float, float]:
    """(result, best wall seconds, best process CPU seconds, peak MiB above the start)."""
    import torch

    best_wall = best_cpu = float("inf")
    peak = 0.0
    out = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            w0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        else:
            with _PeakRSS() as mem:
                w0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            mib = mem.mib
        best_wall, best_cpu, peak = min(best_wall, wall), min(best_cpu, cpu), max(peak, mib)
    return out, best_wall, best_cpu, peak


def _sequences(args: argparse.Namespace):
    import torch

    gen = torch.Generator().manual_seed(args.seed)
    n_prompts = -(-args.responses // args.per_prompt)
    prompts, responses, prompt_index = [], [], []
    for i in range(n_prompts):
        lp = int(torch.randint(args.prompt_len[0], args.prompt_len[1] + 1, (1,), generator=gen))
        prompt = torch.randint(0, args.vocab, (lp,), generator=gen).tolist()
        for _ in range(args.per_prompt):
            if len(responses) == args.responses:
                break
            lr = int(torch.randint(args.response_len[0], args.response_len[1] + 1, (1,),
                                   generator=gen))
            prompts.append(prompt)
            responses.append(torch.randint(0, args.vocab, (lr,), generator=gen).tolist())
            prompt_index.append(i)
    return prompts, responses, prompt_index, n_prompts


def _build_model(args: argparse.Namespace):
    from gvm_mega.config.schema import ModelConfig, ParallelConfig
    from gvm_mega.models import build_gpt_model
    from gvm_mega.parallel import find_free_port, init_distributed, seed_everything

    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port()), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
    init_distributed(ParallelConfig(tp=1, pp=1))
    seed_everything(args.seed)
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                      num_attention_heads=args.heads, num_query_groups=args.query_groups,
                      vocab_size=args.vocab, tie_word_embeddings=args.tied,
                      max_position_embeddings=args.prompt_len[1] + args.response_len[1] + 8)
    return build_gpt_model(cfg), cfg


def main(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from gvm_mega.cli import CLIError
    from gvm_mega.gradnorm import (GradNormEstimator, make_batch, prompt_grad_norms,
                                   reference_sq_norms)
    from gvm_mega.parallel import shutdown

    if min(args.responses, args.per_prompt, args.repeats, args.max_tokens) < 1:
        raise CLIError("--responses, --per-prompt, --repeats and --max-tokens must be >= 1")
    for name, (lo, hi) in (("--prompt-len", args.prompt_len), ("--response-len", args.response_len)):
        if not 1 <= lo <= hi:
            raise CLIError(f"{name} needs 1 <= MIN <= MAX, got {lo} {hi}")
    warnings.filterwarnings("ignore", module="megatron")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg = _build_model(args)
    try:
        device = next(model.parameters()).device
        prompts, responses, prompt_index, n_prompts = _sequences(args)
        batch = make_batch(prompts, responses)
        est = GradNormEstimator(model, args.params, max_tokens=args.max_tokens, backend=args.backend)
        # warm-up: first calls pay for lazy initialisation
        est.sq_norms(batch.select(range(min(4, batch.size))))
        reference_sq_norms(model, batch.select([0]), args.params)

        ref_sq, ref_s, ref_cpu, ref_mib = _timed(
            lambda: reference_sq_norms(model, batch, args.params), device, args.repeats)
        our_sq, our_s, our_cpu, our_mib = _timed(lambda: est.sq_norms(batch), device, args.repeats)
        ref, ours = ref_sq.sqrt(), our_sq.sqrt()
        max_rel = float(((ours - ref).abs() / ref.abs().clamp_min(1e-30)).max())
        g = prompt_grad_norms(ours, prompt_index, n_prompts)
        g_ref = prompt_grad_norms(ref, prompt_index, n_prompts)
        result = {
            "benchmark": "gradnorm",
            "params": args.params,
            "responses": batch.size,
            "tokens": int(batch.lengths.sum()),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "backend": args.backend,
            "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "ffn": cfg.ffn_hidden_size,
                      "vocab": cfg.vocab_size, "tied": cfg.tie_word_embeddings,
                      "dtype": cfg.params_dtype},
            "reference_s": round(ref_s, 4),
            "batched_s": round(our_s, 4),
            "speedup": round(ref_s / our_s, 3),
            "reference_cpu_s": round(ref_cpu, 4),
            "batched_cpu_s": round(our_cpu, 4),
            "speedup_cpu_time": round(ref_cpu / our_cpu, 3),
            "repeats": args.repeats,
            "max_rel_diff": max_rel,
            "max_rel_diff_G": float(((g - g_ref).abs() / g_ref.abs().clamp_min(1e-30)).max()),
            "peak_mem_reference_mib": round(ref_mib, 1),
            "peak_mem_batched_mib": round(our_mib, 1),
        }
    finally:
        shutdown()
    if args.json:
        print(json.dumps(result))
    else:
        print(f"gradnorm ({result['params']}): {result['responses']} responses, "
              f"{result['tokens']} tokens, {result['device']}, {result['threads']} threads")
        print(f"  per-response autograd loop : {ref_s:8.3f} s wall {ref_cpu:8.3f} s CPU   "
              f"peak +{ref_mib:.1f} MiB")
        print(f"  batched estimator          : {our_s:8.3f} s wall {our_cpu:8.3f} s CPU   "
              f"peak +{our_mib:.1f} MiB")
        print(f"  speedup                    : {result['speedup']:.2f}x wall, "
              f"{result['speedup_cpu_time']:.2f}x CPU time")
        print(f"  max relative difference    : {max_rel:.2e} (norms), "
              f"{result['max_rel_diff_G']:.2e} (G_i)")
    return 0
