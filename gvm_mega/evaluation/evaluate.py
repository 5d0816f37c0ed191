"""Generate k samples per held-out problem, grade them, and summarise as mean@k / pass@k.

:func:`evaluate` works with any rollout engine (the embedded one, or SGLang servers) and any
scorer with ``score(responses, golds, timeout=)``; the training loop calls it on schedule and
``gvm-mega eval`` calls it once per dataset. Results are also broken down by the prompt
metadata in ``GROUP_KEYS`` when the dataset has it (MATH500: level and subject; the built-in
arithmetic task: level).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from gvm_mega.evaluation.metrics import default_ks, mean_at_k, mean_pass_at_k
from gvm_mega.rollout.types import RolloutRequest, SamplingParams

GROUP_KEYS = ("level", "subject")


@dataclass
class ProblemResult:
    id: str
    samples: int
    correct: int
    tokens: int
    meta: dict = field(default_factory=dict)


@dataclass
class GroupResult:
    """mean@k and pass@k over one subset of the problems."""

    problems: int
    mean_at_k: float
    pass_at_k: dict[int, float]

    def to_dict(self) -> dict:
        return {"problems": self.problems, "mean_at_k": self.mean_at_k,
                "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()}}


@dataclass
class EvalResult:
    """One dataset's evaluation: overall, per metadata group, and per problem."""

    name: str
    samples: int
    overall: GroupResult
    groups: dict[str, dict[str, GroupResult]]
    problems: list[ProblemResult]
    tokens_generated: int
    seconds: float

    @property
    def accuracy(self) -> float:
        """mean@k: the fraction of all samples graded correct (averaged per problem)."""
        return self.overall.mean_at_k

    @property
    def pass_at_k(self) -> dict[int, float]:
        return self.overall.pass_at_k

    def to_dict(self, *, per_problem: bool = True) -> dict:
        out = {"name": self.name, "samples": self.samples, **self.overall.to_dict(),
               "groups": {key: {value: g.to_dict() for value, g in groups.items()}
                          for key, groups in self.groups.items()},
               "tokens_generated": self.tokens_generated, "seconds": self.seconds}
        if per_problem:
            out["per_problem"] = [{"id": p.id, "samples": p.samples, "correct": p.correct,
                                   "tokens": p.tokens} for p in self.problems]
        return out


def _summarise(problems: Sequence[ProblemResult], ks: Sequence[int]) -> GroupResult:
    counts = [(p.samples, p.correct) for p in problems]
    return GroupResult(problems=len(problems), mean_at_k=mean_at_k(counts),
                       pass_at_k={k: mean_pass_at_k(counts, k) for k in ks})


def _group_order(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def summarise(name: str, problems: Sequence[ProblemResult], samples: int, *,
              tokens: int = 0, seconds: float = 0.0) -> EvalResult:
    """An :class:`EvalResult` from graded problems (all with ``samples`` samples)."""
    ks = default_ks(samples)
    groups: dict[str, dict[str, GroupResult]] = {}
    for key in GROUP_KEYS:
        if not any(key in p.meta for p in problems):
            continue
        buckets: dict[str, list[ProblemResult]] = {}
        for p in problems:
            buckets.setdefault(str(p.meta.get(key, "unknown")), []).append(p)
        groups[key] = {value: _summarise(buckets[value], ks)
                       for value in sorted(buckets, key=_group_order)}
    return EvalResult(name=name, samples=samples, overall=_summarise(problems, ks), groups=groups,
                      problems=list(problems), tokens_generated=tokens, seconds=seconds)


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A per-prompt sampling seed that depends on the prompt, not its position in the set."""
    digest = hashlib.blake2b(f"{seed}:{prompt_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2 ** 62)


def evaluate(engine: Any, tokenizer: Any, prompts: Sequence[Any], template: Any, *,
             samples: int, sampling: SamplingParams, scorer: Any, name: str = "eval",
             seed: Optional[int] = 0, batch_prompts: int = 64, timeout: float = 5.0,
             progress: Optional[Callable[[int], None]] = None) -> EvalResult:
    """mean@k and pass@k of ``engine`` on ``prompts`` (``k = samples``).

    ``prompts`` are :class:`gvm_mega.data.Prompt` records, rendered with ``template`` and
    encoded with ``tokenizer.encode_prompt``. ``sampling`` should carry the tokenizer's EOS ids
    in ``stop_token_ids``. With ``seed`` set, each prompt is sampled with a seed derived from
    ``seed`` and its id, so a result does not depend on batching or order. ``progress(n)``
    is called after each batch with the number of prompts it finished.
    """
    if samples < 1:
        raise ValueError(f"evaluate: samples must be >= 1, got {samples}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"evaluate: dataset {name!r} has no prompts")
    encode = getattr(tokenizer, "encode_prompt", tokenizer.encode)
    start = time.perf_counter()
    results: list[ProblemResult] = []
    tokens_total = 0
    for lo in range(0, len(prompts), max(1, batch_prompts)):
        batch = prompts[lo:lo + max(1, batch_prompts)]
        requests = [RolloutRequest(
            prompt_ids=encode(template.render(p.problem)), n=samples,
            sampling=sampling if seed is None else sampling.replace(
                sampling_seed=prompt_seed(seed, p.id)))
            for p in batch]
        outputs = engine.generate(requests)
        texts, golds = [], []
        for p, group in zip(batch, outputs):
            for s in group:
                texts.append(s.text if s.text is not None else tokenizer.decode(s.output_ids))
                golds.append(p.answer)
        scores = scorer.score(texts, golds, timeout=timeout)
        pos = 0
        for p, group in zip(batch, outputs):
            correct = int(sum(scores[pos:pos + len(group)]))
            tokens = sum(len(s.output_ids) for s in group)
            pos += len(group)
            tokens_total += tokens
            meta = {k: p.meta[k] for k in GROUP_KEYS if k in p.meta}
            results.append(ProblemResult(id=p.id, samples=len(group), correct=correct,
                                         tokens=tokens, meta=meta))
        if progress is not None:
            progress(len(batch))
    return summarise(name, results, samples, tokens=tokens_total,
                     seconds=time.perf_counter() - start)


def _slug(name: str) -> str:
    base = name.rsplit("/", 1)[-1].removeprefix("builtin:")
    base = base.rsplit(".", 1)[0] if "." in base else base
    return "".join(c if c.isalnum() else "_" for c in base.lower()).strip("_") or "set"


def eval_metrics(results: Sequence[EvalResult]) -> dict[str, float]:
    """``metrics.jsonl`` keys for held-out results: ``eval_accuracy`` (mean@k over all
    problems of all sets) and, with several sets, ``eval_<set>_accuracy`` per set; with k > 1
    also ``eval_pass_at_<k>`` (and per set)."""
    if not results:
        return {}
    total = sum(r.overall.problems for r in results)
    out = {"eval_accuracy": sum(r.accuracy * r.overall.problems for r in results) / total}
    k = min(r.samples for r in results)
    if k > 1:
        out[f"eval_pass_at_{k}"] = sum(r.pass_at_k[k] * r.overall.problems
                                       for r in results) / total
    if len(results) > 1:
        for r in results:
            out[f"eval_{_slug(r.name)}_accuracy"] = r.accuracy
            if k > 1:
                out[f"eval_{_slug(r.name)}_pass_at_{k}"] = r.pass_at_k[k]
    return out


def format_table(results: Sequence[EvalResult], *, groups: bool = True) -> str:
    """A fixed-width table: one row per dataset, then one per metadata group value."""
    if not results:
        return ""
    ks = sorted({k for r in results for k in r.pass_at_k})
    k_max = max(r.samples for r in results)
    header = ["dataset", "problems", f"mean@{k_max}"] + [f"pass@{k}" for k in ks]
    rows: list[list[str]] = []

    def row(label: str, g: GroupResult) -> list[str]:
        return [label, str(g.problems), f"{g.mean_at_k:.4f}"] + [
            f"{g.pass_at_k[k]:.4f}" if k in g.pass_at_k else "-" for k in ks]

    for r in results:
        rows.append(row(r.name, r.overall))
        if groups:
            for key, values in r.groups.items():
                rows.extend(row(f"  {key}={value}", g) for value, g in values.items())
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(cells, widths))) for cells in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
