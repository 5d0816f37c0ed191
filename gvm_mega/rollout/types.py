"""Requests and samples shared by every rollout engine.

A request is one prompt (token ids), how many samples to draw from it, and SGLang's sampling
parameters. Every engine answers ``generate(requests)`` with one list of samples per request,
in request order, of exactly the requested length.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence, Union

import torch

# SGLang's own default weight version, reported until the first weight update.
DEFAULT_WEIGHT_VERSION = "default"


@dataclass(frozen=True)
class SamplingParams:
    """The subset of SGLang's ``sampling_params`` that rollouts use (same names and meaning)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True
    sampling_seed: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6 or self.top_k == 1

    def to_sglang(self) -> dict:
        """The JSON ``sampling_params`` object SGLang accepts (no ``n``: the caller adds it)."""
        out: dict = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                     "top_p": self.top_p}
        if self.top_k != -1:
            out["top_k"] = self.top_k
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.ignore_eos:
            out["ignore_eos"] = True
        if self.no_stop_trim:
            out["no_stop_trim"] = True
        if not self.skip_special_tokens:
            out["skip_special_tokens"] = False
        if self.sampling_seed is not None:
            out["sampling_seed"] = self.sampling_seed
        return out

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt and the number of samples wanted from it (GVM gives each prompt its own n)."""

    prompt_ids: tuple[int, ...]
    n: int = 1
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        if not self.prompt_ids:
            raise ValueError("a rollout request needs at least one prompt token")
        if not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"sample count n must be an integer >= 0, got {self.n!r}")


@dataclass
class Sample:
    """One generated response.

    ``logprobs[t]`` is ``log_softmax(logits / T)[output_ids[t]]`` (T = 1 when T = 0), the
    behaviour-policy log-prob the trainer's importance ratios need. ``finish_reason`` is
    ``"stop"``, ``"length"`` or ``"abort"``; ``matched`` is the stop token id or stop string.
    """

    output_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    weight_version: str
    matched: Union[int, str, None] = None
    text: Optional[str] = None
    prompt_tokens: int = 0

    def finish_reason_json(self) -> dict:
        """SGLang's ``meta_info.finish_reason`` object."""
        if self.finish_reason == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.finish_reason == "length":
            return {"type": "length", "length": len(self.output_ids)}
        return {"type": "abort", "message": str(self.matched or "aborted")}


class RolloutEngine(Protocol):
    """What the trainer needs from any engine, in-process or remote."""

    weight_version: str

    def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]: ...

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: str) -> None: ...
