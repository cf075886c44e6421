"""Backends: interchangeable implementations of the MoE layer's hot steps.

Every backend is a module exposing the same functions, with the same names and signatures as the
reference (``fastmoe_edu/dispatch.py`` and the routing functions of ``fastmoe_edu/routers.py``):

    prune_capacity, count_tokens_per_expert, exclusive_prefix_sum, stable_positions,
    scatter_rows, gather_combine, grouped_matmul, softmax_topk_route, sigmoid_topk_route

plus ``available(device) -> (ok, reason)``. The layer asks :func:`get_backend` for one by the name in
its config: ``"reference"``, ``"numba"`` (numba.cuda kernels for CUDA tensors, numba's CPU target
otherwise) or ``"auto"`` (numba when it can run here, else the reference). A forced backend that
cannot run raises an error that says why; "auto" never does.

This folder is installed as ``fastmoe_edu.backends`` (see pyproject.toml), never as a top-level
module called ``backends``.
"""
from __future__ import annotations

import importlib

import torch

BACKEND_NAMES = ("reference", "numba", "auto")
_MODULES = {"reference": "reference", "numba": "numba_backend"}


def check_backend_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend={name!r} is not a known backend; allowed: {', '.join(BACKEND_NAMES)}")


def _load(name: str):
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def get_backend(name: str, device: torch.device | str = "cpu"):
    """The backend module called ``name`` for tensors on ``device`` (raises if it cannot run there)."""
    check_backend_name(name)
    device = torch.device(device)
    if name == "auto":
        try:
            numba_module = _load("numba")
        except ImportError:
            return _load("reference")
        ok, _ = numba_module.available(device)
        return numba_module if ok else _load("reference")
    try:
        module = _load(name)
    except ImportError as error:
        raise RuntimeError(f"backend={name!r} cannot be imported here: {error}") from error
    ok, reason = module.available(device)
    if not ok:
        raise RuntimeError(f"backend={name!r} cannot run on device {device}: {reason}")
    return module


def set_cpu_threads(count: int, backend: str = "reference") -> None:
    """Use ``count`` CPU threads for torch and, for a backend other than the reference, numba too.

    Why both: numba's thread pool (OpenMP threading layer) applies numba's own thread count to the
    OpenMP runtime torch also uses, when it starts and when its loops run, so after the first numba
    kernel ``torch.set_num_threads(1)`` would silently be back to one thread per core. With P MPI
    ranks on P cores that meant P × cores spinning threads (measured: 8 ranks on 2 cores, 1.8 s per
    step instead of ~0.1 s).
    """
    check_backend_name(backend)
    if count < 1:
        raise ValueError(f"count={count} threads: must be at least 1")
    if backend != "reference":
        try:
            import numba
        except ImportError:                      # "auto" without numba: the reference runs, torch alone
            numba = None
        if numba is not None:                    # numba first: starting its thread pool also resets OpenMP's count
            numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(count)
