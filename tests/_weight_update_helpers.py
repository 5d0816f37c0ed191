"""Shared pieces of the distributed weight-update tests.

- :func:`sglang_group_function`: SGLang's own ``init_custom_process_group`` from the installed
  package (imported, or, when its module's imports are missing here, compiled from the
  installed source file by itself), to check that our group meets SGLang's.
- Run as a script (``python tests/_weight_update_helpers.py ARGS_JSON`` under
  ``launch_local``): a megatron policy takes one optimizer step and ``sync_weights`` streams
  it into a ``gvm-mega serve`` process through the distributed path.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parent))


def sglang_group_function() -> tuple[Optional[Callable], str]:
    """(SGLang's ``init_custom_process_group``, how it was found) or (None, why not)."""
    try:
        from sglang.srt.utils.common import init_custom_process_group
        return init_custom_process_group, "imported"
    except Exception as exc:  # sglang is installed without its dependencies
        why = f"{type(exc).__name__}: {exc}"
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None, "sglang is not installed (pip install 'sglang==0.5.23' --no-deps)"
    path = Path(list(spec.submodule_search_locations)[0], "srt", "utils", "common.py")
    if not path.is_file():
        return None, f"{path} is missing ({why})"
    tree = ast.parse(path.read_text())
    wanted = [node for node in tree.body
              if isinstance(node, ast.FunctionDef) and node.name == "init_custom_process_group"
              or isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "torch_release"
                                                      for t in node.targets)]
    if len(wanted) != 2:
        return None, f"init_custom_process_group not found in {path} ({why})"
    from packaging import version as pkg_version

    namespace = {"torch": torch, "pkg_version": pkg_version}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["init_custom_process_group"], f"compiled from {path} (import failed: {why})"


def sglang_request_fields(class_name: str) -> Optional[tuple[set[str], set[str]]]:
    """(all fields, fields without a default) of an SGLang request class, read from the
    installed ``sglang/srt/managers/io_struct.py``; None when it is not there."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], "srt", "managers", "io_struct.py")
    if not path.is_file():
        return None
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            fields = [n for n in node.body
                      if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
            return ({f.target.id for f in fields}, {f.target.id for f in fields if f.value is None})
    return None


def scenario_sync(args: dict) -> dict:
    """One optimizer step of a megatron policy (under a gloo default group), then
    ``sync_weights`` through a distributed-mode SGLangEngine, twice (one group)."""
    import torch.distributed as dist

    from gvm_mega.config.schema import ParallelConfig
    from gvm_mega.parallel import init_distributed
    from gvm_mega.rollout import SGLangClient, SGLangEngine, sync_weights
    from _train_worker import train
    from _weight_sync_worker import make_policy, policy_gap, requests

    init_distributed(ParallelConfig(tp=1, pp=1), seed=3)
    policy = make_policy(args["hf_dir"])
    hf_config = json.loads(Path(args["hf_dir"], "config.json").read_text())
    # a server that cannot join fails the sync before any weight moves, naming its URL
    gone = SGLangEngine(SGLangClient([args["refused_url"]]), hf_config, args["weights_dir"],
                        weight_sync="distributed", sync_backend="gloo", sync_timeout_s=3.0)
    try:
        sync_weights(policy.model, gone, "never")
    except ValueError as exc:
        assert args["refused_url"] in str(exc) and "did not open" in str(exc), exc
    else:
        raise AssertionError("sync_weights into an unreachable server succeeded")
    remote = SGLangEngine(SGLangClient([args["url"]], request_timeout_s=60.0), hf_config,
                          args["weights_dir"], weight_sync="distributed", sync_backend="gloo",
                          sync_timeout_s=30.0)
    reqs = requests()
    before = remote.generate(reqs)
    report: dict = {"gaps": [], "syncs": []}
    try:
        for step in (1, 2):
            train(policy, [0])
            sync = sync_weights(policy.model, remote, f"step-{step}", bucket_bytes=6 * 1024)
            after = remote.generate(reqs)
            assert all(s.weight_version == f"step-{step}" for g in after for s in g)
            report["gaps"].append(policy_gap(policy, reqs, after))
            report["syncs"].append({"mode": sync.mode, "buckets": sync.buckets,
                                    "bytes": sync.bytes, "engine": sync.engine_detail})
            # the trainer's own world still works beside the update group
            x = torch.ones(1)
            dist.all_reduce(x)
            assert float(x) == 1.0
        report["stale_gap"] = policy_gap(policy, reqs, before)
        report["inits"] = remote.update_group.stats["inits"]
        report["written"] = sorted(os.listdir(args["weights_dir"])) \
            if os.path.isdir(args["weights_dir"]) else []
    finally:
        remote.close()
    return report


def main() -> None:
    args = json.loads(sys.argv[1])
    from gvm_mega.parallel import shutdown

    try:
        report = scenario_sync(args)
    finally:
        shutdown()
    Path(args["out"], "rank0.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
