"""Which rank does what: the world split into tensor-, expert- and data-parallel groups.

    world size = tp × ep × dp

* **tp** (tensor parallel): ranks that hold slices of the same non-expert matrices (attention heads,
  dense-MLP units; tensor_parallel.py) and therefore see the *same* tokens.
* **ep** (expert parallel): the ranks that share one MoE layer's experts, ``E / ep`` each. Tokens
  travel between them in the all-to-all. Global expert ``g`` lives on expert-rank ``g // (E / ep)``.
* **dp** (expert data parallel, "expert replicas"): copies of the same expert slice. Their gradients
  are averaged.

Every rank at a different (ep, dp) position reads different tokens, so the *data-parallel degree of
the replicated (non-expert) parameters* is ``ep × dp``: the global batch is split into that many
shards, and the gradients of the attention, embeddings, norms and gates are averaged over them.

Rank numbering puts tp innermost (neighbours, usually one node), then ep, then dp:

    rank = (dp_index · ep + ep_index) · tp + tp_index

Example, 8 ranks, tp=1, ep=4, dp=2: ranks 0-3 hold expert slices 0..3 and ranks 4-7 hold a second
copy of the same slices; the expert groups are {0,1,2,3} and {4,5,6,7}; the expert-replica groups
are {0,4}, {1,5}, {2,6}, {3,7}; the data group (all ranks with the same tp index) is all 8 ranks.

Each group is a :class:`Communicator` made with ``split(color, key)``: ranks with the same color end
up in the same communicator, numbered by key. All communicators share one :class:`CommunicationStats`.
The layout does not care which engine (MPI or torch.distributed) the world communicator speaks.
"""
from __future__ import annotations

import os

from .communicator import Communicator


class ParallelLayout:
    """The parallel groups of this run.

    Args:
        world: the world :class:`Communicator` (default: :func:`~fastmoe_edu.distributed.engines.open_world`,
            the engine that launched this process; MPI when no launcher is detected).
        tp: tensor-parallel degree.
        ep: expert-parallel degree; None = ``world_size / (tp · dp)``, i.e. all other ranks share the experts.
        dp: expert data-parallel degree (copies of each expert slice).

    Attributes (:class:`Communicator` s): ``world``, ``tensor`` (size tp), ``expert`` (size ep, the
    all-to-all group), ``expert_replica`` (size dp, expert gradients are averaged here) and ``data``
    (size ep·dp: ranks with different tokens; replicated gradients are averaged here).
    """

    def __init__(self, world: Communicator | None = None, tp: int = 1, ep: int | None = None, dp: int = 1):
        if world is None:
            from .engines import open_world
            world = open_world()
        for name, value in (("tp", tp), ("dp", dp)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        rank = world.rank
        tp, ep, dp = split_world(world.size, tp, ep, dp)
        self.tp_size, self.ep_size, self.dp_size = tp, ep, dp

        # Coordinates of this rank: rank = (dp_index · ep + ep_index) · tp + tp_index.
        self.tp_rank = rank % tp
        self.ep_rank = (rank // tp) % ep
        self.dp_rank = rank // (tp * ep)

        # More ranks than cores on this machine = oversubscribed (said at start-up; the MPI engine then
        # sleeps while waiting instead of busy-polling).
        self.ranks_on_this_node = world.ranks_on_this_node()
        self.oversubscribed = self.ranks_on_this_node > len(os.sched_getaffinity(0))

        self.world = world
        self.stats = world.stats
        # split(color, key): same color -> same communicator; key orders the ranks inside it.
        self.tensor = world.split(color=rank // tp, key=self.tp_rank, name="tensor")
        self.expert = world.split(color=self.dp_rank * tp + self.tp_rank, key=self.ep_rank, name="expert")
        self.expert_replica = world.split(color=self.ep_rank * tp + self.tp_rank, key=self.dp_rank,
                                          name="expert_replica")
        self.data = world.split(color=self.tp_rank, key=self.dp_rank * ep + self.ep_rank, name="data")

    # ------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.world.size

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def data_size(self) -> int:
        """Number of batch shards: ranks that see different tokens (ep × dp)."""
        return self.data.size

    @property
    def data_rank(self) -> int:
        """Which batch shard this rank reads."""
        return self.data.rank

    @property
    def is_main(self) -> bool:
        """Rank 0 of the world: the one that prints and writes the shared files."""
        return self.world.rank == 0

    # ------------------------------------------------------------------------------------------
    # Checks of a configuration against the layout. They use no communication, so a bad launch
    # raises the same error on every rank before any collective is entered (no rank is left waiting).
    # ------------------------------------------------------------------------------------------
    def check_num_experts(self, num_experts: int) -> int:
        """Experts per rank, ``E / ep``; ValueError if ``num_experts`` is not a multiple of ep."""
        return experts_per_rank(num_experts, self.ep_size, self.world_size)

    def check_batch_size(self, batch_size: int) -> int:
        """Sequences per rank, ``batch_size / (ep · dp)``; ValueError if not divisible."""
        return sequences_per_rank(batch_size, self.data_size, self.world_size)

    def describe(self) -> str:
        """One line for the start-up log."""
        busy = " (more ranks than cores: oversubscribed)" if self.oversubscribed else ""
        return (f"{self.world.engine} engine, world={self.world_size} = tp {self.tp_size} × ep {self.ep_size} × "
                f"dp {self.dp_size}; {self.ranks_on_this_node} ranks on this node{busy}")

    def __repr__(self) -> str:
        return (f"ParallelLayout(rank={self.rank}, world={self.world_size}, tp={self.tp_size}, "
                f"ep={self.ep_size}, dp={self.dp_size})")


# ----------------------------------------------------------------------------------------------------
# The same checks as plain arithmetic, usable before any layout (and any collective) exists.
# ----------------------------------------------------------------------------------------------------
def split_world(world_size: int, tp: int, ep: int | None, dp: int, hint: str = "") -> tuple[int, int, int]:
    """(tp, ep, dp) with world size = tp × ep × dp; ``ep=None`` takes the ranks tp and dp leave.

    ``hint`` is appended to the error message (what to change).
    """
    if ep is None:
        if world_size % (tp * dp):
            raise ValueError(f"world size {world_size} is not divisible by tp × dp = {tp} × {dp}" + hint)
        ep = world_size // (tp * dp)
    if tp * ep * dp != world_size:
        raise ValueError(f"tp × ep × dp = {tp} × {ep} × {dp} = {tp * ep * dp}, but the world size is {world_size}"
                         + hint)
    return tp, ep, dp


def experts_per_rank(num_experts: int, ep_size: int, world_size: int | None = None) -> int:
    """``E / ep``, or a ValueError that says what to change (``world_size``: named in it, when known)."""
    if num_experts % ep_size:
        world = f" (world size {world_size})" if world_size is not None else ""
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}"
                         f"{world}; every rank must hold the same number of experts: "
                         f"choose num_experts as a multiple of {ep_size}")
    return num_experts // ep_size


def sequences_per_rank(batch_size: int, data_size: int, world_size: int) -> int:
    """``batch_size / (ep · dp)``, or a ValueError that says what to change."""
    if batch_size % data_size:
        raise ValueError(f"batch_size={batch_size} (the global batch) is not divisible by the data-parallel "
                         f"size {data_size} (world size {world_size}); choose a multiple of {data_size}")
    return batch_size // data_size


def layout_sizes(cfg, world_size: int) -> tuple[int, int, int]:
    """(tp, ep, dp) of a launch from a TrainConfig, checked with plain arithmetic (no communication).

    ``ep`` unset means "all ranks not used by tp and dp": ep = world size / (tp · dp).
    """
    hint = (f"; launch a multiple of {cfg.tp * cfg.dp} ranks or change tp / dp" if cfg.ep is None
            else f"; launch {cfg.tp * cfg.ep * cfg.dp} ranks or change tp / ep / dp")
    return split_world(world_size, cfg.tp, cfg.ep, cfg.dp, hint=hint)
