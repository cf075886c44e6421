"""DeepSpeed-TED: tensor × expert × data parallelism, with duplicate token dropping (REFERENCE §1, §4).

    world = tp × ep × dp          rank = (dp_index · ep + ep_index) · tp + tp_index     (layout.py)

* non-expert layers are **tensor-parallel** over the tp group (tensor_parallel.py);
* each MoE layer's experts are **expert-parallel** over the ep group (E / ep per rank); the ranks
  with the same ep index hold the same experts;
* the batch is split into ``ep × dp`` shards; the tp ranks of a group read the same shard.

Gradients (after every rank's ``loss.backward()`` on its shard, R = ep · dp shards):

    parameter                         where copies live                  all-reduce over
    tp-sliced (q/k/v/out, MLP up/down) ep·dp ranks with my tp index      data group, ×1/R
    whole non-expert (norms, gate...) same                               data group, ×1/R
    experts, no token dropping        dp ranks with my (ep, tp) index    expert_replica group, ×1/R
    experts, duplicate tokens dropped tp·dp ranks with my ep index       expert_replica, then Σ over tensor group

**Duplicate token dropping.** At the gate the tp ranks of a group hold identical tokens, so without
it each of them sends the same rows through its own all-to-all: tp copies of the traffic. With it,
each tp rank keeps a 1/tp share of the expert-sorted buffer (a contiguous piece, so it stays
sorted by expert) and exchanges only that; after the experts the tp group all-gathers the pieces,
and every tp rank continues with the full buffer (the combine is identical on all of them):

    buffer [N rows] ─► my share [≈N/tp] ─► all-to-all ─► experts ─► all-to-all ─► all-gather (tp) ─► [N rows]

Each rank's experts now see only 1/tp of the rows, so expert gradients are partial per tp rank:
they are summed over the tensor group as well (last row of the table). The gate, the combine and
everything else see the same full tensors as without dropping, so results do not change.

Deviation from the paper: TED all-gathers the *combined* token outputs ``[T, d]``; here the
all-gather is of the expert output rows ``[k·T, d]`` just before the combine (the combine then runs
unchanged inside ``MoELayer``). The all-to-all volume saving (1/tp) is the same; the intra-node
all-gather moves k× more bytes than the paper's.
"""
from __future__ import annotations

import torch
from torch import nn

from .exchange import exchange_counts, global_gather, global_scatter, regroup_by_expert, regroup_by_source
from .expert_parallel import ExpertParallel, keep_local_experts
from .gradients import _allreduce_in_buckets, allreduce_gradients, split_parameters
from .hierarchical import HierarchicalAllToAll, HierarchicalExchange, check_ranks_per_node
from .layout import ParallelLayout
from .pipeline import check_pipeline_degree, pipelined_expert_exchange
from .tensor_parallel import (GatherRowsFromTensorGroup, SplitRowsForTensorRank, make_tensor_parallel,
                              row_shares, tensor_parallel_parameters)


class TEDExpertParallel(ExpertParallel):
    """Expert parallelism plus the TED / FasterMoE / Tutel options of one MoE layer.

    Args:
        drop_duplicate_tokens: each tp rank exchanges only its 1/tp share of the rows (see the module doc).
        pipeline_degree: D > 1 cuts the exchange into D overlapped chunks (pipeline.py).
        ranks_per_node: G; set it to use the hierarchical all-to-all (hierarchical.py); None = flat.
    """

    def __init__(self, layout: ParallelLayout, num_experts: int, exchange: str = "alltoallv",
                 drop_duplicate_tokens: bool = False, pipeline_degree: int = 1, ranks_per_node: int | None = None):
        check_ted_options(layout, pipeline_degree, ranks_per_node)
        super().__init__(layout, num_experts, exchange)
        self.drop_duplicate_tokens = bool(drop_duplicate_tokens) and layout.tp_size > 1
        self.pipeline_degree = pipeline_degree
        self.hierarchical = None if ranks_per_node is None else HierarchicalExchange(layout.expert, ranks_per_node)
        if self.hierarchical is not None:
            self.exchange = "hierarchical"
        elif pipeline_degree > 1:
            self.exchange = f"ialltoallv x{pipeline_degree}"

    def run_experts(self, experts, buffer: torch.Tensor, counts: torch.Tensor, backend) -> torch.Tensor:
        tensor = self.layout.tensor
        if self.drop_duplicate_tokens:
            shares = row_shares(buffer.shape[0], tensor.size)
            counts = _counts_in_share(counts, shares, tensor.rank)
            buffer = SplitRowsForTensorRank.apply(buffer, shares, tensor)        # my ≈1/tp of the rows
        if self.pipeline_degree > 1:
            out = pipelined_expert_exchange(experts, buffer, counts, backend, self.layout.expert,
                                            self.num_local_experts, self.pipeline_degree)
        elif self.hierarchical is not None:
            out = self._run_hierarchical(experts, buffer, counts, backend)
        else:
            out = super().run_experts(experts, buffer, counts, backend)
        if self.drop_duplicate_tokens:
            out = GatherRowsFromTensorGroup.apply(out, shares, tensor)           # every tp rank: all N rows
        return out

    def _run_hierarchical(self, experts, buffer, counts, backend):
        plan = exchange_counts(counts, self.num_local_experts, self.layout.expert)
        received = HierarchicalAllToAll.apply(buffer, plan.send_rows, plan.recv_rows, self.hierarchical)
        expert_rows = regroup_by_expert(received, plan.recv_counts, "alltoallv")
        out = experts(expert_rows, plan.local_expert_counts.to(counts.device), backend.grouped_matmul)
        returned = regroup_by_source(out, plan.recv_counts, "alltoallv")
        return HierarchicalAllToAll.apply(returned, plan.recv_rows, plan.send_rows, self.hierarchical)

    def __repr__(self) -> str:
        return (super().__repr__()[:-1] + f", drop_duplicate_tokens={self.drop_duplicate_tokens}, "
                f"pipeline_degree={self.pipeline_degree})")


def _counts_in_share(counts: torch.Tensor, shares: list[int], tp_rank: int) -> torch.Tensor:
    """Rows per expert inside my share ``[lo, hi)`` of the expert-sorted buffer: |segment_e ∩ [lo, hi)|."""
    lo = sum(shares[:tp_rank])
    hi = lo + shares[tp_rank]
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    return ends.clamp(lo, hi) - starts.clamp(lo, hi)


def check_ted_options(layout: ParallelLayout, pipeline_degree: int, ranks_per_node: int | None) -> None:
    """Plain arithmetic (no communication): the same ValueError on every rank for a bad combination."""
    check_pipeline_degree(pipeline_degree)
    if ranks_per_node is not None:
        check_ranks_per_node(ranks_per_node, layout.ep_size)
        if pipeline_degree > 1:
            raise ValueError(f"pipeline_degree={pipeline_degree} with ranks_per_node={ranks_per_node}: the pipelined "
                             f"exchange is flat only; use pipeline_degree=1 with the hierarchical all-to-all, "
                             f"or ranks_per_node unset with pipelining")


def make_ted(model: nn.Module, layout: ParallelLayout, drop_duplicate_tokens: bool = False,
             pipeline_degree: int = 1, ranks_per_node: int | None = None, exchange: str | None = None) -> nn.Module:
    """Tensor-parallel non-expert layers + TED expert parallelism for every MoE layer of ``model``, in place.

    Build the whole model from the same seed on every rank first; call before creating the optimizer.
    All checks run before anything changes and without communication.
    """
    from ..layer import MoELayer

    check_ted_options(layout, pipeline_degree, ranks_per_node)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layout.check_num_experts(layer.num_experts)
        if layer.expert_parallel is not None:
            raise ValueError(f"{layer} is already expert-parallel")
    make_tensor_parallel(model, layout)
    for layer in layers:
        method = exchange or ("pairwise" if layer.backend_name == "reference" else "alltoallv")
        plan = TEDExpertParallel(layout, layer.num_experts, method, drop_duplicate_tokens,
                                 pipeline_degree, ranks_per_node)
        keep_local_experts(layer.experts, plan.first_local_expert, plan.num_local_experts)
        layer.expert_parallel = plan
    return model


def drops_duplicate_tokens(model: nn.Module) -> bool:
    return any(getattr(getattr(m, "expert_parallel", None), "drop_duplicate_tokens", False) for m in model.modules())


@torch.no_grad()
def allreduce_ted_gradients(model: nn.Module, layout: ParallelLayout) -> None:
    """The gradient table of the module doc: data group for non-expert, replicas (and tp if dropping) for experts."""
    allreduce_gradients(model, layout)
    if drops_duplicate_tokens(model):
        _, experts = split_parameters(model)
        _allreduce_in_buckets(experts, layout.tensor, 1.0, 25 * 2**20)         # Σ of the tp ranks' shares


@torch.no_grad()
def ted_clip_grad_norm_(model: nn.Module, max_norm: float, layout: ParallelLayout) -> torch.Tensor:
    """Global gradient norm under TED (after :func:`allreduce_ted_gradients`), and clipping like torch.

        ‖g‖² = Σ whole non-expert (counted once) + Σ_tp tp-sliced + Σ_ep experts
    (the tp ranks hold equal copies of the experts and of the whole non-expert parameters).
    """
    replicated, experts = split_parameters(model)
    grads = [p.grad for p in replicated + experts if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sliced_ids = {id(p) for p in tensor_parallel_parameters(model)}

    def squares(params):
        return sum((p.grad.double().square().sum() for p in params if p.grad is not None),
                   torch.zeros((), dtype=torch.float64))

    whole_sq = squares([p for p in replicated if id(p) not in sliced_ids])
    sliced_sq = squares([p for p in replicated if id(p) in sliced_ids]).reshape(1)
    expert_sq = squares(experts).reshape(1)
    layout.tensor.allreduce_(sliced_sq, purpose="allreduce_grad_norm")
    layout.expert.allreduce_(expert_sq, purpose="allreduce_grad_norm")
    total_norm = (whole_sq + sliced_sq[0] + expert_sq[0]).sqrt()
    clip = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(clip.to(g.dtype))
    return total_norm.to(grads[0].dtype)
