"""The routing functions: router scores -> k expert ids and k weights per token (docs/moe_systems.md §3).

    softmax_top_k_route    p = softmax(logits); the top k of p (Mixtral, FastMoE's naive gate, DeepSeek-V2)
    sigmoid_top_k_route    s = sigmoid(logits); the top k of s + b (DeepSeek-V3's loss-free balancing)

They are the routing half of what a backend implements: ``dispatch.py`` + this file are the reference,
``backends/`` has a function of the same name and signature for each (``backends/interface.py``). The
routers (routers.py) compute the logits and hand them to the backend's copy of these functions.
"""
from __future__ import annotations

import torch

# Switch Transformer: route in at least float32 (a bfloat16 softmax is too coarse to rank experts).
from .precision import at_least_float32


def softmax_top_k_route(logits: torch.Tensor, top_k: int, renormalize: bool, num_groups: int | None = None,
                        top_k_groups: int | None = None,
                        bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(logits); ids = top-k of p; weights = p[ids] (divided by their sum if renormalize).

    Renormalized, this equals FastMoE's naive gate (softmax over the k largest logits) and Mixtral.
    With groups (DeepSeek-V2's group-limited greedy routing, "device-limited" in the paper): the experts
    are split into ``num_groups`` equal consecutive groups, each group is scored by its largest p, and
    only experts of the best ``top_k_groups`` groups may be selected. The weights stay p[ids], p the
    softmax over *all* E experts.

    With a selection ``bias`` b [E] (ERNIE-4.5-MoE's correction bias) the experts are ranked by p + b
    (and groups by their largest p + b); b only selects: the weights are still p[ids], with no
    gradient into b.
    """
    probs = torch.softmax(at_least_float32(logits), dim=-1)                       # p_e = e^{l_e} / Σ_j e^{l_j}
    if num_groups is None and bias is None:
        weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    else:
        selection = probs if bias is None else probs + bias.detach().to(probs.dtype)   # rank by p + b
        if num_groups is not None:
            group_score = selection.unflatten(1, (num_groups, -1)).amax(dim=-1)                # max_g (p + b)
            selection = _mask_outside_best_groups(selection, group_score, top_k_groups)
        expert_ids = selection.topk(top_k, dim=-1).indices
        weights = probs.gather(1, expert_ids)                                      # w = p[ids], p over all E
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)                      # w_s = p_s / Σ_{s'} p_{s'}
    return expert_ids, weights


def sigmoid_top_k_route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    route_scale: float,
    num_groups: int | None,
    top_k_groups: int | None,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: s = sigmoid(logits); select top-k of (s + b); weights = s_sel / Σ s_sel · scale.

    The bias b only *selects*; it never enters the weights, so it needs no gradient. With groups, the
    experts are split into ``num_groups`` equal groups, each group is scored by the sum of its two
    largest (s + b), and only experts of the best ``top_k_groups`` groups may be selected. Without
    ``renormalize`` (DeepSeek-V3's norm_topk_prob=False) the weights are s_sel · scale.
    """
    logits = at_least_float32(logits)
    scores = torch.sigmoid(logits)                                                 # s = σ(logits)
    selection = scores + bias                                                      # s + b
    if num_groups is not None:
        grouped = selection.unflatten(1, (num_groups, -1))                                 # [T, G, E / G]
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)   # [T, G]
        selection = _mask_outside_best_groups(selection, group_score, top_k_groups)
    expert_ids = selection.topk(top_k, dim=-1).indices
    chosen = scores.gather(1, expert_ids)
    if not renormalize:
        return expert_ids, chosen * route_scale                                    # w = s · scale
    total = chosen.sum(dim=-1, keepdim=True)
    # Far below 0, σ underflows (float32: to 0 below l ≈ −104), so s / Σ s is 0/0, and even before that its
    # gradient's 1 / Σ s overflows. Where Σ s < min_score_sum, every chosen s is so small that σ(l) = e^l
    # to far below float precision, so s / Σ s = softmax of the chosen logits: the same number, never 0/0.
    # Everywhere else the plain ratio is kept, so ordinary logits give the same bits as without the guard.
    far_below_zero = total < min_score_sum(total.dtype)
    plain = chosen / torch.where(far_below_zero, 1.0, total)      # 1 where unused: keeps its gradient finite
    underflow_free = torch.softmax(logits.gather(1, expert_ids), dim=-1)
    weights = torch.where(far_below_zero, underflow_free, plain) * route_scale     # w = s / Σ s · scale
    return expert_ids, weights


def _mask_outside_best_groups(selection: torch.Tensor, group_score: torch.Tensor, top_k_groups: int) -> torch.Tensor:
    """selection [T, E] with −∞ for the experts outside each token's ``top_k_groups`` best-scored groups
    (group_score [T, G]: the scores of the G equal consecutive groups of experts)."""
    best_groups = group_score.topk(top_k_groups, dim=-1).indices
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
    allowed = group_mask.repeat_interleave(selection.shape[1] // group_score.shape[1], dim=1)   # [T, E]
    return selection.masked_fill(~allowed, float("-inf"))


def min_score_sum(dtype: torch.dtype) -> float:
    """The smallest Σ s that sigmoid_top_k_route divides by: √(smallest normal float), 1e-19 in float32.

    Below it each chosen σ(l) = e^l / (1 + e^l) is e^l up to a factor 1 − O(1e-19), far below float
    precision; above it 1 / Σ s (in the gradient) is at most ~1e19, far from overflowing."""
    return torch.finfo(dtype).tiny ** 0.5
