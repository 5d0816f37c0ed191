"""``gvm-mega config``: print the resolved config, list keys, or validate a file."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print or check a resolved config",
        description="Resolve defaults + CONFIG + overrides, validate, and print the result "
                    "as YAML (the same file every run saves as config.yaml).",
    )
    p.add_argument("config", nargs="?", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="overrides applied after the file")
    p.add_argument("--keys", action="store_true",
                   help="list every valid key with its default and help, then exit")
    p.add_argument("--out", help="also write the resolved config to this file")
    p.add_argument("--get", metavar="SECTION.KEY",
                   help="print only this key's resolved value (for scripts)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gvm_mega.config import dump_config, load_config, save_config
    from gvm_mega.config.schema import Config

    if args.keys:
        _print_keys(Config())
        return 0
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # only overrides were given
        config, overrides = None, [config] + overrides
    cfg = load_config(config, overrides)
    if args.out:
        save_config(cfg, args.out)
    if args.get:
        print(_get(cfg, args.get))
        return 0
    print(dump_config(cfg), end="")
    return 0


def _get(cfg, dotted: str) -> str:
    from gvm_mega.cli import CLIError
    from gvm_mega.config import all_keys
    from gvm_mega.config.loader import suggest

    if dotted not in all_keys():
        raise CLIError(f"unknown key '{dotted}'" + suggest(dotted, all_keys()))
    section, key = dotted.split(".", 1)
    value = getattr(getattr(cfg, section), key)
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _print_keys(cfg) -> None:
    import dataclasses

    from gvm_mega.config.fields import describe_bounds

    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            default = getattr(getattr(cfg, section.name), f.name)
            bounds = describe_bounds(dict(f.metadata))
            extra = "; ".join(x for x in (f.metadata.get("help", ""), bounds) if x)
            print(f"{section.name}.{f.name} = {default!r}" + (f"    # {extra}" if extra else ""))
