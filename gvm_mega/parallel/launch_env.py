"""Where this process sits in the job: rank, world size and rendezvous address.

Read from torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
or from SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODELIST``), so the
same entry point runs under ``torchrun``, under ``srun`` directly, and as a plain single process.
torchrun's variables win when both are present (``srun`` + ``torchrun`` per node).
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Literal, Mapping, Optional

__all__ = ["LaunchEnv", "detect_launch_env", "expand_slurm_nodelist", "find_free_port",
           "usable_cpus"]

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: Literal["torchrun", "slurm", "single"]

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_addr}:{self.master_port}"


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_host(pattern: str) -> list[str]:
    match = re.search(r"\[([^\]]+)\]", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    out: list[str] = []
    for item in match.group(1).split(","):
        lo, sep, hi = item.partition("-")
        if not sep:
            values = [lo]
        else:
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range '{item}' in SLURM node list '{pattern}'")
            values = [str(v).zfill(len(lo)) for v in range(int(lo), int(hi) + 1)]
        for value in values:
            out.extend(_expand_host(head + value + tail))
    return out


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list, e.g. ``gpu[01-03,07],login1`` -> 4+1 hosts."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        hosts.extend(_expand_host(part))
    if not hosts:
        raise ValueError(f"empty SLURM node list '{nodelist}'")
    return hosts


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size and rendezvous address from torchrun, SLURM, or a lone process.

    Under SLURM without ``MASTER_ADDR`` the first host of ``SLURM_NODELIST`` (or
    ``SLURM_JOB_NODELIST``) is the rendezvous host; without ``MASTER_PORT`` the port is
    ``20000 + SLURM_JOB_ID % 10000`` so all tasks of one job agree. A lone process rendezvouses
    with itself on a free loopback port.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_MASTER_PORT
        source: Literal["torchrun", "slurm", "single"] = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        else:
            nodelist = env.get("SLURM_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ValueError("SLURM launch without MASTER_ADDR needs SLURM_NODELIST "
                                 "(or SLURM_JOB_NODELIST) to pick the rendezvous host")
            addr = expand_slurm_nodelist(nodelist)[0]
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = 20000 + _int_env(env, "SLURM_JOB_ID") % 10000
        else:
            port = DEFAULT_MASTER_PORT
        source = "slurm"
    else:
        return LaunchEnv(0, 1, 0, "127.0.0.1", find_free_port(), "single")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of size {world} ({source} environment)")
    return LaunchEnv(rank, world, local, addr, port, source)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, as under SLURM
    or taskset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
