"""Tiny Hugging Face tokenizers built on the spot (no downloads) for the tokenizer tests.

``qwen_like``: byte-level BPE with ChatML special tokens, EOS ``<|im_end|>``, pad
``<|endoftext|>``, no BOS. ``llama_like``: byte-level BPE whose post-processor prepends
``<|begin_of_text|>``, EOS ``<|eot_id|>`` plus ``<|end_of_text|>`` from generation_config.json.
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

CORPUS = [
    "Problem: Compute 12 + 30.\nSolution:\nStep 1: 12 + 30 = 42\nThe answer is \\boxed{42}.",
    "Let's think step by step and output the final answer within \\boxed{}.",
    "The quick brown fox jumps over the lazy dog. Ünïcödé: π ≈ 3.14159, 日本語.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
] * 20


def _train_bpe(specials: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def qwen_like(directory: Path, *, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "add_bos_token": False, "model_max_length": 4096,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                     tok.token_to_id("<|endoftext|>")]}), encoding="utf-8")
    return directory


def llama_like(directory: Path) -> Path:
    from tokenizers import processors

    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = _train_bpe(specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "chat_template": LLAMA_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": [tok.token_to_id("<|end_of_text|>"),
                                                          tok.token_to_id("<|eot_id|>")]}),
        encoding="utf-8")
    return directory
