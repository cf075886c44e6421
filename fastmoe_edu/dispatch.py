"""Dispatch and combine: the data movement of one MoE layer, as the named steps of FastMoE.

A router has decided, for every token t and each of its k slots s, an expert id ``expert_ids[t, s]``
(-1 = the assignment was dropped) and a weight ``weights[t, s]``. This file moves the token rows to
their experts and back, in the steps of FastMoE (He et al. 2021; docs/moe_systems.md §2):

    prune_capacity          drop assignments past an expert's capacity C          (routers with cf)
    count_tokens_per_expert count[e]  = #{(t, s) : expert_ids[t, s] = e}           (a histogram)
    exclusive_prefix_sum    start[e]  = Σ_{j<e} count[j]                           (segment starts)
    stable_positions        row[t, s] = start[e] + #{(t', s') before (t, s) with the same e}
    scatter_rows            buffer[row[t, s]] = x[t]                               (expert-contiguous)
      ... experts run on their contiguous segment of ``buffer`` (experts.py) ...
    gather_combine          y[t] = Σ_s weights[t, s] · expert_out[row[t, s]]

"Before" in stable_positions means "earlier in the flattened order t·k + s": inside one expert's
segment the rows keep token order, so the result never depends on thread scheduling. That is what
makes the optimized kernels in ``backends/`` bitwise reproducible and comparable to this file.

This is the *reference*: plain PyTorch, written to be read. ``backends/numba_backend.py`` has one
function of the same name and signature for each function here.
"""
from __future__ import annotations

import torch

__all__ = [
    "prune_capacity",
    "count_tokens_per_expert",
    "exclusive_prefix_sum",
    "stable_positions",
    "scatter_rows",
    "gather_combine",
    "grouped_matmul",
]


def prune_capacity(expert_ids: torch.Tensor, num_experts: int, capacity: int | None,
                   tokens_per_group: int | None = None, priority: torch.Tensor | None = None) -> torch.Tensor:
    """Keep at most ``capacity`` assignments per expert; the rest become -1 (dropped).

    Priority is *slot-major*: every token's first choice (slot 0), in token order, claims capacity
    before any second choice (slot 1) does. For Switch (k = 1) this is plain token order; for GShard
    it is the paper's "first choices claim capacity first". ``capacity=None`` means dropless.

    ``tokens_per_group`` = S splits the T tokens into T / S consecutive groups (the sequences of a
    batch): each group has its own ``capacity`` places per expert, and its tokens compete only among
    themselves, in the same slot-major order (Switch Transformers' per-sequence capacity).

    ``priority`` [T] (batch-prioritized routing, Riquelme et al. 2021; NLLB-MoE's
    batch_prioritized_routing) replaces token order by the order of decreasing priority (ties: token
    order): the first choices of the highest-priority tokens claim capacity first, then theirs down to
    the lowest, then all second choices in the same token order, and so on. Within groups likewise.
    """
    if capacity is None:
        return expert_ids
    num_tokens = expert_ids.shape[0]
    if num_tokens == 0:
        return expert_ids.clone()
    group = tokens_per_group or num_tokens
    if num_tokens % group:
        raise ValueError(f"tokens_per_group={tokens_per_group} does not divide the {num_tokens} tokens")
    num_groups = num_tokens // group
    if priority is None:
        return _prune_slot_major(expert_ids, num_experts, capacity, num_groups)
    # order[i] = the token that claims capacity i-th within its group: a stable sort keeps ties in token order.
    order = priority.reshape(num_groups, group).argsort(dim=1, descending=True, stable=True)         # [G, S]
    order = (order + torch.arange(num_groups, device=order.device)[:, None] * group).reshape(-1)     # [T]
    pruned_in_order = _prune_slot_major(expert_ids[order], num_experts, capacity, num_groups)
    return torch.empty_like(expert_ids).index_copy_(0, order, pruned_in_order)                  # back to token order


def _prune_slot_major(expert_ids: torch.Tensor, num_experts: int, capacity: int, num_groups: int) -> torch.Tensor:
    """prune_capacity's walk: in each of the ``num_groups`` consecutive groups of tokens, slot-major order."""
    num_tokens, top_k = expert_ids.shape
    group = num_tokens // num_groups
    # Walk each group's assignments in priority order: slot-major, i.e. the group's transpose flattened.
    ids_by_priority = expert_ids.reshape(num_groups, group, top_k).transpose(1, 2).reshape(num_groups, -1)  # [G, k·S]
    # Kept: fewer than C earlier assignments of the group (in priority order) went to the same expert.
    keep = (ids_by_priority >= 0) & (_rank_in_expert(ids_by_priority, num_experts) < capacity)
    pruned = torch.where(keep, ids_by_priority, torch.full_like(ids_by_priority, -1))
    return pruned.reshape(num_groups, top_k, group).transpose(1, 2).reshape(num_tokens, top_k).contiguous()


def count_tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """count[e] = number of (token, slot) pairs routed to expert e. Dropped (-1) ids are ignored.

    A 1 added at each kept id. (``bincount(ids[ids >= 0])`` counts the same, but on a GPU it first waits for
    the device to learn how many ids are kept and which is largest; this never waits.)"""
    ids = expert_ids.reshape(-1)
    kept = (ids >= 0).to(torch.int64)
    return torch.zeros(num_experts, dtype=torch.int64, device=ids.device).index_add_(0, ids.clamp(min=0), kept)


def exclusive_prefix_sum(counts: torch.Tensor) -> torch.Tensor:
    """start[e] = Σ_{j<e} count[j]: where expert e's segment begins in the sorted buffer."""
    return torch.cumsum(counts, dim=0) - counts


def stable_positions(expert_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """row[t, s] = start[e] + (number of earlier assignments to the same expert e), -1 if dropped.

    "Earlier" is the flattened order t·k + s, so each segment keeps token order (a stable sort).
    """
    ids = expert_ids.reshape(-1)                                                  # [T·k]
    rows = starts[ids.clamp(min=0)] + _rank_in_expert(ids, starts.numel())
    rows = torch.where(ids >= 0, rows, torch.full_like(rows, -1))
    return rows.reshape(expert_ids.shape)


def _rank_in_expert(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """rank[..., i] = how many earlier assignments along the last axis of ``ids`` went to the same expert
    as ids[..., i]: 0, 1, 2, ... (dropped ids, -1, are counted nowhere; their own rank is meaningless)."""
    valid = ids >= 0
    safe_ids = ids.clamp(min=0)
    one_hot = torch.nn.functional.one_hot(safe_ids, num_experts) * valid[..., None]          # [..., N, E]
    return (one_hot.cumsum(dim=-2) - 1).gather(-1, safe_ids[..., None])[..., 0]


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """buffer[rows[t, s]] = x[t] for every kept (t, s): tokens laid out expert by expert.

    Backward (autograd derives it from index_add/index_select): grad_x[t] = Σ_s grad_buffer[rows[t, s]],
    the scatter-add of the k gradient copies of each token.
    """
    top_k = rows.shape[1]
    token_of_slot = torch.arange(x.shape[0], device=x.device).repeat_interleave(top_k)  # [T·k]
    flat_rows = rows.reshape(-1)
    keep = flat_rows >= 0
    buffer = x.new_zeros(num_rows, x.shape[1])
    return buffer.index_copy(0, flat_rows[keep], x.index_select(0, token_of_slot[keep]))


def gather_combine(expert_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_{s kept} weights[t, s] · expert_out[rows[t, s]]; a token with no kept slot gets 0.

    Backward: grad_expert_out[rows[t, s]] = weights[t, s] · grad_y[t]  and
              grad_weights[t, s]          = <grad_y[t], expert_out[rows[t, s]]>.
    """
    num_tokens, top_k = rows.shape
    # A dropped slot (row -1) reads an extra all-zero row appended at the end of expert_out, so it
    # contributes nothing (and its weight gets a zero gradient) without any branching.
    zero_row = expert_out.new_zeros(1, expert_out.shape[1])
    padded = torch.cat([expert_out, zero_row], dim=0)
    safe_rows = torch.where(rows >= 0, rows, torch.full_like(rows, expert_out.shape[0]))
    gathered = padded.index_select(0, safe_rows.reshape(-1)).reshape(num_tokens, top_k, expert_out.shape[1])
    return torch.einsum("tk,tkd->td", weights.to(expert_out.dtype), gathered)


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Segment-wise linear map: out[segment e] = rows[segment e] · weight[e]ᵀ.

    rows [N, d_in] are expert-contiguous (segment e has counts[e] rows), weight is [E, d_out, d_in].
    This is a *grouped GEMM*: E matrix products of the same inner shape, a different weight each,
    a segment may be empty. The reference simply loops over experts.
    """
    # unbind (not weight[e]) so the backward stacks the E weight gradients once, instead of adding
    # E full-size [E, d_out, d_in] tensors that are zero outside one expert.
    segments = zip(torch.split(rows, counts.tolist(), dim=0), weight.unbind(0))
    outputs = [segment @ expert_weight.t() for segment, expert_weight in segments]
    if not outputs:
        return rows.new_zeros(0, weight.shape[1])
    return torch.cat(outputs, dim=0)
