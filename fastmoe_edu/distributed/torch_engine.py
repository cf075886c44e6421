"""The torch engine (``torch.distributed``): a :class:`Communicator` over a process group. Chosen under ``torchrun``.

    torchrun --nproc-per-node=4 -m fastmoe_edu.train

``torch.distributed`` is PyTorch's own communication library. ``torchrun`` starts the processes and
tells each one who it is through environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); :func:`torch_world` reads them (``init_process_group``'s default
``env://``). A *process group* plays the part of an MPI communicator; the data travels through a
*backend*:

* **gloo** — CPU tensors, over TCP sockets. Works everywhere; the one used on a laptop.
* **NCCL** — CUDA tensors, GPU to GPU (NVLink, InfiniBand) without touching host memory. With
  ``device_type="cuda"`` the world is created as ``"cpu:gloo,cuda:nccl"``: every operation goes to
  the backend of its tensors' device, so the small CPU tensors (counts, statistics) still work.

gloo's collectives have no int16 type ("Invalid scalar type"): int16 tensors travel as float16,
whose bits they only copy. gloo's all-gather wants equal pieces: :meth:`TorchCommunicator._allgatherv`
pads every rank's piece to the largest.

Why ``split`` is collective over the *world*: ``torch.distributed.new_group`` must be called by every
process of the job, for every group, in the same order — even by processes that will not be in the
group. MPI's ``Split`` only involves the ranks of the communicator being split. So here every rank
calls ``split`` at the same point of the program, each on its own communicator (layouts and layers
are built identically on all ranks); the ranks tell each other what they asked for with one
all-gather over the world, and all of them create every requested group, in one sorted order.
"""
from __future__ import annotations

import atexit
import os
import socket
import sys
import zlib
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from .communicator import CollectiveTimeout, Communicator, start_up_timeout
from .stats import CommunicationStats

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class TorchCommunicator(Communicator):
    """A :class:`Communicator` over a ``torch.distributed`` process group (this process is a member)."""

    engine = "torch"

    def __init__(self, group: dist.ProcessGroup, name: str, ranks_on_node: int, timeout: timedelta,
                 stats: CommunicationStats | None = None):
        super().__init__(name, dist.get_rank(group), dist.get_world_size(group),
                         dist.get_process_group_ranks(group), timeout.total_seconds(), stats)
        self.group = group
        self.backend = str(dist.get_backend(group))                      # "gloo" or "cpu:gloo,cuda:nccl"
        self._ranks_on_node = ranks_on_node

    def ranks_on_this_node(self) -> int:
        return self._ranks_on_node

    def _start_alltoallv(self, send, received, send_counts, recv_counts):
        return dist.all_to_all_single(_movable(received).view(-1), _movable(send).view(-1),
                                      output_split_sizes=recv_counts, input_split_sizes=send_counts,
                                      group=self.group, async_op=True)

    def _start_sendrecv(self, send, destination, received, source):
        # An empty block is neither sent nor received: the receiver expects as many elements as the
        # sender sends, so both sides skip the message together.
        requests = []
        if received.numel():
            requests.append(dist.irecv(_movable(received), group=self.group, group_src=source))
        if send.numel():
            requests.append(dist.isend(_movable(send), group=self.group, group_dst=destination))
        return requests

    def _start_allreduce(self, tensor, op):
        return dist.all_reduce(tensor, op=_OPS[op], group=self.group, async_op=True)

    def _start_broadcast(self, tensor, root):
        return dist.broadcast(_movable(tensor), group=self.group, group_src=root, async_op=True)

    def _allgatherv(self, send, gathered, counts):
        width = max(counts)                              # gloo gathers equal pieces: pad to the largest
        padded = send.new_zeros(width)
        padded[:send.numel()] = send.reshape(-1)
        pieces = send.new_empty(self.size * width)
        self._complete(dist.all_gather_single(_movable(pieces), _movable(padded), group=self.group, async_op=True),
                       "all-gather")
        valid = [piece[:count] for piece, count in zip(pieces.view(self.size, width), counts)]
        gathered.view(-1).copy_(torch.cat(valid))

    def _start_barrier(self):
        return dist.barrier(group=self.group, async_op=True)

    def _wait(self, request, timeout_s) -> bool:
        """``Work.wait``; gloo / NCCL raise past the group's timeout (set from ``collective_timeout_s``)."""
        try:
            if timeout_s is None:
                request.wait()
            else:
                request.wait(timedelta(seconds=timeout_s))
        except RuntimeError as failure:
            if "timed out" in str(failure).lower() or "timeout" in str(failure).lower():
                return False
            raise
        return True

    def _test(self, request) -> bool:
        return request.is_completed()

    def _split(self, color, key, name):
        """Collective over the world (see the module docstring); returns this rank's new communicator."""
        me = _SplitRequest(min(self.members), self.size, color, key, self.rank, dist.get_rank(), _host_id())
        everyone = [_SplitRequest(*row) for row in _allgather_world(list(me)).tolist()]
        for lowest, size in {(other.parent, other.parent_size) for other in everyone}:
            callers = sum(other.parent == lowest for other in everyone)
            if callers != size:
                raise RuntimeError(f"split: {callers} ranks split the communicator of size {size} starting at "
                                   f"global rank {lowest}: every world rank must call split at the same point")
        groups: dict[tuple[int, int], list[_SplitRequest]] = {}      # (parent, color) -> the members
        for other in everyone:
            groups.setdefault((other.parent, other.color), []).append(other)
        mine = None
        for parent_and_color in sorted(groups):                       # the same order on every rank
            members = sorted(groups[parent_and_color], key=lambda other: (other.key, other.old_rank))
            group = dist.new_group(ranks=[other.global_rank for other in members], timeout=timedelta(seconds=self.timeout_s),
                                   sort_ranks=False)                  # keep our order, not torch's sorted one
            if parent_and_color == (me.parent, me.color):
                on_node = sum(other.host == me.host for other in members)
                mine = TorchCommunicator(group, name, on_node, timedelta(seconds=self.timeout_s), self.stats)
        return mine

    def transfer_path(self, device) -> str:
        if torch.device(device).type != "cuda":
            return "gloo over TCP (CPU tensors, sent from their own memory)"
        if "nccl" in self.backend:
            return "NCCL (GPU buffers read and written directly, GPU to GPU)"
        return "host buffers (gloo: GPU rows are copied to the CPU and back)"

    def _reads_device_memory(self, device) -> bool:
        return device.type == "cuda" and "nccl" in self.backend


def torch_world(device_type: str = "cpu", timeout_s: float = 300) -> TorchCommunicator:
    """The whole job as a Communicator named "world"; starts ``torch.distributed`` (env://) if needed.

    ``device_type="cuda"``: CUDA tensors go through NCCL, CPU tensors through gloo; else gloo only.
    """
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if "TORCHELASTIC_RUN_ID" not in os.environ:          # env:// by hand, or left over: say whom it waits for
            found = " ".join(f"{key}={os.environ.get(key)}" for key in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))
            print(f"torch.distributed: not started by torchrun; joining the job the environment names ({found}), "
                  f"waiting at most {timeout_s:g} s (collective_timeout_s) for its other ranks. To train in one "
                  f"process unset WORLD_SIZE RANK MASTER_ADDR MASTER_PORT", file=sys.stderr, flush=True)
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, timeout=timeout)
        except dist.DistStoreError as error:          # its own wait for the ranks, bounded by the same timeout
            if "time" not in str(error).lower():
                raise
            raise CollectiveTimeout(start_up_timeout(timeout_s, "opening the torch engine's world")) from error
        atexit.register(_shut_down)              # tear gloo's threads down before the interpreter does
    on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0))             # set by torchrun
    if not on_node:                                                  # started another way: compare hosts
        on_node = int((_allgather_world([_host_id()]) == _host_id()).sum())
    return TorchCommunicator(dist.group.WORLD, "world", on_node, timeout)


def _shut_down() -> None:
    """At a normal exit: wait until every rank is here, then tear the process group down. Tearing it down
    while a peer is still using its connections can abort gloo ("terminate called without an active
    exception", seen once in CI); a rank that failed never gets here (failure.py ends it with os._exit),
    and the barrier's own bound keeps a lost peer from holding the exit for long."""
    if dist.is_initialized():
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                dist.barrier()
        except RuntimeError:                     # a peer is gone: nothing left to wait for
            pass
        dist.destroy_process_group()


class _SplitRequest(NamedTuple):
    """What one rank asks of ``split``, gathered from every rank of the world as a row of integers."""
    parent: int          # the communicator it splits, named by its lowest global rank
    parent_size: int
    color: int
    key: int
    old_rank: int        # its rank in the communicator it splits (breaks ties between equal keys)
    global_rank: int
    host: int            # _host_id()


def _allgather_world(row: list[int]) -> torch.Tensor:
    """Every world rank's ``row`` of small integers, as an int64 tensor ``[world size, len(row)]``."""
    mine = torch.tensor(row, dtype=torch.int64)
    everyone = mine.new_empty(dist.get_world_size() * mine.numel())   # gloo wants it flat
    dist.all_gather_single(everyone, mine)
    return everyone.view(-1, mine.numel())


def _host_id() -> int:
    """This machine's name as a number (crc32: unlike ``hash()``, the same in every process)."""
    return zlib.crc32(socket.gethostname().encode())


def _movable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as gloo can move it: int16 as float16 bit patterns (gloo's collectives lack int16)."""
    return tensor.view(torch.float16) if tensor.dtype == torch.int16 else tensor
