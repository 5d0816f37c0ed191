"""``gvm-mega convert``: HF -> megatron dist checkpoint -> HF, bit-exact, at several layouts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gvm_mega.cli import main as cli_main
from gvm_mega.models import HFCheckpointReader, save_hf_state_dict

from _mcore_helpers import ROOT, make_tiny_hf, read_safetensors_dir

SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _convert(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "gvm_mega", "convert", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc


def _assert_same_checkpoint(src: Path, dst: Path) -> None:
    a, b = read_safetensors_dir(src), read_safetensors_dir(dst)
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    for f in SIDE_FILES:
        assert (src / f).is_file() and (dst / f).read_bytes() == (src / f).read_bytes(), f


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_round_trips_through_megatron_layouts(tmp_path):
    """A tied bf16 Qwen2 saved from two pipeline stages, read back and exported at TP1."""
    qwen = make_tiny_hf(tmp_path / "qwen2", "qwen2", tied=True, seed=3, dtype=torch.bfloat16)
    _convert("hf-to-mcore", "--hf", str(qwen), "--out", str(tmp_path / "q.mcore"), "--pp", "2")
    meta = json.loads((tmp_path / "q.mcore" / "gvm_mega_model.json").read_text())
    assert meta["saved_layout"] == {"tp": 1, "pp": 2}
    assert (meta["model"]["arch"], meta["model"]["params_dtype"]) == ("qwen2", "bfloat16")
    assert (tmp_path / "q.mcore" / "model" / "metadata.json").is_file()
    _convert("mcore-to-hf", "--mcore", str(tmp_path / "q.mcore"), "--out", str(tmp_path / "q.hf"))
    _assert_same_checkpoint(qwen, tmp_path / "q.hf")
    assert read_safetensors_dir(tmp_path / "q.hf")["model.norm.weight"].dtype == torch.bfloat16


def test_sharded_save_writes_an_index_the_reader_follows(tmp_path):
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(16, 8) for i in range(5)}
    paths = save_hf_state_dict(state, tmp_path, max_shard_bytes=1100)
    assert len(paths) == 3  # 512-byte tensors, two per shard
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reader = HFCheckpointReader(tmp_path)
    assert sorted(reader.keys()) == sorted(state)
    assert all(torch.equal(reader[k], v) for k, v in state.items())


def test_reader_names_missing_pieces(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        HFCheckpointReader(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors: listed"):
        HFCheckpointReader(tmp_path)["a"]
    with pytest.raises(KeyError, match="tensor 'b' is not in the checkpoint"):
        HFCheckpointReader(tmp_path)["b"]


def test_cli_errors_before_starting_workers(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["convert", "hf-to-mcore", "--hf", str(empty), "--out",
                     str(tmp_path / "o")]) == 2
    assert "config.json: not found" in capsys.readouterr().err

    (empty / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 32,
        "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 96}))
    assert cli_main(["convert", "hf-to-mcore", "--hf", str(empty), "--out",
                     str(tmp_path / "o")]) == 2
    assert "no model.safetensors or model.safetensors.index.json" in capsys.readouterr().err

    torch.manual_seed(0)
    save_hf_state_dict({"model.norm.weight": torch.ones(32)}, empty)
    assert cli_main(["convert", "hf-to-mcore", "--hf", str(empty), "--out", str(tmp_path / "o"),
                     "--tp", "4"]) == 2
    assert "'model.num_query_groups' (2) must be divisible by 'parallel.tp' (4)" in \
        capsys.readouterr().err

    assert cli_main(["convert", "hf-to-mcore", "--hf", str(empty), "--out", str(empty)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err

    assert cli_main(["convert", "mcore-to-hf", "--mcore", str(empty), "--out",
                     str(tmp_path / "o")]) == 2
    assert "gvm_mega_model.json: not found" in capsys.readouterr().err
