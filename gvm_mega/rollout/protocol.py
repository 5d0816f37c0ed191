"""SGLang's ``/generate`` JSON contract: parse request bodies, build reply bodies.

Shared by the server (which parses what clients send) and the client (which parses what
servers reply), so both sides agree with SGLang on names and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gvm_mega.rollout.types import Sample, SamplingParams

# Every key SGLang's SamplingParams accepts (sglang/api/v1 SamplingParams); others are a 400.
SGLANG_SAMPLING_KEYS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice")

# Keys SGLang knows that this implementation accepts only at their no-op value.
_NOOP_VALUES = {
    "min_p": (0, 0.0), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0), "min_new_tokens": (0,), "json_schema": (), "regex": (),
    "ebnf": (), "structural_tag": (), "stop_regex": ((), []), "logit_bias": ({},),
    "custom_params": (), "beam_width": (), "watermark": (), "choice": ([],),
}
# SGLang's "no top-k" value.
_TOP_K_OFF = 1 << 30


class BadRequest(ValueError):
    """A request body that SGLang would answer with HTTP 400."""


@dataclass
class PromptItem:
    """One prompt of a (possibly batched) ``/generate`` body."""

    text: Optional[str]
    input_ids: Optional[list[int]]
    sampling: SamplingParams
    n: int
    return_logprob: bool
    rid: Optional[str]


def _per_prompt(value: Any, count: int, name: str, is_scalar) -> list:
    if isinstance(value, list) and not is_scalar(value):
        if len(value) != count:
            raise BadRequest(f"{name}: {len(value)} values for {count} prompts")
        return value
    return [value] * count


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"sampling_params.{key}: expected an integer, got {value!r}")
    return value


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"sampling_params.{key}: expected a number, got {value!r}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"sampling_params.{key}: expected a boolean, got {value!r}")
    return value


def parse_sampling_params(raw: Any) -> tuple[SamplingParams, int]:
    """SGLang ``sampling_params`` JSON -> (SamplingParams, n); unknown keys are a BadRequest."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest(f"sampling_params: expected an object, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SGLANG_SAMPLING_KEYS]
    if unknown:
        raise BadRequest(f"sampling_params: unknown field `{unknown[0]}`, expected one of "
                         + ", ".join(f"`{k}`" for k in SGLANG_SAMPLING_KEYS))
    for key, allowed in _NOOP_VALUES.items():
        if key in raw and raw[key] is not None and raw[key] not in allowed:
            raise BadRequest(f"sampling_params.{key}={raw[key]!r} is not supported by this server")
    kw: dict[str, Any] = {}
    if raw.get("max_new_tokens") is not None:
        kw["max_new_tokens"] = _int(raw["max_new_tokens"], "max_new_tokens")
    for key in ("temperature", "top_p"):
        if raw.get(key) is not None:
            kw[key] = _float(raw[key], key)
    if raw.get("top_k") is not None:
        top_k = _int(raw["top_k"], "top_k")
        kw["top_k"] = -1 if top_k >= _TOP_K_OFF else top_k
    stop = raw.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("sampling_params.stop: expected a string or a list of strings")
        kw["stop"] = tuple(stop)
    if raw.get("stop_token_ids") is not None:
        ids = raw["stop_token_ids"]
        if not isinstance(ids, list):
            raise BadRequest("sampling_params.stop_token_ids: expected a list of integers")
        kw["stop_token_ids"] = tuple(_int(t, "stop_token_ids") for t in ids)
    for key in ("ignore_eos", "no_stop_trim", "skip_special_tokens"):
        if raw.get(key) is not None:
            kw[key] = _bool(raw[key], key)
    if raw.get("sampling_seed") is not None:
        kw["sampling_seed"] = _int(raw["sampling_seed"], "sampling_seed")
    n = 1 if raw.get("n") is None else _int(raw["n"], "n")
    if n < 1:
        raise BadRequest(f"sampling_params.n must be >= 1, got {n}")
    try:
        return SamplingParams(**kw), n
    except ValueError as exc:
        raise BadRequest(f"sampling_params: {exc}") from None


def parse_generate_body(body: Any) -> tuple[list[PromptItem], bool]:
    """A ``/generate`` body -> (prompts, batched). Unknown top-level keys are ignored, as in SGLang."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by this server")
    text, input_ids = body.get("text"), body.get("input_ids")
    if (text is None) == (input_ids is None):
        raise BadRequest("exactly one of `text` and `input_ids` must be given")
    if text is not None:
        if isinstance(text, str):
            prompts, batched = [text], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompts, batched = list(text), True
        else:
            raise BadRequest("text: expected a string or a non-empty list of strings")
    else:
        def is_ids(v):
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        if is_ids(input_ids) and input_ids:
            prompts, batched = [list(input_ids)], False
        elif isinstance(input_ids, list) and input_ids and all(is_ids(p) and p for p in input_ids):
            prompts, batched = [list(p) for p in input_ids], True
        else:
            raise BadRequest("input_ids: expected a non-empty list of token ids or a list of such lists")
    count = len(prompts)
    sps = _per_prompt(body.get("sampling_params"), count, "sampling_params", lambda v: False)
    lps = _per_prompt(body.get("return_logprob", False), count, "return_logprob", lambda v: False)
    rids = _per_prompt(body.get("rid"), count, "rid", lambda v: False)
    items = []
    for k in range(count):
        sampling, n = parse_sampling_params(sps[k])
        if not isinstance(lps[k] or False, bool):
            raise BadRequest(f"return_logprob: expected a boolean, got {lps[k]!r}")
        if rids[k] is not None and not isinstance(rids[k], str):
            raise BadRequest(f"rid: expected a string, got {rids[k]!r}")
        items.append(PromptItem(
            text=prompts[k] if text is not None else None,
            input_ids=prompts[k] if input_ids is not None else None,
            sampling=sampling, n=n, return_logprob=bool(lps[k]), rid=rids[k]))
    return items, batched or any(it.n > 1 for it in items)


def sample_to_json(sample: Sample, rid: str, return_logprob: bool,
                   e2e_latency: Optional[float] = None) -> dict:
    """One element of SGLang's ``/generate`` reply."""
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": sample.finish_reason_json(),
        "prompt_tokens": sample.prompt_tokens,
        "completion_tokens": len(sample.output_ids),
        "cached_tokens": 0,
        "weight_version": sample.weight_version,
    }
    if e2e_latency is not None:
        meta["e2e_latency"] = e2e_latency
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, tok, None]
                                         for lp, tok in zip(sample.logprobs, sample.output_ids)]
    return {"text": sample.text or "", "output_ids": list(sample.output_ids), "meta_info": meta}


class BadReply(ValueError):
    """A server reply that does not follow SGLang's ``/generate`` shape."""


def sample_from_json(item: Any, prompt_tokens: int = 0) -> Sample:
    """Parse one element of a ``/generate`` reply (requires ``return_logprob``)."""
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise BadReply(f"reply element is not an object with meta_info: {str(item)[:200]}")
    meta = item["meta_info"]
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict) or fr.get("type") not in ("stop", "length", "abort"):
        raise BadReply(f"reply {meta.get('id')!r}: unknown finish_reason {fr!r}")
    ids = item.get("output_ids")
    lps = meta.get("output_token_logprobs")
    if fr["type"] != "abort":
        if not isinstance(ids, list) or not isinstance(lps, list):
            raise BadReply(f"reply {meta.get('id')!r}: missing output_ids or output_token_logprobs")
        if len(lps) != len(ids) or any(int(e[1]) != t for e, t in zip(lps, ids)):
            raise BadReply(f"reply {meta.get('id')!r}: output_token_logprobs do not match output_ids")
    ids = list(ids or [])
    lps = lps or []
    matched = fr.get("matched") if fr["type"] == "stop" else fr.get("message")
    wv = meta.get("weight_version")
    return Sample(output_ids=ids, logprobs=[float(e[0]) for e in lps], finish_reason=fr["type"],
                  weight_version=None if wv is None else str(wv), matched=matched,
                  text=item.get("text"), prompt_tokens=int(meta.get("prompt_tokens", prompt_tokens)))
