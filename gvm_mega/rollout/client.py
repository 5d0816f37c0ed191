"""Async client for SGLang servers (or an sglang-router, or ``gvm-mega serve``).

Every requested sample is a slot ``(request, index)``. A slot is filled by exactly one
finished (non-aborted) reply; aborted replies and failed attempts are resubmitted, to another
server when one is down. ``generate`` returns only when every slot is filled, or raises
:class:`RolloutError` saying which request failed and why. Requests with a ``sampling_seed``
are sent one sample per HTTP request with that sample's own seed, so a resubmission draws
the same tokens (SGLang honours ``sampling_seed`` only when launched with
``--enable-deterministic-inference``; ``gvm-mega serve`` always does); unseeded requests send
up to ``max_n_per_request`` samples with ``n``.
"""
from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import aiohttp

from gvm_mega.rollout.embedded import sample_seed
from gvm_mega.rollout.protocol import BadReply, sample_from_json
from gvm_mega.rollout.types import RolloutRequest, Sample

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """A rollout that could not deliver every requested sample exactly once."""


class _Retryable(Exception):
    """A failed attempt worth repeating (connection error, timeout, HTTP 5xx)."""

    def __init__(self, message: str, server_down: bool = False) -> None:
        super().__init__(message)
        self.server_down = server_down


@dataclass
class _Server:
    url: str
    inflight: int = 0
    down_until: float = 0.0
    failures: int = 0


@dataclass
class _Chunk:
    request_index: int
    slots: list[int]


class SGLangClient:
    """Sends rollout requests to SGLang-compatible servers and accounts for every sample.

    ``urls`` are the endpoints that receive ``/generate`` (servers, or one router).
    ``worker_urls`` receive control calls (weight updates); default: ``urls``. Pass the
    servers behind a router here, since a router does not forward every control endpoint.
    """

    def __init__(self, urls: Sequence[str], *, worker_urls: Optional[Sequence[str]] = None,
                 concurrency: int = 64, request_timeout_s: float = 600.0, max_retries: int = 3,
                 backoff_s: float = 0.2, max_backoff_s: float = 5.0, max_abort_resubmits: int = 8,
                 server_cooldown_s: float = 2.0, max_n_per_request: int = 64,
                 check_weight_version: bool = True,
                 on_sample: Optional[Callable[[int, int, Sample], None]] = None) -> None:
        if not urls:
            raise ValueError("SGLangClient needs at least one server or router URL")
        if concurrency < 1 or max_retries < 0 or max_n_per_request < 1:
            raise ValueError("concurrency and max_n_per_request must be >= 1, max_retries >= 0")
        self.servers = [_Server(u.rstrip("/")) for u in urls]
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or urls)]
        self.concurrency = concurrency
        self.request_timeout_s = request_timeout_s
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_abort_resubmits = max_abort_resubmits
        self.server_cooldown_s = server_cooldown_s
        self.max_n_per_request = max_n_per_request
        self.check_weight_version = check_weight_version
        self.on_sample = on_sample
        self.expected_weight_version: Optional[str] = None
        self.stats = {"http_requests": 0, "retries": 0, "aborts_resubmitted": 0, "failovers": 0}

    # ---- generation ----------------------------------------------------------------------
    async def generate(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        """``requests[i].n`` samples for every request, per request, in order."""
        results: list[list[Optional[Sample]]] = [[None] * r.n for r in requests]
        chunks = []
        for i, req in enumerate(requests):
            if not isinstance(req, RolloutRequest):
                raise TypeError(f"request {i}: expected RolloutRequest, got {type(req).__name__}")
            step = 1 if req.sampling.sampling_seed is not None else self.max_n_per_request
            chunks.extend(_Chunk(i, list(range(s, min(s + step, req.n))))
                          for s in range(0, req.n, step))
        sem = asyncio.Semaphore(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [asyncio.create_task(self._run_chunk(session, sem, c, requests, results))
                     for c in chunks]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        missing = [(i, j) for i, row in enumerate(results) for j, s in enumerate(row) if s is None]
        if missing:
            raise RolloutError(f"{len(missing)} samples never came back, first {missing[0]}")
        return results  # type: ignore[return-value]

    def generate_sync(self, requests: Sequence[RolloutRequest]) -> list[list[Sample]]:
        """Blocking ``generate`` for callers without an event loop."""
        return asyncio.run(self.generate(requests))

    async def _run_chunk(self, session: aiohttp.ClientSession, sem: asyncio.Semaphore,
                         chunk: _Chunk, requests: Sequence[RolloutRequest],
                         results: list[list[Optional[Sample]]]) -> None:
        req = requests[chunk.request_index]
        pending = list(chunk.slots)
        failures = aborts = 0
        failed_url = None
        while pending:
            server = await self._pick_server()
            if failed_url is not None and server.url != failed_url:
                self.stats["failovers"] += 1
            failed_url = None
            rid = uuid.uuid4().hex
            body = self._body(req, pending, rid)
            try:
                async with sem:
                    reply = await self._post_generate(session, server, body, rid)
            except _Retryable as exc:
                failures += 1
                failed_url = server.url
                self.stats["retries"] += 1
                if exc.server_down:
                    server.down_until = time.monotonic() + self.server_cooldown_s
                if failures > self.max_retries:
                    raise RolloutError(f"request {chunk.request_index}: gave up after "
                                       f"{failures} failed attempts; last: {exc}") from None
                await asyncio.sleep(self._backoff(failures))
                continue
            items = reply if isinstance(reply, list) else [reply]
            if len(items) != len(pending):
                raise RolloutError(f"request {chunk.request_index}: {server.url} returned "
                                   f"{len(items)} samples for n={len(pending)}")
            still = []
            for slot, item in zip(pending, items):
                try:
                    sample = sample_from_json(item, len(req.prompt_ids))
                except BadReply as exc:
                    raise RolloutError(f"request {chunk.request_index}: {server.url}: {exc}") from None
                if sample.finish_reason == "abort":
                    still.append(slot)
                    continue
                self._check_version(sample, server.url)
                if results[chunk.request_index][slot] is not None:
                    raise RolloutError(f"sample {slot} of request {chunk.request_index} "
                                       "came back twice")
                results[chunk.request_index][slot] = sample
                if self.on_sample is not None:
                    self.on_sample(chunk.request_index, slot, sample)
            if still:
                aborts += 1
                self.stats["aborts_resubmitted"] += len(still)
                if aborts > self.max_abort_resubmits:
                    raise RolloutError(f"request {chunk.request_index}: still aborted after "
                                       f"{aborts} resubmissions")
                await asyncio.sleep(self._backoff(aborts))
            pending = still

    def _body(self, req: RolloutRequest, slots: list[int], rid: str) -> dict:
        params = req.sampling.to_sglang()
        if req.sampling.sampling_seed is not None:
            params["sampling_seed"] = sample_seed(req.sampling.sampling_seed, slots[0])
        if len(slots) > 1:
            params["n"] = len(slots)
        return {"input_ids": list(req.prompt_ids), "sampling_params": params,
                "return_logprob": True, "rid": rid}

    async def _post_generate(self, session: aiohttp.ClientSession, server: _Server, body: dict,
                             rid: str) -> Any:
        server.inflight += 1
        self.stats["http_requests"] += 1
        try:
            timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
            async with session.post(server.url + "/generate", json=body, timeout=timeout) as resp:
                if resp.status >= 500 or resp.status == 429:
                    text = await resp.text()
                    raise _Retryable(f"{server.url}: HTTP {resp.status}: {text[:300]}",
                                     server_down=resp.status in (502, 503, 504))
                if resp.status != 200:
                    text = await resp.text()
                    raise RolloutError(f"{server.url} rejected the request (HTTP {resp.status}): "
                                       f"{text[:500]}")
                server.failures = 0
                return await resp.json(content_type=None)
        except asyncio.TimeoutError:
            asyncio.ensure_future(self._abort_quietly(session, server.url, rid))
            raise _Retryable(f"{server.url}: no reply within {self.request_timeout_s}s") from None
        except aiohttp.ClientError as exc:
            server.failures += 1
            raise _Retryable(f"{server.url}: {type(exc).__name__}: {exc}", server_down=True) from None
        finally:
            server.inflight -= 1

    async def _abort_quietly(self, session: aiohttp.ClientSession, url: str, rid: str) -> None:
        try:
            async with session.post(url + "/abort_request", json={"rid": rid},
                                    timeout=aiohttp.ClientTimeout(total=5)):
                pass
        except Exception:
            pass

    async def _pick_server(self) -> _Server:
        while True:
            now = time.monotonic()
            up = [s for s in self.servers if s.down_until <= now]
            if up:
                return min(up, key=lambda s: s.inflight)
            await asyncio.sleep(max(0.01, min(s.down_until for s in self.servers) - now))

    def _backoff(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)

    def _check_version(self, sample: Sample, url: str) -> None:
        want = self.expected_weight_version
        if self.check_weight_version and want is not None and sample.weight_version != want:
            raise RolloutError(f"{url} answered with weight version {sample.weight_version!r}, "
                               f"expected {want!r} (did its weight update fail?)")

    # ---- weights -------------------------------------------------------------------------
    async def update_weights_from_disk(self, model_path: str, version: str, *,
                                       abort_all_requests: bool = False) -> dict[str, float]:
        """Tell every worker to load ``model_path`` as ``version`` and check that they did.

        Returns ``{"seconds": ...}``. Replies to later ``generate`` calls must carry ``version``.
        """
        start = time.perf_counter()
        body = {"model_path": model_path, "weight_version": str(version),
                "abort_all_requests": abort_all_requests}
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._control(session, url, "/update_weights_from_disk", body)
                                   for url in self.worker_urls))
            await self._verify_version(session, str(version))
        self.expected_weight_version = str(version)
        return {"seconds": time.perf_counter() - start}

    async def init_weights_update_group(self, master_address: str, master_port: int,
                                        world_size: int, rank_offsets: Sequence[int], *,
                                        group_name: str = "weight_update_group",
                                        backend: str = "nccl", timeout_s: Optional[float] = None,
                                        join: Optional[Callable[[], Any]] = None) -> Any:
        """Ask every worker to join the trainer's update group (trainer is rank 0).

        ``rank_offsets[k]`` is the first rank of worker k (1 + the ranks of the workers before
        it). The workers answer only once every rank is in, so the trainer joins at the same
        time: ``join()`` runs in a thread meanwhile and its result is returned. A worker that
        fails or does not answer within ``timeout_s`` raises :class:`RolloutError` with its URL.
        """
        if len(rank_offsets) != len(self.worker_urls):
            raise ValueError(f"{len(rank_offsets)} rank offsets for {len(self.worker_urls)} workers")
        timeout = timeout_s or self.request_timeout_s
        async with aiohttp.ClientSession() as session:
            posts = {url: self._control(session, url, "/init_weights_update_group", {
                "master_address": master_address, "master_port": master_port,
                "rank_offset": off, "world_size": world_size, "group_name": group_name,
                "backend": backend}, timeout_s=timeout)
                for url, off in zip(self.worker_urls, rank_offsets)}
            return await _beside(posts, join, timeout, "joining the weight update group")

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group", *,
                                           timeout_s: Optional[float] = None) -> None:
        """Ask every worker to leave the update group ``group_name``."""
        timeout = timeout_s or self.request_timeout_s
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._control(session, url, "/destroy_weights_update_group",
                                                 {"group_name": group_name}, timeout_s=timeout)
                                   for url in self.worker_urls))

    async def update_weights_from_distributed(
            self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
            version: Optional[str], broadcast: Optional[Callable[[], Any]], *,
            group_name: str = "weight_update_group", timeout_s: Optional[float] = None,
            flush_cache: bool = True) -> dict[str, float]:
        """Announce one bucket of tensors to every worker while ``broadcast()`` sends them.

        ``broadcast`` runs in a thread and must broadcast each tensor from rank 0 of the update
        group, in ``names`` order. With ``version`` the workers take that weight version (and
        later replies must carry it); ``None`` leaves it as is (a bucket before the last).
        A :class:`RolloutError` has ``collective_done`` set when the broadcast itself finished
        (a worker refused the tensors afterwards, the group is still in step).
        """
        start = time.perf_counter()
        timeout = timeout_s or self.request_timeout_s
        body: dict[str, Any] = {"names": list(names), "dtypes": list(dtypes),
                                "shapes": [list(s) for s in shapes], "group_name": group_name,
                                "flush_cache": flush_cache}
        if version is not None:
            body["weight_version"] = str(version)
        async with aiohttp.ClientSession() as session:
            posts = {url: self._control(session, url, "/update_weights_from_distributed", body,
                                        timeout_s=timeout) for url in self.worker_urls}
            await _beside(posts, broadcast, timeout, "broadcasting the weights", settle_s=2.0)
            if version is not None:
                await self._verify_version(session, str(version))
        if version is not None:
            self.expected_weight_version = str(version)
        return {"seconds": time.perf_counter() - start}

    async def _control(self, session: aiohttp.ClientSession, url: str, path: str,
                       body: dict, timeout_s: Optional[float] = None) -> dict:
        timeout = timeout_s or self.request_timeout_s
        try:
            async with session.post(url + path, json=body,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                try:
                    data = await resp.json(content_type=None)
                except Exception:
                    data = {}
        except asyncio.TimeoutError:
            raise RolloutError(f"{url}{path}: no answer within {timeout}s") from None
        except aiohttp.ClientError as exc:
            raise RolloutError(f"{url}{path}: {type(exc).__name__}: {exc}") from None
        if resp.status != 200 or (isinstance(data, dict) and data.get("success") is False):
            raise RolloutError(f"{url}{path} failed (HTTP {resp.status}): {text[:500]}")
        return data if isinstance(data, dict) else {}

    async def _verify_version(self, session: aiohttp.ClientSession, version: str) -> None:
        for url in self.worker_urls:
            info = await self.get_json(url, "/model_info", session)
            if str(info.get("weight_version")) != version:
                raise RolloutError(f"{url} reports weight version {info.get('weight_version')!r} "
                                   f"after an update to {version!r}")

    # ---- misc ----------------------------------------------------------------------------
    async def get_json(self, url: str, path: str,
                       session: Optional[aiohttp.ClientSession] = None) -> dict:
        """GET ``url + path`` and decode its JSON body."""
        own = session is None
        session = session or aiohttp.ClientSession()
        try:
            async with session.get(url + path, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                if resp.status != 200:
                    raise RolloutError(f"{url}{path}: HTTP {resp.status}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RolloutError(f"{url}{path}: {type(exc).__name__}: {exc}") from None
        finally:
            if own:
                await session.close()

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Wait until every URL answers ``/health`` with 200."""
        deadline = time.monotonic() + timeout_s
        urls = sorted({s.url for s in self.servers} | set(self.worker_urls))
        async with aiohttp.ClientSession() as session:
            for url in urls:
                while True:
                    try:
                        async with session.get(url + "/health",
                                               timeout=aiohttp.ClientTimeout(total=2)) as resp:
                            if resp.status == 200:
                                break
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass
                    if time.monotonic() > deadline:
                        raise RolloutError(f"{url} not healthy after {timeout_s}s")
                    await asyncio.sleep(0.1)


async def _in_thread(fn: Callable[[], Any], name: str) -> Any:
    """``fn()`` in a daemon thread. Unlike ``asyncio.to_thread`` nothing waits for a thread
    stuck in a collective when the caller gives up (``asyncio.run`` would join it)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def target() -> None:
        try:
            outcome = (True, fn())
        except BaseException as exc:  # handed to the awaiting side
            outcome = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is gone: the caller already failed
            pass

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


async def _beside(posts: dict[str, Any], blocking: Optional[Callable[[], Any]],
                  timeout_s: float, what: str, settle_s: float = 0.0) -> Any:
    """Await the control calls ``posts`` (one per URL) while ``blocking()`` runs in a thread.

    A failing call fails at once with its URL; the thread's own error is reported only when
    every call came back, since the calls say more (which server) than a timed-out collective.
    On failure the thread gets ``settle_s`` more to finish (a worker's refusal can arrive just
    before the news that the collective completed) before ``collective_done`` is decided.
    """
    tasks = [asyncio.ensure_future(p) for p in posts.values()]
    side = asyncio.ensure_future(asyncio.wait_for(_in_thread(blocking, what), timeout_s)) \
        if blocking is not None else None
    try:
        for next_done in asyncio.as_completed(tasks):
            await next_done
        if side is None:
            return None
        try:
            return await side
        except asyncio.TimeoutError:
            raise RolloutError(f"{what}: this side did not finish within {timeout_s}s") from None
        except RolloutError:
            raise
        except Exception as exc:
            raise RolloutError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except RolloutError as exc:
        if side is not None and not side.done() and settle_s > 0:
            await asyncio.wait([side], timeout=min(settle_s, timeout_s))
        exc.collective_done = side is not None and side.done() and not side.cancelled() \
            and side.exception() is None
        raise
    finally:
        for t in tasks + ([side] if side is not None else []):
            if not t.done():
                t.cancel()
