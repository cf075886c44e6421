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
from .engines import launch_world_size, open_world
from .expert_parallel import expert_parameters
from .failure import abort_on_exception, end_if_launcher_dies, start_up_deadline
from .gradient_partitioning import GradientPieces
from .gradients import allreduce_expert_gradients, allreduce_gradients, clip_grad_norm_
from .hierarchical import check_ranks_per_node
from .layout import ParallelLayout, experts_per_rank, layout_sizes, sequences_per_rank
from .parallelize import parallelize
from .tensor_parallel import tensor_parallel_parameters

class ParallelRuntime(Runtime):
    """One of P ranks: the layout's communicators and the parallel versions of the runtime methods."""

    #: gradient_partitioning's piece size in bytes; None = chosen by the cost model (tests force small pieces)
    gradient_piece_bytes: float | None = None
    gradient_pieces: GradientPieces | None = None

    def __init__(self, cfg, engine: str):
        abort_on_exception(engine)                    # one rank's error ends the whole job
        end_if_launcher_dies()                        # a killed torchrun leaves no worker training alone
        world_size = launch_world_size()                              # from the launcher: no communication
        tp, ep, dp = layout_sizes(cfg, world_size)
        experts_per_rank(cfg.num_experts, ep, world_size)
        sequences_per_rank(cfg.batch_size, ep * dp, world_size)      # every (ep, dp) position reads its own shard
        if cfg.ranks_per_node is not None:
            check_ranks_per_node(cfg.ranks_per_node, ep)
        self.cfg = cfg
        with start_up_deadline(cfg.collective_timeout_s, f"opening the {engine} engine's world and communicators"):
            world = open_world(engine, cfg.device, cfg.collective_timeout_s)
            self.layout = ParallelLayout(world, tp=tp, ep=ep, dp=dp)
        self.rank, self.world_size, self.data_rank = world.rank, world.size, self.layout.data_rank

    # -- the model ------------------------------------------------------------------------------
    def shard_model(self, model: nn.Module) -> nn.Module:
        """Local experts (and tp slices) only, replicated weights from rank 0."""
        # parallelize's options are named as the config keys that set them
        options = ("exchange", "drop_duplicate_tokens", "drop_duplicate_at", "pipeline_degree", "ranks_per_node",
                   "backward_pipeline_degree", "expert_tensor_parallel", "shadow_experts", "shadow_cost_ratio")
        parallelize(model, self.layout, **{key: getattr(self.cfg, key) for key in options})
        if self.gradient_pieces is not None:                     # a second model: the first one's hooks off
            self.gradient_pieces.remove()
            self.gradient_pieces = None
        if self.cfg.gradient_partitioning:                       # FSMoE: all-reduce pieces during the backward
            tokens_per_rank = self.layout.check_batch_size(self.cfg.batch_size) * self.cfg.seq_len
            self.gradient_pieces = GradientPieces(model, self.layout, tokens_per_rank, self.gradient_piece_bytes)
        return model

    def describe(self, model: nn.Module) -> str:
        """The start-up lines rank 0 prints under the configuration."""
        runners = [m.expert_runner for m in model.modules() if hasattr(m, "expert_runner")]
        exchange = repr(runners[0].exchange) if runners else "-"
        cfg, layout = self.cfg, self.layout
        return (f"parallel: {layout.describe()}\n"
                f"     {layout.check_num_experts(cfg.num_experts)} of {cfg.num_experts} experts per rank per MoE "
                f"layer, {layout.check_batch_size(cfg.batch_size)} of {cfg.batch_size} sequences per rank per step\n"
                f"     backend {cfg.backend!r}, token exchange {exchange}, pipeline_degree {cfg.pipeline_degree}"
                f"{'' if cfg.backward_pipeline_degree is None else f' (backward {cfg.backward_pipeline_degree})'}, "
                f"drop_duplicate_tokens {cfg.drop_duplicate_tokens}"
                f"{f' (at {cfg.drop_duplicate_at})' if cfg.drop_duplicate_tokens else ''}, "
                f"expert_tensor_parallel {cfg.expert_tensor_parallel}, shadow_experts {cfg.shadow_experts}, "
                f"torch threads per rank "
                f"{torch.get_num_threads()}; tensors travel via {layout.world.transfer_path(cfg.device)}"
                + (f"\n     {self.gradient_pieces.describe()}" if self.gradient_pieces is not None else ""))

    # -- each step ------------------------------------------------------------------------------
    def shard_batch(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous slice of the global batch (the tp ranks of a group read the same one)."""
        rows = self.layout.check_batch_size(batch[0].shape[0])
        first = self.layout.data_rank * rows
        return tuple(t[first:first + rows] for t in batch)

    def reduce_gradients(self, model: nn.Module) -> None:
        if self.gradient_pieces is None:
            allreduce_gradients(model, self.layout)
            return
        self.gradient_pieces.finish()                   # the replicated pieces, most already under way
        allreduce_expert_gradients(model, self.layout)

    def clip_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm, self.layout)

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
        return expert_parameters(model) + tensor_parallel_parameters(model)

    def layout_record(self) -> dict:
        return {key: getattr(self.layout, key) for key in ("world_size", "tp_size", "ep_size", "dp_size", "rank")}

    def barrier(self) -> None:
        self.layout.world.barrier()

