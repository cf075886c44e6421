"""Exercise 10 · a two-chunk pipelined exchange (FasterMoE / FSMoE; tutorial/06_schedules.py, section 2).

Check it: python -m tutorial.exercises.check 10

The expert-parallel exchange of exercise 8, cut into D chunks so that chunk c+1 travels
while the experts compute chunk c. Each expert's segment is cut into D nearly equal pieces; chunk c is
piece c of every segment, so every chunk is itself expert-sorted, and both sides compute every cut from
the segment sizes alone. Uses your exercise 8 (``exchange_counts``, ``regroup_by_expert``,
``regroup_by_source``) and the non-blocking ``comm.ialltoallv(rows, send_rows, recv_rows)``, which
returns at once; its ``.wait()`` returns the received rows.
"""
from __future__ import annotations

import torch

from .ex08_expert_parallel import exchange_counts, regroup_by_expert, regroup_by_source


def chunk_rows(counts: torch.Tensor, degree: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Cut each segment (``counts[i]`` consecutive rows) into ``degree`` pieces.

        piece c of a segment of n rows starting at row a:   rows a + ⌊c·n/D⌋ .. a + ⌊(c+1)·n/D⌋ − 1

    Args:
        counts: [S] int64, segment sizes in buffer order.
        degree: D >= 1.
    Returns:
        (indices, chunk_counts): indices[c] = the buffer rows of chunk c, ascending (int64, maybe empty);
        chunk_counts [D, S] int64 = the rows of segment i in chunk c.
    """
    raise NotImplementedError


def pipelined_exchange(buffer: torch.Tensor, counts: torch.Tensor, comm, num_local_experts: int, local_experts,
                       degree: int = 2) -> torch.Tensor:
    """Exercise 8's ``expert_parallel_forward``, pipelined in ``degree`` chunks:

        exchange the counts once
        post scatter(c) for every chunk c        comm.ialltoallv(chunk c of buffer, ...): all in flight
        for c in 0 .. D−1:
            wait scatter(c); experts on chunk c  (regroup, local_experts, regroup back)
            post gather(c)                       chunk c's results travel home while chunk c+1 computes
        wait every gather; put the rows back in buffer order

    Chunk c sends, to rank p, piece c of each of rank p's segments: cut ``send_counts`` (flattened, P·L
    segments) with :func:`chunk_rows`; what arrives is piece c of what each rank sends, cut the same way
    from ``recv_counts``. Every rank posts its exchanges in the same order.

    Args / Returns: as exercise 8's ``expert_parallel_forward``, plus ``degree`` = D.
    """
    raise NotImplementedError
