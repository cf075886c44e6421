"""Backends: interchangeable implementations of the MoE layer's hot steps.

Every backend is a module with the functions of the :class:`~.interface.Backend` Protocol
(``backends/interface.py``: the signatures, what each computes, which carry gradients):

    prune_capacity, count_tokens_per_expert, exclusive_prefix_sum, stable_positions,
    scatter_rows, gather_combine, grouped_matmul, expert_feed_forward, softmax_top_k_route, sigmoid_top_k_route

plus ``available(device) -> (ok, reason)`` and ``NAME``. The layer asks :func:`get_backend` for one by
the name in its config: a name in :data:`REGISTRY` (``"reference"``: plain PyTorch; ``"numba"``:
numba.cuda kernels for CUDA tensors, numba's CPU target otherwise) or ``"auto"``: the first backend
of :data:`AUTO_PREFERENCE` that can run here. A forced backend that cannot run raises an error that
says why; "auto" never does.

This folder is installed as ``fastmoe_edu.backends`` (see pyproject.toml), never as a top-level
module called ``backends``.
"""
from __future__ import annotations

import functools
import importlib

import torch

from .interface import Backend, HasThreadPool, missing_members

#: Backend name -> its module in this folder. Adding a backend = one new module + one line here.
REGISTRY = {"reference": "reference", "numba": "numba_backend"}

#: What "auto" picks: the first of these that imports and is available on the device.
AUTO_PREFERENCE = ("numba", "reference")

#: Every name a config may give (the registered backends, then "auto").
BACKEND_NAMES = (*REGISTRY, "auto")


def check_backend_name(name: str) -> None:
    """Raise ValueError unless ``name`` is registered or "auto" (read from REGISTRY at each call)."""
    allowed = (*REGISTRY, "auto")
    if name not in allowed:
        raise ValueError(f"backend={name!r} is not a known backend; allowed: {', '.join(allowed)}")


@functools.cache
def _checked(module):
    """``module`` itself, if it has every member of the Backend Protocol (checked once per module)."""
    missing = missing_members(module)
    if missing:
        raise TypeError(f"backend module {module.__name__} lacks {', '.join(missing)} "
                        f"(the members of the Backend Protocol in backends/interface.py)")
    return module


def _load(name: str):
    """The registered backend module ``name`` (ImportError if it cannot be imported here)."""
    return _checked(importlib.import_module(f"{__name__}.{REGISTRY[name]}"))


def _auto(device: torch.device):
    """The first backend of AUTO_PREFERENCE that imports and is available on ``device``."""
    for name in AUTO_PREFERENCE:
        try:
            module = _load(name)
        except ImportError:
            continue
        if module.available(device)[0]:
            return module
    raise RuntimeError(f"backend='auto': none of {', '.join(AUTO_PREFERENCE)} can run on device {device}")


def get_backend(name: str, device: torch.device | str = "cpu") -> Backend:
    """The backend module called ``name`` for tensors on ``device`` (raises if it cannot run there)."""
    check_backend_name(name)
    device = torch.device(device)
    if name == "auto":
        return _auto(device)
    try:
        module = _load(name)
    except ImportError as error:
        raise RuntimeError(f"backend={name!r} cannot be imported here: {error}") from error
    ok, reason = module.available(device)
    if not ok:
        raise RuntimeError(f"backend={name!r} cannot run on device {device}: {reason}")
    return module


def set_cpu_threads(count: int, backend: str = "reference") -> None:
    """Use ``count`` CPU threads for torch and for the backend's own thread pool, if it has one.

    The backend is the one named, or for "auto" the one it picks for CPU tensors; a backend that
    cannot be imported here runs nowhere, so torch alone is set. Its ``set_num_threads`` hook
    (:class:`~.interface.HasThreadPool`) runs first. Why both, and in that order: numba's thread pool
    (OpenMP threading layer) applies numba's own thread count to the OpenMP runtime torch also uses,
    when it starts and when its loops run, so after the first numba kernel
    ``torch.set_num_threads(1)`` would silently be back to one thread per core. With P MPI ranks on
    P cores that meant P × cores spinning threads (measured: 8 ranks on 2 cores, 1.8 s per step
    instead of ~0.1 s).
    """
    check_backend_name(backend)
    if count < 1:
        raise ValueError(f"count={count} threads: must be at least 1")
    if backend == "auto":
        module = _auto(torch.device("cpu"))
    else:
        try:
            module = _load(backend)
        except ImportError:
            module = None
    if isinstance(module, HasThreadPool):
        module.set_num_threads(count)
    torch.set_num_threads(count)
