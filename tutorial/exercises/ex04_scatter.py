"""Exercise 4 · scatter: the token rows laid out expert by expert (tutorial/02_dispatch.py, section 1).

Check it: python -m tutorial.exercises.check 4
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
    raise NotImplementedError
