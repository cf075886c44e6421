"""Which rank does what: the world split into tensor-, expert- and data-parallel groups.

    world size = tp × ep × dp

* **tp** (tensor parallel, 1 for now): ranks that hold slices of the same non-expert matrices and
  therefore see the *same* tokens. Kept in the layout so tensor parallelism can be added later.
* **ep** (expert parallel): the ranks that share one MoE layer's experts, ``E / ep`` each. Tokens
  travel between them in the all-to-all. Global expert ``g`` lives on expert-rank ``g // (E / ep)``.
* **dp** (expert data parallel): copies of the same expert slice. Their gradients are averaged.

Every rank at a different (ep, dp) position reads different tokens, so the *data-parallel degree of
the replicated (non-expert) parameters* is ``ep × dp``: the global batch is split into that many
shards, and the gradients of the attention, embeddings, norms and gates are averaged over them.

Rank numbering puts tp innermost (neighbours, usually one node), then ep, then dp:

    rank = (dp_index · ep + ep_index) · tp + tp_index

Example, 8 ranks, tp=1, ep=4, dp=2: ranks 0-3 hold experts slices 0..3 and ranks 4-7 hold a second
copy of the same slices; the expert groups are {0,1,2,3} and {4,5,6,7}; the expert-replica groups
are {0,4}, {1,5}, {2,6}, {3,7}; the data group (all ranks with the same tp index) is all 8 ranks.

Each group is an MPI communicator made with ``Split(color, key)``: ranks with the same color end up
in the same communicator, numbered by key. All communicators share one :class:`CommunicationStats`.
"""
from __future__ import annotations

import os

from mpi4py import MPI

from .communicator import Communicator, cuda_aware_mpi
from .stats import CommunicationStats


_SLEEP_SECONDS = 1e-4      # between completion checks while waiting, when oversubscribed


class ParallelLayout:
    """The parallel groups of this run.

    Args:
        world: the MPI communicator to split (default ``MPI.COMM_WORLD``).
        tensor_parallel: tp (only 1 is used by this project so far).
        expert_parallel: ep; default ``world_size / (tp · dp)``, i.e. all ranks share the experts.
        expert_replicas: dp, copies of each expert slice.
        sleep_while_waiting: wait for collectives by test-and-sleep instead of MPI's busy polling;
            None = only when this machine has more ranks than cores.

    Attributes (:class:`Communicator` s): ``world``, ``tensor`` (size tp), ``expert`` (size ep, the
    all-to-all group), ``expert_replica`` (size dp, expert gradients are averaged here) and ``data``
    (size ep·dp: ranks with different tokens; replicated gradients are averaged here).
    """

    def __init__(self, world: MPI.Comm | None = None, tensor_parallel: int = 1,
                 expert_parallel: int | None = None, expert_replicas: int = 1,
                 sleep_while_waiting: bool | None = None):
        world = MPI.COMM_WORLD if world is None else world
        world_size, rank = world.Get_size(), world.Get_rank()
        for name, value in (("tensor_parallel", tensor_parallel), ("expert_replicas", expert_replicas)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        tensor_parallel, expert_parallel, expert_replicas = split_world(
            world_size, tensor_parallel, expert_parallel, expert_replicas)
        self.tp_size, self.ep_size, self.dp_size = tensor_parallel, expert_parallel, expert_replicas

        # Coordinates of this rank: rank = (dp_index · ep + ep_index) · tp + tp_index.
        self.tp_rank = rank % tensor_parallel
        self.ep_rank = (rank // tensor_parallel) % expert_parallel
        self.dp_rank = rank // (tensor_parallel * expert_parallel)

        # How many ranks share this machine; more ranks than cores = oversubscribed: then waiting ranks
        # sleep instead of busy-polling, leaving the cores to the ranks that compute (communicator.py).
        node = world.Split_type(MPI.COMM_TYPE_SHARED)
        self.ranks_on_this_node = node.Get_size()
        node.Free()
        self.oversubscribed = self.ranks_on_this_node > len(os.sched_getaffinity(0))
        if sleep_while_waiting is None:
            sleep_while_waiting = self.oversubscribed
        self.sleep_while_waiting = _SLEEP_SECONDS if sleep_while_waiting else None

        self.stats = CommunicationStats()
        self.world = Communicator(world, "world", self.stats, self.sleep_while_waiting)
        # Split(color, key): same color -> same communicator; key orders the ranks inside it.
        self.tensor = self._split(world, "tensor", color=rank // tensor_parallel, key=self.tp_rank)
        self.expert = self._split(world, "expert", color=self.dp_rank * tensor_parallel + self.tp_rank,
                                  key=self.ep_rank)
        self.expert_replica = self._split(world, "expert_replica",
                                          color=self.ep_rank * tensor_parallel + self.tp_rank, key=self.dp_rank)
        self.data = self._split(world, "data", color=self.tp_rank,
                                key=self.dp_rank * expert_parallel + self.ep_rank)

    def _split(self, world: MPI.Comm, name: str, color: int, key: int) -> Communicator:
        return Communicator(world.Split(color, key), name, self.stats, self.sleep_while_waiting)

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
        waiting = "sleep between checks (oversubscribed)" if self.sleep_while_waiting else "MPI's busy wait"
        return (f"world={self.world_size} = tp {self.tp_size} × ep {self.ep_size} × dp {self.dp_size}; "
                f"{self.ranks_on_this_node} ranks on this node; waiting: {waiting}; "
                f"CUDA-aware MPI: {'yes' if cuda_aware_mpi() else 'no'}")

    def __repr__(self) -> str:
        return (f"ParallelLayout(rank={self.rank}, world={self.world_size}, tp={self.tp_size}, "
                f"ep={self.ep_size}, dp={self.dp_size})")


# ----------------------------------------------------------------------------------------------------
# The same checks as plain arithmetic, usable before any layout (and any collective) exists:
#     experts_per_rank(cfg.num_experts, MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_size())
# ----------------------------------------------------------------------------------------------------
def split_world(world_size: int, tp: int, ep: int | None, dp: int,
                names: tuple[str, str, str] = ("tensor_parallel", "expert_parallel", "expert_replicas"),
                hint: str = "") -> tuple[int, int, int]:
    """(tp, ep, dp) with world size = tp × ep × dp; ``ep=None`` takes the ranks tp and dp leave.

    ``names`` spell the three degrees in the error message (the config says tp / ep / dp), ``hint``
    is appended to it (what to change).
    """
    tp_name, ep_name, dp_name = names
    if ep is None:
        if world_size % (tp * dp):
            raise ValueError(f"world size {world_size} is not divisible by {tp_name} × {dp_name} = {tp} × {dp}"
                             + hint)
        ep = world_size // (tp * dp)
    if tp * ep * dp != world_size:
        raise ValueError(f"{tp_name} × {ep_name} × {dp_name} = {tp} × {ep} × {dp} = {tp * ep * dp}, "
                         f"but the world size is {world_size}" + hint)
    return tp, ep, dp


def experts_per_rank(num_experts: int, ep_size: int, world_size: int) -> int:
    """``E / ep``, or a ValueError that says what to change."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size} "
                         f"(world size {world_size}); every rank must hold the same number of experts: "
                         f"choose num_experts as a multiple of {ep_size}")
    return num_experts // ep_size


def sequences_per_rank(batch_size: int, data_size: int, world_size: int) -> int:
    """``batch_size / (ep · dp)``, or a ValueError that says what to change."""
    if batch_size % data_size:
        raise ValueError(f"batch_size={batch_size} (the global batch) is not divisible by the data-parallel "
                         f"size {data_size} (world size {world_size}); choose a multiple of {data_size}")
    return batch_size // data_size
