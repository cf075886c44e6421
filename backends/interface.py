"""The backend interface: what every backend module provides, written down as a ``typing.Protocol``.

A *backend* is a module with the functions of :class:`Backend` (plain module-level functions: the
``self`` of the Protocol's methods stands for the module). The MoE layer calls them in this order:

    softmax_top_k_route | sigmoid_top_k_route        route: k experts and k weights per token
    prune_capacity                                 drop assignments past an expert's capacity
    count_tokens_per_expert, exclusive_prefix_sum  where each expert's segment of rows begins
    stable_positions                               the row of every (token, slot) in that layout
    scatter_rows                                   tokens -> expert-contiguous rows
    expert_feed_forward                            every expert's network on its segment of rows
      (grouped_matmul                              its linear maps, one segment each)
    gather_combine                                 rows -> tokens, weighted by the router

These are the steps of FastMoE (He et al., 2021, arXiv:2103.13262); the sigmoid router is
DeepSeek-V3's (DeepSeek-AI, 2024, arXiv:2412.19437). The plain-PyTorch reference implementation is
``fastmoe_edu/dispatch.py``, the two routing functions of ``fastmoe_edu/routing.py`` and
``fastmoe_edu/experts.py``'s ``expert_feed_forward``; their docstrings give the full semantics.

Shapes: ``T`` tokens, ``k`` slots per token, ``E`` experts, ``d`` features. ``expert_ids`` and
``rows`` are int64 ``[T, k]`` with -1 for a dropped assignment. Contract: integer results equal the
reference's exactly (they fix the row layout, so they must not depend on thread scheduling); float
results equal it up to summation order. "Differentiable" means autograd must flow through the
function into the inputs named; the integer steps carry no gradient.

To add a backend: write one module with these functions, and add one line to ``REGISTRY`` in
``backends/__init__.py``. :func:`~fastmoe_edu.backends.get_backend` checks that every member is there.
"""
from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    """The members every backend module defines."""

    NAME: str
    """The backend's name in the registry (what ``MoELayer(backend=...)`` takes)."""

    def available(self, device: torch.device | str) -> tuple[bool, str]:
        """(True, "") if the backend can run on tensors on ``device``, else (False, why not)."""

    # ------------------------------------------------------------------------------------------------
    # Integer steps: not differentiable
    # ------------------------------------------------------------------------------------------------
    def prune_capacity(self, expert_ids: torch.Tensor, num_experts: int, capacity: int | None,
                       tokens_per_group: int | None = None, priority: torch.Tensor | None = None) -> torch.Tensor:
        """Keep at most ``capacity`` assignments per expert (slot 0 of every token first, then slot 1,
        ...; tokens in order), set the rest to -1; ``None`` keeps all. With ``tokens_per_group`` = S, each
        run of S consecutive tokens (a sequence) has its own ``capacity`` per expert and its tokens compete
        only among themselves, in the same order. With ``priority`` [T] (batch-prioritized routing) the
        tokens go in order of decreasing priority instead, ties in token order (still slot-major: every
        slot 0 before any slot 1); ``None`` keeps token order. Not differentiable."""

    def count_tokens_per_expert(self, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
        """count[e] = number of kept (token, slot) pairs routed to expert e, int64 ``[E]``.
        Not differentiable."""

    def exclusive_prefix_sum(self, counts: torch.Tensor) -> torch.Tensor:
        """start[e] = Σ_{j<e} count[j]: where expert e's segment begins. Not differentiable."""

    def stable_positions(self, expert_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """row[t, s] = start[e] + number of assignments to the same expert e earlier in the order
        t·k + s; -1 if dropped. Not differentiable."""

    # ------------------------------------------------------------------------------------------------
    # Data movement and expert products: differentiable
    # ------------------------------------------------------------------------------------------------
    def scatter_rows(self, x: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
        """buffer ``[num_rows, d]`` with buffer[rows[t, s]] = x[t]; rows nobody owns are 0. ``rows`` are what
        stable_positions returns for starts = exclusive_prefix_sum(counts), so the kept assignments own rows
        0..kept-1 and ``num_rows`` >= kept (the layer passes Σ counts = kept).
        Differentiable in ``x``: grad_x[t] = Σ_s grad_buffer[rows[t, s]]."""

    def gather_combine(self, expert_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y[t] = Σ_{s kept} weights[t, s] · expert_out[rows[t, s]], ``[T, d]``.
        Differentiable in ``expert_out`` and ``weights``."""

    def grouped_matmul(self, rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """out[segment e] = rows[segment e] · weight[e]ᵀ, for rows ``[N, d_in]`` in segments of
        counts[e] rows and weight ``[E, d_out, d_in]``. Differentiable in ``rows`` and ``weight``."""

    def expert_feed_forward(self, experts, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert of ``experts`` (a ``fastmoe_edu.experts.Experts``: its stacked weights, kind and constants)
        on its segment of ``rows`` ``[N, d_model]`` (counts[e] rows for expert e) -> ``[N, d_model]``, as
        ``fastmoe_edu.experts.expert_feed_forward`` defines it: W2·act(W1·x) (⊙ W3·x), biases if any.
        Differentiable in ``rows`` and every weight."""

    # ------------------------------------------------------------------------------------------------
    # Routing: differentiable in the weights, not in the ids
    # ------------------------------------------------------------------------------------------------
    def softmax_top_k_route(
        self, logits: torch.Tensor, top_k: int, renormalize: bool, num_groups: int | None = None,
        top_k_groups: int | None = None, bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights) ``[T, k]``: p = softmax(logits); ids = top-k of p, or of p + ``bias`` [E] if one is
        given (ERNIE-4.5-MoE), within the best ``top_k_groups`` of ``num_groups`` equal consecutive expert
        groups, each scored by its largest p (+ bias), if given (DeepSeek-V2); weights = p[ids], divided by
        their sum if ``renormalize``. Differentiable: weights in ``logits``; ``bias`` only selects."""

    def sigmoid_top_k_route(
        self,
        logits: torch.Tensor,
        bias: torch.Tensor,
        top_k: int,
        route_scale: float,
        num_groups: int | None,
        top_k_groups: int | None,
        renormalize: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, weights) ``[T, k]``: s = sigmoid(logits); ids = top-k of s + bias (within the best
        ``top_k_groups`` of ``num_groups`` expert groups, each scored by the sum of its two largest s + bias,
        if given); weights = s[ids] / Σ s[ids] · route_scale (s[ids] · route_scale if not ``renormalize``),
        finite for any finite logits (where the chosen s underflow, the same ratio is taken as
        a softmax of their logits: see fastmoe_edu.routing.sigmoid_top_k_route). Differentiable: weights
        in ``logits``; ``bias`` only selects (no gradient)."""


@runtime_checkable
class HasThreadPool(Protocol):
    """Optional: a backend with a CPU thread pool of its own (numba's) also defines this hook."""

    def set_num_threads(self, count: int) -> None:
        """Use at most ``count`` CPU threads. ``set_cpu_threads`` calls it before torch.set_num_threads,
        so a pool that resets the shared OpenMP thread count when it starts cannot undo torch's."""


#: The functions of :class:`Backend`, in the order declared above.
FUNCTIONS = tuple(name for name, member in vars(Backend).items() if callable(member) and not name.startswith("_"))

#: Every member of :class:`Backend`: its attributes (``NAME``), then its functions.
MEMBERS = (*inspect.get_annotations(Backend), *FUNCTIONS)


def missing_members(module) -> list[str]:
    """The members of :class:`Backend` that ``module`` lacks (empty: the module satisfies the Protocol)."""
    return [name for name in MEMBERS if not hasattr(module, name)]
