"""Exercise 4 · scatter: the token rows laid out expert by expert (tutorial/02_dispatch.py, section 1).

Model answer.
"""
from __future__ import annotations

import torch


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """buffer[rows[t, s]] = x[t] for every kept (t, s); a token with k kept slots appears k times.

    Differentiable in ``x``: the backward is grad_x[t] = Σ_{s kept} grad_buffer[rows[t, s]] (the sum of
    the gradients of a token's copies); autograd derives it when the buffer is built from x with
    differentiable operations (no in-place writes into x, no .data / .detach()).

    Args:
        x: [T, d] token rows.
        rows: [T, k] int64 from stable_positions, -1 = dropped.
        num_rows: N, the number of kept assignments (the buffer's length).
    Returns:
        buffer [N, d], same dtype as x.
    """
    num_tokens, top_k = rows.shape
    token_of = torch.arange(num_tokens).repeat_interleave(top_k)             # token of (t, s), order t·k + s
    flat_rows = rows.reshape(-1)
    kept = flat_rows >= 0
    buffer = x.new_zeros(num_rows, x.shape[1])
    return buffer.index_copy(0, flat_rows[kept], x[token_of[kept]])          # buffer[row[t, s]] = x[t]
