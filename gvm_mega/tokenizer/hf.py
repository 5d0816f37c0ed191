"""Hugging Face ``tokenizer.json`` tokenizers (Qwen2.5, Llama 2/3 families) via ``tokenizers``.

Special tokens come from ``tokenizer_config.json`` (``eos_token``, ``pad_token``,
``bos_token``, ``add_bos_token``, ``chat_template``), with ``generation_config.json`` and
``config.json`` supplying EOS ids when the tokenizer config does not. Generation stops on every
id listed there (Qwen2.5-Instruct: ``<|im_end|>`` and ``<|endoftext|>``; Llama 3 Instruct:
``<|eot_id|>`` and ``<|end_of_text|>``). Whether BOS is prepended follows ``add_bos_token``
or, when absent, what the tokenizer's own post-processor does.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from gvm_mega.tokenizer.base import Tokenizer, TokenizerError

_EOS_FALLBACKS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with the special-token settings of its model directory."""

    def __init__(self, tokenizer: Any, config: dict, *, extra_eos_ids: Sequence[int] = (),
                 name: str = "hf"):
        self._tok = tokenizer
        self.config = dict(config)
        self.name = name
        self.chat_template = config.get("chat_template") if isinstance(
            config.get("chat_template"), str) else None
        self.bos_token_id = self._lookup(_token_text(config.get("bos_token")), "bos_token")
        eos_id = self._lookup(_token_text(config.get("eos_token")), "eos_token")
        eos_ids = list(extra_eos_ids)
        if eos_id is None:
            eos_id = eos_ids[0] if eos_ids else None
        if eos_id is None:
            for text in _EOS_FALLBACKS:
                eos_id = self._tok.token_to_id(text)
                if eos_id is not None:
                    break
        if eos_id is None:
            raise TokenizerError(f"{name}: cannot tell the EOS token: set eos_token in "
                                 f"tokenizer_config.json or eos_token_id in generation_config.json")
        self.eos_token_id = eos_id
        self._eos_ids = tuple(dict.fromkeys([eos_id] + eos_ids))
        pad_id = self._lookup(_token_text(config.get("pad_token")), "pad_token")
        self.pad_token_id = eos_id if pad_id is None else pad_id
        if "add_bos_token" in config:
            self.add_bos = bool(config["add_bos_token"]) and self.bos_token_id is not None
        else:
            self.add_bos = self._post_processor_adds_bos()

    def _lookup(self, text: Optional[str], key: str) -> Optional[int]:
        if text is None:
            return None
        token_id = self._tok.token_to_id(text)
        if token_id is None:
            raise TokenizerError(f"{self.name}: {key} {text!r} from tokenizer_config.json is not "
                                 f"in the tokenizer's vocabulary")
        return token_id

    def _post_processor_adds_bos(self) -> bool:
        if self.bos_token_id is None:
            return False
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == self.bos_token_id

    @classmethod
    def from_dir(cls, directory: str | Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as RawTokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json")
        try:
            raw = RawTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 — tokenizers raises a bare Exception
            raise TokenizerError(f"{path}: cannot be read by the tokenizers library ({exc})") from exc
        config = _read_json(directory / "tokenizer_config.json")
        if "chat_template" not in config and (directory / "chat_template.jinja").is_file():
            config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        extra = _ids(_read_json(directory / "generation_config.json").get("eos_token_id"))
        extra += _ids(_read_json(directory / "config.json").get("eos_token_id"))
        return cls(raw, config, extra_eos_ids=extra, name=str(directory))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(token_id)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("eos_token", self.eos_token)
        config.setdefault("pad_token", self.id_to_token(self.pad_token_id))
        if self.bos_token_id is not None:
            config.setdefault("bos_token", self.id_to_token(self.bos_token_id))
        config.setdefault("add_bos_token", self.add_bos)
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        if len(self._eos_ids) > 1:
            gen_path = directory / "generation_config.json"
            gen = _read_json(gen_path)
            gen["eos_token_id"] = list(self._eos_ids)
            gen_path.write_text(json.dumps(gen, indent=2), encoding="utf-8")
        return directory
