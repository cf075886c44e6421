"""``parallelize(model, layout)``: the one call that makes a model (or a single MoELayer) parallel.

    layout = ParallelLayout(tp=2, ep=2, dp=2)             # 8 ranks
    torch.manual_seed(0); model = build_model(...)         # the whole model, same seed on every rank
    plan = parallelize(model, layout, drop_duplicate_tokens=True, pipeline_degree=2)   # or ParallelOptions(...)
    optimizer = torch.optim.AdamW(model.parameters())      # after: the parameters have been replaced
    ...
    loss.backward(); allreduce_gradients(model, layout, plan); clip_grad_norm_(model, 1.0, layout, plan)

In place, in this order, after checking every option with plain arithmetic (so a bad layout fails
with the same error on every rank, before any rank enters a collective), and returning the
:class:`ParallelPlan` (plan.py): the options and what was decided per layer, which the gradient code,
gradient partitioning and the checkpoint read:

1. **tensor parallelism** (tp > 1): the modules of tensor_parallel.py's table (attention and dense MLPs)
   cut to this rank's slice;
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
from .expert_parallel import ExpertParallel, SumOverRanks, keep_local_experts
from .expert_tensor_parallel import check_shardable, shard_experts
from .shadowing import measure_rates
from .gradients import broadcast_parameters
from .layout import ParallelLayout
from .plan import LayerPlan, ParallelOptions, ParallelPlan
from .recompute import stash_contexts
from .tensor_parallel import make_tensor_parallel


def parallelize(model: nn.Module, layout: ParallelLayout, options: ParallelOptions | None = None,
                **keywords) -> ParallelPlan:
    """Tensor-, expert- and data-parallel ``model`` over ``layout``, in place; returns the decided plan.

    ``options``: a :class:`ParallelOptions` (plan.py documents each option), or give them as keywords
    (``exchange="pairwise"``, ``drop_duplicate_tokens=True``, ...), not both.
    """
    if options is not None and keywords:
        raise TypeError(f"parallelize takes the options as ParallelOptions or as keywords, not both: "
                        f"{sorted(keywords)}")
    options = (ParallelOptions(**keywords) if options is None else ParallelOptions.of(options)).check(layout.ep_size)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    for _, layer in layers:                                                 # check all before changing any
        layout.check_num_experts(layer.num_experts)
        if isinstance(layer.expert_runner, ExpertParallel):
            raise ValueError(f"{layer} is already expert-parallel")
        if options.expert_tensor_parallel and layout.tp_size > 1:
            check_shardable(layer.experts, layout.tp_size)
    sliced = make_tensor_parallel(model, layout)
    settings = options.expert_settings(layout)
    decided, shadow_rates = [], {}                                           # expert kind -> measured rates
    for index, (name, layer) in enumerate(layers):
        runner = ExpertParallel(layout, layer.num_experts, settings, name=f"MoE layer {index}")
        keep_local_experts(layer.experts, runner.first_local_expert, runner.num_local_experts)
        if settings.expert_tensor_parallel:                                     # my hidden units of each
            shard_experts(layer.experts, layout.tensor.rank, layout.tp_size)
        layer.expert_runner = runner
        if settings.shadow_experts == "auto":      # FasterMoE's latency model: β, γ measured here, once per
            experts = layer.experts                  # kind of expert (the layers of a model share one)
            kind = (tuple(experts.w1.shape), experts.w1.dtype, experts.w1.device, experts.kind, experts.b1 is not None,
                    layer.backend_name)
            if kind not in shadow_rates:
                shadow_rates[kind] = measure_rates(layout.expert, experts,
                                                   get_backend(layer.backend_name, experts.w1.device))
            runner.shadow_rates = shadow_rates[kind]
        layer.reduce = SumOverRanks(layout.data)
        decided.append(LayerPlan(name, layer, settings))
    if hasattr(model, "recompute_contexts"):               # a language model: recomputed blocks replay
        model.recompute_contexts = stash_contexts           # their collectives (activation checkpointing)
    plan = ParallelPlan(options, tuple(decided), tuple(sliced))
    broadcast_parameters(model, layout, plan)
    return plan
