"""The one tokenizer interface the trainer, rollout and data code use."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer that cannot be found, read or used, worded for the user."""


class Tokenizer(ABC):
    """Text <-> token ids, plus the special tokens generation and padding need.

    ``encode`` never adds special tokens unless asked: prompts rendered by a chat template
    already carry theirs. ``encode_prompt`` is the one to use for a prompt's ids: it prepends
    BOS for families that expect it (Llama) unless the text already starts with it.
    """

    name: str = "tokenizer"
    eos_token_id: int
    pad_token_id: int
    bos_token_id: Optional[int] = None
    add_bos: bool = False
    chat_template: Optional[str] = None

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (the model's vocab must be at least this)."""

    @abstractmethod
    def token_to_id(self, token: str) -> Optional[int]: ...

    @abstractmethod
    def id_to_token(self, token_id: int) -> Optional[str]: ...

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer so that ``load_tokenizer(directory)`` reads it back."""

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a generation (EOS first)."""
        return (self.eos_token_id,)

    @property
    def eos_token(self) -> str:
        return self.id_to_token(self.eos_token_id) or ""

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.encode(text)
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, "
                f"eos={self.eos_token_id}, pad={self.pad_token_id}, bos={self.bos_token_id})")
