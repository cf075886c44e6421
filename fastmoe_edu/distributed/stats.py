"""Counters of the communication: how often each collective ran, how long it took, how many bytes it moved.

Every collective of :class:`~fastmoe_edu.distributed.communicator.Communicator` reports here under a
key ``"<communicator>/<operation>"``, e.g. ``"expert/alltoallv"`` (the token exchange of expert
parallelism) or ``"data/allreduce"`` (the gradient all-reduce of data parallelism). One
:class:`CommunicationStats` is shared by all communicators of a :class:`ParallelLayout`, so

    layout.stats.reset()
    ... train some steps ...
    layout.stats.total_seconds()      # time this rank spent inside MPI calls
    print(layout.stats.table())       # per collective: calls, seconds, MB sent

Conventions:

* ``seconds`` is wall time inside the call on this rank. It includes *waiting* for slower ranks to
  arrive, so on an imbalanced or oversubscribed machine it is an upper bound of the pure transfer time.
* ``bytes_sent`` counts the bytes this rank sends to *other* ranks (the rows it keeps for itself
  are a local copy, not traffic). For an all-reduce it is the buffer size (what a naive algorithm
  sends once; the ring algorithm sends about twice that). These are the volumes the cost model
  ``t = α·(P−1) + β·bytes`` of docs/moe_systems.md §4.2 is written in.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..profiling import named_range


@dataclass
class CollectiveCounter:
    calls: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0


class CommunicationStats:
    """Per-collective counters (calls, seconds, bytes sent), keyed ``"<communicator>/<operation>"``."""

    def __init__(self):
        self.counters: dict[str, CollectiveCounter] = {}

    @contextmanager
    def measure(self, key: str, bytes_sent: int):
        """Time the body of the ``with`` block and add it to the counter called ``key`` (and, while a profiler
        records, show it as a range called ``key`` in the trace: profiling.py)."""
        start = time.perf_counter()
        try:
            with named_range(key):
                yield
        finally:
            counter = self.counters.setdefault(key, CollectiveCounter())
            counter.calls += 1
            counter.seconds += time.perf_counter() - start
            counter.bytes_sent += int(bytes_sent)

    def reset(self) -> None:
        self.counters.clear()

    def total_seconds(self) -> float:
        return sum(counter.seconds for counter in self.counters.values())

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Plain numbers, e.g. for JSON: ``{key: {"calls": .., "seconds": .., "bytes_sent": ..}}``."""
        return {key: {"calls": c.calls, "seconds": c.seconds, "bytes_sent": c.bytes_sent}
                for key, c in sorted(self.counters.items())}

    def table(self) -> str:
        lines = [f"{'collective':<28}{'calls':>8}{'seconds':>10}{'MB sent':>10}"]
        for key, c in sorted(self.counters.items()):
            lines.append(f"{key:<28}{c.calls:>8}{c.seconds:>10.3f}{c.bytes_sent / 1e6:>10.2f}")
        return "\n".join(lines)


def wall_clock(device) -> float:
    """Wall time in seconds, after ``device`` has finished its queued work (CUDA runs asynchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
