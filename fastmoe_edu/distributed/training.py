"""What ``fastmoe_edu.train`` does differently when it runs as one rank of ``mpirun -n P``.

    mpirun -n 8 python -m fastmoe_edu.train          # ep = 8: E/8 experts and batch_size/8 sequences per rank
    mpirun -n 8 python -m fastmoe_edu.train --tp=2 --ep=2 --dp=2 --drop_duplicate_tokens=true   # TED

Order of events on every rank (the training loop in train.py calls these):

1. :func:`launch_world_size` — how many ranks were started (no communication).
2. :func:`start_layout` — install the abort-on-exception hook, check the configuration against the
   world size with plain arithmetic (tp × ep × dp = world, num_experts and batch_size divisible),
   and only then create the communicators. A bad launch raises the same clear error on every rank
   before any collective.
3. :func:`distribute_model` — cut every MoE layer down to its local experts (and, with tp > 1, the
   attention / dense MLPs down to this rank's slice: ted.py) and broadcast the replicated weights
   from rank 0 of each group (the model was built from the same seed everywhere already). Then each
   rank re-seeds its random stream with its rank, so router noise differs across shards.
4. Each step: the rank's slice of the global batch, :func:`reduce_gradients`,
   :func:`clip_gradients`, and :func:`mean_over_ranks` / :func:`sum_over_ranks` for the logged figures.

With one rank none of this runs: ``python -m fastmoe_edu.train`` is a plain single process.
"""
from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from .communicator import transfer_path
from .expert_parallel import make_expert_parallel
from .failure import abort_on_exception
from .gradients import broadcast_parameters, clip_grad_norm_
from .hierarchical import check_ranks_per_node
from .layout import ParallelLayout, experts_per_rank, sequences_per_rank, split_world
from .ted import allreduce_ted_gradients, make_ted, ted_clip_grad_norm_

# Added to the seed, times the rank, for each rank's own random stream (router noise, jitter).
_RANK_SEED_STRIDE = 1_000_003


def launch_world_size() -> int:
    """Number of ranks of this launch: 1 for ``python ...``, P for ``mpirun -n P python ...``."""
    return MPI.COMM_WORLD.Get_size()


def launch_rank() -> int:
    """This process's rank in the launch (0 without mpirun). No communication."""
    return MPI.COMM_WORLD.Get_rank()


def layout_sizes(cfg, world_size: int) -> tuple[int, int, int]:
    """(tp, ep, dp) of this launch from the config, checked with plain arithmetic (no communication).

    ``ep`` unset means "all ranks not used by tp and dp": ep = world size / (tp · dp).
    """
    if cfg.ep is None:
        hint = f"; launch a multiple of {cfg.tp * cfg.dp} ranks or change tp / dp"
    else:
        hint = f"; launch mpirun -n {cfg.tp * cfg.ep * cfg.dp} or change tp / ep / dp"
    return split_world(world_size, cfg.tp, cfg.ep, cfg.dp, names=("tp", "ep", "dp"), hint=hint)


def uses_ted(cfg) -> bool:
    """Whether the run needs the TED / FasterMoE / Tutel code paths (ted.py) rather than plain expert parallelism."""
    return cfg.tp > 1 or cfg.drop_duplicate_tokens or cfg.pipeline_degree > 1 or cfg.ranks_per_node is not None


def start_layout(cfg) -> ParallelLayout:
    """Checks first (arithmetic only), then the communicators. ``cfg`` is a TrainConfig."""
    abort_on_exception()
    world_size = MPI.COMM_WORLD.Get_size()
    tp, ep, dp = layout_sizes(cfg, world_size)
    experts_per_rank(cfg.num_experts, ep, world_size)
    sequences_per_rank(cfg.batch_size, ep * dp, world_size)            # every (ep, dp) position reads its own shard
    if cfg.ranks_per_node is not None:
        check_ranks_per_node(cfg.ranks_per_node, ep)
    return ParallelLayout(tensor_parallel=tp, expert_parallel=ep, expert_replicas=dp)


def distribute_model(model: nn.Module, layout: ParallelLayout, cfg) -> nn.Module:
    """Local experts (and tp slices) only, replicated weights from rank 0, a random stream per rank.

    Call before creating the optimizer. ``cfg.exchange``: "pairwise", "alltoallv", or "auto" (the
    layer's choice: pairwise on the reference backend).
    """
    exchange = None if cfg.exchange == "auto" else cfg.exchange
    if uses_ted(cfg):
        make_ted(model, layout, drop_duplicate_tokens=cfg.drop_duplicate_tokens,
                 pipeline_degree=cfg.pipeline_degree, ranks_per_node=cfg.ranks_per_node, exchange=exchange)
    else:
        make_expert_parallel(model, layout, exchange=exchange)
    broadcast_parameters(model, layout)            # data group / expert-replica group: tp slices stay apart
    torch.manual_seed(cfg.seed + _RANK_SEED_STRIDE * layout.rank)
    return model


def reduce_gradients(model: nn.Module, layout: ParallelLayout) -> None:
    """Per-shard gradients → gradients of the global batch (gradients.py; ted.py adds the tp sum when dropping)."""
    allreduce_ted_gradients(model, layout)


def clip_gradients(model: nn.Module, max_norm: float, layout: ParallelLayout) -> torch.Tensor:
    """Global gradient norm and clipping; with tp > 1 the tp-sliced parameters' squares are summed over tp."""
    if layout.tp_size > 1:
        return ted_clip_grad_norm_(model, max_norm, layout)
    return clip_grad_norm_(model, max_norm, layout)


def describe(cfg, layout: ParallelLayout, model: nn.Module) -> str:
    """The start-up lines rank 0 prints under the configuration."""
    layers = [m for m in model.modules() if getattr(m, "expert_parallel", None) is not None]
    exchange = layers[0].expert_parallel.exchange if layers else "-"
    per_rank = layout.check_batch_size(cfg.batch_size)
    options = (f"\n     TED/overlap: drop_duplicate_tokens={cfg.drop_duplicate_tokens}, "
               f"pipeline_degree={cfg.pipeline_degree}, ranks_per_node={cfg.ranks_per_node}") if uses_ted(cfg) else ""
    return (f"MPI: {layout.describe()}\n"
            f"     {layout.check_num_experts(cfg.num_experts)} of {cfg.num_experts} experts per rank per MoE layer, "
            f"{per_rank} of {cfg.batch_size} sequences per rank per step\n"
            f"     backend {cfg.backend!r}, token exchange {exchange!r}, torch threads per rank "
            f"{torch.get_num_threads()}; tensors reach MPI via {transfer_path(cfg.device)}" + options)


def mean_over_ranks(values: list[float], layout: ParallelLayout) -> list[float]:
    """Average of each value over the data-parallel ranks (one Allreduce for the whole list)."""
    figures = torch.tensor(values, dtype=torch.float64)
    layout.data.allreduce_(figures, average=True, purpose="allreduce_log")
    return figures.tolist()


def sum_over_ranks(tensor: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """Sum of a (small) tensor over the data-parallel ranks, as a new tensor."""
    return layout.data.allreduce_(tensor.detach().clone(), purpose="allreduce_log")


def any_rank(flag: bool, layout: ParallelLayout) -> bool:
    """True on every rank if it is true on at least one (e.g. Ctrl-C reached only some ranks)."""
    votes = torch.tensor([int(flag)])
    return int(layout.world.allreduce_(votes, purpose="allreduce_stop")[0]) > 0
