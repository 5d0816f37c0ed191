"""The trainer's config: one typed schema, YAML files, ``section.key=value`` overrides."""
from gvm_mega.config.loader import (
    ConfigError,
    all_keys,
    apply_overrides,
    dump_config,
    load_config,
    save_config,
    validate,
)
from gvm_mega.config.schema import Config

__all__ = ["Config", "ConfigError", "all_keys", "apply_overrides", "dump_config",
           "load_config", "save_config", "validate"]
