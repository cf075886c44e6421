"""Exercise 3 · counting and ranking: where each (token, slot) goes in the expert-sorted buffer
(tutorial/02_dispatch.py, section 1).

Check it: python -m tutorial.exercises.check 3

FastMoE's steps: count → exclusive prefix sum → stable positions.
"""
from __future__ import annotations

import torch


def count_tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """count[e] = #{(t, s) : expert_ids[t, s] = e}; dropped assignments (-1) are not counted.

    Args:
        expert_ids: [T, k] int64, -1 = dropped.
        num_experts: E (experts that nobody chose still get an entry, 0).
    Returns:
        counts [E] int64.
    """
    raise NotImplementedError


def exclusive_prefix_sum(counts: torch.Tensor) -> torch.Tensor:
    """start[e] = Σ_{j<e} count[j]: where expert e's segment begins in the buffer (start[0] = 0).

    Args:
        counts: [E] int64.
    Returns:
        starts [E] int64.
    """
    raise NotImplementedError


def stable_positions(expert_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """row[t, s] = start[e] + #{assignments to e that come before (t, s)}, e = expert_ids[t, s]; -1 if dropped.

    "Before" is the flattened order t·k + s (token by token, slot by slot inside a token), so every
    expert's segment keeps token order: a *stable* sort, the same on every run.

    Args:
        expert_ids: [T, k] int64, -1 = dropped.
        starts: [E] int64 from :func:`exclusive_prefix_sum`.
    Returns:
        rows [T, k] int64.
    """
    raise NotImplementedError
