"""Prompt data: file readers, the built-in arithmetic task, templates and the prompt stream.

``load_prompts(spec, data_cfg, tokenizer=..., template=...)`` turns a config's data source
into a counted :class:`PromptSet`; :class:`PromptStream` serves it in a resumable shuffled
order; :func:`build_template` renders problems into prompts.
"""
from gvm_mega.data.arithmetic import (
    LEVELS,
    ArithmeticProblem,
    Difficulty,
    arithmetic_prompts,
    generate_problems,
    steps_hold,
)
from gvm_mega.data.loader import BUILTIN_SOURCES, filter_by_length, load_prompts
from gvm_mega.data.readers import read_prompts
from gvm_mega.data.records import DataError, Prompt, PromptSet, ReadStats, content_id
from gvm_mega.data.stream import PromptStream
from gvm_mega.data.templates import (
    COT_INSTRUCTION,
    TEMPLATE_NAMES,
    HFChatTemplate,
    PlainTemplate,
    PromptTemplate,
    QwenMathCoTTemplate,
    TemplateError,
    build_template,
    read_chat_template,
)

__all__ = ["BUILTIN_SOURCES", "COT_INSTRUCTION", "LEVELS", "TEMPLATE_NAMES", "ArithmeticProblem",
           "DataError", "Difficulty", "HFChatTemplate", "PlainTemplate", "Prompt", "PromptSet",
           "PromptStream", "PromptTemplate", "QwenMathCoTTemplate", "ReadStats", "TemplateError",
           "arithmetic_prompts", "build_template", "content_id", "filter_by_length",
           "generate_problems", "load_prompts", "read_chat_template", "read_prompts", "steps_hold"]
