"""Communication-aware activation checkpointing (DeepSpeed-TED): recompute a block, not its messages.

Activation checkpointing keeps only each block's input during the forward pass and recomputes the
block in the backward pass, when its activations are needed (``model.py``, ``activation_checkpointing``).
Recomputing an MoE block naively repeats its collectives: the two all-to-alls of every MoE layer,
the all-gather of duplicate token dropping, the tensor-parallel all-reduces, the balance loss's sum
over ranks, so the backward pass would send as much again as the forward. DeepSpeed-TED's remedy,
done here for every collective: during the forward pass each checkpointed block *records* the result
of every collective it calls, in call order; during its recomputation the same code calls the same
collectives in the same order, and each call *replays* the recorded result without communicating.

    forward      block(h):  ... comm.alltoallv(...) -> rows        [record rows]
    backward     block(h):  ... comm.alltoallv(...) -> rows        [replay rows: no message]
                 then the backward's own collectives, as without checkpointing

The cost is the memory of the recorded results (the received rows a layer would keep anyway as
activations), until the block's backward pass has replayed them. The Communicator consults
:func:`active_stash` at the top of each public collective (communicator.py).
"""
from __future__ import annotations

from ..profiling import named_range

_active: "CollectiveStash | None" = None


def active_stash() -> "CollectiveStash | None":
    """The stash of the checkpointed block being run or recomputed now (None outside of one)."""
    return _active


class CollectiveStash:
    """The results of one checkpointed block's collectives, in call order.

    A recomputation reads them from the start; a block can be recomputed more than once in one
    backward pass (torch recomputes again for a nested ``torch.autograd.grad``, as the pipelined
    exchange's backward does), so replaying leaves the results in place until the stash is dropped.
    """

    def __init__(self):
        self.results: list[tuple[str, object]] = []
        self.replaying = False
        self.cursor = 0                 # the next result a recomputation replays
        self.depth = 0                  # > 0 inside a collective that calls another (allgather -> allgatherv)

    def record(self, what: str, result) -> None:
        self.results.append((what, result))

    def replay(self, what: str):
        if self.cursor == len(self.results):
            raise RuntimeError(f"recomputation called {what}, which the forward pass of this block did not: "
                               f"the block must issue the same collectives when it is recomputed")
        recorded, result = self.results[self.cursor]
        if recorded != what:
            raise RuntimeError(f"recomputation called {what} where the forward pass called {recorded}: "
                               f"the block must issue the same collectives in the same order")
        self.cursor += 1
        return result


class _StashMode:
    """Makes ``stash`` the active one while the block runs (record) or is recomputed (replay)."""

    def __init__(self, stash: CollectiveStash, replaying: bool):
        self.stash, self.replaying, self.outer, self.ranges = stash, replaying, [], []

    def __enter__(self):
        global _active
        self.outer.append((_active, self.stash.replaying))
        _active, self.stash.replaying = self.stash, self.replaying
        if self.replaying:
            self.stash.cursor = 0                        # every recomputation replays from the start
            self.ranges.append(named_range("recompute/block"))      # a range in a profiler's trace (profiling.py)
            self.ranges[-1].__enter__()

    def __exit__(self, *exc_info):
        global _active
        if self.replaying:
            self.ranges.pop().__exit__(*exc_info)
        _active, self.stash.replaying = self.outer.pop()


def stash_contexts():
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint``: (record during the forward pass,
    replay during each recomputation), both on one fresh stash for this block and this step."""
    stash = CollectiveStash()
    return _StashMode(stash, replaying=False), _StashMode(stash, replaying=True)
