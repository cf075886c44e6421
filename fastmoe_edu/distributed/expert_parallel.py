"""Expert parallelism for :class:`~fastmoe_edu.layer.MoELayer`: each rank holds E / ep of the experts.

Two ways to switch it on (both do the same thing)::

    layout = ParallelLayout()                                   # all ranks share the experts
    layer = MoELayer(d_model, d_hidden, num_experts=8, layout=layout)      # a new layer
    make_expert_parallel(model, layout)                          # every MoELayer of a built model

``num_experts`` stays the *global* count E; each rank keeps the experts
``ep_rank·L .. ep_rank·L + L − 1`` with ``L = E / ep`` (global expert g lives on expert-rank g // L).
The layer is built whole (all E experts, from the same random stream on every rank) and then cut
down to the local slice, so the distributed model holds exactly the weights a single process would.

One forward pass, on every rank (the layer's own steps in capitals, this file's in lower case):

    GATE on local tokens -> PRUNE (capacity of *this rank's* tokens) -> COUNT -> POSITIONS ->
    LOCAL SCATTER (rows sorted by global expert) -> exchange counts -> global scatter -> regroup ->
    local EXPERTS (grouped GEMM) -> ungroup -> global gather -> LOCAL GATHER + COMBINE

Capacity is **per rank**: the router computes ``C = ceil(cf · k · T / E)`` from the rank's own T
tokens and the pruning walks the rank's own tokens, as GShard (per group) and FastMoE (per
worker) do. A capacity-limited layer on P ranks therefore equals a single process that runs each
rank's shard separately. Dropless routers (cf = None) equal a single process on the whole batch.

Balance statistics (aux loss, sigmoid load) are over the global batch: see balance.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ..experts import Experts
from .balance import global_aux_loss, global_router_load
from .communicator import EXCHANGE_METHODS
from .exchange import (exchange_counts, global_gather, global_scatter, regroup_by_expert,
                       regroup_by_source)
from .layout import ParallelLayout


class ExpertParallel:
    """The expert-parallel part of one MoE layer: which experts live here and how rows travel.

    ``exchange``: ``"pairwise"`` (readable Sendrecv rounds, block-wise regroup) or ``"alltoallv"``
    (one collective, one-index permutation regroup). Both give identical numbers.
    """

    def __init__(self, layout: ParallelLayout, num_experts: int, exchange: str = "alltoallv"):
        if exchange not in EXCHANGE_METHODS:
            raise ValueError(f"exchange={exchange!r} is not known; allowed: {', '.join(EXCHANGE_METHODS)}")
        self.layout, self.exchange = layout, exchange
        self.num_experts = num_experts
        self.num_local_experts = layout.check_num_experts(num_experts)
        self.first_local_expert = layout.ep_rank * self.num_local_experts

    def run_experts(self, experts: Experts, buffer: torch.Tensor, counts: torch.Tensor, backend) -> torch.Tensor:
        """Steps 3 and 6-8: ``buffer`` (this rank's rows sorted by global expert, ``counts[E]``) -> expert outputs, same order."""
        comm = self.layout.expert
        plan = exchange_counts(counts, self.num_local_experts, comm)                      # 3. counts
        received = global_scatter(buffer, plan, comm, self.exchange)                      # 6. (source, expert)
        expert_rows = regroup_by_expert(received, plan.recv_counts, self.exchange)        #    (expert, source)
        expert_out = experts(expert_rows, plan.local_expert_counts.to(counts.device),     # 7. grouped GEMM
                             backend.grouped_matmul)
        returned = regroup_by_source(expert_out, plan.recv_counts, self.exchange)         #    (source, expert)
        return global_gather(returned, plan, comm, self.exchange)                         # 8. back home

    def global_aux_loss(self, gate, route) -> torch.Tensor:
        return global_aux_loss(gate, route, self.layout.data)

    def global_load(self, gate) -> torch.Tensor | None:
        return global_router_load(gate, self.layout.data)

    def __deepcopy__(self, memo):
        # A copied layer (e.g. an EMA copy of the model) talks to the same ranks: share, never copy, MPI state.
        return self

    def __repr__(self) -> str:
        last = self.first_local_expert + self.num_local_experts - 1
        return (f"ExpertParallel(experts {self.first_local_expert}..{last} of {self.num_experts} on "
                f"expert-rank {self.layout.ep_rank}/{self.layout.ep_size}, exchange={self.exchange!r})")


def make_expert_parallel(module: nn.Module, layout: ParallelLayout, exchange: str | None = None) -> nn.Module:
    """Spread the experts of every :class:`MoELayer` in ``module`` over the layout's expert group, in place.

    Call it on the freshly built model, before creating the optimizer (the expert parameters are
    replaced by their local slices). ``exchange=None`` picks ``"pairwise"`` for layers on the
    reference backend (the readable path) and ``"alltoallv"`` otherwise (the fast path).
    Raises ValueError, before changing anything and without communicating, when a layer's
    ``num_experts`` is not divisible by the expert-parallel size.
    """
    from ..layer import MoELayer          # layer.py imports this module lazily; import it back the same way

    layers = [m for m in module.modules() if isinstance(m, MoELayer)]
    for layer in layers:                                                    # check all before changing any
        layout.check_num_experts(layer.num_experts)
        if layer.expert_parallel is not None:
            raise ValueError(f"{layer} is already expert-parallel")
    for layer in layers:
        method = exchange or ("pairwise" if layer.backend_name == "reference" else "alltoallv")
        plan = ExpertParallel(layout, layer.num_experts, method)
        keep_local_experts(layer.experts, plan.first_local_expert, plan.num_local_experts)
        layer.expert_parallel = plan
    return module


def keep_local_experts(experts: Experts, first: int, count: int) -> None:
    """Replace the stacked expert weights ``w[E, ...]`` by the slice ``w[first : first + count]``."""
    for name in ("w1", "w2", "w3", "b1", "b2", "b3"):
        weight = getattr(experts, name)
        if weight is not None:
            setattr(experts, name, nn.Parameter(weight.detach()[first:first + count].clone(),
                                                requires_grad=weight.requires_grad))
    experts.num_experts = count


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of expert-parallel experts (each rank holds different ones: never averaged over ep)."""
    from ..layer import MoELayer

    params = []
    for layer in module.modules():
        if isinstance(layer, MoELayer) and layer.expert_parallel is not None:
            params.extend(layer.experts.parameters())
    return params
