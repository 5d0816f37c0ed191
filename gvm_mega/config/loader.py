"""Load, override, validate and save :class:`~gvm_mega.config.schema.Config`.

Errors name the offending key (and the YAML file and line where it came from), say what
form was expected, and suggest the closest valid key for typos.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

import yaml

from gvm_mega.config.fields import check_bounds, describe_bounds
from gvm_mega.config.schema import POSTERIOR_ONLY, Config, GVMConfig


class ConfigError(ValueError):
    """A config problem, worded for the user: which key, where, and what was expected."""


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _fields(section_cls: type) -> dict[str, tuple[Any, dict]]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(section_cls)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``gvm.alpha``."""
    return [f"{s}.{k}" for s, cls in _section_types().items() for k in _fields(cls)]


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest candidate, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(item, _type_name(item))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, from_text: bool) -> Any:
    """Convert ``value`` to ``tp`` or raise _Mismatch. Text from the command line is parsed."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None or (from_text and str(value).strip().lower() in ("null", "none", "~")):
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in args:
            try:
                return _coerce(value, arg, from_text)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise _Mismatch
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = yaml.safe_load(text)
            else:
                value = [v for v in (s.strip() for s in text.split(",")) if v]
            return [_coerce(v, item_tp, isinstance(v, str)) for v in value]
        if not isinstance(value, list):
            raise _Mismatch
        return [_coerce(v, item_tp, False) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif isinstance(value, str) and value.strip():
            # YAML 1.1 reads "1e-3" as a string; accept it as the number it plainly is.
            try:
                value = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if math.isnan(value):
            raise _Mismatch
        return value
    if tp is str:
        if isinstance(value, str):
            return value
        if from_text:
            return str(value)
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")


def _set(cfg: Config, dotted: str, value: Any, where: str, from_text: bool) -> None:
    section, _, key = dotted.partition(".")
    sections = _section_types()
    if section not in sections or not key:
        if section in sections:
            raise ConfigError(f"{where}: '{dotted}' names a section, not a key; "
                              f"use {section}.KEY=VALUE")
        raise ConfigError(f"{where}: unknown key '{dotted}'" + suggest(dotted, all_keys()))
    fields = _fields(sections[section])
    if key not in fields:
        raise ConfigError(f"{where}: unknown key '{dotted}'" + suggest(dotted, all_keys()))
    tp, meta = fields[key]
    try:
        coerced = _coerce(value, tp, from_text)
    except _Mismatch:
        raise ConfigError(f"{where}: '{dotted}' must be {_type_name(tp)}, got {value!r}") from None
    if not check_bounds(coerced, meta):
        raise ConfigError(f"{where}: '{dotted}' must be {describe_bounds(meta)}, got {coerced!r}")
    setattr(getattr(cfg, section), key, coerced)


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted keys of a two-level YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}
    root = yaml.compose(text)
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key_node, value_node in root.value:
        lines[str(key_node.value)] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            for sub_key, _ in value_node.value:
                lines[f"{key_node.value}.{sub_key.value}"] = sub_key.start_mark.line + 1
    return lines


def apply_yaml(cfg: Config, path: str | Path, _chain: tuple[Path, ...] = ()) -> Config:
    """Apply a YAML file's values onto ``cfg`` (in place), validating every key.

    A top-level ``base: OTHER.yaml`` (relative to this file) is applied first, so that
    variants of one setup (e.g. an algorithm and its uniform baseline) share one file.
    """
    path = Path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: 'base' files include each other: {cycle}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return cfg
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str):
            raise ConfigError(f"{path}:{lines['base']}: 'base' must be a file name, got {base!r}")
        apply_yaml(cfg, path.parent / base, (*_chain, path.resolve()))
    for section, values in data.items():
        where = f"{path}:{lines.get(str(section), '?')}"
        if str(section) not in _section_types():
            raise ConfigError(f"{where}: unknown section '{section}'"
                              + suggest(str(section), _section_types()))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys")
        for key, value in values.items():
            dotted = f"{section}.{key}"
            _set(cfg, dotted, value, f"{path}:{lines.get(dotted, '?')}", from_text=False)
    return cfg


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """Apply ``section.key=value`` strings onto ``cfg`` (in place)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value")
        dotted, _, text = item.partition("=")
        _set(cfg, dotted.strip(), text, f"override '{item}'", from_text=True)
    return cfg


def validate(cfg: Config) -> Config:
    """Checks that involve more than one key."""
    m = cfg.model
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"'model.hidden_size' ({m.hidden_size}) must be divisible by "
                          f"'model.num_attention_heads' ({m.num_attention_heads})")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"'model.num_attention_heads' ({m.num_attention_heads}) must be "
                          f"divisible by 'model.num_query_groups' ({m.num_query_groups})")
    if m.num_attention_heads % cfg.parallel.tp:
        raise ConfigError(f"'parallel.tp' ({cfg.parallel.tp}) must divide "
                          f"'model.num_attention_heads' ({m.num_attention_heads})")
    if m.num_layers % cfg.parallel.pp:
        raise ConfigError(f"'parallel.pp' ({cfg.parallel.pp}) must divide "
                          f"'model.num_layers' ({m.num_layers})")
    if cfg.rollout.engine == "sglang" and not cfg.rollout.urls:
        raise ConfigError("'rollout.urls' must list at least one server when "
                          "'rollout.engine' is 'sglang'")
    g = cfg.gvm
    if g.max_samples is not None and g.min_samples > g.max_samples:
        raise ConfigError(f"'gvm.min_samples' ({g.min_samples}) must not exceed "
                          f"'gvm.max_samples' ({g.max_samples})")
    if g.estimator != "posterior":
        default = GVMConfig()
        changed = [k for k in POSTERIOR_ONLY if getattr(g, k) != getattr(default, k)]
        if changed:
            raise ConfigError(f"'gvm.{changed[0]}' ({getattr(g, changed[0])!r}) only applies "
                              f"to 'gvm.estimator' = posterior, which is {g.estimator!r}; "
                              f"set the estimator or drop the key")
    if g.skip_recheck_every is not None and g.skip_solved_above is None:
        raise ConfigError(f"'gvm.skip_recheck_every' ({g.skip_recheck_every}) revisits skipped "
                          f"prompts; it needs 'gvm.skip_solved_above'")
    if g.shuffle_allocation and g.presample_until is not None:
        raise ConfigError("'gvm.shuffle_allocation' moves counts between prompts, which "
                          "'gvm.presample_until' gives different floors and caps; drop one")
    if g.stage2_rounds > 1:
        if not g.rates_from_stage2:
            raise ConfigError(f"'gvm.stage2_rounds' ({g.stage2_rounds}) refines p_i with each "
                              f"round's verdicts; it needs 'gvm.rates_from_stage2' = true")
        for key in ("presample_until", "shuffle_allocation"):
            if getattr(g, key) not in (None, False):
                raise ConfigError(f"'gvm.stage2_rounds' ({g.stage2_rounds}) cannot be combined "
                                  f"with 'gvm.{key}'; drop one")
    if g.count_stage1 and not g.reuse_stage1:
        raise ConfigError("'gvm.count_stage1' counts the stage-1 samples trained on; it needs "
                          "'gvm.reuse_stage1' = true")
    if cfg.algorithm.prompt_weight != "pooled" and cfg.algorithm.name == "raft":
        raise ConfigError("'algorithm.prompt_weight' must be 'pooled' for 'raft' (plain SFT on "
                          "accepted samples has no per-sample weights); use raft++")
    if cfg.reward.check_steps and not str(cfg.data.train_path).startswith("builtin:arithmetic"):
        raise ConfigError(f"'reward.check_steps' checks the built-in task's worked steps; "
                          f"'data.train_path' is {cfg.data.train_path!r}, not builtin:arithmetic")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"'optim.min_lr' ({cfg.optim.min_lr}) must not exceed "
                          f"'optim.lr' ({cfg.optim.lr})")
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults, then the YAML file (if any), then overrides; validated."""
    cfg = Config()
    if path is not None:
        apply_yaml(cfg, path)
    apply_overrides(cfg, overrides)
    return validate(cfg)


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_config(cfg), encoding="utf-8")
    return path
