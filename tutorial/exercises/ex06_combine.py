"""Exercise 6 · the weighted combine and its backward (tutorial/02_dispatch.py, section 1).

Check it: python -m tutorial.exercises.check 6
"""
from __future__ import annotations

import torch


def gather_combine(expert_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_{s kept} weights[t, s] · expert_out[rows[t, s]]; a token with no kept slot gets 0.

    A dropped slot has rows[t, s] = -1 and adds nothing (careful: -1 is a valid Python index).

    Args:
        expert_out: [N, d] expert outputs, in buffer order.
        rows: [T, k] int64, -1 = dropped.
        weights: [T, k].
    Returns:
        y [T, d].
    """
    raise NotImplementedError


def gather_combine_backward(expert_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                            grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The combine's backward, by hand (no autograd): from g = ∂L/∂y [T, d]

        ∂L/∂expert_out[rows[t, s]] = weights[t, s] · g[t]               (0 for rows no slot reads)
        ∂L/∂weights[t, s]          = <g[t], expert_out[rows[t, s]]>    (0 for a dropped slot)

    Args:
        expert_out, rows, weights: as in :func:`gather_combine`.
        grad_y: [T, d].
    Returns:
        (grad_expert_out [N, d], grad_weights [T, k]).
    """
    raise NotImplementedError
