"""Overlapped all-to-all: the token exchange cut into chunks so that communication and expert compute overlap.

FasterMoE's *smart schedule* and FSMoE's *pipeline degree* rest on one observation: the experts
do not need all their rows at once. Cut the expert-sorted buffer into D chunks, each expert's
segment into D nearly equal pieces (piece c of a segment of n rows = its rows ``⌊c·n/D⌋ .. ⌊(c+1)·n/D⌋``),
so every chunk is itself expert-sorted. Then, forward with D_f = ``pipeline_degree`` chunks:

    post scatter(0), scatter(1); advance scatter(0)
    for c in 0 .. D_f−1:
        post scatter(c+2); advance scatter(c+1)   ← chunks c+1 and c+2 travel ...
        wait scatter(c); experts(chunk c)         ← ... while chunk c is computed
        post gather(c); advance gather(c−1)       ← and chunk c's results travel back during the next compute
    wait gather(0 .. D_f−1); put the rows back in buffer order

(``advance`` starts the second phase of a two-level exchange and does nothing for a flat one: below.)

and backward, the same schedule mirrored, with its own D_b = ``backward_pipeline_degree`` chunks
(FSMoE chooses the two degrees separately: the backward computes twice as much per row, so its best
degree differs):

    post grad-gather(0), grad-gather(1); advance grad-gather(0)   ← output gradients to the expert ranks
    for b in 0 .. D_b−1:
        post grad-gather(b+2); advance grad-gather(b+1)   ← chunks b+1, b+2's gradients travel ...
        wait grad-gather(b); expert backward(chunk b)     ← ... while chunk b's input and weight grads are computed
        post grad-scatter(b); advance grad-scatter(b−1)   ← chunk b's input gradients go home
    wait grad-scatter(0 .. D_b−1)

``cost_model.py`` models each pass (every task α + β·n per chunk) and picks D_f and D_b; autotune.py
measures α and β online for ``"auto"``.

How the backward can use other chunks than the forward. Autograd can only differentiate a graph
whole, and the forward's graphs are per forward chunk. So the forward cuts finer: it computes each
forward chunk as its *pieces*, the rows it shares with each backward chunk (per segment, the rows
between consecutive cuts of ⌊c·n/D_f⌋ ∪ ⌊b·n/D_b⌋), each piece one grouped GEMM with its own small
autograd graph. Backward chunk b then differentiates exactly its pieces with ``torch.autograd.grad``.
Nothing is recomputed and every row is differentiated once; the price is more, smaller GEMM calls
forward (about D_f + D_b − 1 instead of D_f). With D_f = D_b a forward chunk is one piece: the
plain FasterMoE schedule.

    segment of 12 rows, D_f = 2, D_b = 3:   forward chunks |0 0 0 0 0 0|1 1 1 1 1 1|
                                           backward chunks |0 0 0 0|1 1 1 1|2 2 2 2|
                                           pieces (c, b)   |(0,0)  |(0,1)|(1,1)|(1,2)  |

Both sides of the exchange compute every chunking from the segment sizes alone, so after the one
exchange of counts (step 3) no rank needs to be told how another cuts. Every row is computed by the
same expert with the same weights as without chunks, so the output is the same (up to the summation
order of the expert weight gradients, which add the pieces' partial sums in backward-chunk order).

Each chunk can take the flat exchange or the hierarchical one (hierarchical.py), whose handle has two
phases: posting starts the intra-node phase, ``advance()`` the inter-node one. The loops above keep
two chunks ahead — post chunk c+2, advance chunk c+1, wait for and compute chunk c — so the intra-node
phase of c+2, the inter-node phase of c+1 and the experts on c run at once (FSMoE's co-scheduling of
the two levels with the compute); the returning chunks are advanced one behind their post. For the
flat exchange ``advance()`` does nothing and the schedule is the one above.

Non-blocking collectives: ``Communicator.ialltoallv`` returns a :class:`PendingExchange` at once;
its buffers stay alive until ``.wait()``. All ranks run the same loop, so they post their collectives
on each communicator in the same order (scatter 0, scatter 1, scatter 2, gather 0, scatter 3, gather 1,
...), as MPI and torch.distributed both require. How much actually overlaps depends on the engine: an MPI library
without an asynchronous progress thread (the ``mpich`` wheel's default) may only move a large
message inside MPI calls — the waits; gloo and NCCL progress on their own threads / streams.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..profiling import named_range
from .communicator import Communicator
from .exchange import exchange_counts, regroup_by_expert, regroup_by_source

#: the spelling of "choose the degree by measuring" (autotune.py)
AUTO = "auto"


def check_pipeline_degree(pipeline_degree, name: str = "pipeline_degree"):
    """An integer >= 1 or ``"auto"``; anything else is a ValueError naming the value."""
    if pipeline_degree == AUTO:
        return pipeline_degree
    if not (isinstance(pipeline_degree, int) and not isinstance(pipeline_degree, bool) and pipeline_degree >= 1):
        raise ValueError(f"{name}={pipeline_degree!r} must be an integer >= 1 or {AUTO!r} "
                         f"(1 = no pipelining, D = the exchange cut into D overlapped chunks, "
                         f"{AUTO!r} = measured and chosen during the first steps)")
    return pipeline_degree


# ----------------------------------------------------------------------------------------------------
# Chunkings and pieces
# ----------------------------------------------------------------------------------------------------
def chunk_rows(counts: torch.Tensor, degree: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cut each segment (``counts[i]`` rows, consecutive) into ``degree`` pieces.

    Returns the row indices of each chunk (ascending: segment by segment) and counts[degree, segments].
    """
    counts = counts.to("cpu", torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    cuts = torch.stack([counts * c // degree for c in range(degree + 1)])        # [D+1, segments]: boundaries
    chunk_counts = cuts[1:] - cuts[:-1]
    indices = [torch.cat([torch.arange(s + lo, s + hi) for s, lo, hi in
                          zip(starts.tolist(), cuts[c].tolist(), cuts[c + 1].tolist())] or [torch.zeros(0, dtype=torch.int64)])
               for c in range(degree)]
    return indices, chunk_counts


@dataclass
class Chunking:
    """One side's cut of its rows into D chunks: which rows, and how many go to / come from each rank."""
    indices: list[torch.Tensor]          # [D]: rows of the whole buffer in each chunk, in chunk (= wire) order
    peer_rows: list[list[int]]           # [D][P]: rows of chunk c for (or from) rank p

    @staticmethod
    def of(counts: torch.Tensor, degree: int, num_ranks: int) -> "Chunking":
        """``counts`` = segment sizes grouped by rank (P blocks of L experts), in buffer order."""
        indices, chunk_counts = chunk_rows(counts.reshape(-1), degree)
        return Chunking(indices, chunk_counts.reshape(degree, num_ranks, -1).sum(2).tolist())


@dataclass
class Piece:
    """The received rows of forward chunk c that belong to backward chunk b (one grouped GEMM)."""
    forward_chunk: int
    backward_chunk: int
    in_forward: torch.Tensor             # where its rows sit in forward chunk c
    in_backward: torch.Tensor            # ... and in backward chunk b
    counts: torch.Tensor                 # [P, L]: its rows per (source rank, local expert)


def cut_pieces(recv_counts: torch.Tensor, forward: Chunking, backward: Chunking) -> list[Piece]:
    """The pieces of the received rows, by forward chunk; every forward chunk gets at least one (maybe empty)."""
    total = int(recv_counts.sum())
    label_f, label_b = torch.zeros(total, dtype=torch.int64), torch.zeros(total, dtype=torch.int64)
    for c, rows in enumerate(forward.indices):
        label_f[rows] = c
    for b, rows in enumerate(backward.indices):
        label_b[rows] = b
    segment = torch.repeat_interleave(torch.arange(recv_counts.numel()), recv_counts.reshape(-1))
    key = label_f * len(backward.indices) + label_b
    order = torch.argsort(key, stable=True)                   # rows grouped by (c, b), ascending in each
    keys, sizes = torch.unique_consecutive(key[order], return_counts=True)
    pieces = []
    for k, rows in zip(keys.tolist(), order.split(sizes.tolist())):
        c, b = divmod(k, len(backward.indices))
        pieces.append(Piece(c, b, torch.searchsorted(forward.indices[c], rows),
                            torch.searchsorted(backward.indices[b], rows),
                            torch.bincount(segment[rows], minlength=recv_counts.numel()).reshape(recv_counts.shape)))
    empty = torch.zeros(0, dtype=torch.int64)
    for c in set(range(len(forward.indices))) - {p.forward_chunk for p in pieces}:
        pieces.append(Piece(c, 0, empty, empty, torch.zeros_like(recv_counts)))
    return sorted(pieces, key=lambda p: (p.forward_chunk, p.backward_chunk))


@dataclass
class Schedule:
    """Everything one pipelined layer call needs: the four chunkings and the pieces."""
    send_forward: Chunking               # my buffer, cut D_f ways (rows I send, gradients I receive)
    recv_forward: Chunking               # the rows I receive for my experts, cut D_f ways
    send_backward: Chunking              # my buffer, cut D_b ways (output gradients I send)
    recv_backward: Chunking              # the rows I computed, cut D_b ways (gradients I receive)
    pieces: list[Piece]


# ----------------------------------------------------------------------------------------------------
# The overlapped exchange, both passes
# ----------------------------------------------------------------------------------------------------
class PipelinedExperts(torch.autograd.Function):
    """The chunks' exchange → experts → exchange back, overlapped in both passes (see the module docstring).

    Inputs: the expert-sorted ``buffer`` and the experts' parameters (so autograd hands their gradients
    back through this function); output: the returned rows, back in buffer order.
    """

    @staticmethod
    def forward(ctx, buffer, run_piece, exchange, schedule: Schedule, build_graph: bool, *params):
        computed = []

        def experts_on(c, received):                                             # forward chunk c, piece by piece
            outs, places = [], []
            for piece in (p for p in schedule.pieces if p.forward_chunk == c):
                rows = received.index_select(0, piece.in_forward.to(received.device)).requires_grad_(build_graph)
                with torch.set_grad_enabled(build_graph):                        # this piece's own small graph
                    out = run_piece(rows, piece.counts)
                computed.append((piece, rows, out))
                outs.append(out.detach())
                places.append(piece.in_forward)
            return _place(torch.cat(outs), torch.cat(places), received.shape[0])    # (then they go home)
        ctx.exchange, ctx.schedule, ctx.params, ctx.computed = exchange, schedule, params, computed
        ctx.buffer_shape, ctx.buffer_dtype = buffer.shape, buffer.dtype
        return _overlapped(buffer, schedule.send_forward, schedule.recv_forward, exchange, experts_on, "forward")

    @staticmethod
    def backward(ctx, grad):
        # Mirrored: the gradient of my results goes to where they were computed (the gather's reverse), and
        # chunk b's input gradient travels home (the scatter's reverse) during chunk b+1's backward.
        params = ctx.params
        param_grads = [torch.zeros_like(p) for p in params]

        def expert_backward(b, grad_out):                                        # backward chunk b, piece by piece
            grad_in = grad_out.new_zeros((grad_out.shape[0], *ctx.buffer_shape[1:]), dtype=ctx.buffer_dtype)
            for piece, rows, out in (entry for entry in ctx.computed if entry[0].backward_chunk == b):
                at = piece.in_backward.to(grad_out.device)
                with torch.enable_grad():
                    found = torch.autograd.grad(out, (rows, *params), grad_out.index_select(0, at), allow_unused=True)
                for total, partial in zip(param_grads, found[1:]):
                    if partial is not None:
                        total += partial                                         # piece order: deterministic
                grad_in.index_copy_(0, at, found[0])
            return grad_in
        grad_buffer = _overlapped(grad, ctx.schedule.send_backward, ctx.schedule.recv_backward, ctx.exchange,
                                  expert_backward, "backward")
        ctx.computed = None                                                      # free the pieces' graphs
        return (grad_buffer, None, None, None, None, *param_grads)


def _overlapped(rows: torch.Tensor, send: Chunking, recv: Chunking, exchange, compute, name: str) -> torch.Tensor:
    """Either pass's loop (module docstring): ``rows`` go out in ``send``'s chunks, each posted two chunks
    ahead and advanced one ahead; ``compute(c, arrived)`` runs on chunk c once it is in, and its result goes
    back (the counts swapped) while the next chunk computes, advanced one chunk behind. Returns what came
    back, in the order of ``rows``. ``name`` ("forward", "backward") names the pass's ranges in a profiler's
    trace: ``pipeline/forward chunk 0 send``, ``... receive``, ``... experts``, ``... send back``, ``... receive back``."""
    chunks = [rows.index_select(0, where.to(rows.device)) for where in send.indices]

    def step(c, what):                                                           # a named range (profiling.py)
        return named_range(f"pipeline/{name} chunk {c} {what}")

    def post(c):
        with step(c, "send"):
            return exchange.ialltoallv(chunks[c], send.peer_rows[c], recv.peer_rows[c])
    outgoing, returning = [post(c) for c in range(min(2, len(chunks)))], []
    outgoing[0].advance()                                                        # (chunk 0's second phase first)
    for c in range(len(chunks)):
        if c + 2 < len(chunks):
            outgoing.append(post(c + 2))                                         # chunk c+2 starts travelling
        if c + 1 < len(chunks):
            outgoing[c + 1].advance()                                            # c+1's second phase, if any
        with step(c, "receive"):
            arrived = outgoing[c].wait()
        with step(c, "experts"):
            result = compute(c, arrived)                                         # ... while chunk c is computed
        with step(c, "send back"):
            returning.append(exchange.ialltoallv(result, recv.peer_rows[c], send.peer_rows[c]))
        if c > 0:
            returning[c - 1].advance()                                           # (c−1's second phase, if any)
    returned = []
    for c, pending in enumerate(returning):
        with step(c, "receive back"):
            returned.append(pending.wait())
    returned = torch.cat(returned)
    return _place(returned, torch.cat(send.indices), rows.shape[0])             # chunk order -> row order


def _place(rows: torch.Tensor, where: torch.Tensor, total: int) -> torch.Tensor:
    """``out[where[i]] = rows[i]`` for a permutation ``where`` of ``0 .. total−1``."""
    return rows.new_empty((total, *rows.shape[1:])).index_copy_(0, where.to(rows.device), rows)


def pipelined_expert_exchange(experts, buffer: torch.Tensor, counts: torch.Tensor, backend, comm: Communicator,
                              num_local_experts: int, degree: int, backward_degree: int | None = None,
                              exchange=None) -> torch.Tensor:
    """Steps 3 and 6-8 of the layer, forward in ``degree`` and backward in ``backward_degree`` (default: the
    same) overlapped chunks, each chunk through ``exchange`` (anything with ``ialltoallv``: the flat
    ``comm`` by default, or a HierarchicalExchange). Same contract as an expert runner."""
    P = comm.size
    plan = exchange_counts(counts, num_local_experts, comm)                      # 3. counts, once
    send_counts = plan.send_counts.reshape(-1)                                   # my rows per global expert
    recv_f = Chunking.of(plan.recv_counts, degree, P)
    recv_b = Chunking.of(plan.recv_counts, backward_degree or degree, P)
    schedule = Schedule(send_forward=Chunking.of(send_counts, degree, P), recv_forward=recv_f,
                        send_backward=Chunking.of(send_counts, backward_degree or degree, P),
                        recv_backward=recv_b, pieces=cut_pieces(plan.recv_counts, recv_f, recv_b))

    def run_piece(received: torch.Tensor, piece_counts: torch.Tensor) -> torch.Tensor:
        expert_rows = regroup_by_expert(received, piece_counts)
        out = experts(expert_rows, piece_counts.sum(0).to(counts.device), backend)
        return regroup_by_source(out, piece_counts)

    params = [p for p in experts.parameters() if p.requires_grad]
    build_graph = torch.is_grad_enabled() and (buffer.requires_grad or bool(params))
    return PipelinedExperts.apply(buffer, run_piece, exchange or comm, schedule, build_graph, *params)
