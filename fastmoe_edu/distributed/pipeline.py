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

Non-blocking collectives: ``Communicator.ialltoallv`` returns a :class:`PendingExchange` at once;
its buffers stay alive until ``.wait()``. All ranks post their collectives on one communicator in
the same order (scatter 0, scatter 1, gather 0, scatter 2, gather 1, ...), as MPI and
torch.distributed both require. How much actually overlaps depends on the engine: an MPI library
without an asynchronous progress thread (the ``mpich`` wheel's default) may only move a large
message inside MPI calls — the waits; gloo and NCCL progress on their own threads / streams.

Backward, the same schedule mirrored (FasterMoE overlaps both passes): the gradient of chunk c+1's
results travels to the expert ranks while chunk c's expert backward runs, and chunk c's input
gradient travels home while chunk c+1's expert backward runs:

    post grad-gather(0)
    for c in 0 .. D−1:
        post grad-gather(c+1)
        wait grad-gather(c); expert backward(chunk c)     ← input and weight gradients of chunk c
        post grad-scatter(c)
    wait grad-scatter(0 .. D−1)

To control that order, the chunks' expert compute sits inside one ``autograd.Function``
(:class:`PipelinedExperts`): its forward records each chunk's small autograd graph, its backward
walks the chunks itself with ``torch.autograd.grad``. The weight gradient is the sum of the D chunks'
partial gradients, added in chunk order.
"""
from __future__ import annotations

import torch

from .communicator import Communicator
from .exchange import ExchangePlan, regroup_by_expert, regroup_by_source


def check_pipeline_degree(pipeline_degree) -> int:
    if not (isinstance(pipeline_degree, int) and not isinstance(pipeline_degree, bool) and pipeline_degree >= 1):
        raise ValueError(f"pipeline_degree={pipeline_degree!r} must be an integer >= 1 "
                         f"(1 = no pipelining, D = the exchange cut into D overlapped chunks)")
    return pipeline_degree


class PipelinedExperts(torch.autograd.Function):
    """The D chunks' exchange → experts → exchange back, overlapped in both passes (see the module docstring).

    Inputs: the expert-sorted ``buffer`` and the experts' parameters (so autograd hands their gradients
    back through this function); output: the returned rows, back in buffer order.
    """

    @staticmethod
    def forward(ctx, buffer, run_chunk, comm: Communicator, plans, indices, build_graph: bool, *params):
        degree = len(plans)
        order = torch.cat(indices).to(buffer.device)          # buffer row of each row of the concatenated chunks
        chunks = buffer.index_select(0, order).split([len(idx) for idx in indices])
        scatters = [comm.ialltoallv(chunks[0], plans[0].send_rows, plans[0].recv_rows)]
        inputs, outputs, gathers = [], [], []
        for c, plan in enumerate(plans):
            if c + 1 < degree:                                                   # chunk c+1 starts travelling
                nxt = plans[c + 1]
                scatters.append(comm.ialltoallv(chunks[c + 1], nxt.send_rows, nxt.recv_rows))
            received = scatters[c].wait().requires_grad_(build_graph)           # ... while chunk c is computed
            with torch.set_grad_enabled(build_graph):                            # this chunk's own small graph
                out = run_chunk(received, plan)
            inputs.append(received)
            outputs.append(out)
            gathers.append(comm.ialltoallv(out.detach(), plan.recv_rows, plan.send_rows))   # results go home
        ctx.comm, ctx.plans, ctx.order, ctx.params = comm, plans, order, params
        ctx.inputs, ctx.outputs = inputs, outputs
        returned = torch.cat([pending.wait() for pending in gathers])
        return torch.empty_like(returned).index_copy_(0, order, returned)        # chunk order -> buffer order

    @staticmethod
    def backward(ctx, grad):
        comm, plans, params = ctx.comm, ctx.plans, ctx.params
        degree = len(plans)
        grads = grad.index_select(0, ctx.order).split([sum(plan.send_rows) for plan in plans])   # chunk order
        # The gradient of chunk c's results goes back to where chunk c was computed (the gather's reverse).
        incoming = [comm.ialltoallv(grads[0], plans[0].send_rows, plans[0].recv_rows)]
        outgoing, param_grads = [], [torch.zeros_like(p) for p in params]
        for c, plan in enumerate(plans):
            if c + 1 < degree:
                nxt = plans[c + 1]
                incoming.append(comm.ialltoallv(grads[c + 1], nxt.send_rows, nxt.recv_rows))
            grad_out = incoming[c].wait()
            with torch.enable_grad():
                found = torch.autograd.grad(ctx.outputs[c], (ctx.inputs[c], *params), grad_out, allow_unused=True)
            for total, partial in zip(param_grads, found[1:]):
                if partial is not None:
                    total += partial                                             # chunk order: deterministic
            # Chunk c's input gradient travels home (the scatter's reverse) during chunk c+1's backward.
            outgoing.append(comm.ialltoallv(found[0], plan.recv_rows, plan.send_rows))
        grad_chunks = torch.cat([pending.wait() for pending in outgoing])
        grad_buffer = torch.empty_like(grad_chunks).index_copy_(0, ctx.order, grad_chunks)
        ctx.inputs = ctx.outputs = None                                          # free the chunks' graphs
        return (grad_buffer, None, None, None, None, None, *param_grads)


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
    """Steps 3 and 6-8 of the layer in ``degree`` overlapped chunks. Same contract as an expert runner."""
    P, L = comm.size, num_local_experts
    indices, chunk_counts = chunk_rows(counts, degree)
    # Step 3 for all chunks at once: block p of the message = my counts for rank p's experts, chunk by chunk.
    send_counts = chunk_counts.reshape(degree, P, L).permute(1, 0, 2).contiguous()            # [P, D, L]
    recv_counts = comm.alltoall(send_counts.reshape(-1)).reshape(P, degree, L)                 # [source, D, L]
    plans = [ExchangePlan(send_counts=send_counts[:, c], recv_counts=recv_counts[:, c],
                          send_rows=send_counts[:, c].sum(1).tolist(), recv_rows=recv_counts[:, c].sum(1).tolist(),
                          local_expert_counts=recv_counts[:, c].sum(0)) for c in range(degree)]

    def run_chunk(received: torch.Tensor, plan: ExchangePlan) -> torch.Tensor:
        expert_rows = regroup_by_expert(received, plan.recv_counts)
        out = experts(expert_rows, plan.local_expert_counts.to(counts.device), backend.grouped_matmul)
        return regroup_by_source(out, plan.recv_counts)

    params = [p for p in experts.parameters() if p.requires_grad]
    build_graph = torch.is_grad_enabled() and (buffer.requires_grad or bool(params))
    return PipelinedExperts.apply(buffer, run_chunk, comm, plans, indices, build_graph, *params)
