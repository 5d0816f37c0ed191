"""The tokenizer of a served model directory (for ``text`` requests and stop strings)."""
from __future__ import annotations

import os
from typing import Optional

from gvm_mega.tokenizer import Tokenizer, load_tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_text_codec(hf_dir: str) -> Optional[Tokenizer]:
    """The project tokenizer saved in ``hf_dir``, or None when the directory has none."""
    if any(os.path.isfile(os.path.join(hf_dir, f)) for f in _TOKENIZER_FILES):
        return load_tokenizer(hf_dir)
    return None
