"""Policy model: config mapping, and one HF checkpoint under TP1/TP2/PP2/TP2xPP2 (4 ranks)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gvm_mega.config import ConfigError
from gvm_mega.config.schema import ModelConfig
from gvm_mega.models import (check_model_parallel_fit, hf_config_from_model_config,
                             model_config_from_hf, qkv_bias)

from _mcore_helpers import TINY, hf_logits, make_tiny_hf, run_worker


def _write_config(tmp_path: Path, **cfg) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_model_config_from_transformers_qwen2_config(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(**TINY, rope_theta=1e6, tie_word_embeddings=True).save_pretrained(tmp_path)
    cfg = model_config_from_hf(tmp_path)
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == ("qwen2", 2, 32, 48)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size) == (4, 2, 96)
    assert cfg.rope_theta == 1e6 and cfg.norm_epsilon == 1e-6
    assert cfg.qkv_bias is True and cfg.tie_word_embeddings is True and cfg.head_dim is None
    assert cfg.hf_path == str(tmp_path) and cfg.tokenizer == "builtin"  # no tokenizer files


def test_model_config_from_legacy_llama_config(tmp_path):
    _write_config(tmp_path, model_type="llama", num_hidden_layers=4, hidden_size=64,
                  intermediate_size=128, num_attention_heads=8, num_key_value_heads=8,
                  vocab_size=1000, rope_theta=500000.0, rms_norm_eps=1e-5, head_dim=16,
                  torch_dtype="bfloat16")
    (tmp_path / "tokenizer.json").write_text("{}")
    cfg = model_config_from_hf(tmp_path)
    assert cfg.arch == "llama" and cfg.qkv_bias is False and cfg.tie_word_embeddings is False
    assert cfg.head_dim == 16 and cfg.rope_theta == 500000.0 and cfg.norm_epsilon == 1e-5
    assert cfg.params_dtype == "bfloat16" and cfg.tokenizer == str(tmp_path)


@pytest.mark.parametrize("extra, needle", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'rope_scaling' of type 'llama3'"),
    ({"attention_bias": True}, "'attention_bias: true' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": None}, None),
])
def test_unsupported_hf_configs_are_named(tmp_path, extra, needle):
    base = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32,
            "intermediate_size": 48, "num_attention_heads": 4, "vocab_size": 96}
    base.update(extra)
    if base["hidden_size"] is None:
        del base["hidden_size"]
        needle = "missing key 'hidden_size'"
    _write_config(tmp_path, **base)
    with pytest.raises(ConfigError, match=needle) as info:
        model_config_from_hf(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_invalid_config_json_names_the_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(ConfigError, match=r"config.json:3: invalid JSON"):
        model_config_from_hf(tmp_path)


def test_generated_hf_config_reads_back(tmp_path):
    for arch, bias in (("tiny", True), ("llama", False), ("qwen2", True)):
        cfg = ModelConfig(arch=arch, rope_theta=2e5, tie_word_embeddings=arch != "llama")
        assert qkv_bias(cfg) is bias
        hf = hf_config_from_model_config(cfg)
        assert hf["model_type"] == ("qwen2" if bias else "llama")
        _write_config(tmp_path, **hf)
        back = model_config_from_hf(tmp_path)
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "rope_theta", "norm_epsilon",
                    "tie_word_embeddings"):
            assert getattr(back, key) == getattr(cfg, key), key
        assert qkv_bias(back) is bias


def test_parallel_fit_errors_name_both_keys():
    cfg = ModelConfig(num_attention_heads=4, num_query_groups=2, num_layers=2)
    check_model_parallel_fit(cfg, 2, 2)
    with pytest.raises(ConfigError, match=r"'model.num_query_groups' \(2\) must be divisible "
                                          r"by 'parallel.tp' \(4\)"):
        check_model_parallel_fit(cfg, 4, 1)
    with pytest.raises(ConfigError, match=r"'model.num_layers' \(2\) .* 'parallel.pp' \(3\)"):
        check_model_parallel_fit(cfg, 1, 3)


@pytest.fixture(scope="module")
def layouts_run(tmp_path_factory):
    """Tiny random Qwen2 (tied, theta 5e3) and Llama (untied) run at 4 layouts in one world."""
    root = tmp_path_factory.mktemp("layouts")
    tokens = torch.randint(0, TINY["vocab_size"], (2, 10),
                           generator=torch.Generator().manual_seed(1))
    torch.save(tokens, root / "tokens.pt")
    models, refs = {}, {}
    for name, tied, theta in (("qwen2", True, 5000.0), ("llama", False, 10000.0)):
        shard = "20KB" if name == "llama" else None  # the Llama one is read via its index
        d = make_tiny_hf(root / name, name, tied=tied, seed=len(name), theta=theta,
                         max_shard_size=shard)
        torch.save(hf_logits(d, tokens), root / f"{name}.ref.pt")
        models[name], refs[name] = str(d), str(root / f"{name}.ref.pt")
    assert (root / "llama" / "model.safetensors.index.json").is_file()
    out = root / "out"
    out.mkdir()
    run_worker("layouts", 4, {"models": models, "reference": refs,
                              "tokens": str(root / "tokens.pt"), "out": str(out)})
    reports = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]
    return {"checks": [c for rep in reports for c in rep["checks"]], "rank0": reports[0],
            "out": out, "tokens": tokens}


LAYOUTS = {(1, 1), (2, 1), (1, 2), (2, 2)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_logits_match_transformers_at_every_layout(layouts_run):
    layouts_run = layouts_run["checks"]
    seen = {(c["model"], c["tp"], c["pp"]) for c in layouts_run if "vs_hf" in c}
    assert seen == {(m, tp, pp) for m in ("qwen2", "llama") for tp, pp in LAYOUTS}
    worst = max(c["vs_hf"] for c in layouts_run if "vs_hf" in c)
    assert worst <= 1e-4, worst


@pytest.mark.slow
def test_every_layout_covers_the_rank_grid(layouts_run):
    layouts_run = layouts_run["checks"]
    for tp, pp in LAYOUTS:
        rows = [c for c in layouts_run if (c["model"], c["tp"], c["pp"]) == ("qwen2", tp, pp)]
        dp = 4 // (tp * pp)
        assert {c["dp"] for c in rows} == {dp}
        assert sorted(tuple(c["grid"]) for c in rows) == sorted(
            (t, p, d) for t in range(tp) for p in range(pp) for d in range(dp))


@pytest.mark.slow
def test_logits_agree_across_layouts(layouts_run):
    layouts_run = layouts_run["checks"]
    split = [c for c in layouts_run if "vs_tp1" in c and (c["tp"], c["pp"]) != (1, 1)]
    assert {(c["tp"], c["pp"]) for c in split} == LAYOUTS - {(1, 1)}
    assert max(c["vs_tp1"] for c in split) <= 1e-5


@pytest.mark.slow
def test_export_gathers_the_exact_checkpoint(layouts_run):
    layouts_run = layouts_run["checks"]
    exported = [c for c in layouts_run if "export_exact" in c]
    assert {(c["model"], c["tp"], c["pp"]) for c in exported} == \
        {(m, tp, pp) for m in ("qwen2", "llama") for tp, pp in LAYOUTS}
    assert all(c["rank"] == 0 and c["export_exact"] for c in exported)
    by_model = {c["model"]: c["export_tensors"] for c in exported}
    assert by_model == {"qwen2": 2 + 12 * 2, "llama": 3 + 9 * 2}  # tied + biases vs untied


@pytest.mark.slow
def test_bad_checkpoints_are_refused_by_name(layouts_run):
    assert len(layouts_run["rank0"]["load_errors"]) == 3


@pytest.mark.slow
def test_cpu_initialisation_does_not_depend_on_tp(layouts_run):
    for name in ("tiny", "llama"):
        assert layouts_run["rank0"][f"fresh_{name}_init_tp2_equals_tp1"] is True


@pytest.mark.slow
@pytest.mark.parametrize("name, model_type, tied", [("tiny", "qwen2", True),
                                                    ("llama", "llama", False)])
def test_megatron_initialised_model_exports_to_transformers(layouts_run, name, model_type, tied):
    """Exported from TP2xPP2 with a generated config.json, loaded by transformers: same logits."""
    hf_dir = layouts_run["out"] / f"fresh-{name}-hf"
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["model_type"], config["tie_word_embeddings"]) == (model_type, tied)
    ours = torch.load(layouts_run["out"] / f"fresh-{name}.logits.pt")
    theirs = hf_logits(hf_dir, layouts_run["tokens"])
    assert ours.abs().max() > 0.1  # a real signal, not all-zero logits
    # tight: with megatron's small init, a wrong rope_theta moves logits by only ~7e-5
    assert (ours - theirs).abs().max().item() <= 1e-5
