"""``gvm-mega bench rollout``: embedded-engine decoding speed and SGLang-client overhead.

1. Tokens/s of the embedded engine on a random Llama-shaped model, with and without the KV
   cache (same prompts, greedy, fixed length).
2. Per-request cost of SGLangClient at high concurrency against a ``gvm-mega serve``
   subprocess, next to a bare aiohttp loop sending the same bodies; the difference is what
   the client's accounting, retries and parsing cost.
3. Weight sync of the benchmark model: in memory into the embedded engine, and the disk
   path a server takes (write safetensors, then the load ``/update_weights_from_disk`` runs).
4. ``--sync``: :func:`sync_weights` from a megatron policy model (TP1, one process) of realistic
   CPU size, streamed in buckets into an embedded engine and, via disk, into a
   ``gvm-mega serve`` subprocess.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

DESCRIPTION = ("rollout: embedded-engine tokens/s (KV cache on/off), SGLang-client overhead, "
               "weight-sync time (--sync)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=512, help="requests in the client benchmark")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="client benchmark repetitions (best kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--skip-client", action="store_true", help="only the engine benchmark")
    p.add_argument("--sync", action="store_true",
                   help="also time sync_weights from a megatron model (memory and disk)")
    p.add_argument("--sync-hidden", type=int, default=640)
    p.add_argument("--sync-layers", type=int, default=10)
    p.add_argument("--sync-vocab", type=int, default=32000)
    p.add_argument("--sync-bucket-mb", type=int, default=64, help="weight-sync bucket size")
    p.add_argument("--json", help="also write the results to this JSON file")


def random_config(hidden: int, layers: int, vocab: int) -> dict:
    """An HF Llama config.json dict for a random model of the given size."""
    heads = max(1, hidden // 64)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": hidden * 8 // 3 // 8 * 8,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2), "max_position_embeddings": 4096,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "eos_token_id": 2}


def random_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    from gvm_mega.rollout.decoder import DecoderConfig

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in DecoderConfig.from_hf(cfg).expected_shapes().items():
        out[name] = (torch.ones(shape) if name.endswith("norm.weight")
                     else torch.randn(shape, generator=g) * 0.05)
    return out


def bench_engine(args: argparse.Namespace) -> dict:
    from gvm_mega.rollout import EmbeddedEngine, RolloutRequest, SamplingParams, save_hf_checkpoint

    cfg = random_config(args.hidden, args.layers, args.vocab)
    engine = EmbeddedEngine(cfg, random_state_dict(cfg), max_batch_size=args.batch)
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    reqs = [RolloutRequest(torch.randint(3, args.vocab, (args.prompt_len,), generator=g).tolist(),
                           1, params) for _ in range(args.batch)]
    engine.generate(reqs[:2], use_cache=True)  # warm up
    out = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        res = engine.generate(reqs, use_cache=use_cache)
        seconds = time.perf_counter() - start
        tokens = sum(len(s.output_ids) for r in res for s in r)
        out["kv_cache" if use_cache else "no_cache"] = {"tokens": tokens, "seconds": seconds,
                                                        "tokens_per_s": tokens / seconds}
    out["speedup"] = out["kv_cache"]["tokens_per_s"] / out["no_cache"]["tokens_per_s"]
    state = random_state_dict(cfg, seed=2)
    start = time.perf_counter()
    engine.update_weights(state, "step-1")
    out["update_weights_s"] = time.perf_counter() - start
    out["weights_mib"] = sum(t.numel() * t.element_size() for t in state.values()) / 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:  # the disk path a server takes
        start = time.perf_counter()
        path = save_hf_checkpoint(state, cfg, os.path.join(tmp, "step-2"))
        out["sync_write_s"] = time.perf_counter() - start
        start = time.perf_counter()
        engine.load_from_disk(path, "step-2")
        out["sync_load_s"] = time.perf_counter() - start
    return out


def bench_megatron_sync(args: argparse.Namespace) -> dict:
    """sync_weights at TP1 in this process: into an embedded engine, then through a server."""
    from gvm_mega.config.schema import ModelConfig, ParallelConfig
    from gvm_mega.models import build_gpt_model, export_mcore_to_hf, hf_config_from_model_config
    from gvm_mega.parallel import init_distributed, shutdown
    from gvm_mega.rollout import (EmbeddedEngine, SGLangClient, SGLangEngine, load_hf_state_dict,
                                  sync_weights)

    h = args.sync_hidden
    cfg = ModelConfig(arch="qwen2", num_layers=args.sync_layers, hidden_size=h,
                      ffn_hidden_size=h * 8 // 3 // 64 * 64, num_attention_heads=max(1, h // 64),
                      num_query_groups=max(1, h // 128), vocab_size=args.sync_vocab,
                      max_position_embeddings=1024)
    bucket = args.sync_bucket_mb * 2 ** 20
    init_distributed(ParallelConfig(tp=1, pp=1), seed=0)
    try:
        model = build_gpt_model(cfg)
        params = sum(p.numel() for p in model.parameters())
        hf_config = hf_config_from_model_config(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            initial = export_mcore_to_hf(model, os.path.join(tmp, "initial"))
            engine = EmbeddedEngine(hf_config, load_hf_state_dict(str(initial)))
            memory = sync_weights(model, engine, "step-1", bucket_bytes=bucket)
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            proc = subprocess.Popen([sys.executable, "-m", "gvm_mega", "serve", "--model",
                                     str(initial), "--port", str(port), "--threads", "1"],
                                    env=dict(os.environ, OMP_NUM_THREADS="1"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait(url + "/health", proc)
                remote = SGLangEngine(SGLangClient([url]), hf_config, os.path.join(tmp, "w"))
                disk = sync_weights(model, remote, "step-2", bucket_bytes=bucket)
            finally:
                proc.kill()
                proc.wait()
    finally:
        shutdown()
    return {"params": params, "memory": memory.as_metrics(""), "disk": disk.as_metrics("")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_client(args: argparse.Namespace) -> dict:
    import aiohttp

    from gvm_mega.rollout import RolloutRequest, SamplingParams, SGLangClient, save_hf_checkpoint

    cfg = random_config(64, 1, 256)  # a trivial model: the server's compute stays small
    with tempfile.TemporaryDirectory() as tmp:
        model = save_hf_checkpoint(random_state_dict(cfg), cfg, os.path.join(tmp, "model"))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-m", "gvm_mega", "serve", "--model", model,
                                 "--port", str(port), "--threads", "1",
                                 "--max-batch-size", str(args.concurrency)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(url + "/health", proc)
            params = SamplingParams(max_new_tokens=1, temperature=1.0)
            reqs = [RolloutRequest([5, 6, 7, 8], 1, params.replace(sampling_seed=i))
                    for i in range(args.requests)]
            client = SGLangClient([url], concurrency=args.concurrency)
            asyncio.run(client.generate(reqs[:32]))  # warm up
            bodies = [client._body(r, [0], f"raw-{i}") for i, r in enumerate(reqs)]

            async def raw() -> None:
                sem = asyncio.Semaphore(args.concurrency)
                async with aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
                    async def one(body):
                        async with sem, session.post(url + "/generate", json=body) as resp:
                            await resp.json()
                    await asyncio.gather(*(one(b) for b in bodies))

            client_s = raw_s = float("inf")
            for _ in range(args.rounds):  # alternate and keep the best of each: less noise
                start = time.perf_counter()
                asyncio.run(client.generate(reqs))
                client_s = min(client_s, time.perf_counter() - start)
                start = time.perf_counter()
                asyncio.run(raw())
                raw_s = min(raw_s, time.perf_counter() - start)
        finally:
            proc.kill()
            proc.wait()
    n = args.requests
    return {"requests": n, "concurrency": args.concurrency,
            "client_ms_per_request": 1e3 * client_s / n, "bare_aiohttp_ms_per_request": 1e3 * raw_s / n,
            "client_overhead_ms_per_request": 1e3 * (client_s - raw_s) / n}


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gvm-mega serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    results = {"engine": bench_engine(args)}
    e = results["engine"]
    print(f"embedded engine: hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
          f"batch={args.batch} prompt={args.prompt_len} new={args.new_tokens} threads={args.threads}")
    print(f"  KV cache : {e['kv_cache']['tokens_per_s']:10.1f} tokens/s")
    print(f"  no cache : {e['no_cache']['tokens_per_s']:10.1f} tokens/s  "
          f"(cache speedup {e['speedup']:.1f}x)")
    print(f"weight sync ({e['weights_mib']:.1f} MiB): in memory {e['update_weights_s'] * 1e3:.1f} ms; "
          f"disk: write {e['sync_write_s'] * 1e3:.1f} ms + load {e['sync_load_s'] * 1e3:.1f} ms")
    if not args.skip_client:
        c = results["client"] = bench_client(args)
        print(f"SGLangClient vs bare aiohttp, {c['requests']} one-token requests at "
              f"concurrency {c['concurrency']} against gvm-mega serve:")
        print(f"  client   : {c['client_ms_per_request']:.3f} ms/request")
        print(f"  bare     : {c['bare_aiohttp_ms_per_request']:.3f} ms/request")
        print(f"  overhead : {c['client_overhead_ms_per_request']:.3f} ms/request")

    if args.sync:
        m = results["sync"] = bench_megatron_sync(args)
        mem, disk = m["memory"], m["disk"]
        print(f"sync_weights from megatron (TP1, {m['params'] / 1e6:.1f}M params, "
              f"{mem['bytes'] / 2 ** 20:.0f} MiB in {int(mem['buckets'])} bucket(s), limit "
              f"{args.sync_bucket_mb} MiB, largest {mem['max_bucket_bytes'] / 2 ** 20:.0f} MiB):")
        print(f"  in memory: {mem['total_s']:.3f} s (gather {mem['gather_s']:.3f} s, "
              f"engine {mem['load_s']:.3f} s)")
        print(f"  disk     : {disk['total_s']:.3f} s (gather {disk['gather_s']:.3f} s, write "
              f"{disk['engine_write_s']:.3f} s, server load {disk['engine_load_s']:.3f} s)")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0
