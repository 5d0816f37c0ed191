"""Weights to SGLang servers by broadcast: the trainer is rank 0 of a group the servers join.

SGLang's protocol (``/init_weights_update_group`` + ``/update_weights_from_distributed``):

- rank 0 (the trainer) hosts a TCPStore at ``master_address:master_port``; server k joins as
  ranks ``rank_offset_k .. rank_offset_k + tp_size_k - 1`` of a world of ``1 + sum(tp_size)``;
- the process group is built on ``PrefixStore(group_name, store)``, laid out as
  ``torch.distributed`` lays out any group of that name and backend, so a group made here and
  one made by SGLang's ``init_custom_process_group`` meet;
- per update, the servers are told the tensors' names, dtypes and shapes over HTTP while rank 0
  broadcasts each tensor, in ``names`` order.

The group is built beside the trainer's default process group (torchrun's world), never
registered in it: collectives of the trainer's world are not affected. :func:`join_update_group`
is the one place that builds it, for the trainer (rank 0) and for ``gvm-mega serve``.
"""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import socket
import time
import uuid
from typing import Any, Mapping, Optional, Sequence
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from gvm_mega.rollout.client import RolloutError, SGLangClient

log = logging.getLogger(__name__)

__all__ = ["UpdateGroupMember", "WeightUpdateGroup", "dtype_name", "join_update_group",
           "resolve_backend"]


def resolve_backend(backend: str) -> str:
    """``auto``: NCCL when CUDA and NCCL are available, else gloo."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weight update backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ValueError("weight update backend 'nccl' needs CUDA and NCCL; use 'gloo' on CPU")
    return backend


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as SGLang reads it (``getattr(torch, name)``): ``float32``, ``bfloat16``..."""
    return str(dtype).removeprefix("torch.")


class UpdateGroupMember:
    """One rank's handle on an update group: ``broadcast`` from rank 0, ``close``."""

    def __init__(self, backend: Any, store: Any, rank: int, world_size: int, name: str,
                 kind: str) -> None:
        self._backend, self._store = backend, store
        self.rank, self.world_size, self.name, self.kind = rank, world_size, name, kind
        self.device = torch.device("cuda", torch.cuda.current_device()) if kind == "nccl" \
            else torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Send ``tensor`` (rank 0) or fill it (other ranks) in place; blocks until done."""
        if self._backend is None:
            raise RuntimeError(f"weight update group {self.name!r} is closed")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        self._backend.broadcast([tensor], opts).wait()
        if self.kind == "nccl":
            torch.cuda.current_stream(tensor.device).synchronize()
        return tensor

    def close(self) -> None:
        backend, self._backend, self._store = self._backend, None, None
        shutdown = getattr(backend, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception as exc:  # a peer already gone; nothing left to free
                log.debug("closing weight update group %s: %s", self.name, exc)


def join_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                      group_name: str, backend: str, timeout_s: float,
                      store: Optional[Any] = None) -> UpdateGroupMember:
    """Join (rank > 0) or open (rank 0) the update group; blocks until every rank is in.

    Rank 0 may pass the TCPStore it hosts (so it can bind the port before the others
    connect); other ranks connect to ``master_address:master_port``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if not group_name:
        raise ValueError("group_name must not be empty")
    kind = resolve_backend(backend)
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        # a client's "wait" only counts it in, which a master built with wait_for_workers
        # (as SGLang-based trainers build theirs) waits for; rank 0 here waits for no one, as
        # the group's own rendezvous below waits for every rank anyway
        store = dist.TCPStore(master_address, int(master_port), world_size, rank == 0, timeout,
                              wait_for_workers=rank != 0, multi_tenant=rank == 0)
    # the keys torch.distributed uses for a group named group_name on this device, under the
    # group-name prefix SGLang adds: both sides must agree on every level
    device = "cuda" if kind == "nccl" else "cpu"
    scoped = dist.PrefixStore(f"{device}/", dist.PrefixStore(
        f"{group_name}/", dist.PrefixStore(group_name, store)))
    if kind == "gloo":
        member = dist.ProcessGroupGloo(scoped, rank, world_size, timeout)
    else:
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        opts.group_name = group_name
        member = dist.ProcessGroupNCCL(scoped, rank, world_size, opts)
    member._set_sequence_number_for_group()  # rank 0 publishes it, the others read it
    return UpdateGroupMember(member, store, rank, world_size, group_name, kind)


def _route_address(urls: Sequence[str]) -> str:
    """The address servers can reach this process at: loopback for local servers, else the
    local address the OS routes to the first server from (no packet is sent)."""
    hosts = [urlparse(u).hostname or "127.0.0.1" for u in urls]

    def loopback(h: str) -> bool:
        if h == "localhost":
            return True
        try:
            return ipaddress.ip_address(h).is_loopback
        except ValueError:
            return False

    if all(loopback(h) for h in hosts):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((hosts[0], urlparse(urls[0]).port or 80))
        return s.getsockname()[0]


class WeightUpdateGroup:
    """The trainer's end: open the group with every server of ``client.worker_urls``, then
    stream buckets of HF tensors into them; ``close`` tears it down.

    ``ranks_per_server[k]`` is how many ranks server k takes (its tensor-parallel size);
    default: each server's ``tp_size`` from ``/server_info``. Every step is bounded by
    ``timeout_s``; a server that does not join or answers an error fails the call with its URL.
    A failed broadcast leaves the group unusable: the next ``send`` opens a new one.
    """

    def __init__(self, client: SGLangClient, *, backend: str = "auto",
                 master_address: Optional[str] = None, master_port: int = 0,
                 group_name: Optional[str] = None, timeout_s: float = 120.0,
                 ranks_per_server: Optional[Sequence[int]] = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.client = client
        self.backend = resolve_backend(backend)
        self.master_address = master_address or _route_address(client.worker_urls)
        self.master_port = int(master_port)
        self.base_name = group_name or "gvm-weights"
        self.timeout_s = float(timeout_s)
        self.ranks_per_server = list(ranks_per_server) if ranks_per_server is not None else None
        self._member: Optional[UpdateGroupMember] = None
        self.group_name: Optional[str] = None
        self.stats = {"inits": 0, "buckets": 0, "tensors": 0, "bytes": 0}

    @property
    def is_open(self) -> bool:
        return self._member is not None

    # ---- lifecycle -----------------------------------------------------------------------
    def open(self) -> float:
        """Open the group (no-op when open); returns the seconds it took."""
        if self._member is not None:
            return 0.0
        start = time.perf_counter()
        urls = self.client.worker_urls
        ranks = self.ranks_per_server or asyncio.run(self._tp_sizes(urls))
        if len(ranks) != len(urls) or any(int(r) < 1 for r in ranks):
            raise ValueError(f"ranks_per_server {ranks} does not give >= 1 rank to each of "
                             f"{len(urls)} servers")
        offsets = [1 + sum(ranks[:k]) for k in range(len(ranks))]
        world = 1 + sum(ranks)
        # a fresh name per group: a server still holding a broken group of the old name is
        # not in the way of the new one
        name = f"{self.base_name}-{uuid.uuid4().hex[:8]}"
        timeout = datetime.timedelta(seconds=self.timeout_s)
        store = dist.TCPStore(self.master_address, self.master_port, world, True, timeout,
                              wait_for_workers=False, multi_tenant=True)
        port = store.port
        member = asyncio.run(self.client.init_weights_update_group(
            self.master_address, port, world, offsets, group_name=name, backend=self.backend,
            timeout_s=self.timeout_s,
            join=lambda: join_update_group(self.master_address, port, 0, world, name,
                                           self.backend, self.timeout_s, store=store)))
        self._member, self.group_name = member, name
        self.stats["inits"] += 1
        log.info("weight update group %s open: %d servers, world %d, %s via %s:%d",
                 name, len(urls), world, self.backend, self.master_address, port)
        return time.perf_counter() - start

    async def _tp_sizes(self, urls: Sequence[str]) -> list[int]:
        infos = [await self.client.get_json(u, "/server_info") for u in urls]
        return [int(i.get("tp_size") or 1) for i in infos]

    def close(self) -> None:
        """Ask every server to drop the group, then drop it here (best effort: a server that
        is gone does not stop the others)."""
        member, self._member = self._member, None
        if member is None:
            return
        try:
            asyncio.run(self.client.destroy_weights_update_group(member.name,
                                                                 timeout_s=self.timeout_s))
        except RolloutError as exc:
            log.warning("closing weight update group %s: %s", member.name, exc)
        member.close()

    def __enter__(self) -> "WeightUpdateGroup":
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- updates -------------------------------------------------------------------------
    def send(self, tensors: Mapping[str, torch.Tensor], version: Optional[str] = None,
             *, flush_cache: bool = True) -> dict[str, float]:
        """Announce ``tensors`` to every server and broadcast them (opening the group first
        when needed). With ``version`` the servers switch to that weight version once these
        tensors are in (pass it with the last bucket of an update)."""
        start = time.perf_counter()
        init_s = self.open()
        member = self._member
        names = list(tensors)
        items = [tensors[n] for n in names]
        nbytes = sum(t.numel() * t.element_size() for t in items)

        def broadcast() -> None:
            for t in items:
                member.broadcast(t.detach().to(member.device).contiguous())

        try:
            asyncio.run(self.client.update_weights_from_distributed(
                names, [dtype_name(t.dtype) for t in items], [list(t.shape) for t in items],
                version, broadcast, group_name=member.name, timeout_s=self.timeout_s,
                flush_cache=flush_cache))
        except RolloutError as exc:
            if not getattr(exc, "collective_done", False):
                # some rank did not take part in the broadcast: the group is out of step
                self._member = None
                member.close()
            raise
        self.stats["buckets"] += 1
        self.stats["tensors"] += len(names)
        self.stats["bytes"] += nbytes
        return {"init_s": init_s, "send_s": time.perf_counter() - start - init_s,
                "bytes": float(nbytes)}
