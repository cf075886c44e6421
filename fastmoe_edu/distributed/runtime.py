"""ParallelRuntime: the training loop's runtime when the job is one of P ranks (MPI or torch.distributed).

    mpirun -n 8 python -m fastmoe_edu.train                                       # ep = 8
    torchrun --nproc-per-node=8 -m fastmoe_edu.train --tp=2 --ep=2 --dp=2 --drop_duplicate_tokens=true

Same methods as ``fastmoe_edu.runtime.Runtime``; what they do here, in the order of a run:

1. construction — install the abort-on-failure hook and the launcher watch, check the configuration
   against the world size with plain arithmetic (tp × ep × dp = world, num_experts and batch_size
   divisible), and only then open the engine's world and the layout's communicators, within
   ``collective_timeout_s`` (failure.py). A bad launch raises the same clear error on every rank
   before any collective.
2. :meth:`shard_model` — :func:`parallelize` (local experts, tp slices, replicated weights broadcast);
   ``data_rank`` tells the loop which batch shard (and random stream) is this rank's. With
   ``gradient_partitioning`` also the backward hooks that post the replicated gradients' all-reduce
   in pieces (gradient_partitioning.py).
3. each step — :meth:`shard_batch`, :meth:`reduce_gradients`, :meth:`clip_gradients`, and
   :meth:`mean` / :meth:`sum` / :meth:`any` for the logged figures and the stop decision.
"""
from __future__ import annotations

import torch
from torch import nn

from ..runtime import Runtime
from .engines import DEFAULT_TIMEOUT_S, launch_world_size, open_world
from .failure import abort_on_exception, end_if_launcher_dies, start_up_deadline
from .gradient_partitioning import GradientPieces
from .gradients import allreduce_expert_gradients, allreduce_gradients, clip_grad_norm_
from .layout import ParallelLayout, experts_per_rank, sequences_per_rank, split_world
from .parallelize import parallelize
from .plan import ParallelOptions, ParallelPlan


class ParallelRuntime(Runtime):
    """One of P ranks: the layout's communicators and the parallel versions of the runtime methods.

    Args:
        engine: ``"mpi"`` or ``"torch"`` (the launcher's).
        options: the parallel options (:class:`ParallelOptions`), checked here.
        tp, ep, dp: the layout's degrees (``ep=None``: the ranks tp and dp leave).
        num_experts, batch_size, seq_len: the model's E and the global batch (checked against the ranks).
        gradient_partitioning: FSMoE's replicated-gradient pieces during the backward (gradient_partitioning.py).
    """

    #: gradient_partitioning's piece size in bytes; None = chosen by the cost model (tests force small pieces)
    gradient_piece_bytes: float | None = None
    gradient_pieces: GradientPieces | None = None
    plan: ParallelPlan | None = None                 # what parallelize decided (shard_model)

    def __init__(self, engine: str, options: ParallelOptions, *, tp: int = 1, ep: int | None = None, dp: int = 1,
                 num_experts: int, batch_size: int, seq_len: int, device: str = "cpu",
                 collective_timeout_s: float = DEFAULT_TIMEOUT_S, gradient_partitioning: bool = False):
        abort_on_exception(engine)                    # one rank's error ends the whole job
        end_if_launcher_dies()                        # a killed torchrun leaves no worker training alone
        world_size = launch_world_size()                              # from the launcher: no communication
        tp, ep, dp = split_world(world_size, tp, ep, dp)
        experts_per_rank(num_experts, ep, world_size)
        sequences_per_rank(batch_size, ep * dp, world_size)          # every (ep, dp) position reads its own shard
        self.options = options.check(ep)
        self.num_experts, self.batch_size, self.seq_len = num_experts, batch_size, seq_len
        self.gradient_partitioning = gradient_partitioning
        with start_up_deadline(collective_timeout_s, f"opening the {engine} engine's world and communicators"):
            world = open_world(engine, device, collective_timeout_s)
            self.layout = ParallelLayout(world, tp=tp, ep=ep, dp=dp)
        self.device = device
        self.rank, self.world_size, self.data_rank = world.rank, world.size, self.layout.data_rank

    # -- the model ------------------------------------------------------------------------------
    def shard_model(self, model: nn.Module) -> nn.Module:
        """Local experts (and tp slices) only, replicated weights from rank 0; the plan kept for the steps."""
        self.plan = parallelize(model, self.layout, self.options)
        if self.gradient_pieces is not None:                     # a second model: the first one's hooks off
            self.gradient_pieces.remove()
            self.gradient_pieces = None
        if self.gradient_partitioning:                           # FSMoE: all-reduce pieces during the backward
            tokens_per_rank = self.layout.check_batch_size(self.batch_size) * self.seq_len
            self.gradient_pieces = GradientPieces(model, self.layout, self.plan, tokens_per_rank,
                                                  self.gradient_piece_bytes)
        return model

    def describe(self, model: nn.Module) -> str:
        """The start-up lines rank 0 prints under the configuration."""
        layers = self.plan.layers if self.plan is not None else ()
        exchange = repr(layers[0].layer.expert_runner.exchange) if layers else "-"
        backend = repr(layers[0].layer.backend_name) if layers else "-"
        layout = self.layout
        return (f"parallel: {layout.describe()}\n"
                f"     {layout.check_num_experts(self.num_experts)} of {self.num_experts} experts per rank per MoE "
                f"layer, {layout.check_batch_size(self.batch_size)} of {self.batch_size} sequences per rank per step\n"
                f"     backend {backend}, token exchange {exchange}, {self.options.describe()}, torch threads per rank "
                f"{torch.get_num_threads()}; tensors travel via {layout.world.transfer_path(self.device)}"
                + (f"\n     {self.gradient_pieces.describe()}" if self.gradient_pieces is not None else ""))

    # -- each step ------------------------------------------------------------------------------
    def shard_batch(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous slice of the global batch (the tp ranks of a group read the same one)."""
        rows = self.layout.check_batch_size(batch[0].shape[0])
        first = self.layout.data_rank * rows
        return tuple(t[first:first + rows] for t in batch)

    def reduce_gradients(self, model: nn.Module) -> None:
        if self.gradient_pieces is None:
            allreduce_gradients(model, self.layout, self.plan)
            return
        self.gradient_pieces.finish()                   # the replicated pieces, most already under way
        allreduce_expert_gradients(model, self.layout, self.plan)

    def clip_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm, self.layout, self.plan)

    def mean(self, values: list[float]) -> list[float]:
        """Average of each value over the data-parallel ranks (one all-reduce for the whole list)."""
        figures = torch.tensor(values, dtype=torch.float64)
        return self.layout.data.allreduce_(figures, average=True, purpose="allreduce_log").tolist()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of a (small) tensor over the data-parallel ranks, as a new tensor."""
        return self.layout.data.allreduce_(tensor.detach().clone(), purpose="allreduce_log")

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on at least one (e.g. Ctrl-C reached only some ranks)."""
        votes = torch.tensor([int(flag)])
        return int(self.layout.world.allreduce_(votes, purpose="allreduce_stop")[0]) > 0

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.layout.world.allgather(tensor, purpose="allgather_checkpoint")

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.layout.world.broadcast_(tensor, root=0)

    # -- checkpoints ----------------------------------------------------------------------------
    def per_rank_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters that differ between ranks: expert slices and tensor-parallel slices."""
        return self.plan.per_rank_parameters()

    def layout_record(self) -> dict:
        return {key: getattr(self.layout, key) for key in ("world_size", "tp_size", "ep_size", "dp_size", "rank")}

    def barrier(self) -> None:
        self.layout.world.barrier()

