"""One entry point from a config's data source name to a filtered :class:`PromptSet`.

``builtin:arithmetic`` and ``builtin:arithmetic-test`` name the built-in task's splits; any
other name is a JSONL or parquet file. When a tokenizer and template are given, prompts whose
rendered text is longer than ``max_prompt_length`` tokens are dropped and counted.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Optional

from gvm_mega.data.arithmetic import arithmetic_prompts
from gvm_mega.data.readers import read_prompts
from gvm_mega.data.records import DataError, PromptSet, ReadStats
from gvm_mega.data.templates import PromptTemplate

BUILTIN_SOURCES = ("builtin:arithmetic", "builtin:arithmetic-test")
log = logging.getLogger(__name__)


def _builtin(spec: str, cfg: Any) -> PromptSet:
    split = "test" if spec.endswith("-test") else "train"
    size = cfg.arithmetic_test_size if split == "test" else cfg.arithmetic_train_size
    if cfg.arithmetic_min_level > cfg.arithmetic_max_level:
        raise DataError(f"data.arithmetic_min_level ({cfg.arithmetic_min_level}) is above "
                        f"data.arithmetic_max_level ({cfg.arithmetic_max_level})")
    levels = range(cfg.arithmetic_min_level, cfg.arithmetic_max_level + 1)
    try:
        prompts = arithmetic_prompts(size, seed=cfg.arithmetic_seed, split=split, levels=levels,
                                     solutions=cfg.arithmetic_solutions)
    except ValueError as exc:
        key = "arithmetic_test_size" if split == "test" else "arithmetic_train_size"
        raise DataError(f"{spec}: {exc} (data.{key}={size}, data.arithmetic_min_level.."
                        f"arithmetic_max_level)") from None
    worked = cfg.arithmetic_worked_max_level
    if worked is not None:
        if worked < cfg.arithmetic_min_level:
            raise DataError(f"data.arithmetic_worked_max_level ({worked}) is below "
                            f"data.arithmetic_min_level ({cfg.arithmetic_min_level}): no "
                            f"problem would keep a worked solution")
        prompts = [p if p.meta["level"] <= worked else replace(p, solution=None,
                                                                 other_solutions=())
                   for p in prompts]
    stats = ReadStats(source=spec, rows=len(prompts), kept=len(prompts))
    return PromptSet(prompts, stats)


def filter_by_length(prompt_set: PromptSet, tokenizer: Any, template: PromptTemplate,
                     max_prompt_length: int) -> PromptSet:
    """Drop (and count) prompts whose rendered text exceeds ``max_prompt_length`` tokens."""
    encode = getattr(tokenizer, "encode_prompt", tokenizer.encode)  # counts BOS where added
    kept = [p for p in prompt_set.prompts
            if len(encode(template.render(p.problem))) <= max_prompt_length]
    stats = replace(prompt_set.stats, skipped=dict(prompt_set.stats.skipped),
                    skipped_examples=list(prompt_set.stats.skipped_examples))
    stats.too_long += len(prompt_set.prompts) - len(kept)
    stats.kept = len(kept)
    if not kept:
        raise DataError(f"{stats.source}: every prompt is longer than max_prompt_length="
                        f"{max_prompt_length} tokens ({stats.summary()})")
    if stats.too_long:
        log.warning("%s: dropped %d prompts longer than max_prompt_length=%d tokens",
                    stats.source, stats.too_long, max_prompt_length)
    return PromptSet(kept, stats)


def load_prompts(spec: str, data_cfg: Any = None, *, tokenizer: Any = None,
                 template: Optional[PromptTemplate] = None) -> PromptSet:
    """Prompts from ``spec`` (a builtin name or a file) under the ``data`` config section."""
    if data_cfg is None:
        from gvm_mega.config.schema import DataConfig
        data_cfg = DataConfig()
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_SOURCES:
            raise DataError(f"unknown built-in data source {spec!r}; expected one of "
                            f"{', '.join(BUILTIN_SOURCES)}")
        prompt_set = _builtin(spec, data_cfg)
    else:
        prompt_set = read_prompts(spec, prompt_field=data_cfg.prompt_field,
                                  answer_field=data_cfg.answer_field, id_field=data_cfg.id_field,
                                  on_bad_row=data_cfg.on_bad_row, dedupe=data_cfg.dedupe)
    if tokenizer is not None and template is not None:
        prompt_set = filter_by_length(prompt_set, tokenizer, template, data_cfg.max_prompt_length)
    return prompt_set
