"""Expert parallelism: the expert runner that spreads one MoE layer's experts over the expert group.

``parallelize`` (parallelize.py) installs an :class:`ExpertParallel` as the layer's ``expert_runner``
and a :class:`SumOverRanks` as its ``reduce``; the layer itself is unchanged. ``num_experts`` stays
the *global* count E; each rank keeps the experts ``ep_rank·L .. ep_rank·L + L − 1`` with ``L = E / ep``
(global expert g lives on expert-rank g // L). The layer is built whole (all E experts, from the
same random stream on every rank) and then cut down to the local slice, so the distributed model
holds exactly the weights a single process would.

One forward pass, on every rank (the layer's own steps in capitals, this runner's in lower case):

    GATE on local tokens -> PRUNE (capacity of *this rank's* tokens) -> COUNT -> POSITIONS ->
    LOCAL SCATTER (rows sorted by global expert) -> [drop duplicates] -> exchange counts -> global
    scatter -> regroup -> local EXPERTS (grouped GEMM) -> ungroup -> global gather -> [all-gather
    the tp shares] -> LOCAL GATHER + COMBINE

Capacity is **per rank**: the router computes ``C = ceil(cf · k · T / E)`` from the rank's own T
tokens, as GShard (per group) and FastMoE (per worker) do. A capacity-limited layer on P ranks
therefore equals a single process that runs each rank's shard separately. Dropless routers equal a
single process on the whole batch.

**Duplicate token dropping** (DeepSpeed-TED, Singh et al. 2023). The tp ranks of a tensor group
hold identical tokens, so without it each of them sends the same rows through its own all-to-all:
tp copies of the traffic. With it, every tp rank routes all T tokens (identically), then dispatches
only its 1/tp share of them, and the tp group all-gathers the *combined* outputs (TED's way,
``drop_duplicate_at="combined"``, the default):

    T tokens ─► route ─► my T/tp tokens ─► dispatch ─► all-to-all ─► experts ─► all-to-all ─► combine
             ─► [T/tp, d] ─► all-gather (tp) ─► [T, d]

``drop_duplicate_at="expert_rows"`` is the variant this project had first: every tp rank dispatches
all tokens, keeps a 1/tp share of the expert-sorted buffer (a contiguous piece, still sorted by
expert), exchanges only that, and all-gathers the expert output rows ``[k·T, d]`` before combining
them: the same all-to-all bytes, k times the all-gather bytes. Either way each rank's experts see
only 1/tp of the rows, so expert gradients are partial per tp rank and are summed over the tensor
group too (gradients.py). Soft MoE layers (whose slots are not token rows) drop nothing under
"combined".
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ..experts import Experts
from ..profiling import named_range
from .communicator import Communicator
from .exchange import FlatExchange, exchange_counts, exchange_rows, regroup_by_expert, regroup_by_source
from .exchange import Permute, inverse_permutation
from .expert_tensor_parallel import run_sharded_experts
from .shadowing import (ShadowRates, choose_shadowed, describe_choice, run_shadowed, shadow_weights, split_segments,
                        weights_per_expert)
from .hierarchical import HierarchicalExchange
from .layout import ParallelLayout
from .autotune import DegreeTuner
from .pipeline import AUTO, pipelined_expert_exchange
from .plan import ExpertSettings
from .tensor_parallel import GatherRowsFromTensorGroup, SplitRowsForTensorRank, row_shares


class ExpertParallel:
    """The expert runner of one MoE layer under expert parallelism (see the module docstring).

    Args:
        settings: its share of the plan (plan.py's :class:`ExpertSettings`): the exchange (``"pairwise"`` or
            ``"alltoallv"``, flat and identical in numbers, or ``"hierarchical"`` with ``ranks_per_node``),
            duplicate token dropping (each tp rank exchanges only its 1/tp share of the rows), tensor-parallel
            experts, the pipeline degrees D_f and D_b (pipeline.py; ``"auto"``: chosen from measurements of the
            first passes, autotune.py) and shadowing.
        name: how the "auto" log line names this layer.
    """

    def __init__(self, layout: ParallelLayout, num_experts: int, settings: ExpertSettings = ExpertSettings(),
                 name: str = "MoE layer"):
        self.layout, self.num_experts, self.settings = layout, num_experts, settings
        self.num_local_experts = layout.check_num_experts(num_experts)
        self.first_local_expert = layout.ep_rank * self.num_local_experts
        self.drop_duplicate_tokens = settings.drop_duplicate_tokens
        self.drop_tokens = self.drop_duplicate_tokens and settings.drop_duplicate_at == "combined"
        self.drop_rows = self.drop_duplicate_tokens and settings.drop_duplicate_at == "expert_rows"
        self.drop_duplicate_at = settings.drop_duplicate_at
        self.expert_tensor_parallel = settings.expert_tensor_parallel
        self.shadow_experts = settings.shadow_experts                       # 0, N or "auto"
        self.shadow_cost_ratio = settings.shadow_cost_ratio
        self.max_shadowed = settings.max_shadowed if settings.max_shadowed is not None else self.num_local_experts
        self.last_shadowed: list[int] | None = None    # the experts shadowed in the last forward (for logs)
        self.shadow_rates: ShadowRates | None = None   # "auto": β and γ, measured by parallelize()
        self.name = name
        self._token_shares: list[int] = []
        self.pipeline_degree = settings.pipeline_degree
        self.backward_pipeline_degree = settings.backward_pipeline_degree
        degrees = (self.pipeline_degree, self.backward_pipeline_degree)
        self.tuner = DegreeTuner(layout, *degrees, label=name) if AUTO in degrees else None
        self.exchange = (HierarchicalExchange(layout.expert, settings.ranks_per_node)
                         if settings.exchange == "hierarchical" else FlatExchange(layout.expert, settings.exchange))

    def share_tokens(self, tokens, expert_ids, weights, counts, backend):
        """Before dispatch: my 1/tp of the (identically routed) tokens under TED's dropping, else all."""
        if not self.drop_tokens:
            return tokens, expert_ids, weights, counts
        tensor = self.layout.tensor
        self._token_shares = shares = row_shares(tokens.shape[0], tensor.size)
        start = sum(shares[:tensor.rank])
        tokens = SplitRowsForTensorRank.apply(tokens, shares, tensor)          # backward: all-gather the grads
        weights = SplitRowsForTensorRank.apply(weights, shares, tensor)
        expert_ids = expert_ids[start:start + shares[tensor.rank]]
        return tokens, expert_ids, weights, backend.count_tokens_per_expert(expert_ids, self.num_experts)

    def collect_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """After combine: the tp group's shares of the output joined, ``[T, d]`` on every tp rank."""
        return GatherRowsFromTensorGroup.apply(y, self._token_shares, self.layout.tensor) if self.drop_tokens else y

    def __call__(self, experts: Experts, buffer: torch.Tensor, counts: torch.Tensor, backend) -> torch.Tensor:
        """Steps 3 and 6-8: ``buffer`` (rows sorted by global expert, ``counts[E]``) -> expert outputs, same order."""
        tensor = self.layout.tensor
        if self.drop_rows:
            shares = row_shares(buffer.shape[0], tensor.size)
            counts = _counts_in_share(counts, shares, tensor.rank)
            buffer = SplitRowsForTensorRank.apply(buffer, shares, tensor)        # my ≈1/tp of the rows
        profiling = self.tuner.next_pass() if self.tuner is not None else None
        if profiling is not None:                                               # "auto": the first passes, timed
            out = self.tuner.run(profiling, self, experts, buffer, counts, backend)   # (unpipelined, unshadowed)
        elif self.shadow_experts != 0:
            out = self._run_with_shadows(experts, buffer, counts, backend)
        else:
            out = self.exchange_and_run(experts, buffer, counts, backend)
        if self.drop_rows:
            out = GatherRowsFromTensorGroup.apply(out, shares, tensor)           # every tp rank: all N rows
        return out

    @property
    def chosen_degrees(self) -> tuple[int, int] | None:
        """(D_f, D_b) this layer runs with; None while "auto" is still measuring."""
        return self.tuner.chosen if self.tuner is not None else (self.pipeline_degree, self.backward_pipeline_degree)

    def exchange_and_run(self, experts: Experts, buffer: torch.Tensor, counts: torch.Tensor, backend,
                         clock=None) -> torch.Tensor:
        """Steps 3 and 6-8 for ``buffer``: rows to their experts' ranks, the local experts, rows back.

        With a pipeline degree > 1 (forward or backward) the same steps run as overlapped chunks (pipeline.py).
        ``clock`` (autotune.py's ``PassClock``): the unpipelined steps, each step's end told to it
        (``counted``, ``scattered``, ``regrouped``, ``computed``, ``ungrouped``, ``gathered``), so "auto"
        times this very exchange."""
        forward_degree, backward_degree = self.chosen_degrees if clock is None else (1, 1)
        if forward_degree > 1 or backward_degree > 1:
            return pipelined_expert_exchange(experts, buffer, counts, backend, self.layout.expert,
                                             self.num_local_experts, forward_degree, backward_degree, self.exchange)
        with named_range("ep/exchange counts"):
            plan = exchange_counts(counts, self.num_local_experts, self.layout.expert)          # 3. counts
        if clock is not None:
            clock.counted(plan)
        with named_range("ep/scatter"):
            received = exchange_rows(buffer, plan.send_rows, plan.recv_rows, self.exchange)    # 6. (source, expert)
            if clock is not None:
                clock.scattered()
            expert_rows = regroup_by_expert(received, plan.recv_counts)                        #    (expert, source)
        local_counts = plan.local_expert_counts.to(counts.device)
        if clock is not None:
            clock.regrouped(expert_rows, local_counts)
        with named_range("ep/experts"):
            if self.expert_tensor_parallel:                                                     # 7. my shard of
                expert_out = run_sharded_experts(experts, expert_rows, local_counts, backend,  #    every expert
                                                 self.layout.tensor, rows_differ=self.drop_duplicate_tokens)
            else:
                expert_out = experts(expert_rows, local_counts, backend)        # 7. grouped GEMM
        if clock is not None:
            clock.computed()
        with named_range("ep/gather"):
            returned = regroup_by_source(expert_out, plan.recv_counts)                         #    (source, expert)
            if clock is not None:
                clock.ungrouped(returned)
            out = exchange_rows(returned, plan.recv_rows, plan.send_rows, self.exchange)       # 8. back home
        if clock is not None:
            clock.gathered()
        return out

    def _run_with_shadows(self, experts: Experts, buffer: torch.Tensor, counts: torch.Tensor, backend) -> torch.Tensor:
        """FasterMoE's shadowing (shadowing.py): the popular experts' weights come to every rank, which
        computes its own rows for them; the other rows take the usual exchange (pipelined or not)."""
        comm, L = self.layout.expert, self.num_local_experts
        rank_counts = comm.allgather(counts.detach().to("cpu", torch.int64),
                                     purpose="allgather_shadow_counts").reshape(comm.size, -1)
        weights = weights_per_expert(experts)
        sizes = (L, buffer.shape[1] * buffer.element_size(), weights, weights * experts.w1.element_size())
        shadowed = choose_shadowed(rank_counts, *sizes, self.shadow_experts, self.shadow_rates, self.shadow_cost_ratio,
                                   self.max_shadowed)
        if self.shadow_experts == "auto" and self.layout.world.rank == 0 and self.last_shadowed is None:
            tqdm.write(describe_choice(self.name, shadowed, rank_counts, *sizes,           # the first decision
                                       self.shadow_rates, self.shadow_cost_ratio))
        self.last_shadowed = shadowed
        if not shadowed:
            return self.exchange_and_run(experts, buffer, counts, backend)
        order, n_shadow = split_segments(counts, shadowed)
        regrouped = Permute.apply(buffer, order)                              # shadowed segments first
        rest_counts = counts.clone()
        rest_counts[shadowed] = 0
        rest_out = self.exchange_and_run(experts, regrouped[n_shadow:], rest_counts, backend)
        with named_range("ep/shadowed experts"):
            shadow_out = run_shadowed(experts, shadow_weights(experts, shadowed, L, comm), regrouped[:n_shadow],
                                      counts[shadowed], backend)
        return Permute.apply(torch.cat([shadow_out, rest_out]), inverse_permutation(order))   # back in buffer order

    def __deepcopy__(self, memo):
        # A copied layer (e.g. an EMA copy of the model) talks to the same ranks: share, never copy, comm state.
        return self

    def __repr__(self) -> str:
        last = self.first_local_expert + self.num_local_experts - 1
        options = (f", drop_duplicate_tokens at {self.drop_duplicate_at}" if self.drop_duplicate_tokens else "") + (
            ", expert_tensor_parallel" if self.expert_tensor_parallel else "") + (
            f", shadow_experts={self.shadow_experts!r}" if self.shadow_experts != 0 else "") + (
            f", pipeline_degree={self.pipeline_degree}" if self.pipeline_degree != 1 else "") + (
            f", backward_pipeline_degree={self.backward_pipeline_degree}"
            if self.backward_pipeline_degree != self.pipeline_degree else "")
        return (f"ExpertParallel(experts {self.first_local_expert}..{last} of {self.num_experts} on "
                f"expert-rank {self.layout.ep_rank}/{self.layout.ep_size}, exchange={self.exchange!r}{options})")


class SumOverRanks:
    """The layer's ``reduce`` under data parallelism: Σ over the data group, differentiable.

    Every rank computes the same global statistic (e.g. the balance loss of the whole batch) from
    the sum. The backward all-reduces the incoming gradient too: the sum feeds the loss on every rank,
    so ``∂(Σ_r L_r)/∂x_mine = Σ_r ∂L_r/∂sum``. After the data-parallel gradient average (×1/R) the
    replicated gate receives exactly the gradient of the single-process loss.
    """

    def __init__(self, comm: Communicator):
        self.comm = comm

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(tensor, self.comm)

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"SumOverRanks({self.comm.name!r}, {self.comm.size} ranks)"


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, comm: Communicator):
        ctx.comm = comm
        return comm.allreduce_(tensor.detach().clone(), purpose="allreduce_router_statistics")

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.allreduce_(grad.contiguous().clone(), purpose="allreduce_router_statistics"), None


def _counts_in_share(counts: torch.Tensor, shares: list[int], tp_rank: int) -> torch.Tensor:
    """Rows per expert inside my share ``[lo, hi)`` of the expert-sorted buffer: |segment_e ∩ [lo, hi)|."""
    lo = sum(shares[:tp_rank])
    hi = lo + shares[tp_rank]
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    return ends.clamp(lo, hi) - starts.clamp(lo, hi)


def keep_local_experts(experts: Experts, first: int, count: int) -> None:
    """Replace the stacked expert weights ``w[E, ...]`` by the slice ``w[first : first + count]``."""
    for name in ("w1", "w2", "w3", "b1", "b2", "b3"):
        weight = getattr(experts, name)
        if weight is not None:
            setattr(experts, name, nn.Parameter(weight.detach()[first:first + count].clone(),
                                                requires_grad=weight.requires_grad))
    experts.num_experts = count
