"""What ``fastmoe_edu.train`` does differently when it runs as one rank of ``mpirun -n P``.

    mpirun -n 8 python -m fastmoe_edu.train          # ep = 8: E/8 experts and batch_size/8 sequences per rank

Order of events on every rank (the training loop in train.py calls these):

1. :func:`launch_world_size` — how many ranks were started (no communication).
2. :func:`start_layout` — install the abort-on-exception hook, check the configuration against the
   world size with plain arithmetic (num_experts and batch_size divisible), and only then create
   the communicators. A bad launch raises the same clear error on every rank before any collective.
3. :func:`distribute_model` — cut every MoE layer down to its local experts and broadcast the
   replicated weights from rank 0 (the model was built from the same seed everywhere already).
   Then each rank re-seeds its random stream with its rank, so router noise differs across shards.
4. Each step: the rank's slice of the global batch, ``allreduce_gradients``, ``clip_grad_norm_``,
   and :func:`mean_over_ranks` / :func:`sum_over_ranks` for the logged figures.

With one rank none of this runs: ``python -m fastmoe_edu.train`` is a plain single process.
"""
from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from .communicator import transfer_path
from .expert_parallel import make_expert_parallel
from .failure import abort_on_exception
from .gradients import broadcast_parameters
from .layout import ParallelLayout, experts_per_rank, sequences_per_rank

# Added to the seed, times the rank, for each rank's own random stream (router noise, jitter).
_RANK_SEED_STRIDE = 1_000_003


def launch_world_size() -> int:
    """Number of ranks of this launch: 1 for ``python ...``, P for ``mpirun -n P python ...``."""
    return MPI.COMM_WORLD.Get_size()


def launch_rank() -> int:
    """This process's rank in the launch (0 without mpirun). No communication."""
    return MPI.COMM_WORLD.Get_rank()


def start_layout(cfg) -> ParallelLayout:
    """Checks first (arithmetic only), then the communicators. ``cfg`` is a TrainConfig."""
    abort_on_exception()
    world_size = MPI.COMM_WORLD.Get_size()
    experts_per_rank(cfg.num_experts, world_size, world_size)          # ep = world size
    sequences_per_rank(cfg.batch_size, world_size, world_size)         # every rank reads its own shard
    if cfg.num_threads > 0 and cfg.backend != "reference":
        import numba                                                   # numba's parallel loops: same thread budget
        numba.set_num_threads(min(cfg.num_threads, numba.config.NUMBA_NUM_THREADS))
    return ParallelLayout()


def distribute_model(model: nn.Module, layout: ParallelLayout, seed: int, exchange: str = "auto") -> nn.Module:
    """Local experts only, replicated weights from rank 0, a random stream per rank. Before the optimizer.

    ``exchange``: "pairwise", "alltoallv", or "auto" (the layer's choice: pairwise on the reference backend).
    """
    make_expert_parallel(model, layout, exchange=None if exchange == "auto" else exchange)
    broadcast_parameters(model, layout)
    torch.manual_seed(seed + _RANK_SEED_STRIDE * layout.rank)
    return model


def describe(cfg, layout: ParallelLayout, model: nn.Module) -> str:
    """The start-up lines rank 0 prints under the configuration."""
    layers = [m for m in model.modules() if getattr(m, "expert_parallel", None) is not None]
    exchange = layers[0].expert_parallel.exchange if layers else "-"
    per_rank = layout.check_batch_size(cfg.batch_size)
    return (f"MPI: {layout.describe()}\n"
            f"     {layout.check_num_experts(cfg.num_experts)} of {cfg.num_experts} experts per rank per MoE layer, "
            f"{per_rank} of {cfg.batch_size} sequences per rank per step\n"
            f"     backend {cfg.backend!r}, token exchange {exchange!r}, torch threads per rank "
            f"{torch.get_num_threads()}; tensors reach MPI via {transfer_path(cfg.device)}")


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
