"""The token exchange of expert parallelism: steps 3, 6 and 8 of the layer (docs/moe_systems.md §2), differentiable.

P ranks, E experts in all, ``L = E / P`` on each; global expert g lives on rank ``g // L``.
After the local scatter every rank holds its tokens' rows sorted by *global* expert id, so the rows
for rank p (experts ``p·L .. p·L+L−1``) form one contiguous block. Then:

    3. exchange counts   send[p, e] = rows this rank has for expert e of rank p     (all-to-all)
                         recv[s, e] = rows rank s has for my local expert e
    6. global scatter    the block for rank p goes to rank p                          (all-to-all-v)
                         what arrives is ordered (source rank s, local expert e)
       regroup           reorder to (local expert e, source rank s): each expert's rows contiguous
    7.                   ... local experts run on their segments ...
       ungroup           back to (source rank s, local expert e)
    8. global gather     the reverse all-to-all-v: every row returns to the rank that sent it

How the rows of steps 6 and 8 travel is pluggable: an *exchange* is any object with
``alltoallv(rows, send_rows, recv_rows)`` (the contract of ``Communicator.alltoallv``) and its
non-blocking ``ialltoallv`` (returns an object whose ``.wait()`` gives the rows; pipeline.py):

    FlatExchange("pairwise")     P−1 rounds of matched send/receive (readable, FasterMoE's order)
    FlatExchange("alltoallv")    one collective (fast)
    HierarchicalExchange         inside each node first, then between nodes (hierarchical.py)

All give bit-identical rows. The exchange is linear and its adjoint is the same exchange with send
and receive counts swapped, so one autograd function (:func:`exchange_rows`) differentiates them all:
the backward of the global scatter is a global gather with the same plan, and vice versa. The
regroup is a permutation of rows; its backward is the inverse permutation.

Because every rank's tokens are a contiguous slice of the global batch, the (expert, source) order
after the regroup puts each expert's rows in *global token order*: exactly the segment a single
process would build for the whole batch. That is why N ranks reproduce one process to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profiling import named_range
from .communicator import EXCHANGE_METHODS, Communicator


@dataclass
class ExchangePlan:
    """Who sends how many rows to whom, for one MoE layer call (step 3's result)."""
    send_counts: torch.Tensor           # [P, L]: rows I send to rank p for its local expert e
    recv_counts: torch.Tensor           # [P, L]: rows I receive from rank s for my local expert e
    send_rows: list[int]                # [P]: Σ_e send_counts[p, e]
    recv_rows: list[int]                # [P]: Σ_e recv_counts[s, e]
    local_expert_counts: torch.Tensor   # [L]: rows each local expert processes, Σ_s recv_counts[s, e]


def exchange_counts(counts: torch.Tensor, num_local_experts: int, comm: Communicator) -> ExchangePlan:
    """Step 3: ``counts[E]`` (this rank's rows per global expert) -> an :class:`ExchangePlan`.

    ``counts`` viewed as ``[P, L]``: row p are the counts for rank p's experts; Alltoall sends row p to
    rank p, so row s of the result is what rank s will send me.
    """
    send_counts = counts.detach().to("cpu", torch.int64).reshape(comm.size, num_local_experts)
    recv_counts = comm.alltoall(send_counts.reshape(-1)).reshape(comm.size, num_local_experts)
    return ExchangePlan(send_counts=send_counts, recv_counts=recv_counts,
                        send_rows=send_counts.sum(dim=1).tolist(), recv_rows=recv_counts.sum(dim=1).tolist(),
                        local_expert_counts=recv_counts.sum(dim=0))


# ----------------------------------------------------------------------------------------------------
# Steps 6 and 8: one differentiable exchange, any algorithm
# ----------------------------------------------------------------------------------------------------
class FlatExchange:
    """Every rank sends straight to every rank: ``method`` "pairwise" or "alltoallv" (communicator.py)."""

    def __init__(self, comm: Communicator, method: str):
        if method not in EXCHANGE_METHODS:
            raise ValueError(f"exchange={method!r} is not known; allowed: {', '.join(EXCHANGE_METHODS)}")
        self.comm, self.method = comm, method

    def alltoallv(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
        return self.comm.alltoallv(rows, send_rows, recv_rows, self.method)

    def ialltoallv(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int]):
        """Non-blocking (pipeline.py): one posted all-to-all-v, whatever ``method`` the blocking one uses."""
        return self.comm.ialltoallv(rows, send_rows, recv_rows)

    def __repr__(self) -> str:
        return self.method


class ExchangeRows(torch.autograd.Function):
    """Forward: ``exchange.alltoallv(rows, send_rows, recv_rows)``; backward: the same with the counts swapped."""

    @staticmethod
    def forward(ctx, rows, send_rows: list[int], recv_rows: list[int], exchange):
        ctx.send_rows, ctx.recv_rows, ctx.exchange = send_rows, recv_rows, exchange
        return exchange.alltoallv(rows.detach(), send_rows, recv_rows)

    @staticmethod
    def backward(ctx, grad):
        # Each row's gradient goes back to the rank the row came from.
        with named_range("ep/exchange backward"):
            return ctx.exchange.alltoallv(grad.contiguous(), ctx.recv_rows, ctx.send_rows), None, None, None


def exchange_rows(rows: torch.Tensor, send_rows: list[int], recv_rows: list[int], exchange) -> torch.Tensor:
    """Differentiable: ``send_rows[p]`` consecutive rows to rank p, ``recv_rows[s]`` rows from rank s (source order)."""
    return ExchangeRows.apply(rows, send_rows, recv_rows, exchange)


# ----------------------------------------------------------------------------------------------------
# Regroup: (source rank, local expert) order <-> (local expert, source rank) order. Think of the rows
# as blocks (s, e) laid out s-major; the regroup lays the same blocks out e-major. One index does it.
# ----------------------------------------------------------------------------------------------------
def regroup_by_expert(received: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
    """Source-major rows -> expert-major rows (each local expert's rows contiguous, sources in rank order)."""
    return Permute.apply(received, _expert_major_source_rows(recv_counts))


def regroup_by_source(expert_rows: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`regroup_by_expert`: expert-major rows -> source-major rows."""
    return Permute.apply(expert_rows, _expert_major_source_rows(recv_counts.t()))


def _expert_major_source_rows(block_counts: torch.Tensor) -> torch.Tensor:
    """For every output row of the j-major layout, the row of the i-major input it comes from.

        input  start of block (i, j):  in_start[i, j]  = exclusive prefix sum over the i-major order
        output start of block (i, j):  out_start[i, j] = exclusive prefix sum over the j-major order
        output row  out_start[i, j] + r  reads input row  in_start[i, j] + r
    """
    sizes = block_counts.to(torch.int64)
    in_start = (torch.cumsum(sizes.reshape(-1), 0) - sizes.reshape(-1)).reshape(sizes.shape)
    sizes_j_major = sizes.t().reshape(-1)
    out_start = torch.cumsum(sizes_j_major, 0) - sizes_j_major
    shift_j_major = in_start.t().reshape(-1) - out_start                   # input row − output row, per block
    total = int(sizes.sum())
    return torch.arange(total) + torch.repeat_interleave(shift_j_major, sizes_j_major, output_size=total)


class Permute(torch.autograd.Function):
    """``out[i] = rows[source_row[i]]`` for a permutation ``source_row``; backward applies the inverse permutation."""

    @staticmethod
    def forward(ctx, rows, source_row):
        source_row = source_row.to(rows.device)
        ctx.save_for_backward(source_row)
        return rows.index_select(0, source_row)

    @staticmethod
    def backward(ctx, grad_out):
        (source_row,) = ctx.saved_tensors
        return grad_out.index_select(0, inverse_permutation(source_row)), None


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``back`` with ``back[order[i]] = i``: indexing by it undoes indexing by ``order``."""
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return back
