"""Tokenizers behind one interface: HF ``tokenizer.json`` models and the built-in default.

``load_tokenizer(spec_or_dir)`` returns a :class:`Tokenizer` with ``encode``, ``decode``,
``eos_token_id``, ``pad_token_id``, ``vocab_size`` and ``save``.
"""
from gvm_mega.tokenizer.base import Tokenizer, TokenizerError
from gvm_mega.tokenizer.builtin import SentencePieceTokenizer, builtin_tokenizer, default_cache_dir
from gvm_mega.tokenizer.hf import HFTokenizer
from gvm_mega.tokenizer.loading import load_tokenizer

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "TokenizerError",
           "builtin_tokenizer", "default_cache_dir", "load_tokenizer"]
