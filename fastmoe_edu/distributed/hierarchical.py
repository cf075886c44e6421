"""Hierarchical (two-dimensional) all-to-all-v: inside each node first, then between nodes (Tutel's "2DH").

The expert group's P ranks sit on N nodes of G ranks each (``ranks_per_node = G``, P = N·G); a rank
is ``(node n, local index l)`` with ``p = n·G + l`` (consecutive ranks share a node, as mpirun places them).
The flat exchange makes every rank send P − 1 messages, P − G of them across nodes; at large P
those messages are tiny and the per-message latency α dominates. The hierarchical one:

    phase 1 (intra-node Alltoallv, G ranks):  rank (n, l) sends to its node-mate l' every row whose
             destination has local index l' (destinations (0, l'), (1, l'), ..., (N−1, l')).
             Rank (n, l') now holds its whole node's rows for "local index l' on every node".
    phase 2 (inter-node Alltoallv, N ranks with the same local index):  rank (n, l') sends to node n'
             one message: all rows of its node for destination (n', l').

Per exchange a rank sends (G − 1) + (N − 1) messages instead of P − 1, and only N − 1 of them cross
nodes (instead of P − G), each G times larger on average. Every row crosses the inter-node network
once, as in the flat exchange, but also moves once inside the node (cheap: shared memory / NVLink).

Order of rows. The flat exchange delivers the rows from source rank 0 first, then rank 1, ... . Here:

    before phase 1   my rows ordered by destination (n', l')       -> reorder to (l', n') blocks
    after  phase 1   rows ordered (source local l_s, dest node n')  -> reorder to (n', l_s) blocks
    after  phase 2   rows ordered (source node n_s, source local l_s) = source rank order  ✓

so the result is bit-identical to the flat Alltoallv. The block sizes of the middle reorder are the
send counts of my node-mates; one small Allgather of the G × P count matrix inside the node gives them.

It is an *exchange* in the sense of exchange.py (``alltoallv(rows, send_rows, recv_rows)``), so
``exchange_rows`` differentiates it like the flat ones: the backward runs it with the counts swapped.
Its non-blocking ``ialltoallv`` posts phase 1 and returns a handle; ``.advance()`` waits for phase 1,
reorders and *posts* phase 2; ``.wait()`` waits for phase 2 (advancing first if needed). So the
pipelined exchange (pipeline.py) keeps three chunks in flight, FSMoE's co-scheduling of the two levels
with the compute:

    intra-node phase of chunk c+2  ∥  inter-node phase of chunk c+1  ∥  experts on chunk c
"""
from __future__ import annotations

import torch

from .communicator import Communicator
from .exchange import _expert_major_source_rows
from .stats import wall_clock


class HierarchicalExchange:
    """The two communicators of a two-level exchange over ``comm`` (an expert group), and message counters.

    ``messages`` counts the non-empty messages this rank sent, ``{"intra_node": .., "inter_node": ..}``;
    :func:`count_flat_messages` gives the same figures for the flat exchange.
    """

    def __init__(self, comm: Communicator, ranks_per_node: int):
        check_ranks_per_node(ranks_per_node, comm.size)
        self.comm, self.ranks_per_node = comm, ranks_per_node
        self.num_nodes = comm.size // ranks_per_node
        self.node, self.local = divmod(comm.rank, ranks_per_node)
        # split(color, key): the node-mates (same node), and the ranks with my local index on every node.
        self.intra = comm.split(color=self.node, key=self.local, name=f"{comm.name}_intra_node")
        self.inter = comm.split(color=self.local, key=self.node, name=f"{comm.name}_inter_node")
        self.messages = {"intra_node": 0, "inter_node": 0}
        self.last_phase_seconds = (0.0, 0.0)            # (intra-node, inter-node) of the last blocking exchange

    def alltoallv(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
        """Same contract as ``Communicator.alltoallv``: ``send_rows[p]`` rows to rank p, result in source order.
        Keeps the seconds of its two phases in ``last_phase_seconds`` (autotune.py fits each level apart)."""
        start = wall_clock(rows.device)
        pending = self.ialltoallv(rows, send_rows, recv_rows, blocking=True)          # phase 1 (and the counts)
        middle = wall_clock(rows.device)
        result = pending.wait()                                                       # phase 2
        self.last_phase_seconds = (middle - start, wall_clock(rows.device) - middle)
        return result

    def ialltoallv(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                   blocking: bool = False) -> "PendingTwoPhase":
        """Post phase 1 and return; ``.wait()`` finishes phase 1 and runs phase 2 (pipeline.py overlaps one
        chunk's phase 1 with the previous chunk's phase 2 and expert compute this way)."""
        G, N = self.ranks_per_node, self.num_nodes
        send = torch.tensor(send_rows, dtype=torch.int64).reshape(N, G)                # [dest node n', dest local l']
        # The send counts of all my node-mates: mates[l_s, n', l'] (one Allgather of G·P integers).
        mates = self.intra.allgather(send.reshape(-1), purpose="allgather_counts").reshape(G, N, G)
        # Phase 1: reorder my rows (n', l') -> (l', n') and send block l' to node-mate l'.
        by_local = rows.index_select(0, _expert_major_source_rows(send).to(rows.device))
        phase1_send = send.sum(dim=0).tolist()                                          # Σ_n' per l'
        mine = mates[:, :, self.local]                                                  # [l_s, n'] rows for (n', me)
        phase1_recv = mine.sum(dim=1).tolist()                                          # Σ_n' per source l_s
        self._count("intra_node", phase1_send, self.local)
        phase2_recv = torch.tensor(recv_rows, dtype=torch.int64).reshape(N, G).sum(dim=1).tolist()
        post = self.intra.alltoallv if blocking else self.intra.ialltoallv
        return PendingTwoPhase(self, post(by_local, phase1_send, phase1_recv), mine, phase2_recv, blocking)

    def _count(self, level: str, sends: list[int], me: int) -> None:
        self.messages[level] += sum(1 for peer, rows in enumerate(sends) if rows and peer != me)

    def __repr__(self) -> str:
        return f"hierarchical ({self.num_nodes} nodes × {self.ranks_per_node} ranks)"


class PendingTwoPhase:
    """A posted hierarchical exchange: phase 1 in flight; :meth:`advance` posts phase 2, :meth:`wait` ends it.
    A blocking one (``alltoallv``) holds each phase's arrived rows instead of its handle."""

    def __init__(self, exchange: HierarchicalExchange, phase1, mine: torch.Tensor, phase2_recv: list[int],
                 blocking: bool = False):
        self.exchange, self.phase1, self.mine, self.phase2_recv = exchange, phase1, mine, phase2_recv
        self.blocking = blocking
        self.phase2 = None                                  # phase 2, once posted

    def advance(self) -> None:
        """Wait for phase 1, then post phase 2 (non-blocking unless the exchange was blocking)."""
        if self.phase2 is not None:
            return
        arrived = self.phase1 if self.blocking else self.phase1.wait()
        # Reorder (l_s, n') -> (n', l_s): rows for each destination node contiguous.
        by_node = arrived.index_select(0, _expert_major_source_rows(self.mine).to(arrived.device))
        # Phase 2: block n' to node n' (over the ranks with my local index).
        phase2_send = self.mine.sum(dim=0).tolist()                                     # Σ_l_s per n'
        self.exchange._count("inter_node", phase2_send, self.exchange.node)
        post = self.exchange.inter.alltoallv if self.blocking else self.exchange.inter.ialltoallv
        self.phase2 = post(by_node, phase2_send, self.phase2_recv)

    def wait(self) -> torch.Tensor:
        self.advance()
        return self.phase2 if self.blocking else self.phase2.wait()


def count_flat_messages(send_rows: list[int], my_rank: int, ranks_per_node: int) -> dict[str, int]:
    """The non-empty messages a flat exchange sends from ``my_rank``, split into intra- and inter-node."""
    node = my_rank // ranks_per_node
    intra = sum(1 for p, rows in enumerate(send_rows) if rows and p != my_rank and p // ranks_per_node == node)
    inter = sum(1 for p, rows in enumerate(send_rows) if rows and p // ranks_per_node != node)
    return {"intra_node": intra, "inter_node": inter}


def check_ranks_per_node(ranks_per_node: int, group_size: int) -> None:
    """ValueError (no communication) unless ``ranks_per_node`` divides the expert group's size."""
    if not (isinstance(ranks_per_node, int) and ranks_per_node >= 1 and group_size % ranks_per_node == 0):
        divisors = [d for d in range(1, group_size + 1) if group_size % d == 0]
        raise ValueError(f"ranks_per_node={ranks_per_node!r} must divide the expert-parallel size ep={group_size} "
                         f"(the hierarchical all-to-all groups ep ranks into nodes); allowed: "
                         f"{', '.join(map(str, divisors))}")
