"""Prompt templates: how a problem becomes the text the policy continues.

- ``qwen-math-cot``: the Qwen2.5-Math chat format (system prompt, the problem followed by the
  chain-of-thought instruction, an open assistant turn).
- ``plain``: ``Problem: ...`` / ``Solution:`` lines, for the embedded default model.
- ``hf-chat``: a model's own ``chat_template`` (from ``tokenizer_config.json`` or
  ``chat_template.jinja``), rendered with jinja2 the way transformers renders it: sandboxed,
  ``trim_blocks`` and ``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``
  and a non-ASCII-preserving ``tojson``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Protocol

COT_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATE_NAMES = ("qwen-math-cot", "plain", "hf-chat")


class PromptTemplate(Protocol):
    name: str

    def render(self, problem: str) -> str:
        """The prompt text for one problem (ends where the response starts)."""


@dataclass(frozen=True)
class QwenMathCoTTemplate:
    system: str = QWEN_MATH_SYSTEM
    instruction: str = COT_INSTRUCTION
    name: str = "qwen-math-cot"

    def render(self, problem: str) -> str:
        return (f"<|im_start|>system\n{self.system}<|im_end|>\n"
                f"<|im_start|>user\n{problem.strip()} {self.instruction}<|im_end|>\n"
                f"<|im_start|>assistant\n")


@dataclass(frozen=True)
class PlainTemplate:
    name: str = "plain"

    def render(self, problem: str) -> str:
        return f"Problem: {problem.strip()}\nSolution:\n"


class TemplateError(ValueError):
    """A chat template that is missing or does not render."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class HFChatTemplate:
    """A model's jinja chat template with one user turn and the generation prompt."""

    name = "hf-chat"

    def __init__(self, chat_template: str, *, special_tokens: Optional[dict[str, str]] = None,
                 system: Optional[str] = None, instruction: Optional[str] = COT_INSTRUCTION):
        from jinja2 import TemplateError as JinjaError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(chat_template)
        except JinjaError as exc:
            raise TemplateError(f"chat template does not compile: {exc}") from exc
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.system = system
        self.instruction = instruction

    def messages(self, problem: str) -> list[dict[str, str]]:
        content = problem.strip() + (f" {self.instruction}" if self.instruction else "")
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": content}]

    def render(self, problem: str) -> str:
        from jinja2 import TemplateError as JinjaError

        try:
            return self._template.render(messages=self.messages(problem), tools=None,
                                         documents=None, add_generation_prompt=True,
                                         **self.special_tokens)
        except JinjaError as exc:
            raise TemplateError(f"chat template does not render: {exc}") from exc


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(tokenizer_dir: str | Path) -> tuple[Optional[str], dict[str, str]]:
    """``(chat_template or None, special token strings)`` from a tokenizer directory."""
    tokenizer_dir = Path(tokenizer_dir)
    config_path = tokenizer_dir / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TemplateError(f"{config_path}: not valid JSON ({exc})") from exc
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = tokenizer_dir / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    specials = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                "mask_token"):
        text = _token_text(config.get(key))
        if text is not None:
            specials[key] = text
    return template, specials


def build_template(name: str, *, tokenizer_dir: Optional[str | Path] = None,
                   system: Optional[str] = None) -> PromptTemplate:
    """The template called ``name``; ``hf-chat`` reads its template from ``tokenizer_dir``."""
    if name == "qwen-math-cot":
        return QwenMathCoTTemplate() if system is None else QwenMathCoTTemplate(system=system)
    if name == "plain":
        return PlainTemplate()
    if name == "hf-chat":
        if tokenizer_dir is None:
            raise TemplateError("template 'hf-chat' needs a tokenizer directory with a "
                                "chat_template (model.tokenizer or model.hf_path)")
        template, specials = read_chat_template(tokenizer_dir)
        if not template:
            raise TemplateError(f"template 'hf-chat': no chat_template in "
                                f"{Path(tokenizer_dir) / 'tokenizer_config.json'} or "
                                f"chat_template.jinja; use data.template=qwen-math-cot or plain")
        return HFChatTemplate(template, special_tokens=specials, system=system)
    raise TemplateError(f"unknown prompt template {name!r}; expected one of {TEMPLATE_NAMES}")
