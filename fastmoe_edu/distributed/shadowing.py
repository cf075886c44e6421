"""FasterMoE's dynamic expert shadowing: move a popular expert's weights to the tokens, not its tokens to it.

    parallelize(model, layout, shadow_experts="auto")     # or an int N: the N most loaded, or 0: off
    mpirun -n 4 python -m fastmoe_edu.train --shadow_experts=auto

In expert parallelism an expert that many tokens choose makes its rank the bottleneck: every other
rank sends it rows (and receives them back, and again for the gradients), and it computes them all.
FasterMoE (He et al. 2022) *shadows* such an expert for one step: its owner broadcasts the expert's
weights to the expert group, every rank computes its own rows for that expert locally, and in the
backward pass the weight gradients are summed back to the owner. Per shadowed expert e, with ``n_e``
rows held by the other ranks, ``d`` the model width and ``W_e`` its weight count (both in elements):

    kept local by shadowing:   2 all-to-alls forward + 2 backward of those rows   ≈ 4 · n_e · d
    paid for it:               a broadcast of the weights + a sum of their grads  ≈ 2 · W_e

so with ``shadow_experts="auto"`` e is shadowed when ``4 · n_e · d > cost_ratio · 2 · W_e``
(``cost_ratio`` 1 by default; larger shadows less), at most ``max_shadowed`` experts, the most loaded
first; with ``shadow_experts=N`` the N most loaded experts that have travelling rows, whatever the cost. The decision uses the expert
group's summed counts (one small all-reduce per layer), so every rank of the group shadows the same
experts. Results are unchanged (tested): a shadowed expert computes the same rows with the same
weights, only on another rank, and its gradient is the same sum.
"""
from __future__ import annotations

import torch
from torch.func import functional_call

from ..experts import Experts
from .communicator import Communicator


def check_shadow_experts(shadow_experts) -> None:
    """0, a positive integer, or "auto"; anything else is refused with what is allowed."""
    ok = shadow_experts == "auto" or (isinstance(shadow_experts, int) and not isinstance(shadow_experts, bool)
                                     and shadow_experts >= 0)
    if not ok:
        raise ValueError(f"shadow_experts={shadow_experts!r} is not allowed; allowed: 0 (off), an integer N >= 1 "
                         f"(the N most loaded experts) or 'auto' (the cost rule)")


def choose_shadowed(global_counts: torch.Tensor, own_counts: torch.Tensor, d_model: int, weights_per_expert: int,
                    mode: int | str, cost_ratio: float, max_shadowed: int) -> list[int]:
    """The global ids of the experts worth shadowing this step, most loaded first (see the docstring).

    ``global_counts[E]``: rows per expert over the expert group; ``own_counts[E]``: rows each expert's
    owner holds itself (those never travel either way).
    """
    remote = global_counts - own_counts                                       # n_e: rows that would travel
    if mode == "auto":
        worth_it = 4 * remote * d_model > cost_ratio * 2 * weights_per_expert
    else:
        worth_it, max_shadowed = remote > 0, mode                             # the N most loaded
    order = torch.argsort(global_counts, descending=True, stable=True)
    return [int(e) for e in order if worth_it[e]][:max_shadowed]


class BroadcastFromOwner(torch.autograd.Function):
    """Forward: the owner's tensor on every rank of the group. Backward: the gradients summed over the
    group (every rank's contribution to the shadowed weights), which reach the owner's parameter."""

    @staticmethod
    def forward(ctx, tensor, owner: int, comm: Communicator):
        ctx.comm = comm
        return comm.broadcast_(tensor.detach().clone().contiguous(), root=owner)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.allreduce_(grad.contiguous().clone(), purpose="allreduce_shadow_grads"), None, None


def shadow_weights(experts: Experts, shadowed: list[int], num_local: int, comm: Communicator) -> dict[str, torch.Tensor]:
    """The stacked weights ``{name: [S, ...]}`` of the shadowed experts, on every rank of the group."""
    stacked = {}
    for name, param in experts.named_parameters(recurse=False):
        pieces = []
        for e in shadowed:
            owner, local = divmod(e, num_local)
            mine = owner == comm.rank
            # Only the owner's tensor is real. The others' stand-ins must require a gradient too, or
            # autograd would skip their backward, and with it their part in the gradient's all-reduce.
            source = param[local] if mine else param.new_zeros(param.shape[1:], requires_grad=True)
            pieces.append(BroadcastFromOwner.apply(source, owner, comm))
        stacked[name] = torch.stack(pieces)
    return stacked


def run_shadowed(experts: Experts, weights: dict[str, torch.Tensor], rows: torch.Tensor, counts: torch.Tensor,
                 grouped_matmul) -> torch.Tensor:
    """The shadowed experts on this rank's rows for them (expert-major, ``counts[S]``): the experts'
    own forward with the broadcast weights in place of the local ones."""
    return functional_call(experts, weights, (rows, counts, grouped_matmul))


def split_segments(counts: torch.Tensor, chosen: list[int]) -> tuple[torch.Tensor, int]:
    """For rows sorted by global expert (``counts[E]``): the row order that puts the ``chosen`` experts'
    segments first (in that order), then every other row in its order; and how many rows come first."""
    counts = counts.to("cpu", torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    first = [torch.arange(int(starts[e]), int(starts[e] + counts[e])) for e in chosen]
    is_chosen = torch.zeros(int(counts.sum()), dtype=torch.bool)
    for index in first:
        is_chosen[index] = True
    order = torch.cat([*first, torch.nonzero(~is_chosen).flatten()])
    return order, int(is_chosen.sum())
