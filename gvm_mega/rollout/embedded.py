"""The in-process rollout engine: batched, KV-cached decoding of an HF Llama/Qwen2 model.

It is the CPU default for training and the engine behind ``gvm-mega serve``. Sampling is
seeded per sample (a sample's tokens depend on its seed, not on what else is in the batch),
and log-probs follow SGLang: ``log_softmax(logits / T)`` of the chosen token, taken before
top-k/top-p truncation, with T = 1 when T = 0 (greedy).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from gvm_mega.rollout.decoder import Decoder, DecoderConfig, KVCache, check_state_dict
from gvm_mega.rollout.hf_io import load_hf_state_dict
from gvm_mega.rollout.types import DEFAULT_WEIGHT_VERSION, RolloutRequest, Sample, SamplingParams

_SEED_MULT = 1_000_003
_SEED_MOD = 2 ** 62


class TextCodec(Protocol):
    """The part of a tokenizer the engine needs (stop strings and response text)."""

    def decode(self, ids: list[int]) -> str: ...


def sample_seed(sampling_seed: int, sample_index: int) -> int:
    """The generator seed of sample ``sample_index`` of a request seeded with ``sampling_seed``.

    Sample 0 uses the seed itself, so a request for sample j alone, sent with
    ``sampling_seed=sample_seed(s, j)`` and n=1, reproduces sample j of the n-sample request.
    """
    if sample_index == 0:
        return int(sampling_seed) % _SEED_MOD
    return (int(sampling_seed) * _SEED_MULT + sample_index) % _SEED_MOD


@dataclass
class _Seq:
    """One sample being decoded."""

    request_index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Optional[str] = None
    matched: object = None
    text: Optional[str] = None


class EmbeddedEngine:
    """Generate rollouts in this process from HF-layout weights held in memory."""

    def __init__(self, config: DecoderConfig | dict, state_dict: dict[str, torch.Tensor], *,
                 tokenizer: Optional[TextCodec] = None, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", seed: int = 0, max_batch_size: int = 64,
                 use_cache: bool = True, weight_version: str = DEFAULT_WEIGHT_VERSION) -> None:
        self.config = config if isinstance(config, DecoderConfig) else DecoderConfig.from_hf(config)
        self.decoder = Decoder(self.config, state_dict, dtype=dtype, device=device)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.use_cache = use_cache
        self.weight_version = str(weight_version)
        self._rng = torch.Generator().manual_seed(seed)
        self._lock = threading.Lock()  # one generate or weight update at a time

    @classmethod
    def from_pretrained(cls, hf_dir: str, **kwargs) -> "EmbeddedEngine":
        """Load ``config.json`` + ``*.safetensors`` from an HF model directory."""
        return cls(DecoderConfig.from_dir(hf_dir), load_hf_state_dict(hf_dir), **kwargs)

    # ---- weights -------------------------------------------------------------------------
    def update_weights(self, state_dict: dict[str, torch.Tensor], version: Optional[str] = None,
                       *, strict: bool = True) -> None:
        """Swap in new weights (HF names) in memory and set the weight version.

        ``strict=False`` accepts one bucket of a larger update: only the given tensors are
        replaced (each name and shape is checked against the current weights).
        """
        with self._lock:
            if strict:
                self.decoder.load(state_dict)
            else:
                current = self.decoder.w
                for name, tensor in state_dict.items():
                    if name not in current:
                        raise ValueError(f"update_weights: unknown tensor {name!r}")
                    if tuple(tensor.shape) != tuple(current[name].shape):
                        raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(current[name].shape)}")
                new = dict(current)
                for name, tensor in state_dict.items():
                    new[name] = tensor.detach().to(self.decoder.device, self.decoder.dtype,
                                                   copy=True).contiguous()
                if self.config.tie_word_embeddings:
                    new["lm_head.weight"] = new["model.embed_tokens.weight"]
                self.decoder.w = new
            if version is not None:
                self.weight_version = str(version)

    def load_from_disk(self, hf_dir: str, version: Optional[str] = None) -> None:
        """Reload weights from an HF directory whose config matches the served model."""
        cfg = DecoderConfig.from_dir(hf_dir)
        if cfg.expected_shapes() != self.config.expected_shapes():
            raise ValueError(f"{hf_dir}: config.json describes a different model shape than the "
                             "one being served")
        state = load_hf_state_dict(hf_dir)
        check_state_dict(self.config, state)
        self.update_weights(state, version)

    # ---- scoring -------------------------------------------------------------------------
    def score(self, prompt_ids: Sequence[int], output_ids: Sequence[int],
              temperature: float = 1.0) -> torch.Tensor:
        """Log-probs of ``output_ids`` given ``prompt_ids`` from one full forward (no cache)."""
        ids = torch.tensor([list(prompt_ids) + list(output_ids)], dtype=torch.long,
                           device=self.decoder.device)
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        mask = torch.ones_like(ids, dtype=torch.bool)
        with self._lock:
            logits = self.decoder.forward(ids, positions, mask)[0]
        t = temperature if temperature > 1e-6 else 1.0
        lp = torch.log_softmax(logits[len(prompt_ids) - 1:-1] / t, dim=-1)
        return lp.gather(-1, torch.tensor(list(output_ids), device=lp.device)[:, None])[:, 0]

    # ---- generation ----------------------------------------------------------------------
    def generate(self, requests: Sequence[RolloutRequest], *,
                 is_aborted: Optional[Callable[[int], bool]] = None,
                 step_hook: Optional[Callable[[], None]] = None,
                 use_cache: Optional[bool] = None) -> list[list[Sample]]:
        """Draw ``request.n`` samples for every request; returns them per request, in order.

        ``is_aborted(i)`` is polled every decoding step: a true answer ends request i's
        running samples with finish reason ``abort``. ``step_hook()`` runs before each step
        (the server blocks in it while generation is paused).
        """
        use_cache = self.use_cache if use_cache is None else use_cache
        seqs = []
        limit = self.config.max_position_embeddings
        for i, req in enumerate(requests):
            if not isinstance(req, RolloutRequest):
                raise TypeError(f"request {i}: expected RolloutRequest, got {type(req).__name__}")
            bad = [t for t in req.prompt_ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"request {i}: token id {bad[0]} outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
            if len(req.prompt_ids) >= limit:
                raise ValueError(f"request {i}: prompt of {len(req.prompt_ids)} tokens does not fit "
                                 f"the context length {limit}")
            if req.sampling.stop and self.tokenizer is None:
                raise ValueError(f"request {i}: stop strings need a tokenizer; this engine has none")
            for j in range(req.n):
                seed = req.sampling.sampling_seed
                if seed is None:
                    seed = int(torch.randint(0, _SEED_MOD, (1,), generator=self._rng))
                else:
                    seed = sample_seed(seed, j)
                seqs.append(_Seq(i, list(req.prompt_ids), req.sampling,
                                 torch.Generator().manual_seed(seed)))
        # Decoding is plain tensor math: skip torch-function dispatch (a process-wide mode,
        # such as megatron's CPU shim, would otherwise run in Python for every small op).
        with self._lock, torch._C.DisableTorchFunction():
            version = self.weight_version
            order = sorted(range(len(seqs)), key=lambda k: len(seqs[k].prompt))
            for start in range(0, len(order), self.max_batch_size):
                group = [seqs[k] for k in order[start:start + self.max_batch_size]]
                self._decode(group, use_cache, is_aborted, step_hook)
        out: list[list[Sample]] = [[] for _ in requests]
        for s in seqs:
            out[s.request_index].append(Sample(
                output_ids=s.out, logprobs=s.logprobs, finish_reason=s.finish or "length",
                weight_version=version, matched=s.matched, text=s.text,
                prompt_tokens=len(s.prompt)))
        return out

    def _decode(self, seqs: list[_Seq], use_cache: bool,
                is_aborted: Optional[Callable[[int], bool]],
                step_hook: Optional[Callable[[], None]]) -> None:
        dec, dev = self.decoder, self.decoder.device
        limit = self.config.max_position_embeddings
        for s in seqs:  # max_new_tokens == 0
            self._check_finished(s, limit)
        live = [s for s in seqs if s.finish is None]
        if not live:
            return
        plen = max(len(s.prompt) for s in live)
        steps = max(min(s.params.max_new_tokens, limit - len(s.prompt)) for s in live)
        cap = plen + steps
        pads = torch.tensor([plen - len(s.prompt) for s in live], device=dev)
        ids = torch.zeros(len(live), cap, dtype=torch.long, device=dev)
        key_mask = torch.zeros(len(live), cap, dtype=torch.bool, device=dev)
        for r, s in enumerate(live):
            ids[r, plen - len(s.prompt):plen] = torch.tensor(s.prompt, device=dev)
            key_mask[r, plen - len(s.prompt):plen] = True
        cache = KVCache(self.config, len(live), cap, dec.dtype, dev) if use_cache else None
        length = plen  # filled columns of ids / key_mask
        new_tokens = ids[:, :plen]
        while live:
            if step_hook is not None:
                step_hook()
            if use_cache:
                positions = torch.arange(length - new_tokens.shape[1], length, device=dev)[None] - pads[:, None]
                logits = dec.forward(new_tokens, positions.clamp(min=0), key_mask, cache,
                                     last_only=True)[:, -1]
            else:
                positions = (torch.arange(length, device=dev)[None] - pads[:, None]).clamp(min=0)
                logits = dec.forward(ids[:, :length], positions, key_mask[:, :length],
                                     last_only=True)[:, -1]
            tokens = self._sample(logits, live)
            ids[:, length] = torch.tensor(tokens, dtype=torch.long, device=dev)
            key_mask[:, length] = True
            length += 1
            keep = []
            for r, s in enumerate(live):
                s.out.append(tokens[r])
                if is_aborted is not None and is_aborted(s.request_index):
                    s.finish, s.matched = "abort", "aborted by request"
                    self._set_text(s)
                else:
                    self._check_finished(s, limit)
                if s.finish is None:
                    keep.append(r)
            if len(keep) < len(live):
                rows = torch.tensor(keep, dtype=torch.long, device=dev)
                ids, key_mask, pads = ids[rows], key_mask[rows], pads[rows]
                if cache is not None:
                    cache.select(rows)
                live = [live[r] for r in keep]
            new_tokens = ids[:, length - 1:length]

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        # SGLang: T = 0 means greedy with log-probs at T = 1; top_k = 1 is greedy at T.
        # The draw is torch.multinomial's own one-sample method, argmax(p / q) with q ~ Exp(1),
        # with q filled row by row from each row's generator, so a sample's tokens depend on its
        # seed alone and equal multinomial's; the division and argmax run once for the batch
        # (per-row multinomial calls were a fifth of a CPU run's time).
        temps = torch.tensor([s.params.temperature if s.params.temperature >= 1e-6 else 1.0
                              for s in seqs], device=logits.device)
        logp = torch.log_softmax(logits / temps[:, None], dim=-1)
        probs = logp.exp().cpu()
        if not bool(torch.isfinite(probs).all()):
            raise FloatingPointError("sampling: the policy's next-token probabilities are not "
                                     "finite (NaN or inf logits; have the weights diverged?)")
        noise = torch.ones_like(probs)  # greedy rows keep ones and take the argmax of logits
        for r, s in enumerate(seqs):
            p = s.params
            if p.greedy:
                continue
            row = probs[r]
            if p.top_k != -1 and p.top_k < row.numel():
                kth = torch.topk(row, p.top_k).values[-1]
                row = torch.where(row >= kth, row, torch.zeros_like(row))
            if p.top_p < 1.0:
                sorted_p, idx = torch.sort(row, descending=True)
                cum = torch.cumsum(sorted_p, 0)
                drop = (cum - sorted_p) > p.top_p * cum[-1]
                sorted_p = sorted_p.masked_fill(drop, 0.0)
                row = torch.zeros_like(row).scatter(0, idx, sorted_p)
            probs[r] = row
            noise[r].exponential_(1, generator=s.generator)
        drawn = (probs / noise).argmax(-1).tolist()
        greedy = logits.argmax(-1).tolist()
        tokens = [greedy[r] if s.params.greedy else drawn[r] for r, s in enumerate(seqs)]
        chosen = torch.tensor(tokens, dtype=torch.long, device=logits.device)
        for s, lp in zip(seqs, logp.gather(1, chosen[:, None])[:, 0].tolist()):
            s.logprobs.append(lp)
        return tokens

    def _check_finished(self, s: _Seq, limit: int) -> None:
        p = s.params
        if s.out:
            tok = s.out[-1]
            if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.config.eos_token_ids):
                s.finish, s.matched = "stop", tok
                self._set_text(s)
                return
            if p.stop:
                text = self.tokenizer.decode(s.out)
                hits = [(text.find(stop), stop) for stop in p.stop if stop in text]
                if hits:
                    pos, stop = min(hits)
                    s.finish, s.matched = "stop", stop
                    s.text = text if p.no_stop_trim else text[:pos]
                    return
        if len(s.out) >= p.max_new_tokens or len(s.prompt) + len(s.out) >= limit:
            s.finish = "length"
            self._set_text(s)

    def _set_text(self, s: _Seq) -> None:
        if self.tokenizer is not None:
            s.text = self.tokenizer.decode(s.out)
