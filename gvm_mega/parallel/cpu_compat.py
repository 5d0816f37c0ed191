"""Run megatron-core on machines without CUDA (CPU laptops, CI): the only place it is patched.

megatron-core assumes CUDA throughout: tensors are created with ``device="cuda"`` or
``device=torch.cuda.current_device()``, the pipeline schedules call ``torch.cuda.synchronize()``,
DDP waits on ``torch.cuda.current_stream()``, the RNG tracker saves and restores CUDA generator
states, and grad clipping asserts ``torch.cuda.FloatTensor`` grads. On a CPU-only torch build
every one of these raises. :func:`enable` makes them work on CPU:

* a :class:`torch.overrides.TorchFunctionMode` (entered on the calling thread) rewrites every
  CUDA device argument (``"cuda"``, ``"cuda:N"``, ``torch.device("cuda")``, a bare ordinal) to
  CPU, turns ``Tensor.cuda()`` into a no-op and drops ``pin_memory=True``;
* ``torch.cuda.current_device`` returns the CPU device; ``torch.cuda.synchronize`` is a no-op;
  ``torch.cuda.current_stream`` returns a stream stand-in whose waits do nothing;
* the tensor-parallel RNG tracker forks the CPU generator instead of CUDA ones, so
  ``model_parallel_cuda_manual_seed`` and dropout under tensor parallelism behave as on GPUs
  (per-TP-rank streams for model-parallel regions, a shared stream elsewhere);
* the optimizer's grad clipping scales CPU grads in place;
* newer megatron-core releases import ``triton`` unconditionally
  (``transformer/moe/ops/paged_stash.py``); when triton is missing that one module is replaced by
  an inert stand-in (paged stashing is a GPU MoE feature);
* megatron's "Apex / Transformer Engine not installed" import warnings, expected on CPU, are
  silenced.

Everything here is inactive when CUDA is available: :func:`enable` then returns ``False`` and
changes nothing. Call it before building models or initialising megatron parallel state;
:func:`gvm_mega.parallel.init_distributed` does so. :func:`disable` undoes it (for tools and
tests that continue in the same process).
"""
from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable", "disable", "is_enabled", "CudaToCpuMode"]

_CPU = torch.device("cpu")
_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"

_state: dict[str, Any] = {"mode": None, "saved": []}


def _to_cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (string, torch.device or bare ordinal) to CPU; others unchanged."""
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to CPU (see the module docstring)."""

    def __torch_function__(self, func: Callable, types_: Any, args: tuple = (), kwargs: Any = None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(
                args[1], (torch.dtype, torch.Tensor)):
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered."""

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        return None

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        return None


def _make_cpu_rng_tracker_class(base: type, default_name: str) -> type:
    """A megatron RNG tracker whose named states are CPU generator states."""

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        def set_states(self, states: dict) -> None:
            self.states_ = dict(states)

        @contextlib.contextmanager
        def fork(self, name: str = default_name):
            if name not in self.states_:
                raise RuntimeError(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    tracker_cls = _make_cpu_rng_tracker_class(mrandom.CudaRNGStatesTracker,
                                              mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME)

    def initialize_rng_tracker(*args: Any, force_reset: bool = False, **kwargs: Any) -> None:
        if force_reset or not mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED \
                or not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, tracker_cls):
            mrandom._CUDA_RNG_STATE_TRACKER = tracker_cls()
            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    _patch(mrandom, "initialize_rng_tracker", initialize_rng_tracker)
    _state["saved"].append((mrandom, "_CUDA_RNG_STATE_TRACKER", mrandom._CUDA_RNG_STATE_TRACKER))
    _state["saved"].append((mrandom, "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
                            mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED))


def _clip_grad_by_total_norm_cpu(parameters: Any, max_norm: float, total_norm: float,
                                 use_decoupled_grad: bool = False) -> None:
    """CPU version of megatron's ``clip_grad_by_total_norm_fp32``: scale grads in place."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    coeff = max_norm / (float(total_norm) + 1.0e-6)
    if coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(coeff)


def _patch(owner: Any, name: str, value: Any) -> None:
    _state["saved"].append((owner, name, getattr(owner, name, None)))
    setattr(owner, name, value)


def _stub_paged_stash_if_no_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        if _PAGED_STASH not in sys.modules:
            stub = types.ModuleType(_PAGED_STASH)
            stub.__doc__ = "Inert stand-in installed by gvm_mega.parallel.cpu_compat (no triton)."
            stub.GLOBAL_BLOCK_SIZE = 1024
            stub.paged_stash_copy_kernel = None
            stub.paged_stash_pop_kernel = None
            sys.modules[_PAGED_STASH] = stub


def is_enabled() -> bool:
    return _state["mode"] is not None


def enable() -> bool:
    """Make megatron-core run on CPU; idempotent. Returns True when the CPU layer is active.

    A no-op returning False when CUDA is available.
    """
    if torch.cuda.is_available():
        return False
    if is_enabled():
        return True
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # Expected on CPU, and printed by several megatron modules at import: not worth showing.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed",
                            category=UserWarning)
    _stub_paged_stash_if_no_triton()
    _patch(torch.cuda, "current_device", lambda: _CPU)
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch(torch.cuda, "current_stream", lambda *a, **k: _NullStream())
    import megatron.core.optimizer.optimizer as moptimizer

    _patch(moptimizer, "clip_grad_by_total_norm_fp32", _clip_grad_by_total_norm_cpu)
    _install_rng_tracker()
    mode = CudaToCpuMode()
    mode.__enter__()
    _state["mode"] = mode
    return True


def disable() -> None:
    """Undo :func:`enable` (restores every patched attribute and leaves the device mode)."""
    mode = _state["mode"]
    if mode is None:
        return
    mode.__exit__(None, None, None)
    _state["mode"] = None
    for owner, name, value in reversed(_state["saved"]):
        setattr(owner, name, value)
    _state["saved"].clear()
