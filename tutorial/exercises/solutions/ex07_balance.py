"""Exercise 7 · the load-balancing loss of Switch Transformer / Mixtral (tutorial/01_gating.py, section 1).

Model answer.
"""
from __future__ import annotations

import torch


def balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """loss = E · Σ_e f_e · P_e  (1 when the load is perfectly balanced).

        f_e = #{(t, s) kept with expert_ids[t, s] = e} / #{(t, s) kept}     a fraction of the assignments:
                                                                           Σ_e f_e = 1; no gradient (a count)
        P_e = (1/T) Σ_t probs[t, e]                                        mean router probability
                                                                           (the gradient flows through it)

    Dropped assignments (-1) count nowhere; when every assignment is dropped, f = 0 and the loss is 0
    (not nan).

    Args:
        probs: [T, E] router probabilities (softmax over experts), may require grad.
        expert_ids: [T, k] int64, -1 = dropped.
    Returns:
        a scalar tensor, differentiable in probs.
    """
    num_experts = probs.shape[1]
    ids = expert_ids.reshape(-1)
    counts = torch.bincount(ids[ids >= 0], minlength=num_experts).to(probs.dtype)
    fraction = counts / counts.sum().clamp(min=1)                            # f_e (0 everywhere if all dropped)
    mean_prob = probs.mean(dim=0)                                            # P_e
    return num_experts * (fraction * mean_prob).sum()                        # E · Σ_e f_e P_e
