"""Tiny HF models, tokenizers and server processes for the rollout tests."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

CORPUS = [f"{a} + {b} = {a + b}. The answer is {a + b}." for a in range(40) for b in range(0, 40, 3)]


def build_tokenizer(out_dir: str) -> int:
    """Train a small BPE tokenizer.json; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return tok.get_vocab_size()


def build_model(out_dir: str, arch: str = "qwen2", seed: int = 0, vocab_size: int | None = None,
                tokenizer: bool = True, scale: float = 0.25) -> torch.nn.Module:
    """Save a random 2-layer HF model (with distinct, non-flat logits) into ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if tokenizer:
        vocab_size = build_tokenizer(out_dir)
    vocab_size = vocab_size or 128
    common = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, eos_token_id=2,
                  pad_token_id=0, bos_token_id=None)
    if arch == "qwen2":
        cfg = Qwen2Config(rope_theta=10000.0, tie_word_embeddings=True, **common)
        cls = Qwen2ForCausalLM
    else:
        cfg = LlamaConfig(rope_theta=500.0, tie_word_embeddings=False, **common)
        cls = LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start_server(model_dir: str, *extra: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``gvm-mega serve`` as a subprocess on a free loopback port; returns (process, url)."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gvm_mega", "serve", "--model", model_dir,
                             "--host", "127.0.0.1", "--port", str(port), "--threads", "1", *extra],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, f"http://127.0.0.1:{port}"


def start_router(worker_urls: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router",
                             "--host", "127.0.0.1", "--port", str(port),
                             "--worker-urls", *worker_urls, "--policy", "round_robin",
                             "--log-level", "warn", "--health-check-interval-secs", "1",
                             "--worker-startup-timeout-secs", "60",
                             "--retry-initial-backoff-ms", "20", "--retry-max-backoff-ms", "200",
                             "--cb-failure-threshold", "2", "--health-failure-threshold", "1"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)
    if proc.stderr:
        proc.stderr.close()


def post(url: str, body, timeout: float = 60.0) -> tuple[int, object]:
    """POST JSON with urllib; returns (status, decoded body or text)."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def get(url: str, timeout: float = 30.0) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            raw, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read().decode(), e.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def load_sglang_schema():
    """SGLang's own request/response schema (sglang/api/v1/api_types.py), or None."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "api", "v1", "api_types.py")
    if not os.path.isfile(path) or importlib.util.find_spec("msgspec") is None:
        return None
    mod_spec = importlib.util.spec_from_file_location("_sglang_api_types", path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules["_sglang_api_types"] = module
    mod_spec.loader.exec_module(module)
    return module


SCHEMA_SKIP_REASON = ("SGLang's schema is not installed: pip install 'sglang==0.5.23' --no-deps "
                      "msgspec")
