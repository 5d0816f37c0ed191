"""The embedded default tokenizer: sentencepiece BPE trained on the built-in task's text.

Trained at first use (~0.05 s) and cached on disk, keyed by a hash of the training text and
settings, so every process of a run — and every later run — loads the same model file.
Settings that round-trip text exactly: identity normalisation, no whitespace collapsing, no
dummy prefix (so ``encode(prompt) + encode(response)`` matches ``encode(prompt + response)``
at a line break), byte fallback (needs vocab >= 512 requested; sentencepiece keeps fewer
pieces when the text has fewer), digits split into single tokens.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from gvm_mega.tokenizer.base import Tokenizer, TokenizerError

FORMAT_VERSION = 1
META_FILE = "gvm_tokenizer.json"
MODEL_FILE = "tokenizer.model"
USER_SYMBOLS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n", "\\boxed")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


def default_cache_dir() -> Path:
    """``$GVM_MEGA_CACHE`` or ``$XDG_CACHE_HOME/gvm_mega`` (default ``~/.cache/gvm_mega``)."""
    if os.environ.get("GVM_MEGA_CACHE"):
        return Path(os.environ["GVM_MEGA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gvm_mega"


def training_text(num_problems: int = 4000) -> list[str]:
    """The built-in task's text in the templates it is used with (fixed, seed 0)."""
    from gvm_mega.data.arithmetic import generate_problems
    from gvm_mega.data.templates import PlainTemplate, QwenMathCoTTemplate

    plain, chat = PlainTemplate(), QwenMathCoTTemplate()
    lines = []
    for i, p in enumerate(generate_problems(num_problems, seed=0, split="train")):
        template = chat if i % 8 == 0 else plain
        lines.append(template.render(p.problem) + p.solution)
    return lines


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model with unk/bos/eos/pad at ids 0-3 (BOS is not prepended)."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise TokenizerError(f"{self.model_file}: no sentencepiece model file")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except Exception as exc:  # noqa: BLE001 — sentencepiece raises OSError/RuntimeError
            raise TokenizerError(f"{self.model_file}: not a sentencepiece model ({exc})") from exc
        self.name = str(self.model_file.parent)
        self.eos_token_id = self._sp.eos_id()
        self.bos_token_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        pad = self._sp.pad_id()
        self.pad_token_id = pad if pad >= 0 else self.eos_token_id
        self.add_bos = False

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_token_id] + ids if add_special_tokens and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        # A model's vocabulary is padded past the tokenizer's (to divide by TP size); ids in
        # the padding have no piece and decode to nothing.
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if not self._sp.is_control(i)])
        out, run = [], []
        for i in ids:  # control pieces (<s>, </s>, <pad>) decode to nothing in sentencepiece
            if self._sp.is_control(i):
                out.append(self._sp.decode(run))
                out.append(self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> Optional[int]:
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id) else token_id

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else None

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.model_file.resolve() != (directory / MODEL_FILE).resolve():
            shutil.copyfile(self.model_file, directory / MODEL_FILE)
        meta = {"kind": "sentencepiece", "format_version": FORMAT_VERSION,
                "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id, "vocab_size": self.vocab_size}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return directory


def _train(lines: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, character_coverage=1.0,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
        user_defined_symbols=list(USER_SYMBOLS), num_threads=1, minloglevel=2,
        max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False)
    return model.getvalue()


def builtin_tokenizer(cache_dir: Optional[str | Path] = None, *,
                      vocab_size: int = 512) -> SentencePieceTokenizer:
    """The built-in tokenizer, trained now if the cache does not have it yet.

    Concurrent first uses (several ranks) are safe: each trains into a private temporary
    directory and renames it into place; a loser of the race uses the winner's files.
    """
    if vocab_size < 512:
        raise TokenizerError(f"the built-in tokenizer needs vocab_size >= 512 (byte fallback "
                             f"takes 256 ids), got {vocab_size}")
    lines = training_text()
    digest = hashlib.sha256(json.dumps(
        {"v": FORMAT_VERSION, "vocab": vocab_size, "symbols": USER_SYMBOLS,
         "text": hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()}).encode())
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "tokenizers" / f"builtin-{digest.hexdigest()[:12]}"
    if not (target / MODEL_FILE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=target.parent))
        try:
            (tmp / MODEL_FILE).write_bytes(_train(lines, vocab_size))
            SentencePieceTokenizer(tmp / MODEL_FILE).save(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / MODEL_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SentencePieceTokenizer(target / MODEL_FILE)
