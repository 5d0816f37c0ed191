"""``load_tokenizer``: one call from a config value to a :class:`Tokenizer`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from gvm_mega.tokenizer.base import Tokenizer, TokenizerError
from gvm_mega.tokenizer.builtin import MODEL_FILE, SentencePieceTokenizer, builtin_tokenizer
from gvm_mega.tokenizer.hf import HFTokenizer


def load_tokenizer(spec_or_dir: str | Path, *, cache_dir: Optional[str | Path] = None,
                   vocab_size: int = 512) -> Tokenizer:
    """``"builtin"``, a directory with ``tokenizer.json`` (HF) or ``tokenizer.model`` (saved
    built-in), or the path of a ``tokenizer.json`` file.

    ``cache_dir`` and ``vocab_size`` apply to ``"builtin"`` only.
    """
    if str(spec_or_dir) == "builtin":
        return builtin_tokenizer(cache_dir, vocab_size=vocab_size)
    path = Path(spec_or_dir)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_dir(path)
        if (path / MODEL_FILE).is_file():
            return SentencePieceTokenizer(path / MODEL_FILE)
        raise TokenizerError(f"{path}: neither tokenizer.json (Hugging Face) nor {MODEL_FILE} "
                             f"(sentencepiece) in this directory")
    raise TokenizerError(f"tokenizer {str(spec_or_dir)!r}: not 'builtin' and no such directory")
