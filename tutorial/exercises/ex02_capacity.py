"""Exercise 2 · capacity pruning, slot-major (tutorial/01_gating.py, section 1; tutorial/02_dispatch.py, section 1).

Check it: python -m tutorial.exercises.check 2
"""
from __future__ import annotations

import torch


def prune_capacity(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Keep at most ``capacity`` (token, slot) assignments per expert; the others become -1 (dropped).

    Who wins the C places is decided *slot-major*: first every token's slot 0 in token order, then every
    token's slot 1 in token order, and so on (GShard: "first choices claim capacity first"):

        order of the walk:   (t=0, s=0), (t=1, s=0), ..., (t=T−1, s=0), (t=0, s=1), (t=1, s=1), ...
        kept[t, s]        =  expert_ids[t, s]  if fewer than C earlier assignments in that walk went to
                                               the same expert, else −1

    An assignment that is already -1 stays -1 and takes no place. ``capacity`` may be 0 (all dropped).

    Args:
        expert_ids: [T, k] int64, -1 = already dropped.
        num_experts: E.
        capacity: C >= 0.
    Returns:
        a new [T, k] tensor (the input is not modified).
    """
    raise NotImplementedError
