"""Tokenizers: the built-in sentencepiece default and HF tokenizer.json (Qwen2/Llama-like)."""
from __future__ import annotations

import json
import threading

import pytest

from _tokenizer_helpers import llama_like, qwen_like
from gvm_mega.data import PlainTemplate, QwenMathCoTTemplate, generate_problems
from gvm_mega.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    builtin_tokenizer,
    load_tokenizer,
)
from gvm_mega.tokenizer import builtin as builtin_module

TEXTS = [
    "Compute 4821 + 977 - 35.",
    "  leading and  double  spaces \n\n\ttabs and trailing ",
    "Ünïcödé π ≈ 3.14159, 日本語, emoji 🙂, NUL \x00 and \x7f",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "\\boxed{\\frac{1}{2}}",
    "",
]


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    return builtin_tokenizer(tmp_path_factory.mktemp("cache"))


def test_builtin_round_trips_and_special_ids(builtin):
    assert isinstance(builtin, SentencePieceTokenizer)
    for text in TEXTS:
        assert builtin.decode(builtin.encode(text)) == text
    specials = {builtin.eos_token_id, builtin.pad_token_id, builtin.bos_token_id}
    assert len(specials) == 3 and max(specials) < builtin.vocab_size <= 512
    assert builtin.eos_token_ids == (builtin.eos_token_id,)
    ids = builtin.encode("Step 1: 7 + 8 = 15")
    # EOS/pad are control tokens: skipped by default, shown on request
    assert builtin.decode(ids + [builtin.eos_token_id, builtin.pad_token_id]) == "Step 1: 7 + 8 = 15"
    # ids in a model's padded vocabulary (past the tokenizer's) decode to nothing
    assert builtin.decode(ids + [builtin.vocab_size, builtin.vocab_size + 7]) == "Step 1: 7 + 8 = 15"
    shown = builtin.decode(ids + [builtin.eos_token_id], skip_special_tokens=False)
    assert shown == "Step 1: 7 + 8 = 15" + builtin.id_to_token(builtin.eos_token_id)
    assert builtin.encode("x", add_special_tokens=True)[0] == builtin.bos_token_id
    assert builtin.encode_prompt("x") == builtin.encode("x")  # no BOS for the built-in model
    assert builtin.token_to_id("<|im_end|>") is not None
    assert builtin.token_to_id("no-such-piece-xyz") is None


def test_builtin_fits_the_task(builtin):
    for p in generate_problems(50, seed=3):
        prompt = PlainTemplate().render(p.problem)
        # prompt and response tokenised apart concatenate to the joint tokenisation
        assert builtin.encode(prompt) + builtin.encode(p.solution) == builtin.encode(prompt + p.solution)
        assert builtin.decode(builtin.encode(prompt + p.solution)) == prompt + p.solution
    digits = builtin.encode("90817")
    assert [builtin.decode([i]) for i in digits] == list("90817")  # digits split
    chat = QwenMathCoTTemplate().render("Compute 1 + 2.")
    assert builtin.encode(chat)[0] == builtin.token_to_id("<|im_start|>")
    assert len(builtin.encode(chat)) < 80


def test_builtin_cache_is_reused_deterministic_and_race_safe(tmp_path, builtin, monkeypatch):
    first = builtin_tokenizer(tmp_path / "a")
    second = builtin_tokenizer(tmp_path / "b")
    assert first.model_file.read_bytes() == second.model_file.read_bytes() == \
        builtin.model_file.read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache has the model")

    monkeypatch.setattr(builtin_module, "_train", no_training)
    again = builtin_tokenizer(tmp_path / "a")
    assert again.model_file == first.model_file
    monkeypatch.undo()

    results, errors = [], []

    def first_use():
        try:
            results.append(builtin_tokenizer(tmp_path / "race").model_file)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    leftovers = [p.name for p in results[0].parent.parent.iterdir() if p.name.startswith(".train-")]
    assert leftovers == []


def test_builtin_save_and_load(builtin, tmp_path):
    saved = builtin.save(tmp_path / "tok")
    loaded = load_tokenizer(saved)
    assert isinstance(loaded, SentencePieceTokenizer)
    for text in TEXTS:
        assert loaded.encode(text) == builtin.encode(text)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.vocab_size) == \
        (builtin.eos_token_id, builtin.pad_token_id, builtin.vocab_size)
    with pytest.raises(TokenizerError, match="vocab_size >= 512"):
        builtin_tokenizer(tmp_path, vocab_size=256)


def test_qwen_like_hf_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = qwen_like(tmp_path / "qwen")
    tok = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_token_id == ref.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_token_id == ref.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id is None and not tok.add_bos
    assert tok.eos_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    assert tok.vocab_size == len(ref)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    chat = "<|im_start|>user\nhi<|im_end|>"
    ids = tok.encode(chat)
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.eos_token_id
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == chat
    assert tok.encode_prompt(chat) == ids
    assert tok.chat_template is not None


def test_llama_like_bos_and_eos(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = llama_like(tmp_path / "llama")
    tok = load_tokenizer(path / "tokenizer.json")  # a tokenizer.json path works too
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    bos = tok.token_to_id("<|begin_of_text|>")
    assert tok.bos_token_id == bos == ref.bos_token_id and tok.add_bos
    assert tok.eos_token_id == ref.eos_token_id == tok.token_to_id("<|eot_id|>")
    assert set(tok.eos_token_ids) == {tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")}
    assert tok.pad_token_id == tok.eos_token_id  # no pad token: pad with EOS
    assert tok.encode_prompt("hello") == ref("hello").input_ids
    assert tok.encode_prompt("hello")[0] == bos and tok.encode("hello")[0] != bos
    # a chat-rendered prompt already starts with BOS: not doubled
    assert tok.encode_prompt("<|begin_of_text|>hello").count(bos) == 1


def test_hf_save_round_trip(tmp_path):
    tok = load_tokenizer(qwen_like(tmp_path / "src"))
    out = tok.save(tmp_path / "out")
    again = load_tokenizer(out)
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert (again.eos_token_id, again.pad_token_id, again.eos_token_ids, again.chat_template) == \
        (tok.eos_token_id, tok.pad_token_id, tok.eos_token_ids, tok.chat_template)


def test_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(TokenizerError, match="no such directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="neither tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    path = qwen_like(tmp_path / "bad_eos")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|nope|>"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="eos_token '<\\|nope\\|>'"):
        load_tokenizer(path)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(path)
    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="cannot be read"):
        load_tokenizer(path)
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"junk")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "sp")
