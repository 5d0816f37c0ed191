"""An HTTP server that speaks SGLang's API over the embedded engine (``gvm-mega serve``).

Concurrent ``/generate`` calls are gathered into one engine batch; the next batch starts
when the current one ends. Generation runs in a worker thread so that control endpoints
(abort, pause, health) answer while a batch decodes.

Weights arrive from disk (``/update_weights_from_disk``) or by broadcast from a trainer
(``/init_weights_update_group`` once, then ``/update_weights_from_distributed`` per bucket:
a partial update of the named tensors, all of them loaded or none).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from aiohttp import web

from gvm_mega import __version__
from gvm_mega.rollout.embedded import EmbeddedEngine
from gvm_mega.rollout.protocol import BadRequest, parse_generate_body, sample_to_json
from gvm_mega.rollout.types import RolloutRequest, Sample, SamplingParams
from gvm_mega.rollout.weight_update_group import (UpdateGroupMember, join_update_group,
                                                  resolve_backend)

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """One ``/generate`` call: its prompts (n expanded by the engine) and its reply future."""

    requests: list[RolloutRequest]
    rids: list[str]
    future: asyncio.Future
    aborted: bool = False
    start: float = field(default_factory=time.time)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


class RolloutServer:
    """Owns the engine, the batching loop and the aiohttp application."""

    def __init__(self, engine: EmbeddedEngine, *, tokenizer: Any = None, model_path: str = "",
                 host: str = "127.0.0.1", port: int = 30000, max_batch_size: int = 64,
                 group_timeout_s: float = 300.0) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.host, self.port = host, port
        self.max_batch_size = max_batch_size
        self._queue: list[_Job] = []
        self._wakeup: Optional[asyncio.Event] = None
        self._running: list[_Job] = []
        self._resume = threading.Event()
        self._resume.set()
        self._pause_admission = False
        self._admission_open: Optional[asyncio.Event] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="load")
        # joins and broadcasts block until the trainer takes part; their own thread keeps
        # disk loads free meanwhile
        self._groups: dict[str, UpdateGroupMember] = {}
        self._group_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="group")
        self.group_timeout_s = group_timeout_s
        self._loop_task: Optional[asyncio.Task] = None
        self.app = self._build_app()

    # ---- app -----------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        r = app.router
        r.add_post("/generate", self.generate)
        for path in ("/health", "/health_generate"):
            r.add_get(path, self.health if path == "/health" else self.health_generate)
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self.model_info)
        for path in ("/server_info", "/get_server_info"):
            r.add_get(path, self.server_info)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_post("/abort_request", self.abort_request)
        r.add_post("/pause_generation", self.pause_generation)
        r.add_post("/continue_generation", self.continue_generation)
        r.add_post("/update_weights_from_disk", self.update_weights_from_disk)
        r.add_get("/get_weight_version", self.get_weight_version)
        r.add_post("/init_weights_update_group", self.init_weights_update_group)
        r.add_post("/update_weights_from_distributed", self.update_weights_from_distributed)
        r.add_post("/destroy_weights_update_group", self.destroy_weights_update_group)
        r.add_post("/update_weights_from_tensor", self.unsupported)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._wakeup = asyncio.Event()
        self._admission_open = asyncio.Event()
        self._admission_open.set()
        self._loop_task = asyncio.create_task(self._batch_loop())

    async def _on_cleanup(self, app: web.Application) -> None:
        self._resume.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._group_pool.shutdown(wait=False, cancel_futures=True)
        for member in self._groups.values():
            member.close()
        self._groups.clear()

    # ---- generation ----------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except Exception:
            return _error(400, "request body is not valid JSON")
        try:
            items, listed = parse_generate_body(body)
            reqs, rids = [], []
            for k, it in enumerate(items):
                ids = it.input_ids
                if ids is None:
                    if self.tokenizer is None:
                        raise BadRequest("text prompts need a tokenizer; this server has none "
                                         "(send input_ids)")
                    ids = self.tokenizer.encode(it.text)
                    if not ids:
                        raise BadRequest(f"prompt {k} encodes to zero tokens")
                reqs.append(RolloutRequest(ids, n=it.n, sampling=it.sampling))
                rids.append(it.rid or uuid.uuid4().hex)
            self._validate(reqs)
        except (BadRequest, ValueError) as exc:
            return _error(400, str(exc))
        await self._admission_open.wait()
        job = _Job(reqs, rids, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wakeup.set()
        try:
            samples: list[list[Sample]] = await job.future
        except ValueError as exc:
            return _error(400, str(exc))
        except asyncio.CancelledError:  # the client went away: stop decoding for it
            job.aborted = True
            raise
        latency = time.time() - job.start
        out = []
        for it, rid, group in zip(items, rids, samples):
            out.extend(sample_to_json(s, rid, it.return_logprob, latency) for s in group)
        return web.json_response(out if listed else out[0])

    def _validate(self, reqs: list[RolloutRequest]) -> None:
        cfg = self.engine.config
        for k, req in enumerate(reqs):
            bad = [t for t in req.prompt_ids if not 0 <= t < cfg.vocab_size]
            if bad:
                raise BadRequest(f"prompt {k}: token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
            if len(req.prompt_ids) >= cfg.max_position_embeddings:
                raise BadRequest(f"prompt {k}: {len(req.prompt_ids)} tokens do not fit the context "
                                 f"length {cfg.max_position_embeddings}")
            if req.sampling.stop and self.engine.tokenizer is None:
                raise BadRequest("stop strings need a tokenizer; this server has none")

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, size = [], 0
                while self._queue and (not batch or size + sum(r.n for r in self._queue[0].requests)
                                       <= self.max_batch_size):
                    job = self._queue.pop(0)
                    batch.append(job)
                    size += sum(r.n for r in job.requests)
                live = [j for j in batch if not j.aborted]
                for j in batch:
                    if j.aborted and not j.future.done():
                        j.future.set_result(_aborted(j.requests, self.engine.weight_version))
                if not live:
                    continue
                self._running = live
                try:
                    results = await loop.run_in_executor(self._pool, self._run, live)
                except Exception as exc:  # reported to every caller of the batch
                    log.exception("generation failed")
                    for j in live:
                        if not j.future.done():
                            j.future.set_exception(ValueError(f"generation failed: {exc}"))
                    continue
                finally:
                    self._running = []
                for j, res in zip(live, results):
                    if not j.future.done():
                        j.future.set_result(res)

    def _run(self, jobs: list[_Job]) -> list[list[list[Sample]]]:
        reqs, owner = [], []
        for j in jobs:
            reqs.extend(j.requests)
            owner.extend([j] * len(j.requests))
        flat = self.engine.generate(reqs, is_aborted=lambda i: owner[i].aborted,
                                    step_hook=self._resume.wait)
        out, k = [], 0
        for j in jobs:
            out.append(flat[k:k + len(j.requests)])
            k += len(j.requests)
        return out

    def _abort(self, rid: Optional[str], abort_all: bool) -> int:
        count = 0
        for j in self._queue + self._running:
            if abort_all or rid in j.rids:
                j.aborted = True
                count += 1
        self._wakeup.set()
        return count

    # ---- control endpoints ---------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        if self._running or self._queue:
            return web.Response(status=200)  # busy means alive, as in SGLang
        job = _Job([RolloutRequest([0], 1, _greedy_one())], ["health"],
                   asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wakeup.set()
        try:
            await asyncio.wait_for(job.future, timeout=20)
        except Exception:
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.model_path, "served_model_name": self.model_path,
            "tokenizer_path": self.model_path if self.tokenizer is not None else "",
            "is_generation": True, "preferred_sampling_params": None,
            "weight_version": self.engine.weight_version, "load_format": "safetensors",
            "reasoning_parser": None, "tool_call_parser": None})

    async def server_info(self, request: web.Request) -> web.Response:
        cfg = self.engine.config
        return web.json_response({
            "model_path": self.model_path, "served_model_name": self.model_path,
            "tokenizer_path": self.model_path if self.tokenizer is not None else "",
            "max_context_length": cfg.max_position_embeddings,
            "version": f"gvm-mega {__version__}", "host": self.host, "port": self.port,
            "internal_states": [{"running_requests": len(self._running),
                                 "queued_requests": len(self._queue),
                                 "weight_version": self.engine.weight_version}],
            "max_running_requests": self.max_batch_size, "dp_size": 1, "tp_size": 1,
            "weight_version": self.engine.weight_version})

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.engine.weight_version})

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self._running or self._queue:
            return web.Response(status=400, text="Flush cache failed: requests are running.\n")
        return web.Response(status=200, text="Cache flushed.\n")

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        self._abort(body.get("rid") or None, bool(body.get("abort_all", False)))
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        mode = body.get("mode", "abort") if isinstance(body, dict) else None
        if mode not in ("abort", "retract", "in_place"):
            return _error(400, f"mode must be 'abort', 'retract' or 'in_place', got {mode!r}")
        self._admission_open.clear()
        if mode == "abort":
            self._abort(None, abort_all=True)
        else:
            self._resume.clear()
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self._resume.set()
        self._admission_open.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        if not isinstance(body, dict) or not isinstance(body.get("model_path"), str):
            return web.json_response({"success": False, "message": "model_path (a string) is required",
                                      "num_paused_requests": 0}, status=400)
        version = body.get("weight_version")
        if not self._resume.is_set() and self._running:
            return web.json_response({"success": False, "message":
                                      "generation is paused in place with requests running; "
                                      "pause with mode=abort or continue first",
                                      "num_paused_requests": len(self._running)}, status=400)
        if body.get("abort_all_requests"):
            self._abort(None, abort_all=True)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._loader, self.engine.load_from_disk,
                                       body["model_path"], None if version is None else str(version))
        except (OSError, ValueError) as exc:
            return web.json_response({"success": False, "message": str(exc),
                                      "num_paused_requests": 0}, status=400)
        self.model_path = body["model_path"]
        return web.json_response({"success": True, "message": "Succeeded to update model weights.",
                                  "num_paused_requests": 0})

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """Join the trainer's update group as rank ``rank_offset`` (this server is one rank)."""
        body = await _json_or_empty(request)
        try:
            spec = parse_group_body(body)
            if spec["group_name"] in self._groups:
                raise BadRequest(f"weight update group {spec['group_name']!r} already exists")
            resolve_backend(spec["backend"])
        except (BadRequest, ValueError) as exc:
            return _reply(False, str(exc), 400)
        loop = asyncio.get_running_loop()
        try:
            member = await loop.run_in_executor(self._group_pool, lambda: join_update_group(
                spec["master_address"], spec["master_port"], spec["rank_offset"],
                spec["world_size"], spec["group_name"], spec["backend"], self.group_timeout_s))
        except Exception as exc:  # rendezvous failures come as several torch error types
            log.warning("joining weight update group %s failed: %s", spec["group_name"], exc)
            return _reply(False, f"Failed to initialize custom process group: {exc}", 400)
        self._groups[spec["group_name"]] = member
        return _reply(True, "Succeeded to initialize custom process group.")

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = await _json_or_empty(request)
        name = body.get("group_name", "weight_update_group") if isinstance(body, dict) else None
        member = self._groups.pop(name, None) if isinstance(name, str) else None
        if member is None:
            return _reply(False, "The group to be destroyed does not exist.", 400)
        member.close()
        return _reply(True, "Succeeded to destroy custom process group.")

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive the announced tensors from rank 0, then load all of them or none."""
        body = await _json_or_empty(request)
        try:
            spec = parse_distributed_update_body(body)
        except BadRequest as exc:
            return _reply(False, str(exc), 400)
        member = self._groups.get(spec["group_name"])
        if member is None:
            return _reply(False, f"weight update group {spec['group_name']!r} does not exist; "
                                 "call /init_weights_update_group first", 400)
        loop = asyncio.get_running_loop()

        def receive() -> dict[str, torch.Tensor]:
            # every announced tensor is received, even ones that will be refused: the
            # broadcast is collective, and skipping one would leave the group out of step
            return {name: member.broadcast(torch.empty(shape, dtype=dtype, device=member.device))
                    for name, dtype, shape in zip(spec["names"], spec["dtypes"], spec["shapes"])}

        try:
            received = await loop.run_in_executor(self._group_pool, receive)
        except Exception as exc:
            self._groups.pop(spec["group_name"], None)
            member.close()
            return _reply(False, f"Failed to receive the weights (the group is closed): {exc}", 400)
        if spec["abort_all_requests"]:
            self._abort(None, abort_all=True)
        if not self._resume.is_set() and self._running:
            return _reply(False, "generation is paused in place with requests running; pause "
                                 "with mode=abort or continue first", 400)
        version = spec["weight_version"]
        try:
            await loop.run_in_executor(self._loader, lambda: self.engine.update_weights(
                received, version, strict=False))
        except ValueError as exc:  # nothing was swapped in: the check precedes the swap
            return _reply(False, f"Failed to update parameter online: {exc}", 400)
        return _reply(True, "Succeeded to update parameter online.")

    async def unsupported(self, request: web.Request) -> web.Response:
        return web.json_response({"success": False, "message":
                                  f"{request.path} needs a GPU SGLang server; the embedded server "
                                  "loads weights with /update_weights_from_disk"}, status=400)

    # ---- running -------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until interrupted."""
        web.run_app(self.app, host=self.host, port=self.port, access_log=None,
                    handler_cancellation=True,
                    print=lambda _: print(f"gvm-mega serve: listening on http://{self.host}:{self.port}",
                                          flush=True))


def _reply(success: bool, message: str, status: int = 200) -> web.Response:
    return web.json_response({"success": success, "message": message}, status=status)


def _field(body: dict, key: str, kind: type, default: Any = ...) -> Any:
    if key not in body:
        if default is ...:
            raise BadRequest(f"{key} is required")
        return default
    value = body[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def parse_group_body(body: Any) -> dict[str, Any]:
    """The fields of ``/init_weights_update_group`` (SGLang's InitWeightsUpdateGroupReqInput)."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    spec = {"master_address": _field(body, "master_address", str),
            "master_port": _field(body, "master_port", int),
            "rank_offset": _field(body, "rank_offset", int),
            "world_size": _field(body, "world_size", int),
            "group_name": _field(body, "group_name", str, "weight_update_group"),
            "backend": _field(body, "backend", str, "nccl")}
    if not 0 < spec["rank_offset"] < spec["world_size"]:
        raise BadRequest(f"rank_offset {spec['rank_offset']} must lie in [1, world_size="
                         f"{spec['world_size']})")
    if not 0 < spec["master_port"] < 65536:
        raise BadRequest(f"master_port {spec['master_port']} is not a TCP port")
    if not spec["group_name"]:
        raise BadRequest("group_name must not be empty")
    return spec


def parse_distributed_update_body(body: Any) -> dict[str, Any]:
    """The fields of ``/update_weights_from_distributed`` (SGLang's
    UpdateWeightsFromDistributedReqInput), with dtypes as torch dtypes."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    names = _field(body, "names", list)
    dtypes = _field(body, "dtypes", list)
    shapes = _field(body, "shapes", list)
    if not len(names) == len(dtypes) == len(shapes):
        raise BadRequest(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
    torch_dtypes = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        if not isinstance(name, str):
            raise BadRequest(f"tensor name {name!r} is not a string")
        found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(found, torch.dtype):
            raise BadRequest(f"{name}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and d >= 0 for d in shape):
            raise BadRequest(f"{name}: shape {shape!r} is not a list of sizes")
        torch_dtypes.append(found)
    load_format = body.get("load_format")
    if load_format is not None:
        raise BadRequest(f"load_format {load_format!r} is not supported (tensors are sent one "
                         "by one)")
    version = body.get("weight_version")
    return {"names": names, "dtypes": torch_dtypes, "shapes": shapes,
            "group_name": _field(body, "group_name", str, "weight_update_group"),
            "abort_all_requests": bool(body.get("abort_all_requests", False)),
            "weight_version": None if version is None else str(version)}


def _greedy_one() -> SamplingParams:
    return SamplingParams(max_new_tokens=1, temperature=0.0)


def _aborted(requests: list[RolloutRequest], version: str) -> list[list[Sample]]:
    return [[Sample([], [], "abort", version, matched="aborted before it started",
                    text="", prompt_tokens=len(r.prompt_ids)) for _ in range(r.n)] for r in requests]


async def _json_or_empty(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    try:
        return await request.json()
    except Exception:
        return None
