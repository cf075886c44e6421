"""FasterMoE's dynamic expert shadowing: move a popular expert's weights to the tokens, not its tokens to it.

    parallelize(model, layout, shadow_experts="auto")     # or an int N: the N most loaded, or 0: off
    mpirun -n 4 python -m fastmoe_edu.train --shadow_experts=auto

In expert parallelism an expert that many tokens choose makes its rank the bottleneck: every other
rank sends it rows (and receives them back, and again for the gradients), and it computes them all.
FasterMoE (He et al. 2022) *shadows* such an expert for one step: its owner broadcasts the expert's
weights to the expert group, every rank computes its own rows for that expert locally, and in the
backward pass the weight gradients are summed back to the owner.

**Which experts** (``shadow_experts="auto"``): FasterMoE's greedy policy on a latency model. With
``c[w, e]`` the rows rank w holds for expert e (all-gathered, so every rank decides alike), S the
shadowed set, b the bytes of a row, F = 2·W_e the forward flops of one row through one expert (W_e
its weight count) and B_e its weight bytes, the model of one step of the layer is

    link_w    = 4 · max(rows w sends, rows w receives) · b · β       2 all-to-alls forward, 2 backward
    compute_w = 3 · (rows w computes) · F · γ                         forward + backward ≈ 3 × forward
    T(S)      = max_w (link_w + compute_w)  +  ratio · 3 · |S| · B_e · β

where a rank computes its own rows for the experts in S and, for its own experts outside S, every
rank's rows; rows of experts in S never travel; the last term is the broadcast of the weights (B_e)
and the all-reduce of their gradients (≈ 2 B_e). β (seconds per byte of the exchange) and γ
(seconds per flop of the experts' GEMMs) are **measured** when the layer is made parallel (once per kind of expert)
(:func:`measure_rates`: a timed all-to-all and a timed expert call, the slowest rank's figures).
Experts are tried most loaded first; each is kept while it lowers T, at most ``max_shadowed``;
``ratio`` is ``shadow_cost_ratio`` (1; larger shadows less). ``shadow_experts=N`` shadows the N most
loaded experts that have travelling rows, whatever the model says.

Results are unchanged (tested): a shadowed expert computes the same rows with the same weights, only
on another rank, and its gradient is the same sum. Shadowing composes with the flat, hierarchical and
pipelined exchanges (the rows that still travel take it), not with tensor-parallel experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..experts import Experts
from .communicator import Communicator
from .stats import wall_clock


def check_shadow_experts(shadow_experts) -> None:
    """0, a positive integer, or "auto"; anything else is refused with what is allowed."""
    ok = shadow_experts == "auto" or (isinstance(shadow_experts, int) and not isinstance(shadow_experts, bool)
                                     and shadow_experts >= 0)
    if not ok:
        raise ValueError(f"shadow_experts={shadow_experts!r} is not allowed; allowed: 0 (off), an integer N >= 1 "
                         f"(the N most loaded experts) or 'auto' (FasterMoE's greedy policy)")


@dataclass(frozen=True)
class ShadowRates:
    """The two rates of the latency model, measured (:func:`measure_rates`)."""
    seconds_per_byte: float       # β: the exchange, per byte a rank sends
    seconds_per_flop: float       # γ: the experts' grouped GEMM, per flop


def measure_rates(comm: Communicator, experts: Experts, backend, probe_bytes: int = 2 ** 18,
                  probe_rows: int = 256, repeats: int = 3) -> ShadowRates:
    """β and γ on this hardware: the fastest of ``repeats`` timings of an all-to-all with ``probe_bytes``
    per peer and of one expert on ``probe_rows`` rows; then the slowest rank's figures (a max-reduce),
    so that every rank of the group decides alike."""
    device, dtype, d_model = experts.w1.device, experts.w1.dtype, experts.d_model
    rows_per_peer = max(1, probe_bytes // (d_model * experts.w1.element_size()))
    send = torch.zeros(comm.size * rows_per_peer, d_model, device=device, dtype=dtype)
    tokens = torch.randn(probe_rows, d_model, device=device, dtype=dtype)
    counts = torch.zeros(experts.num_experts, dtype=torch.int64)
    counts[0] = probe_rows
    exchange_s, expert_s = math.inf, math.inf
    with torch.no_grad():
        for _ in range(repeats):
            comm.barrier()
            start = wall_clock(device)
            comm.alltoallv(send, [rows_per_peer] * comm.size, [rows_per_peer] * comm.size, purpose="shadow_probe")
            middle = wall_clock(device)
            experts(tokens, counts.to(device), backend)
            end = wall_clock(device)
            exchange_s, expert_s = min(exchange_s, middle - start), min(expert_s, end - middle)
    sent_bytes = max(1, comm.size - 1) * rows_per_peer * d_model * send.element_size()
    flops = probe_rows * 2 * weights_per_expert(experts)
    worst = comm.allreduce_(torch.tensor([exchange_s / sent_bytes, expert_s / flops], dtype=torch.float64),
                            op="max", purpose="allreduce_shadow_rates")
    return ShadowRates(float(worst[0]), float(worst[1]))


def weights_per_expert(experts: Experts) -> int:
    """W_e: the weight count of one expert (its slice of every stacked parameter)."""
    return sum(p.numel() for p in experts.parameters(recurse=False)) // experts.num_experts


def predicted_time(rank_counts: torch.Tensor, shadowed: list[int], num_local: int, row_bytes: int,
                   weights: int, weight_bytes: int, rates: ShadowRates, cost_ratio: float) -> float:
    """T(S) of the module docstring, for ``rank_counts[P, E]`` (rows rank w holds for expert e)."""
    P, E = rank_counts.shape
    counts = rank_counts.to(torch.float64)
    owner = torch.arange(E) // num_local                                   # expert e lives on rank e // L
    mine = owner[None, :] == torch.arange(P)[:, None]                      # [P, E]: w owns e
    kept = torch.zeros(E, dtype=torch.bool)
    kept[shadowed] = True
    travelling = counts * (~kept)[None, :]                                 # rows that take the exchange
    sends = (travelling * ~mine).sum(1)                                    # rows w sends to other owners
    receives = ((travelling.sum(0)[None, :] - travelling) * mine).sum(1)   # rows the others send to w
    computes = (counts * kept[None, :]).sum(1) + (travelling.sum(0)[None, :] * mine).sum(1)
    link = 4 * torch.maximum(sends, receives) * row_bytes * rates.seconds_per_byte
    compute = 3 * computes * (2 * weights) * rates.seconds_per_flop
    return float((link + compute).max()) + cost_ratio * 3 * len(shadowed) * weight_bytes * rates.seconds_per_byte


def choose_shadowed(rank_counts: torch.Tensor, num_local: int, row_bytes: int, weights: int, weight_bytes: int,
                    mode: int | str, rates: ShadowRates | None, cost_ratio: float, max_shadowed: int) -> list[int]:
    """The global ids of the experts to shadow this step, most loaded first (see the module docstring)."""
    P, E = rank_counts.shape
    owner = torch.arange(E) // num_local
    remote = rank_counts.sum(0) - rank_counts[owner, torch.arange(E)]      # rows that would travel to e
    order = [int(e) for e in torch.argsort(rank_counts.sum(0), descending=True, stable=True) if remote[e] > 0]
    if mode != "auto":
        return order[:mode]                                                # the N most loaded
    chosen = []
    best = predicted_time(rank_counts, chosen, num_local, row_bytes, weights, weight_bytes, rates, cost_ratio)
    for e in order[:max_shadowed]:                                         # FasterMoE's greedy policy
        time_with = predicted_time(rank_counts, chosen + [e], num_local, row_bytes, weights, weight_bytes,
                                   rates, cost_ratio)
        if time_with >= best:
            break
        chosen, best = chosen + [e], time_with
    return chosen


def describe_choice(name: str, shadowed: list[int], rank_counts: torch.Tensor, num_local: int, row_bytes: int,
                    weights: int, weight_bytes: int, rates: ShadowRates, cost_ratio: float) -> str:
    """One log line: the measured rates, the experts chosen and the model's step times with and without."""
    args = (num_local, row_bytes, weights, weight_bytes, rates, cost_ratio)
    ms = 1e3
    return (f"shadow_experts=auto, {name}: measured {1e-9 / rates.seconds_per_byte:.3g} GB/s exchange, "
            f"{1e-9 / rates.seconds_per_flop:.3g} GFLOP/s experts; first step shadows experts {shadowed} "
            f"(predicted {predicted_time(rank_counts, shadowed, *args) * ms:.3f} ms, "
            f"{predicted_time(rank_counts, [], *args) * ms:.3f} ms without); decided again every step")


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
                 backend) -> torch.Tensor:
    """The shadowed experts on this rank's rows for them (expert-major, ``counts[S]``): the experts'
    own forward with the broadcast weights in place of the local ones."""
    return functional_call(experts, weights, (rows, counts, backend))


def split_segments(counts: torch.Tensor, chosen: list[int]) -> tuple[torch.Tensor, int]:
    """For rows sorted by global expert (``counts[E]``): the row order that puts the ``chosen`` experts'
    segments first (in that order), then every other row in its order; and how many rows come first."""
    counts = counts.to("cpu", torch.int64)
    place = torch.full((len(counts),), len(chosen))            # each expert's place: the chosen ones 0, 1, ...
    place[chosen] = torch.arange(len(chosen))                  # in order, every other one after them
    order = torch.argsort(torch.repeat_interleave(place, counts), stable=True)   # (stable: rows in order)
    return order, int(counts[chosen].sum())
