"""Second-order gradients through the backends' hand-written backward passes.

A ``torch.autograd.Function`` whose backward runs a kernel (or writes with ``out=``) returns gradients
with no graph behind them, so ``torch.autograd.grad(..., create_graph=True)`` (gradient penalties,
Hessian-vector products, MAML) would get ``None`` past the first derivative, silently, or a deep torch
error. PyTorch runs a backward with grad mode on exactly when ``create_graph=True`` was asked for; then
the backward passes of ``numba_backend.py`` and ``grouped_gemm_torch.py`` return :func:`reference_vjp`
instead: the same vector-Jacobian product, computed by autograd through the reference's torch operations,
so it can be differentiated again. Plain training (``create_graph=False``) never takes this path.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def create_graph_requested() -> bool:
    """True inside a backward pass run for ``create_graph=True`` (torch enables grad mode only then)."""
    return torch.is_grad_enabled()


def reference_vjp(function: Callable[..., torch.Tensor], inputs: Sequence, grad_output: torch.Tensor) -> tuple:
    """(∂⟨function(*inputs), grad_output⟩ / ∂input for each input), each with its own graph.

    ``inputs`` are the Function's inputs as it received them (saved tensors keep their place in the graph);
    an entry that is not a tensor requiring a gradient gets ``None``.
    """
    wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    with torch.enable_grad():
        output = function(*inputs)
    grads = iter(torch.autograd.grad(output, wanted, grad_output, create_graph=True, allow_unused=True))
    return tuple(next(grads) if isinstance(x, torch.Tensor) and x.requires_grad else None for x in inputs)


def linear_input(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A stand-in input for a function linear in it: its vector-Jacobian product does not depend on the
    input's values, so the backward need not keep the real input alive."""
    return torch.zeros(tuple(shape), dtype=like.dtype, device=like.device, requires_grad=True)
