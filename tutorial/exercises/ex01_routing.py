"""Exercise 1 · softmax top-k routing and its gradient (tutorial/01_gating.py, section 2).

Check it: python -m tutorial.exercises.check 1

The notation: logits l [T, E], p = softmax(l) over the E experts, ids [T, k], weights w [T, k].
"""
from __future__ import annotations

import torch


def softmax_top_k(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Route every token to its ``top_k`` most probable experts (Mixtral; FastMoE's naive gate).

        p_e      = exp(l_e) / Σ_j exp(l_j)                 softmax over all E experts
        ids[t]   = the k experts with the largest p[t], largest first
        w[t, s]  = p[t, ids[t, s]] / Σ_s' p[t, ids[t, s']]  renormalized: Σ_s w[t, s] = 1

    Args:
        logits: [T, E] router scores.
        top_k: k, 1 <= k <= E.
    Returns:
        (expert_ids [T, k] int64, weights [T, k] in the logits' dtype).
    """
    raise NotImplementedError


def softmax_top_k_backward(expert_ids: torch.Tensor, weights: torch.Tensor, grad_weights: torch.Tensor,
                           num_experts: int) -> torch.Tensor:
    """∂L/∂logits from ∂L/∂weights, written by hand (no autograd).

    The renormalized weights are the softmax of the k *chosen* logits (the Σ_j exp(l_j) of p cancels), so

        ∂w_s / ∂l_{ids[s']} = w_s (δ_ss' − w_s')
        ∂L / ∂l_{ids[s]}    = w_s (g_s − Σ_s' w_s' g_s')     g = grad_weights
        ∂L / ∂l_e           = 0                              for every expert e the token did not choose

    Args:
        expert_ids: [T, k] from :func:`softmax_top_k`.
        weights: [T, k] from :func:`softmax_top_k`.
        grad_weights: [T, k], ∂L/∂weights.
        num_experts: E.
    Returns:
        grad_logits [T, E].
    """
    raise NotImplementedError
