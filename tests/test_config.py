"""The config schema: YAML loading, overrides, and every error path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gvm_mega.config import Config, ConfigError, all_keys, dump_config, load_config, save_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg == Config()
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(saved) == cfg


def test_yaml_values_and_overrides_apply_in_order(tmp_path):
    path = write(tmp_path, "gvm:\n  alpha: 1.0e-2\n  max_samples: 16\nrollout:\n  stop: [a, b]\n")
    cfg = load_config(path, ["gvm.alpha=1e-4", "algorithm.name=gvm-grpo"])
    assert cfg.gvm.alpha == pytest.approx(1e-4)
    assert cfg.gvm.max_samples == 16
    assert cfg.rollout.stop == ["a", "b"]
    assert cfg.algorithm.name == "gvm-grpo" and cfg.algorithm.uses_gvm


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-3 as a string; a float field must still take it.
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-5\n"))
    assert cfg.optim.lr == pytest.approx(1e-5)


@pytest.mark.parametrize("override, attr, expected", [
    ("gvm.max_samples=null", ("gvm", "max_samples"), None),
    ("gvm.max_samples=12", ("gvm", "max_samples"), 12),
    ("gvm.reuse_stage1=true", ("gvm", "reuse_stage1"), True),
    ("gvm.reuse_stage1=no", ("gvm", "reuse_stage1"), False),
    ("rollout.urls=http://a:1,http://b:2", ("rollout", "urls"), ["http://a:1", "http://b:2"]),
    ("rollout.stop=[\"</s>\", \"\\n\\n\"]", ("rollout", "stop"), ["</s>", "\n\n"]),
    ("parallel.tp=2", ("parallel", "tp"), 2),
    ("optim.lr=3e-6", ("optim", "lr"), 3e-6),
    ("run.name=123", ("run", "name"), "123"),
])
def test_override_parsing(override, attr, expected):
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, attr[0]), attr[1]) == expected


@pytest.mark.parametrize("override, message", [
    ("gvm.alpah=1", "unknown key 'gvm.alpah' (did you mean 'gvm.alpha'?)"),
    ("optim.learning_rate=1", "unknown key 'optim.learning_rate'"),
    ("gmv.alpha=1", "(did you mean 'gvm.alpha'?)"),
    ("gvm=1", "'gvm' names a section, not a key"),
    ("gvm.alpha", "expected section.key=value"),
    ("gvm.alpha=-1", "'gvm.alpha' must be >= 0, got -1.0"),
    ("gvm.alpha=abc", "'gvm.alpha' must be a number, got 'abc'"),
    ("gvm.alpha=nan", "'gvm.alpha' must be a number"),
    ("model.num_layers=2.5", "'model.num_layers' must be an integer, got '2.5'"),
    ("model.num_layers=0", "'model.num_layers' must be >= 1, got 0"),
    ("gvm.filter_threshold=1.5", "'gvm.filter_threshold' must be >= 0 and <= 1, got 1.5"),
    ("gvm.reuse_stage1=maybe", "'gvm.reuse_stage1' must be true or false"),
    ("algorithm.name=ppo", "'algorithm.name' must be one of 'raft', 'raft++', 'grpo'"),
    ("optim.adam_beta1=1", "'optim.adam_beta1' must be >= 0 and < 1, got 1.0"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert f"override '{override}'" in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("gvm:\n  alpha: 1.0\n  beta: 2\n  budgt: 3\n", "cfg.yaml:4: unknown key 'gvm.budgt'"),
    ("run:\n  seed: 1\nmodle:\n  num_layers: 2\n", "cfg.yaml:3: unknown section 'modle' (did you mean 'model'?)"),
    ("run:\n  seed: one\n", "cfg.yaml:2: 'run.seed' must be an integer, got 'one'"),
    ("run:\n  seed: true\n", "cfg.yaml:2: 'run.seed' must be an integer, got True"),
    ("gvm:\n  presample_n: 0\n", "cfg.yaml:2: 'gvm.presample_n' must be >= 1, got 0"),
    ("rollout:\n  urls: http://x\n", "'rollout.urls' must be a list of strings, got 'http://x'"),
    ("gvm: 3\n", "cfg.yaml:1: section 'gvm' must be a mapping of keys"),
    ("- a\n- b\n", "the top level must be a mapping of sections"),
    ("gvm:\n  alpha: [1,\n", "invalid YAML"),
])
def test_yaml_errors_name_file_line_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_base_file_is_applied_first(tmp_path):
    (tmp_path / "common.yaml").write_text("gvm:\n  alpha: 0.5\n  beta: 3\n")
    child = write(tmp_path, "base: common.yaml\ngvm:\n  alpha: 0.25\n")
    cfg = load_config(child)
    assert (cfg.gvm.alpha, cfg.gvm.beta) == (0.25, 3.0)


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "common.yaml").write_text("gvm:\n  alpah: 0.5\n")
    with pytest.raises(ConfigError, match=r"common.yaml:2: unknown key 'gvm.alpah'"):
        load_config(write(tmp_path, "base: common.yaml\n"))
    (tmp_path / "a.yaml").write_text("base: cfg.yaml\n")
    with pytest.raises(ConfigError, match="'base' files include each other"):
        load_config(write(tmp_path, "base: a.yaml\n"))
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config(write(tmp_path, "base: missing.yaml\n"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=65"], "'model.hidden_size' (65) must be divisible by 'model.num_attention_heads' (4)"),
    (["model.num_query_groups=3"], "must be divisible by 'model.num_query_groups' (3)"),
    (["parallel.tp=3"], "'parallel.tp' (3) must divide 'model.num_attention_heads' (4)"),
    (["parallel.pp=3"], "'parallel.pp' (3) must divide 'model.num_layers' (2)"),
    (["rollout.engine=sglang"], "'rollout.urls' must list at least one server"),
    (["gvm.min_samples=5", "gvm.max_samples=4"], "'gvm.min_samples' (5) must not exceed 'gvm.max_samples' (4)"),
    (["optim.lr=1e-6", "optim.min_lr=1e-5"], "'optim.min_lr' (1e-05) must not exceed"),
    (["reward.check_steps=true", "data.train_path=math.jsonl"],
     "'reward.check_steps' checks the built-in task's worked steps; 'data.train_path' is "
     "'math.jsonl'"),
])
def test_cross_key_checks(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_every_key_is_documented_and_dump_lists_every_key():
    dumped = yaml.safe_load(dump_config(Config()))
    dumped_keys = {f"{s}.{k}" for s, section in dumped.items() for k in section}
    assert dumped_keys == set(all_keys())


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("**/*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path, tmp_path):
    cfg = load_config(path)  # raises ConfigError on any problem
    assert load_config(save_config(cfg, tmp_path / "resolved.yaml")) == cfg


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gvm_mega", *args], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=120)


def test_cli_config_prints_saves_and_fails_cleanly(tmp_path):
    out = tmp_path / "resolved.yaml"
    ok = run_cli("config", "configs/demo_cpu.yaml", "gvm.alpha=0.01", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    printed = yaml.safe_load(ok.stdout)
    assert printed["gvm"]["alpha"] == 0.01 and printed["run"]["name"] == "demo-cpu"
    assert yaml.safe_load(out.read_text()) == printed

    only_overrides = run_cli("config", "gvm.beta=3")
    assert only_overrides.returncode == 0 and yaml.safe_load(only_overrides.stdout)["gvm"]["beta"] == 3.0

    bad = run_cli("config", "configs/demo_cpu.yaml", "gvm.alpah=1")
    assert bad.returncode == 2
    assert "gvm-mega: error:" in bad.stderr and "did you mean 'gvm.alpha'" in bad.stderr
    assert "Traceback" not in bad.stderr

    got = run_cli("config", "configs/demo_cpu.yaml", "gvm.reuse_stage1=true", "--get", "gvm.reuse_stage1")
    assert (got.returncode, got.stdout) == (0, "true\n")
    got = run_cli("config", "--get", "gvm.alpa")
    assert got.returncode == 2 and "did you mean 'gvm.alpha'" in got.stderr

    keys = run_cli("config", "--keys")
    assert keys.returncode == 0 and "gvm.alpha = 0.001" in keys.stdout and ">= 0" in keys.stdout


def test_cli_help_lists_subcommands():
    res = run_cli("--help")
    assert res.returncode == 0
    for name in ("config", "bench"):
        assert name in res.stdout
