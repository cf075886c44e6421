"""Router statistics over the *global* batch: the balance loss and the sigmoid router's load.

Each rank routes only its own tokens, but the quantities that balance the experts are defined on the
whole batch. Two of them need the other ranks' counts:

**Balance loss** (Switch, softmax top-k, X-MoE, GShard)::

    loss = E · Σ_e f_e · P_e      f_e = fraction of assignments that chose e   (counts: no gradient)
                                  P_e = mean router probability of e over tokens (differentiable)

Computed on one rank's tokens, ``f`` and ``P`` are local, and the mean over ranks of
``E Σ f_local P_local`` is *not* the global loss (a mean of products is not a product of means).
Here ``f`` is made global with one all-reduce of the E counts (an E-integer message), and ``P``
stays local. Every rank's shard has the same number of tokens, so

    mean over ranks of  E · Σ_e f_global,e · P_local,e  =  E · Σ_e f_global,e · P_global,e

and since the data-parallel all-reduce averages gradients over the ranks, the gradient reaching
the (replicated) gate is *exactly* the gradient of the global-batch loss. (This is "global-batch
load balancing"; the per-rank value of ``layer.aux_loss`` is this rank's share, its mean over
ranks is the loss a single process would report for the whole batch.)

The router z-loss is a mean over tokens, already exact after averaging; routers without a balance
loss (expert choice, sigmoid) need nothing. Noisy top-k's loss (squared coefficients of variation
of sums over tokens) keeps its per-rank value: its random noise differs per rank anyway, so there
is no single-process result to match.

**Sigmoid router load**: the bias update ``b_e ← b_e + γ · sign(mean_load − load_e)`` must see the
same load on every rank or the replicated biases drift apart; the load is all-reduced (summed).
"""
from __future__ import annotations

import torch

from ..routers import (GShardRouter, Router, RouterOutput, SoftmaxTopKRouter, SwitchRouter, XMoERouter,
                       router_z_loss)
from .communicator import Communicator

# Routers whose balance loss is Switch's E · Σ f_e · P_e over all (token, slot) assignments.
_ASSIGNMENT_FRACTION_ROUTERS = (SoftmaxTopKRouter, SwitchRouter, XMoERouter)


def global_aux_loss(gate: Router, route: RouterOutput, data: Communicator) -> torch.Tensor:
    """This rank's share of the global-batch aux loss: ``balance_loss_weight · balance + z_loss_weight · z``."""
    if isinstance(gate, _ASSIGNMENT_FRACTION_ROUTERS):
        chosen = route.expert_ids.reshape(-1)                                # every kept (token, slot)
        balance = _global_fraction_times_mean_prob(chosen[chosen >= 0], route.probs, data)
    elif isinstance(gate, GShardRouter):
        balance = _global_fraction_times_mean_prob(route.expert_ids[:, 0], route.probs, data)   # first choices
    else:
        balance = route.balance_loss                                         # none, or noisy top-k (per rank)
    aux = gate.balance_loss_weight * balance
    if gate.z_loss_weight:
        aux = aux + gate.z_loss_weight * router_z_loss(route.logits)
    return aux


def _global_fraction_times_mean_prob(chosen: torch.Tensor, probs: torch.Tensor, data: Communicator) -> torch.Tensor:
    """E · Σ_e f_e · P_e with f_e from the counts of all ranks and P_e from this rank's tokens."""
    num_experts = probs.shape[-1]
    counts = torch.bincount(chosen, minlength=num_experts)                     # this rank's assignments
    data.allreduce_(counts, purpose="allreduce_router_counts")                # all ranks' assignments
    fraction = counts.to(probs.dtype) / max(int(counts.sum()), 1)             # f_e (global)
    mean_prob = probs.mean(dim=0)                                              # P_e (local)
    return num_experts * (fraction * mean_prob).sum()


def global_router_load(gate: Router, data: Communicator) -> torch.Tensor | None:
    """The sigmoid router's last load summed over all ranks (None for routers without a bias)."""
    load = getattr(gate, "last_load", None)
    if load is None:
        return None
    return data.allreduce_(load.detach().clone(), purpose="allreduce_router_counts")
