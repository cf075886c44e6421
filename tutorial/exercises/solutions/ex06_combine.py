"""Exercise 6 · the weighted combine and its backward (tutorial/02_dispatch.py, section 1).

Model answer.
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
    num_tokens, top_k = rows.shape
    y = expert_out.new_zeros(num_tokens, expert_out.shape[1])
    for slot in range(top_k):
        tokens = (rows[:, slot] >= 0).nonzero().reshape(-1)                   # the tokens whose slot s was kept
        picked = expert_out[rows[tokens, slot]]                               # expert_out[rows[t, s]]
        y = y.index_add(0, tokens, weights[tokens, slot, None] * picked)      # + w[t, s] · expert_out[row]
    return y


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
    num_tokens, top_k = rows.shape
    grad_out = torch.zeros_like(expert_out)
    grad_weights = torch.zeros_like(weights)
    for slot in range(top_k):
        tokens = (rows[:, slot] >= 0).nonzero().reshape(-1)
        slot_rows = rows[tokens, slot]
        grad_out = grad_out.index_add(0, slot_rows, weights[tokens, slot, None] * grad_y[tokens])  # w · g
        grad_weights[tokens, slot] = (grad_y[tokens] * expert_out[slot_rows]).sum(dim=-1)         # <g, out>
    return grad_out, grad_weights
