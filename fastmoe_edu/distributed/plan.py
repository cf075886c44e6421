"""ParallelPlan: the parallel options, each declared once with its check, and what ``parallelize`` decided.

    plan = parallelize(model, layout, drop_duplicate_tokens=True)   # = parallelize(model, layout, ParallelPlan(...))
    plan.layers[0]         # LayerPlan: 'blocks.0.mlp', its runner's ExpertSettings, its gradient groups
    loss.backward(); allreduce_gradients(model, layout, plan); clip_grad_norm_(model, 1.0, layout, plan)

The plan is the one record the rest of the parallel code reads: the gradient all-reduce and its
partitioned version (gradients.py, gradient_partitioning.py) take the expert parameters and their
gradient groups from ``plan.layers``, the checkpoint the per-rank parameters from ``plan``, and each
layer's :class:`~fastmoe_edu.distributed.expert_parallel.ExpertParallel` its share (``ExpertSettings``).
Nobody looks in the model for an option again.

:meth:`ParallelPlan.check` is plain arithmetic (no communication), so a bad combination raises the same
ValueError on every rank before any collective; ``config.TrainConfig.validate`` calls the same check.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from .communicator import EXCHANGE_METHODS
from .hierarchical import check_ranks_per_node
from .pipeline import check_pipeline_degree
from .shadowing import check_shadow_experts

#: the config's spellings of the token exchange; "auto" = one all-to-all-v collective (the fast one)
EXCHANGES = ("auto", *EXCHANGE_METHODS)
#: where duplicate token dropping joins the tp ranks' shares again (expert_parallel.py's docstring)
DROP_POINTS = ("combined", "expert_rows")


@dataclass(frozen=True)
class ExpertSettings:
    """One layer's share of the plan: what its expert runner does, resolved against the layout
    (duplicate dropping and tensor-parallel experts only with tp > 1, shadowing only with ep > 1)."""

    exchange: str = "alltoallv"                   # "pairwise", "alltoallv" or "hierarchical"
    drop_duplicate_tokens: bool = False
    drop_duplicate_at: str = "combined"
    expert_tensor_parallel: bool = False
    pipeline_degree: int | str = 1                # D_f, or "auto"
    backward_pipeline_degree: int | str = 1       # D_b, or "auto"
    ranks_per_node: int | None = None             # the hierarchical exchange's G
    shadow_experts: int | str = 0                 # 0, N or "auto"
    shadow_cost_ratio: float = 1.0
    max_shadowed: int | None = None               # None = the layer's local experts

    def __post_init__(self):
        if self.drop_duplicate_at not in DROP_POINTS:
            raise ValueError(f"drop_duplicate_at={self.drop_duplicate_at!r} is not known; allowed: "
                             f"{', '.join(DROP_POINTS)}")


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """What ``parallelize`` decided for one MoE layer.

    Gradient groups of its expert parameters (gradients.py's table): the expert-replica group (×1/R)
    always; the tensor group (Σ) too when its tp ranks' experts saw different rows (duplicate tokens
    dropped) yet hold the same weights (not tensor-parallel experts).
    """

    name: str                                     # the layer's path in the model ("" = the model itself)
    layer: nn.Module                              # the MoELayer, its experts cut to this rank's
    expert: ExpertSettings

    @property
    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.layer.experts.parameters())

    @property
    def sums_expert_gradients_over_tensor(self) -> bool:
        return self.expert.drop_duplicate_tokens and not self.expert.expert_tensor_parallel


@dataclass(frozen=True, eq=False)
class ParallelPlan:
    """The parallel options (what ``parallelize`` is asked) and, once it ran, what it decided.

    Args:
        exchange: how token rows travel: ``"pairwise"``, ``"alltoallv"`` or ``"auto"`` (= alltoallv).
        drop_duplicate_tokens: DeepSpeed-TED's duplicate token dropping (tp > 1).
        drop_duplicate_at: where the tp shares are joined: ``"combined"`` (TED: the combined outputs
            ``[T, d]``) or ``"expert_rows"`` (the expert output rows ``[k·T, d]``, before combining).
        pipeline_degree: FasterMoE/FSMoE overlap of the exchange with the experts, D_f chunks forward;
            ``"auto"``: measured during the first passes of each layer and chosen (autotune.py).
        backward_pipeline_degree: D_b chunks backward (an int or ``"auto"``); None = as pipeline_degree.
        ranks_per_node: the hierarchical (two-level) all-to-all with this many expert ranks per node
            (pipelined too: every chunk through both levels).
        expert_tensor_parallel: split every expert's hidden units over the tensor group (TED;
            expert_tensor_parallel.py).
        shadow_experts: FasterMoE's dynamic shadowing of popular experts (shadowing.py): 0 = off, N = the
            N most loaded each step, ``"auto"`` = FasterMoE's greedy choice on a latency model whose
            bandwidth and GEMM rate are measured at start (``shadow_cost_ratio`` scales the weights' cost).

    Filled by ``parallelize``: ``layers`` (a :class:`LayerPlan` per MoE layer, in module order) and
    ``sliced_parameters`` (the tensor-parallel slices, tensor_parallel.py).
    """

    exchange: str = "auto"
    drop_duplicate_tokens: bool = False
    drop_duplicate_at: str = "combined"
    pipeline_degree: int | str = 1
    backward_pipeline_degree: int | str | None = None
    ranks_per_node: int | None = None
    expert_tensor_parallel: bool = False
    shadow_experts: int | str = 0
    shadow_cost_ratio: float = 1.0
    layers: tuple[LayerPlan, ...] = ()
    sliced_parameters: tuple[nn.Parameter, ...] = ()

    @classmethod
    def of(cls, config) -> ParallelPlan:
        """The parallel options of a config that has their fields (TrainConfig), as LayerOptions.of does."""
        return cls(**{name: getattr(config, name) for name in OPTION_NAMES})

    # -- the checks: plain arithmetic, no communication ----------------------------------------------
    def check(self, ep_size: int | None = None) -> ParallelPlan:
        """ValueError for a bad option or combination (``ep_size``: also ranks_per_node against it)."""
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange={self.exchange!r} is not known; allowed: {', '.join(EXCHANGES)}")
        check_pipeline_degree(self.pipeline_degree)
        if self.backward_pipeline_degree is not None:
            check_pipeline_degree(self.backward_pipeline_degree, "backward_pipeline_degree")
        if self.ranks_per_node is not None and ep_size is not None:  # (pipelined or not: each chunk, two phases)
            check_ranks_per_node(self.ranks_per_node, ep_size)
        if self.drop_duplicate_at not in DROP_POINTS:
            raise ValueError(f"drop_duplicate_at={self.drop_duplicate_at!r} is not known; allowed: "
                             f"{', '.join(DROP_POINTS)}")
        check_shadow_experts(self.shadow_experts)
        if self.shadow_experts != 0 and self.expert_tensor_parallel:
            raise ValueError(f"shadow_experts={self.shadow_experts!r} broadcasts whole experts: it does not combine "
                             f"with expert_tensor_parallel (experts split over the tp ranks); turn one of them off")
        if not self.shadow_cost_ratio > 0:
            raise ValueError(f"shadow_cost_ratio={self.shadow_cost_ratio!r} must be > 0")
        pipelined = self.pipelining()
        if self.expert_tensor_parallel and pipelined:
            raise ValueError(f"expert_tensor_parallel with {pipelined}: the pipelined exchange "
                             f"runs whole experts only; use pipeline_degree=1 with tensor-parallel experts")
        return self

    def pipelining(self) -> str:
        """"" when neither pass is pipelined, else the settings that pipeline it (for error messages)."""
        settings = [f"{name}={value!r}" for name, value in (("pipeline_degree", self.pipeline_degree),
                                                             ("backward_pipeline_degree", self.backward_pipeline_degree))
                    if value is not None and value != 1]
        return " and ".join(settings)

    # -- what parallelize decides ---------------------------------------------------------------------
    def expert_settings(self, layout) -> ExpertSettings:
        """The runners' settings on ``layout`` (every layer gets the same)."""
        method = ("hierarchical" if self.ranks_per_node is not None
                  else "alltoallv" if self.exchange == "auto" else self.exchange)
        backward = self.pipeline_degree if self.backward_pipeline_degree is None else self.backward_pipeline_degree
        return ExpertSettings(
            exchange=method, drop_duplicate_tokens=bool(self.drop_duplicate_tokens) and layout.tp_size > 1,
            drop_duplicate_at=self.drop_duplicate_at,
            expert_tensor_parallel=bool(self.expert_tensor_parallel) and layout.tp_size > 1,
            pipeline_degree=self.pipeline_degree, backward_pipeline_degree=backward,
            ranks_per_node=self.ranks_per_node, shadow_experts=self.shadow_experts if layout.ep_size > 1 else 0,
            shadow_cost_ratio=self.shadow_cost_ratio)

    def decided(self, layers, sliced_parameters) -> ParallelPlan:
        """This plan with what parallelize decided (a new plan: plans are frozen)."""
        return dataclasses.replace(self, layers=tuple(layers), sliced_parameters=tuple(sliced_parameters))

    # -- what the gradient code and the checkpoint read -----------------------------------------------
    def expert_parameters(self) -> list[nn.Parameter]:
        """The expert-parallel parameters, in module order (each rank holds different ones)."""
        return [p for entry in self.layers for p in entry.expert_parameters]

    def expert_parameters_summed_over_tensor(self) -> list[nn.Parameter]:
        """Those whose gradients are also summed over the tensor group (duplicate tokens dropped)."""
        return [p for entry in self.layers if entry.sums_expert_gradients_over_tensor
                for p in entry.expert_parameters]

    @property
    def tensor_parallel_experts(self) -> bool:
        """Whether the tp ranks hold different shards of the experts."""
        return any(entry.expert.expert_tensor_parallel for entry in self.layers)

    def per_rank_parameters(self) -> list[nn.Parameter]:
        """Parameters that differ between ranks: expert slices and tensor-parallel slices (checkpoints)."""
        return self.expert_parameters() + list(self.sliced_parameters)

    def describe(self) -> str:
        """The options, one line (the start-up log)."""
        backward = "" if self.backward_pipeline_degree is None else f" (backward {self.backward_pipeline_degree})"
        at = f" (at {self.drop_duplicate_at})" if self.drop_duplicate_tokens else ""
        return (f"pipeline_degree {self.pipeline_degree}{backward}, drop_duplicate_tokens "
                f"{self.drop_duplicate_tokens}{at}, expert_tensor_parallel {self.expert_tensor_parallel}, "
                f"shadow_experts {self.shadow_experts}")


#: the option fields (what a config sets); ``layers`` and ``sliced_parameters`` are parallelize's
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ParallelPlan) if f.name not in ("layers", "sliced_parameters"))
