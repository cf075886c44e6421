"""Exercise 8 · the expert-parallel exchange over P ranks (tutorial/03_multinode.py, section 2).

Model answer. P ranks, E experts in all, L = E / P on each: global expert g lives on rank g // L. Every
rank holds its own tokens' rows already sorted by *global* expert (exercises 3-4), so the rows for
rank p (experts p·L .. p·L + L − 1) form one contiguous block. ``comm`` is the project's
:class:`fastmoe_edu.distributed.Communicator`; its ``alltoall`` and ``alltoallv`` are all you need.
"""
from __future__ import annotations

import torch


def regroup_by_expert(received: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
    """Source-major rows -> expert-major rows (no communication).

    What the exchange delivers is ordered by (source rank s, local expert e): block (s, e) has
    recv_counts[s, e] rows, blocks laid out s-major. The experts need their rows contiguous, so lay the
    same blocks out e-major: (e=0, s=0), (e=0, s=1), ..., (e=1, s=0), ... keeping the rows' order
    inside each block.

    Args:
        received: [Σ recv_counts, d].
        recv_counts: [P, L] int64.
    Returns:
        [Σ recv_counts, d], expert e's rows contiguous (sources in rank order).
    """
    num_ranks, num_local = recv_counts.shape
    blocks = received.split(recv_counts.reshape(-1).tolist())                # block (s, e) = blocks[s·L + e]
    return torch.cat([blocks[s * num_local + e] for e in range(num_local) for s in range(num_ranks)])


def regroup_by_source(expert_rows: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`regroup_by_expert`: expert-major rows -> source-major rows.

    Args:
        expert_rows: [Σ recv_counts, d], blocks (e, s) laid out e-major.
        recv_counts: [P, L] int64 (the same counts as for regroup_by_expert).
    Returns:
        [Σ recv_counts, d], blocks (s, e) laid out s-major.
    """
    num_ranks, num_local = recv_counts.shape
    blocks = expert_rows.split(recv_counts.t().reshape(-1).tolist())         # block (e, s) = blocks[e·P + s]
    return torch.cat([blocks[e * num_ranks + s] for s in range(num_ranks) for e in range(num_local)])


def exchange_counts(counts: torch.Tensor, num_local_experts: int, comm) -> tuple[torch.Tensor, torch.Tensor]:
    """Who sends how many rows to whom: one all-to-all of the counts.

        send_counts[p, e] = counts[p·L + e]       rows I send to rank p for its local expert e
        recv_counts[s, e] = send_counts of rank s, row (my rank), entry e
                          = rows rank s sends me for my local expert e

    Args:
        counts: [E] int64, this rank's rows per global expert.
        num_local_experts: L = E / P.
        comm: a Communicator (``comm.size`` = P, ``comm.rank``); ``comm.alltoall(send[P·m])`` sends
            block p of ``send`` to rank p and returns the P blocks received, block s from rank s.
    Returns:
        (send_counts [P, L], recv_counts [P, L]), int64 on the CPU.
    """
    send_counts = counts.to("cpu", torch.int64).reshape(comm.size, num_local_experts)   # row p -> rank p
    received = comm.alltoall(send_counts.reshape(-1))                                  # row s <- rank s
    return send_counts, received.reshape(comm.size, num_local_experts)


def expert_parallel_forward(buffer: torch.Tensor, counts: torch.Tensor, comm, num_local_experts: int,
                            local_experts) -> torch.Tensor:
    """Rows to their experts' ranks, the local experts, the results back home: FastMoE's global exchange.

        1. exchange the counts                         (exchange_counts)
        2. send block p of ``buffer`` to rank p         comm.alltoallv(rows, send_rows, recv_rows),
                                                       send_rows[p] = Σ_e send_counts[p, e]
        3. regroup by expert, run ``local_experts(rows, local_counts)``,
                                                       local_counts[e] = Σ_s recv_counts[s, e]
        4. regroup by source, send every row back      (the reverse alltoallv: the counts swapped)

    Args:
        buffer: [Σ counts, d] this rank's rows sorted by global expert.
        counts: [E] int64.
        comm: the expert group's Communicator.
        num_local_experts: L.
        local_experts: ``f(rows [n, d], local_counts [L]) -> [n, d]``, rows expert-contiguous.
    Returns:
        [Σ counts, d]: expert_g(row) for every row of ``buffer``, in buffer order.
    """
    send_counts, recv_counts = exchange_counts(counts, num_local_experts, comm)           # 1.
    send_rows, recv_rows = send_counts.sum(dim=1).tolist(), recv_counts.sum(dim=1).tolist()
    received = comm.alltoallv(buffer, send_rows, recv_rows)                               # 2. (source, expert)
    expert_rows = regroup_by_expert(received, recv_counts)                                # 3. (expert, source)
    computed = local_experts(expert_rows, recv_counts.sum(dim=0))
    returned = regroup_by_source(computed, recv_counts)                                   # 4. (source, expert)
    return comm.alltoallv(returned, recv_rows, send_rows)                                 #    back home
