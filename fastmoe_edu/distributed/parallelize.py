"""``parallelize(model, layout)``: the one call that makes a model (or a single MoELayer) parallel.

    layout = ParallelLayout(tp=2, ep=2, dp=2)             # 8 ranks
    torch.manual_seed(0); model = build_model(...)         # the whole model, same seed on every rank
    parallelize(model, layout, drop_duplicate_tokens=True, pipeline_degree=2)
    optimizer = torch.optim.AdamW(model.parameters())      # after: the parameters have been replaced
    ...
    loss.backward(); allreduce_gradients(model, layout); clip_grad_norm_(model, 1.0, layout); optimizer.step()

In place, in this order, after checking every option with plain arithmetic (so a bad layout fails
with the same error on every rank, before any rank enters a collective):

1. **tensor parallelism** (tp > 1): attention and dense MLPs cut to this rank's slice (tensor_parallel.py);
2. **expert parallelism**: every MoELayer keeps its ``E / ep`` experts (and, with ``expert_tensor_parallel``,
   its tp rank's share of their hidden units); its two seams are replaced —
   ``expert_runner`` by an :class:`ExpertParallel`, ``reduce`` by a sum over the data group;
3. **data parallelism**: every replicated parameter and buffer broadcast from rank 0 of its group, so
   all copies start equal by construction. The gradient side is ``allreduce_gradients`` (gradients.py);
4. **activation checkpointing** (a language model's ``activation_checkpointing``): recomputed blocks
   replay their collectives' recorded results instead of communicating again (recompute.py).
"""
from __future__ import annotations

from torch import nn

from ..backends import get_backend
from ..layer import MoELayer
from .communicator import EXCHANGE_METHODS
from .expert_parallel import DROP_POINTS, ExpertParallel, SumOverRanks, keep_local_experts
from .expert_tensor_parallel import check_shardable, shard_experts
from .shadowing import check_shadow_experts, measure_rates
from .gradients import broadcast_parameters
from .hierarchical import check_ranks_per_node
from .layout import ParallelLayout
from .pipeline import check_pipeline_degree
from .recompute import stash_contexts
from .tensor_parallel import make_tensor_parallel

#: the config's spellings of the token exchange; "auto" = one all-to-all-v collective (the fast one)
EXCHANGES = ("auto", *EXCHANGE_METHODS)


def parallelize(model: nn.Module, layout: ParallelLayout, exchange: str = "auto",
                drop_duplicate_tokens: bool = False, pipeline_degree: int | str = 1,
                ranks_per_node: int | None = None, drop_duplicate_at: str = "combined",
                expert_tensor_parallel: bool = False, shadow_experts: int | str = 0,
                shadow_cost_ratio: float = 1.0, backward_pipeline_degree: int | str | None = None) -> nn.Module:
    """Tensor-, expert- and data-parallel ``model`` over ``layout``, in place; returns ``model``.

    Args:
        exchange: how token rows travel: ``"pairwise"``, ``"alltoallv"`` or ``"auto"`` (= alltoallv).
        drop_duplicate_tokens: DeepSpeed-TED's duplicate token dropping (tp > 1).
        drop_duplicate_at: where the tp shares are joined: ``"combined"`` (TED: the combined outputs
            ``[T, d]``) or ``"expert_rows"`` (the expert output rows ``[k·T, d]``, before combining).
        expert_tensor_parallel: split every expert's hidden units over the tensor group (TED;
            expert_tensor_parallel.py).
        shadow_experts: FasterMoE's dynamic shadowing of popular experts (shadowing.py): 0 = off, N = the
            N most loaded each step, ``"auto"`` = FasterMoE's greedy choice on a latency model whose
            bandwidth and GEMM rate are measured here (``shadow_cost_ratio`` scales the weights' cost).
        pipeline_degree: FasterMoE/FSMoE overlap of the exchange with the experts, D_f chunks forward;
            ``"auto"``: measured during the first passes of each layer and chosen (autotune.py).
        backward_pipeline_degree: D_b chunks backward (an int or ``"auto"``); None = as pipeline_degree.
        ranks_per_node: the hierarchical (two-level) all-to-all with this many expert ranks per node
            (pipelined too: every chunk through both levels).
    """
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    check_parallel_options(layout, exchange, pipeline_degree, ranks_per_node, backward_pipeline_degree)
    pipelined = pipelining(pipeline_degree, backward_pipeline_degree)
    if drop_duplicate_at not in DROP_POINTS:
        raise ValueError(f"drop_duplicate_at={drop_duplicate_at!r} is not known; allowed: {', '.join(DROP_POINTS)}")
    check_shadow_experts(shadow_experts)
    if shadow_experts != 0 and expert_tensor_parallel:
        raise ValueError(f"shadow_experts={shadow_experts!r} broadcasts whole experts: it does not combine with "
                         f"expert_tensor_parallel (experts split over the tp ranks); turn one of them off")
    if not shadow_cost_ratio > 0:
        raise ValueError(f"shadow_cost_ratio={shadow_cost_ratio!r} must be > 0")
    if expert_tensor_parallel and pipelined:
        raise ValueError(f"expert_tensor_parallel with {pipelined}: the pipelined exchange "
                         f"runs whole experts only; use pipeline_degree=1 with tensor-parallel experts")
    for layer in layers:                                                    # check all before changing any
        layout.check_num_experts(layer.num_experts)
        if isinstance(layer.expert_runner, ExpertParallel):
            raise ValueError(f"{layer} is already expert-parallel")
        if expert_tensor_parallel and layout.tp_size > 1:
            check_shardable(layer.experts, layout.tp_size)
    make_tensor_parallel(model, layout)
    method = "hierarchical" if ranks_per_node is not None else ("alltoallv" if exchange == "auto" else exchange)
    shadow_rates = {}                                                        # expert kind -> measured rates
    for index, layer in enumerate(layers):
        runner = ExpertParallel(layout, layer.num_experts, method, drop_duplicate_tokens, pipeline_degree,
                                ranks_per_node, drop_duplicate_at, expert_tensor_parallel, shadow_experts,
                                shadow_cost_ratio, backward_pipeline_degree=backward_pipeline_degree,
                                name=f"MoE layer {index}")
        keep_local_experts(layer.experts, runner.first_local_expert, runner.num_local_experts)
        if runner.expert_tensor_parallel:                                       # my hidden units of each
            shard_experts(layer.experts, layout.tensor.rank, layout.tp_size)
        layer.expert_runner = runner
        if runner.shadow_experts == "auto":        # FasterMoE's latency model: β, γ measured here, once per
            experts = layer.experts                  # kind of expert (the layers of a model share one)
            kind = (tuple(experts.w1.shape), experts.w1.dtype, experts.w1.device, experts.kind, experts.b1 is not None,
                    layer.backend_name)
            if kind not in shadow_rates:
                shadow_rates[kind] = measure_rates(layout.expert, experts,
                                                   get_backend(layer.backend_name, experts.w1.device).grouped_matmul)
            runner.shadow_rates = shadow_rates[kind]
        layer.reduce = SumOverRanks(layout.data)
    if hasattr(model, "recompute_contexts"):               # a language model: recomputed blocks replay
        model.recompute_contexts = stash_contexts           # their collectives (activation checkpointing)
    broadcast_parameters(model, layout)
    return model


def check_parallel_options(layout: ParallelLayout, exchange: str, pipeline_degree, ranks_per_node,
                           backward_pipeline_degree=None) -> None:
    """Plain arithmetic (no communication): the same ValueError on every rank for a bad combination."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} is not known; allowed: {', '.join(EXCHANGES)}")
    check_pipeline_degree(pipeline_degree)
    if backward_pipeline_degree is not None:
        check_pipeline_degree(backward_pipeline_degree, "backward_pipeline_degree")
    if ranks_per_node is not None:                   # (pipelined or not: each chunk takes the two phases)
        check_ranks_per_node(ranks_per_node, layout.ep_size)


def pipelining(pipeline_degree, backward_pipeline_degree=None) -> str:
    """"" when neither pass is pipelined, else the settings that pipeline it (for error messages)."""
    settings = [f"{name}={value!r}" for name, value in (("pipeline_degree", pipeline_degree),
                                                         ("backward_pipeline_degree", backward_pipeline_degree))
                if value is not None and value != 1]
    return " and ".join(settings)
