"""Tensor-parallel experts (DeepSpeed-TED): every expert's hidden units split over the tensor group.

    parallelize(model, ParallelLayout(tp=2, ep=2), drop_duplicate_tokens=True, expert_tensor_parallel=True)
    mpirun -n 4 python -m fastmoe_edu.train --tp=2 --ep=2 --drop_duplicate_tokens=true --expert_tensor_parallel=true

Without it each rank of a tensor group holds its experts whole. With it, tp rank i holds hidden
units ``[i·h/tp, (i+1)·h/tp)`` of each of its experts — rows of ``w1`` and ``w3`` (column-parallel,
Megatron's term for splitting the output features) and the matching columns of ``w2`` (row-parallel) —
so expert memory per rank falls by tp. An expert's output is then the *sum* of the tp ranks' partial
outputs, because the hidden units add up in the second matrix product:

    expert(x) = W2 · act(W1 x) = Σ_i W2[:, H_i] · act(W1[H_i, :] x)         (H_i = rank i's hidden units)

This holds for GELU and for SwiGLU alike (both act elementwise on the hidden units); an output bias
``b2`` would be added tp times, so tensor-parallel experts refuse ``bias=True``.

Where the tp ranks' rows come from decides the two collectives around the experts (runner order as in
DeepSpeed when experts are tensor-parallel: gather after the first all-to-all, split before the second):

* **without duplicate token dropping** every tp rank received the same rows: each computes its partial
  outputs on them, and an all-reduce over the tensor group sums them (backward: all-reduce of the input
  gradient, Megatron's f / g pair, tensor_parallel.py);
* **with dropping** each tp rank received the rows of its own token share: the tensor group
  all-gathers them (every shard needs every row), each rank computes its partial outputs for all of
  them, and a *reduce-scatter* returns to each rank the sum for its own rows, which go back through
  the second all-to-all. The backward of an all-gather is a reduce-scatter and vice versa.

A reduce-scatter here is an all-to-all followed by a local sum: rank j receives block j of every
rank's partial outputs and adds them up in rank order ((tp−1)/tp of the data each way, as a native
reduce-scatter sends). Each rank's expert shard sees every row, so its gradient is complete: unlike
plain dropping, nothing is summed over the tensor group (gradients.py).
"""
from __future__ import annotations

import torch
from torch import nn

from ..experts import Experts
from .communicator import Communicator
from .exchange import regroup_by_expert, regroup_by_source
from .tensor_parallel import copy_to_tensor_region, reduce_from_tensor_region

#: the expert weights split over the tensor group, and the dimension of their hidden units
HIDDEN_DIM = {"w1": 1, "w3": 1, "w2": 2, "b1": 1, "b3": 1}


def check_shardable(experts: Experts, tp_size: int) -> int:
    """The hidden units each tp rank keeps; ValueError, before anything changes, if the experts cannot be split."""
    if experts.b2 is not None:
        raise ValueError("tensor-parallel experts cannot have biases: the output bias b2 would be added once "
                         "per tp rank; build the layer with bias=False or set expert_tensor_parallel=false")
    return hidden_units_per_rank(experts.d_hidden, tp_size)


def hidden_units_per_rank(d_hidden: int, tp_size: int) -> int:
    """``d_hidden / tp`` of every tensor-parallel expert, or a ValueError (plain arithmetic: config.py calls it too)."""
    if d_hidden % tp_size:
        raise ValueError(f"d_hidden={d_hidden} is not divisible by tp={tp_size}: tensor-parallel experts split "
                         f"the hidden units evenly; choose tp among the divisors of {d_hidden}")
    return d_hidden // tp_size


def shard_experts(experts: Experts, tp_rank: int, tp_size: int) -> None:
    """Keep hidden units ``[tp_rank·h/tp, (tp_rank+1)·h/tp)`` of every expert (in place)."""
    width = check_shardable(experts, tp_size)
    for name, dim in HIDDEN_DIM.items():
        weight = getattr(experts, name)
        if weight is not None:
            piece = weight.detach().narrow(dim, tp_rank * width, width).clone()
            setattr(experts, name, nn.Parameter(piece, requires_grad=weight.requires_grad))
    experts.d_hidden = width


def run_sharded_experts(experts: Experts, rows: torch.Tensor, counts: torch.Tensor, backend,
                        tensor: Communicator, rows_differ: bool) -> torch.Tensor:
    """Expert-major ``rows`` (``counts[L]`` per local expert) -> the experts' full outputs, same rows.

    ``rows_differ``: the tp ranks hold different rows (duplicate token dropping) rather than the same ones.
    """
    if not rows_differ:
        partial = experts(copy_to_tensor_region(rows, tensor), counts, backend)
        return reduce_from_tensor_region(partial, tensor)                      # Σ over the tp shards
    all_counts = tensor.allgather(counts.to(torch.int64)).reshape(tensor.size, -1)     # [tp, L]
    shares = all_counts.sum(dim=1).tolist()                                    # rows of each tp rank
    gathered = AllGatherRows.apply(rows, shares, tensor)                        # rank-major
    by_expert = regroup_by_expert(gathered, all_counts)                         # expert-major, ranks in order
    partial = experts(by_expert, all_counts.sum(dim=0).to(counts.device), backend)
    return ReduceScatterRows.apply(regroup_by_source(partial, all_counts), shares, tensor)   # my rows, summed


def reduce_scatter_rows(rows: torch.Tensor, shares: list[int], comm: Communicator, purpose: str) -> torch.Tensor:
    """Σ over the ranks of ``rows`` (rank-major blocks of ``shares``), returning only my block."""
    mine = shares[comm.rank]
    received = comm.alltoallv(rows.contiguous(), shares, [mine] * comm.size, purpose=purpose)   # block me of all
    return received.reshape(comm.size, mine, *rows.shape[1:]).sum(dim=0)


class AllGatherRows(torch.autograd.Function):
    """Forward: every tp rank's rows, rank-major. Backward: a reduce-scatter (each rank's gradient for
    all rows is partial: it came through its shard of the experts)."""

    @staticmethod
    def forward(ctx, rows, shares: list[int], comm: Communicator):
        ctx.shares, ctx.comm = shares, comm
        return comm.allgatherv(rows.contiguous(), shares, "allgather_expert_rows")

    @staticmethod
    def backward(ctx, grad_all):
        return reduce_scatter_rows(grad_all, ctx.shares, ctx.comm, "reduce_scatter_expert_grad"), None, None


class ReduceScatterRows(torch.autograd.Function):
    """Forward: Σ over the tp ranks, my block of rows. Backward: all-gather the blocks' gradients."""

    @staticmethod
    def forward(ctx, rows, shares: list[int], comm: Communicator):
        ctx.shares, ctx.comm = shares, comm
        return reduce_scatter_rows(rows, shares, comm, "reduce_scatter_expert_out")

    @staticmethod
    def backward(ctx, grad_mine):
        return ctx.comm.allgatherv(grad_mine.contiguous(), ctx.shares, "allgather_expert_grad"), None, None
