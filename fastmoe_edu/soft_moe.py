"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts", arXiv 2308.00951).

    layer = SoftMoELayer(d_model, d_hidden, num_experts, slots_per_expert=p)
    layer = MoELayer(d_model, d_hidden, num_experts, router="soft_moe", slots_per_expert=p)   # the same

A sparse router sends each token to k experts. Soft MoE sends no token anywhere: every expert has p
*slots*, and each slot's input is a weighted average of *all* tokens of a group (one sequence). For
a group X [n, d] and the slot parameters Φ [E·p, d] (row e·p + j = slot j of expert e):

    logits  L = X Φᵀ                       [n, E·p]
    D = softmax over the tokens of L       (per slot, dim 0: Σ_i D[i, s] = 1)      "dispatch weights"
    C = softmax over the slots  of L       (per token, dim 1: Σ_s C[i, s] = 1)    "combine weights"
    X̃ = Dᵀ X                               [E·p, d]   slot inputs
    Ỹ[e·p + j] = expert_e(X̃[e·p + j])      each expert runs on its own p slots
    Y = C Ỹ                                [n, d]     output

With ``normalize=True`` (the paper's recipe for large d): L = scale · l2(X) l2(Φ)ᵀ, rows normalised
over d, ``scale`` a learned scalar starting at 1.

What follows for the layer:

* fully differentiable, no discrete choice: no capacity, nothing dropped, no balance loss (every
  expert processes exactly p slots per group, balanced by construction): aux_loss is exactly 0, and
  the layer's ``reduce`` seam is not used (nothing is summed over the groups of other ranks);
* every expert sees a fixed number of rows, so the expert-sorted buffer has ``counts[e] = G·p`` for G
  groups. It goes through the layer's ``expert_runner`` seam like the sparse path's buffer does, so
  expert parallelism (an all-to-all of equal-sized segments) works unchanged;
* a group is one sequence: a token's output depends on every token of its sequence, later ones
  included. Soft MoE is therefore **not causal** and the language model refuses it (NOT_CAUSAL);
* a group with no tokens still has its slots: zero rows (an empty sum), whose outputs nobody combines.

SoftMoELayer is an MoELayer (the same options, experts, shared experts, output bias and seams) with its
own router and forward; the options of the top-k path (top_k, capacity, expert_dropout, ...) stay at
their defaults (LayerOptions.check).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .backends import get_backend
from .layer import MoELayer, RoutingRecord
from .options import SOFT_MOE, LayerOptions
from .precision import at_least_float32

OPTIONS = {"slots_per_expert": 1, "normalize": False}          # its router's options and their defaults
NOT_CAUSAL = ("router='soft_moe' cannot be used by the causal language model: Soft MoE mixes all positions "
              "of a sequence into every slot (a softmax over the sequence's tokens), so a token's output would "
              "depend on later tokens; use it in MoELayer directly, for non-causal (encoder-style) models")


class SoftMoERouter(nn.Module):
    """The slot parameters Φ (``weight [E·p, d_model]``) and, with ``normalize``, the learned scale.

    It is the layer's ``router`` only to keep the parameter names of the other routers
    (``router.weight``); it has no route/top-k: ``soft_moe_forward`` does the dense dispatch.
    """

    def __init__(self, d_model: int, num_experts: int, slots_per_expert: int = 1, normalize: bool = False):
        super().__init__()
        self.d_model, self.num_experts, self.slots_per_expert = d_model, num_experts, slots_per_expert
        self.normalize = normalize
        # Φ, LeCun-normal as in the paper (and the same scale as the other routers' weight).
        self.weight = nn.Parameter(torch.randn(num_experts * slots_per_expert, d_model) * d_model ** -0.5)
        self.scale = nn.Parameter(torch.ones(())) if normalize else None     # learned scalar, starts at 1

    def logits(self, groups: torch.Tensor) -> torch.Tensor:
        """groups [G, n, d] -> L [G, n, E·p]."""
        if self.normalize:
            # L = scale · l2(X) l2(Φ)ᵀ   (each token and each slot vector normalised over d)
            return self.scale * (F.normalize(groups, dim=-1) @ F.normalize(self.weight, dim=-1).t())
        return groups @ self.weight.t()                                          # L = X Φᵀ

    def update_bias(self, load=None, reduce=None) -> None:
        """MoELayer.update_router_bias calls this on every router: Soft MoE has no bias to balance."""

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"normalize={self.normalize}")


class SoftMoELayer(MoELayer, router=SOFT_MOE):
    """Soft MoE with the experts of an MoELayer: ``SoftMoELayer(d_model, d_hidden, num_experts, slots_per_expert=p,
    normalize=False, ...)``, or ``MoELayer(..., router="soft_moe", ...)``."""

    def __init__(self, d_model: int | None = None, d_hidden: int | None = None, num_experts: int | None = None, *,
                 options: LayerOptions | None = None, **keywords):
        keywords.setdefault("router", SOFT_MOE)
        super().__init__(d_model, d_hidden, num_experts, options=options, **keywords)

    def build_router(self, options: LayerOptions) -> SoftMoERouter:
        return build_soft_moe_router(options.d_model, options.num_experts, **options.router_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        backend = get_backend(self.backend_name, x.device)
        y, record = soft_moe_forward(self.router, self.experts, self.expert_runner, x, backend)
        self.aux_loss = y.new_zeros(())       # no balance loss (and no z-loss): balanced by construction
        self.last_routing = RoutingRecord(**record)
        return self._add_always_on(x.reshape(-1, self.d_model), y.reshape(-1, self.d_model)).reshape(x.shape)

    def _size_repr(self) -> str:
        return f"slots_per_expert={self.router.slots_per_expert}"


def build_soft_moe_router(d_model: int, num_experts: int, **options) -> SoftMoERouter:
    """Check the Soft MoE router's options (clear ValueErrors), then build it."""
    for key in options:
        if key not in OPTIONS:
            raise ValueError(f"unknown option {key!r} for router='soft_moe'; allowed: {', '.join(sorted(OPTIONS))} "
                             f"(no balance or z-loss: Soft MoE is balanced by construction)")
    options = {**OPTIONS, **options}
    slots = options["slots_per_expert"]
    if not (isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1):
        raise ValueError(f"slots_per_expert={slots!r} must be an integer >= 1")
    if not isinstance(options["normalize"], bool):
        raise ValueError(f"normalize={options['normalize']!r} must be True or False")
    return SoftMoERouter(d_model, num_experts, slots, options["normalize"])


def soft_moe_forward(router: SoftMoERouter, experts, expert_runner, x: torch.Tensor, backend):
    """x [..., n, d] (a 2-D x is one group, a 1-D x one token) -> (y like x, fields of a RoutingRecord).

    ``expert_runner(experts, buffer, counts, backend)`` is the layer's seam: LocalExperts, or
    ExpertParallel under expert parallelism.
    """
    num_experts, slots = router.num_experts, router.slots_per_expert
    d = x.shape[-1]
    n = x.shape[-2] if x.dim() >= 2 else 1
    num_groups = math.prod(x.shape[:-2])                             # G (1 for a 1-D or 2-D x)
    groups = x.reshape(num_groups, n, d)                             # X [G, n, d]: one group per sequence

    logits = router.logits(groups)                                   # L [G, n, E·p]
    scores = at_least_float32(logits)                                      # softmax in >= fp32
    dispatch = torch.softmax(scores, dim=1).to(x.dtype)              # D = softmax over tokens (per slot)
    combine = torch.softmax(scores, dim=2).to(x.dtype)               # C = softmax over slots (per token)
    slot_inputs = dispatch.transpose(1, 2) @ groups                  # X̃ = Dᵀ X  [G, E·p, d]

    # The expert-sorted buffer: expert-major, then group, then slot  ->  counts[e] = G·p rows for every e.
    buffer = slot_inputs.reshape(num_groups, num_experts, slots, d).transpose(0, 1).reshape(-1, d)
    counts = torch.full((num_experts,), num_groups * slots, dtype=torch.long, device=x.device)
    expert_out = expert_runner(experts, buffer, counts, backend)    # Ỹ[e·p + j] = expert_e(X̃[e·p + j])
    slot_outputs = expert_out.reshape(num_experts, num_groups, slots, d).transpose(0, 1) \
                             .reshape(num_groups, num_experts * slots, d)          # back to [G, E·p, d]
    y = combine @ slot_outputs                                       # Y = C Ỹ  [G, n, d]

    tokens, num_slots = num_groups * n, num_experts * slots
    slot_expert = torch.arange(num_slots, device=x.device) // slots               # the expert of each slot
    record = dict(                                                                # detached, for inspection
        expert_ids=slot_expert.expand(tokens, num_slots).clone(),   # [T, E·p]: every token reaches every slot
        weights=combine.detach().reshape(tokens, num_slots),        # [T, E·p]: C
        tokens_per_expert=counts,                                   # [E]: rows (slots) each expert processed
        dropped=counts.new_zeros(()), capacity=None,
        logits=logits.detach().reshape(tokens, num_slots),          # [T, E·p]: L
        probs=combine.detach().reshape(tokens, num_experts, slots).sum(-1),    # [T, E]: C summed per expert
        random_draws={},
        dispatch_weights=dispatch.detach().reshape(tokens, num_slots))         # [T, E·p]: D
    return y.reshape(x.shape), record

