"""Overlapped all-to-all: the token exchange cut into chunks so that communication and expert compute overlap.

FasterMoE's *smart schedule* and FSMoE's *pipeline degree* rest on one observation: the experts
do not need all their rows at once. Cut the expert-sorted buffer into D chunks (D = ``pipeline_degree``),
each expert's segment into D nearly equal pieces (piece c of expert e = rows
``start_e + ⌊c·n_e/D⌋ .. start_e + ⌊(c+1)·n_e/D⌋``), so every chunk is itself expert-sorted. Then

    post scatter(0)
    for c in 0 .. D−1:
        post scatter(c+1)                 ← chunk c+1 travels ...
        wait scatter(c); experts(chunk c) ← ... while chunk c is computed
        post gather(c)                    ← and chunk c's results travel back during chunk c+1's compute
    wait gather(0 .. D−1); put the rows back in buffer order

With compute time C and exchange time A per layer, the unpipelined layer takes about 2A + C, the
pipelined one about (2A + C)/D + max(2A, C)·(D−1)/D, minus what the extra D−1 latencies α cost:
``cost_model.py`` writes this out and picks D.

Every row is computed by the same expert with the same weights as without chunks, so the output
is the same (up to the summation order of the expert weight gradients, which add D partial sums).

Non-blocking collectives: ``MPI.Comm.Ialltoallv`` returns a request at once; the buffers must stay
alive and untouched until ``request.Wait()``. All ranks post their collectives on one communicator
in the same order (scatter 0, scatter 1, gather 0, scatter 2, gather 1, ...), as MPI requires.
How much actually overlaps depends on the MPI library: without an asynchronous progress thread
(the ``mpich`` wheel's default), a large message may only move inside MPI calls — the ``Wait`` s.

Backward: autograd runs each chunk's exchange backward as an ordinary (blocking) reverse exchange;
only the forward pass overlaps here.
"""
from __future__ import annotations

import math

import torch

from .communicator import Communicator, _exclusive_prefix_sum
from .exchange import ExchangePlan, Permute, regroup_by_expert, regroup_by_source


def check_pipeline_degree(pipeline_degree) -> int:
    if not (isinstance(pipeline_degree, int) and not isinstance(pipeline_degree, bool) and pipeline_degree >= 1):
        raise ValueError(f"pipeline_degree={pipeline_degree!r} must be an integer >= 1 "
                         f"(1 = no pipelining, D = the exchange cut into D overlapped chunks)")
    return pipeline_degree


class PendingExchange:
    """A posted ``Ialltoallv``: the request and the buffers MPI is reading and writing."""

    def __init__(self, comm: Communicator, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int]):
        self.comm = comm
        self.send = comm._stage(rows)                                            # kept alive until Wait
        self.received = self.send.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
        self.device = rows.device
        width = math.prod(rows.shape[1:])                                        # elements per row
        send_counts = [n * width for n in send_rows]
        recv_counts = [n * width for n in recv_rows]
        sent_elsewhere = (sum(send_rows) - send_rows[comm.rank]) * width * rows.element_size()
        with comm.stats.measure(f"{comm.name}/ialltoallv", sent_elsewhere):
            self.request = comm.comm.Ialltoallv(
                comm._buffer(self.send, send_counts, _exclusive_prefix_sum(send_counts)),
                comm._buffer(self.received, recv_counts, _exclusive_prefix_sum(recv_counts)))

    def wait(self) -> torch.Tensor:
        with self.comm.stats.measure(f"{self.comm.name}/wait", 0):
            self.request.Wait()
        return self.received.to(self.device)


class FinishExchange(torch.autograd.Function):
    """Forward: wait for a posted exchange of ``rows``; backward: the reverse exchange of the gradient (blocking)."""

    @staticmethod
    def forward(ctx, rows, pending: PendingExchange, send_rows: list[int], recv_rows: list[int]):
        ctx.comm, ctx.send_rows, ctx.recv_rows = pending.comm, send_rows, recv_rows
        return pending.wait()

    @staticmethod
    def backward(ctx, grad):
        back = ctx.comm.alltoallv(grad.contiguous(), ctx.recv_rows, ctx.send_rows, "alltoallv")
        return back, None, None, None


def chunk_rows(counts: torch.Tensor, degree: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cut each expert's segment into ``degree`` pieces: (row indices of each chunk, counts[degree, E])."""
    counts = counts.to("cpu", torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    cuts = torch.stack([counts * c // degree for c in range(degree + 1)])        # [D+1, E]: piece boundaries
    chunk_counts = cuts[1:] - cuts[:-1]
    indices = [torch.cat([torch.arange(s + lo, s + hi) for s, lo, hi in
                          zip(starts.tolist(), cuts[c].tolist(), cuts[c + 1].tolist())] or [torch.zeros(0, dtype=torch.int64)])
               for c in range(degree)]
    return indices, chunk_counts


def pipelined_expert_exchange(experts, buffer: torch.Tensor, counts: torch.Tensor, backend, comm: Communicator,
                              num_local_experts: int, degree: int) -> torch.Tensor:
    """Steps 3 and 6-8 of the layer in ``degree`` overlapped chunks. Same contract as ``ExpertParallel.run_experts``."""
    P, L = comm.size, num_local_experts
    indices, chunk_counts = chunk_rows(counts, degree)
    # Step 3 for all chunks at once: block p of the message = my counts for rank p's experts, chunk by chunk.
    send_counts = chunk_counts.reshape(degree, P, L).permute(1, 0, 2).contiguous()            # [P, D, L]
    recv_counts = comm.alltoall(send_counts.reshape(-1)).reshape(P, degree, L)                 # [source, D, L]
    plans = [ExchangePlan(send_counts=send_counts[:, c], recv_counts=recv_counts[:, c],
                          send_rows=send_counts[:, c].sum(1).tolist(), recv_rows=recv_counts[:, c].sum(1).tolist(),
                          local_expert_counts=recv_counts[:, c].sum(0)) for c in range(degree)]
    chunks = [buffer.index_select(0, idx.to(buffer.device)) for idx in indices]

    scatters = [PendingExchange(comm, chunks[0].detach(), plans[0].send_rows, plans[0].recv_rows)]
    computed, gathers = [], []
    for c, plan in enumerate(plans):
        if c + 1 < degree:                                                       # chunk c+1 starts travelling
            nxt = plans[c + 1]
            scatters.append(PendingExchange(comm, chunks[c + 1].detach(), nxt.send_rows, nxt.recv_rows))
        received = FinishExchange.apply(chunks[c], scatters[c], plan.send_rows, plan.recv_rows)
        expert_rows = regroup_by_expert(received, plan.recv_counts, "alltoallv")
        out = experts(expert_rows, plan.local_expert_counts.to(counts.device), backend.grouped_matmul)
        out = regroup_by_source(out, plan.recv_counts, "alltoallv")
        computed.append(out)
        gathers.append(PendingExchange(comm, out.detach(), plan.recv_rows, plan.send_rows))   # results go home
    returned = [FinishExchange.apply(out, pending, plan.recv_rows, plan.send_rows)
                for out, pending, plan in zip(computed, gathers, plans)]
    # Chunk order -> buffer order: output row i of the buffer is row position[i] of the concatenated chunks.
    order = torch.cat(indices)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel())
    return Permute.apply(torch.cat(returned), position)
