"""ParallelOptions and ParallelPlan: the parallel options, each declared once with its check, and what
``parallelize`` decided.

    plan = parallelize(model, layout, drop_duplicate_tokens=True)   # = parallelize(model, layout, ParallelOptions(...))
    plan.layers[0]         # LayerPlan: 'blocks.0.ffn', its runner's ExpertSettings, its gradient groups
    loss.backward(); allreduce_gradients(model, layout, plan); clip_grad_norm_(model, 1.0, layout, plan)

:class:`ParallelOptions` declares every option of parallelize once (default, help, range, and the
combinations in ``check``), as options.LayerOptions does for a layer: the training config
(config.TrainConfig: TOML, the command line, ``--help``) *is* ParallelOptions with more fields, and its
validate calls the same ``check``. The check is plain arithmetic (no communication), so a bad combination
raises the same ValueError on every rank before any collective.

:class:`ParallelPlan` is the one record the rest of the parallel code reads: the gradient all-reduce and
its partitioned version (gradients.py, gradient_partitioning.py) take the expert parameters and their
gradient groups from ``plan.layers``, the checkpoint the per-rank parameters from ``plan``, and each
layer's :class:`~fastmoe_edu.distributed.expert_parallel.ExpertParallel` its share (``ExpertSettings``).
Nobody looks in the model for an option again.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from torch import nn

from ..options import option
from .communicator import EXCHANGE_METHODS
from .hierarchical import check_ranks_per_node
from .pipeline import check_pipeline_degree
from .shadowing import check_shadow_experts

#: the config's spellings of the token exchange; "auto" = one all-to-all-v collective (the fast one)
EXCHANGES = ("auto", *EXCHANGE_METHODS)
#: where duplicate token dropping joins the tp ranks' shares again (expert_parallel.py's docstring)
DROP_POINTS = ("combined", "expert_rows")
#: the type of the pipeline degrees (and of shadow_experts): an integer or the word "auto"
DEGREE = typing.Union[int, typing.Literal["auto"]]
#: the largest pipeline degree accepted: more chunks than this only add per-chunk overhead (a degree of
#: 10^4 made a 3 s run take 50 s, and 2^63 exhausted a rank's memory)
MAX_PIPELINE_DEGREE = 64


@dataclass
class ParallelOptions:
    """The options of ``parallelize``; ``check()`` refuses a bad value or combination (no communication)."""

    exchange: str = option("auto", "parallel", "token exchange between ranks (expert parallelism): pairwise "
                           "(readable: P-1 rounds of matched send/receive), alltoallv (one collective), auto "
                           "(alltoallv); the numbers are identical", choices=EXCHANGES)
    drop_duplicate_tokens: bool = option(False, "parallel", "TED's duplicate token dropping: each of the tp ranks "
                                         "sends only its 1/tp share of the rows through the all-to-all, the tp "
                                         "group all-gathers the expert outputs (no effect when tp = 1)")
    expert_tensor_parallel: bool = option(False, "parallel", "TED's tensor-parallel experts: each expert's hidden "
                                          "units split over the tp ranks (expert memory per rank / tp); "
                                          "d_hidden must be divisible by tp")
    shadow_experts: DEGREE = option(0, "parallel", "FasterMoE's dynamic shadowing: each step, experts whose weights "
                                    "are broadcast to the expert group so every rank computes its own rows for "
                                    "them: 0 = none, N = the N most loaded, auto = FasterMoE's greedy choice on a "
                                    "latency model with the exchange bandwidth and GEMM rate measured at start "
                                    "(whole experts: not with expert_tensor_parallel)", minimum=0)
    shadow_cost_ratio: float = option(1.0, "parallel", "auto shadowing: the weight movement's cost in the latency "
                                      "model is multiplied by this (larger = shadow less)", above=0.0)
    drop_duplicate_at: str = option("combined", "parallel", "where duplicate token dropping joins the tp ranks' "
                                    "shares: combined (TED: each tp rank dispatches 1/tp of the tokens, the "
                                    "combined outputs [T, d] are all-gathered) or expert_rows (the expert output "
                                    "rows [k*T, d] are all-gathered before combining: k times the bytes)",
                                    choices=DROP_POINTS)
    pipeline_degree: DEGREE = option(1, "parallel", "FasterMoE/FSMoE overlap: split the all-to-all + expert "
                                     "compute into this many chunks with non-blocking collectives (1 = not "
                                     "pipelined); auto = measure the exchange and the experts during each MoE "
                                     "layer's first passes and choose a power of 2 with the cost model (FSMoE); "
                                     f"at most {MAX_PIPELINE_DEGREE}", minimum=1, maximum=MAX_PIPELINE_DEGREE)
    backward_pipeline_degree: typing.Optional[DEGREE] = option(None, "parallel", "the same for the backward "
                                                               "pass (FSMoE chooses the two separately): an "
                                                               f"integer from 1 to {MAX_PIPELINE_DEGREE} or "
                                                               "auto; none = as pipeline_degree",
                                                               minimum=1, maximum=MAX_PIPELINE_DEGREE)
    ranks_per_node: typing.Optional[int] = option(None, "parallel", "Tutel-style hierarchical all-to-all with this "
                                                  "many expert-parallel ranks per node (exchange inside the node, "
                                                  "then one message per node pair); none = flat all-to-all",
                                                  minimum=1)

    @classmethod
    def of(cls, config) -> ParallelOptions:
        """The parallel options of a config that has their fields (TrainConfig), as LayerOptions.of does."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(ParallelOptions)})

    def check(self, ep_size: int | None = None) -> ParallelOptions:
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

    def describe(self) -> str:
        """The options, one line (the start-up log)."""
        backward = "" if self.backward_pipeline_degree is None else f" (backward {self.backward_pipeline_degree})"
        at = f" (at {self.drop_duplicate_at})" if self.drop_duplicate_tokens else ""
        return (f"pipeline_degree {self.pipeline_degree}{backward}, drop_duplicate_tokens "
                f"{self.drop_duplicate_tokens}{at}, expert_tensor_parallel {self.expert_tensor_parallel}, "
                f"shadow_experts {self.shadow_experts}")


@dataclass(frozen=True, eq=False)
class ParallelPlan:
    """What ``parallelize`` was asked (``options``, a copy) and what it decided: ``layers`` (a :class:`LayerPlan`
    per MoE layer, in module order) and ``sliced_parameters`` (the tensor-parallel slices, tensor_parallel.py)."""

    options: ParallelOptions
    layers: tuple[LayerPlan, ...] = ()
    sliced_parameters: tuple[nn.Parameter, ...] = ()

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
