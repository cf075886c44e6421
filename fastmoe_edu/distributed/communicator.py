"""Communicator: the only door between this library and a communication engine (MPI or torch.distributed).

Everything the parallel code sends goes through one of these methods, on torch tensors:

    alltoall(counts)                      every rank sends m integers to every rank (exchange plans)
    alltoallv(rows, send_rows, recv_rows) a variable number of rows to every rank (the token exchange)
    ialltoallv(...) -> PendingExchange    the same, non-blocking: ``.wait()`` returns the rows (pipelining)
    allreduce_(tensor, op="sum"|"max")    in place, on every rank (gradients, statistics, votes)
    iallreduce_(tensor) -> PendingAllreduce  the sum, non-blocking: ``.wait()`` completes it in place
                                          (gradient pieces posted during the backward, gradient_partitioning.py)
    broadcast_(tensor, root)              in place (initial weights)
    allgatherv(rows, shares)              every rank's rows, concatenated in rank order (tensor parallelism)
    barrier(), split(color, key, name)    a sub-communicator of the ranks with the same color, ordered by key

An *engine* subclass supplies the few primitives at the bottom of this class (post a collective,
wait for it, split); this base class does what is common: argument checks, counting elements
instead of rows, host staging of GPU tensors for engines that cannot read GPU memory, and the
counters (``CommunicationStats``: calls, seconds, bytes per ``"<communicator>/<operation>"``).

    engine          file                 when
    MPI (mpi4py)    mpi_engine.py        launched by ``mpirun``; CPU tensors zero-copy, GPU via host buffers
                                         unless the MPI library is CUDA-aware
    torch           torch_engine.py      launched by ``torchrun``; gloo for CPU tensors, NCCL for CUDA ones

The row exchange comes in two versions with identical results (the tests check it):

* ``method="pairwise"`` — the readable one: P−1 rounds; in round s every rank sends to ``rank + s``
  and receives from ``rank − s`` (mod P). Every pair of ranks meets exactly once, and no round can
  deadlock, because each send has its matching receive in the same round (FasterMoE's schedule).
* ``method="alltoallv"`` — the fast one: a single collective; the engine schedules the messages.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from abc import ABC, abstractmethod

import torch

from .recompute import active_stash
from .stats import CommunicationStats

EXCHANGE_METHODS = ("pairwise", "alltoallv")
REDUCE_OPS = ("sum", "max")


def replayable(collective):
    """Inside a checkpointed block (recompute.py): record the collective's result during the forward
    pass, and return the recorded result during the block's recomputation instead of communicating.
    A method whose name ends in ``_`` works in place: its first argument receives the result."""
    in_place = collective.__name__.endswith("_")

    @functools.wraps(collective)
    def run(self, tensor, *args, **kwargs):
        stash = active_stash()
        if stash is None or stash.depth:                     # not in a checkpointed block, or nested
            return collective(self, tensor, *args, **kwargs)
        what = f"{self.name}/{collective.__name__}"
        if stash.replaying:
            result = stash.replay(what)
            return tensor.copy_(result) if in_place else result
        stash.depth += 1
        try:
            result = collective(self, tensor, *args, **kwargs)
        finally:
            stash.depth -= 1
        stash.record(what, result.clone() if in_place else result)
        return result
    return run


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within ``timeout_s``: a rank of the communicator stalled or died."""


def start_up_timeout(timeout_s: float, what: str) -> str:
    """The line of a start-up past its deadline (the deadline's helper's, or an engine's own timeout's)."""
    return (f"start-up did not complete within {timeout_s:g} s (collective_timeout_s): {what} still waits for a "
            f"rank that never joined (it stalled or died before start-up; see its output). Ending the job; if "
            f"start-up is merely slow, raise collective_timeout_s")


class Communicator(ABC):
    """A group of ranks spoken to with torch tensors. ``name`` labels the counters ("expert", "data", ...)."""

    #: the engine's name, printed at start-up ("mpi", "torch")
    engine: str = ""

    def __init__(self, name: str, rank: int, size: int, members: list[int], timeout_s: float | None,
                 stats: CommunicationStats | None = None):
        self.name, self.rank, self.size = name, rank, size
        self.members = members                   # the world rank of each rank of this communicator
        self.timeout_s = timeout_s               # the longest one collective may take; None = unbounded
        self.stats = stats if stats is not None else CommunicationStats()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, rank={self.rank}, size={self.size})"

    # ------------------------------------------------------------------------------------------
    # Counts: every rank sends `m` integers to every rank.
    # ------------------------------------------------------------------------------------------
    @replayable
    def alltoall(self, send: torch.Tensor) -> torch.Tensor:
        """``send[P·m]`` -> ``received[P·m]``: block p of ``send`` goes to rank p; block s of the result came from rank s."""
        if send.numel() % self.size:
            raise ValueError(f"alltoall needs a multiple of {self.size} elements, got {send.numel()}")
        per_peer = send.numel() // self.size
        received = self.alltoallv(send.reshape(-1), [per_peer] * self.size, [per_peer] * self.size,
                                  purpose="alltoall")
        return received.reshape(send.shape)

    # ------------------------------------------------------------------------------------------
    # Rows: a variable number of rows to every rank (the token exchange of expert parallelism).
    # ------------------------------------------------------------------------------------------
    @replayable
    def alltoallv(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                  method: str = "alltoallv", purpose: str | None = None) -> torch.Tensor:
        """Send ``send_rows[p]`` consecutive rows of ``rows`` to rank p (in rank order); receive ``recv_rows[s]`` from rank s.

        ``rows`` is ``[Σ send_rows, ...]``; the result is ``[Σ recv_rows, ...]`` with the rows from
        rank 0 first, then rank 1, ... Not differentiable by itself (exchange.py makes it so).
        """
        if method not in EXCHANGE_METHODS:
            raise ValueError(f"method={method!r} is not a known exchange; allowed: {', '.join(EXCHANGE_METHODS)}")
        self._check_counts(rows, send_rows, recv_rows)
        if method == "alltoallv":
            with self.stats.measure(f"{self.name}/{purpose or 'alltoallv'}", self._bytes_to_others(rows, send_rows)):
                return PendingExchange(self, rows, send_rows, recv_rows, timed_wait=False).wait()
        send = self._stage(rows)
        received = send.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
        send_start, recv_start = _exclusive_prefix_sum(send_rows), _exclusive_prefix_sum(recv_rows)

        def outgoing(peer):   # the rows this rank sends to `peer`: one contiguous block
            return send[send_start[peer]: send_start[peer] + send_rows[peer]]

        def incoming(peer):   # where the rows from `peer` land: one contiguous block
            return received[recv_start[peer]: recv_start[peer] + recv_rows[peer]]

        with self.stats.measure(f"{self.name}/{purpose or 'pairwise'}", self._bytes_to_others(rows, send_rows)):
            incoming(self.rank).copy_(outgoing(self.rank))                  # rows that stay here: a copy
            for shift in range(1, self.size):
                destination, source = (self.rank + shift) % self.size, (self.rank - shift) % self.size
                for request in self._start_sendrecv(outgoing(destination), destination, incoming(source), source):
                    self._complete(request, f"pairwise exchange with ranks {destination} and {source}")
        return received.to(rows.device)

    @replayable
    def ialltoallv(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                   purpose: str = "ialltoallv") -> "PendingExchange":
        """Post the exchange of :meth:`alltoallv` and return at once; ``.wait()`` gives the received rows.

        The buffers stay referenced by the returned object until ``wait()``, as the engine requires.
        Every rank must post its non-blocking collectives on one communicator in the same order.
        """
        self._check_counts(rows, send_rows, recv_rows)
        with self.stats.measure(f"{self.name}/{purpose}", self._bytes_to_others(rows, send_rows)):
            return PendingExchange(self, rows, send_rows, recv_rows, timed_wait=True)

    # ------------------------------------------------------------------------------------------
    # Reductions, broadcasts, gathers
    # ------------------------------------------------------------------------------------------
    @replayable
    def allreduce_(self, tensor: torch.Tensor, average: bool = False, purpose: str = "allreduce",
                   op: str = "sum") -> torch.Tensor:
        """In place: ``tensor ← Σ_ranks tensor`` (or the max; divided by the size if ``average``). Returns it.

        ``purpose`` names the counter (``"<communicator>/<purpose>"``), so gradient all-reduces and the
        small statistics all-reduces can be told apart.
        """
        if op not in REDUCE_OPS:
            raise ValueError(f"op={op!r} is not a known reduction; allowed: {', '.join(REDUCE_OPS)}")
        _check_full_precision(tensor)
        if self.size > 1:
            staged = self._stage(tensor)
            with self.stats.measure(f"{self.name}/{purpose}", staged.numel() * staged.element_size()):
                self._complete(self._start_allreduce(staged, op), f"{purpose} ({op})")
            _unstage(staged, tensor)
        if average:
            tensor /= self.size
        return tensor

    def iallreduce_(self, tensor: torch.Tensor, purpose: str = "iallreduce") -> "PendingAllreduce":
        """Post the in-place sum of :meth:`allreduce_` and return at once; ``.wait()`` completes it and returns ``tensor``.

        Counted as ``"<communicator>/<purpose>"`` (the posting) and ``"<communicator>/wait"`` (the time
        spent waiting: the part of the all-reduce that the caller's work did not hide). Every rank must
        post its collectives on one communicator in the same order, blocking ones included; the caller
        must not touch ``tensor`` until ``wait()``.

        Not replayable (no ``@replayable``): a wait handle has no result to record. Activation
        checkpointing replays only the collectives of a block's forward pass; the gradient pieces are
        posted from backward hooks, which run outside any recomputation (recompute.py).
        """
        _check_full_precision(tensor)
        return PendingAllreduce(self, tensor, purpose)

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """In place: every rank's ``tensor`` becomes rank ``root``'s. Returns ``tensor``."""
        if self.size > 1:
            staged = self._stage(tensor)
            sent = staged.numel() * staged.element_size() * (self.size - 1) if self.rank == root else 0
            with self.stats.measure(f"{self.name}/bcast", sent):
                self._complete(self._start_broadcast(staged, root), f"broadcast from rank {root}")
            _unstage(staged, tensor)
        return tensor

    @replayable
    def allgatherv(self, rows: torch.Tensor, shares: list[int], purpose: str = "allgather") -> torch.Tensor:
        """Every rank's ``rows`` (``shares[r]`` rows from rank r), concatenated in rank order, on every rank."""
        if len(shares) != self.size or rows.shape[0] != shares[self.rank]:
            raise ValueError(f"allgatherv: {rows.shape[0]} rows here, shares {shares} for {self.size} ranks")
        send = self._stage(rows)
        gathered = send.new_empty((sum(shares),) + tuple(rows.shape[1:]))
        width = math.prod(rows.shape[1:])                                        # elements per row
        with self.stats.measure(f"{self.name}/{purpose}", send.numel() * send.element_size() * (self.size - 1)):
            self._allgatherv(send, gathered, [share * width for share in shares])
        return gathered.to(rows.device)

    @replayable
    def allgather(self, tensor: torch.Tensor, purpose: str = "allgather") -> torch.Tensor:
        """Every rank's equally sized ``tensor``, flattened and concatenated in rank order."""
        flat = tensor.reshape(-1)
        return self.allgatherv(flat, [flat.numel()] * self.size, purpose)

    def barrier(self) -> None:
        with self.stats.measure(f"{self.name}/barrier", 0):
            self._complete(self._start_barrier(), "barrier")

    def split(self, color: int, key: int, name: str) -> "Communicator":
        """The ranks of this communicator that pass the same ``color``, numbered by ``key``; shares the counters.

        Collective: every rank of this communicator calls it (with the torch engine, every rank of the
        world calls ``split`` at the same point of the program, each on its own communicator).
        """
        return self._split(color, key, name)

    # ------------------------------------------------------------------------------------------
    # What an engine provides
    # ------------------------------------------------------------------------------------------
    @abstractmethod
    def ranks_on_this_node(self) -> int:
        """How many ranks of this communicator share this machine (no communication needed by the caller)."""

    @abstractmethod
    def transfer_path(self, device: torch.device | str) -> str:
        """How tensors on ``device`` reach the engine, in words (printed at start-up)."""

    @abstractmethod
    def _start_alltoallv(self, send: torch.Tensor, received: torch.Tensor,
                         send_counts: list[int], recv_counts: list[int]):
        """Post an all-to-all-v of flat elements (counts in elements, blocks in rank order); returns a request."""

    @abstractmethod
    def _start_sendrecv(self, send: torch.Tensor, destination: int, received: torch.Tensor, source: int) -> list:
        """Post one matched send and receive (a round of the pairwise exchange); returns the requests."""

    @abstractmethod
    def _start_allreduce(self, tensor: torch.Tensor, op: str):
        """Post an in-place all-reduce of a contiguous tensor; returns a request."""

    @abstractmethod
    def _start_broadcast(self, tensor: torch.Tensor, root: int):
        """Post an in-place broadcast of a contiguous tensor from ``root``; returns a request."""

    @abstractmethod
    def _allgatherv(self, send: torch.Tensor, gathered: torch.Tensor, counts: list[int]) -> None:
        """Blocking all-gather of ``counts[r]`` elements from rank r into ``gathered`` (rank order)."""

    @abstractmethod
    def _start_barrier(self):
        """Post a barrier; returns a request."""

    @abstractmethod
    def _wait(self, request, timeout_s: float | None) -> bool:
        """Block until a request of this engine has completed (True), or ``timeout_s`` has passed (False)."""

    @abstractmethod
    def _test(self, request) -> bool:
        """Whether a request has completed, without blocking (with MPI this also moves pending messages on)."""

    def _complete(self, request, what: str) -> None:
        """Wait for ``request`` at most ``timeout_s``; past it, say which collective and which ranks, and raise.

        The engines cannot tell which member failed to arrive, so the message names them all. The
        exception ends the job (``failure.abort_on_exception``): one stalled rank never hangs the rest.
        """
        if not self._wait(request, self.timeout_s):
            raise CollectiveTimeout(f"{what} on communicator {self.name!r} did not complete within "
                                    f"{self.timeout_s:g} s (collective_timeout_s): one of its ranks (world ranks "
                                    f"{self.members}) stalled or died; ending the job")

    @abstractmethod
    def _split(self, color: int, key: int, name: str) -> "Communicator":
        """See :meth:`split`."""

    @abstractmethod
    def _reads_device_memory(self, device: torch.device) -> bool:
        """Whether the engine can send tensors on ``device`` directly (else they go through host copies)."""

    # ------------------------------------------------------------------------------------------
    # Helpers
    # ------------------------------------------------------------------------------------------
    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """The contiguous tensor the engine will touch: the tensor itself, or a host copy of a GPU tensor."""
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            if not self._reads_device_memory(tensor.device):
                return tensor.cpu()                                           # host buffer (synchronous copy)
            torch.cuda.current_stream(tensor.device).synchronize()            # the GPU must be done writing it
        return tensor.contiguous()

    def _check_counts(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> None:
        if len(send_rows) != self.size or len(recv_rows) != self.size:
            raise ValueError(f"need one send and one receive count per rank ({self.size}), "
                             f"got {len(send_rows)} and {len(recv_rows)}")
        if rows.shape[0] != sum(send_rows):
            raise ValueError(f"{rows.shape[0]} rows given but the send counts add up to {sum(send_rows)}")

    def _bytes_to_others(self, rows: torch.Tensor, send_rows: list[int]) -> int:
        width = math.prod(rows.shape[1:])
        return (sum(send_rows) - send_rows[self.rank]) * width * rows.element_size()


class PendingExchange:
    """A posted all-to-all-v: the request and the buffers the engine reads and writes until ``wait()``."""

    def __init__(self, comm: Communicator, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                 timed_wait: bool):
        self.comm, self.device, self.timed_wait = comm, rows.device, timed_wait
        self.result: torch.Tensor | None = None
        self.send = comm._stage(rows)                                            # kept alive until wait()
        self.received = self.send.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
        width = math.prod(rows.shape[1:])                                        # elements per row
        self.request = comm._start_alltoallv(self.send, self.received, [n * width for n in send_rows],
                                             [n * width for n in recv_rows])

    def advance(self) -> None:
        """Nothing to do: a flat exchange is one collective, already posted (a two-phase one starts its
        second phase here: hierarchical.py)."""

    def wait(self) -> torch.Tensor:
        """Block until the rows have arrived (timed as ``"<communicator>/wait"`` for a non-blocking post).
        Waiting again returns the same rows (a recomputed block replays its exchanges, recompute.py)."""
        if self.result is not None:
            return self.result
        timing = self.comm.stats.measure(f"{self.comm.name}/wait", 0) if self.timed_wait else contextlib.nullcontext()
        with timing:
            self.comm._complete(self.request, "all-to-all-v")
        self.result = self.received.to(self.device)
        self.send = self.received = self.request = None                          # the engine is done with them
        return self.result


class PendingAllreduce:
    """A posted all-reduce (sum, in place): the request and the buffer the engine works on until ``wait()``."""

    def __init__(self, comm: Communicator, tensor: torch.Tensor, purpose: str):
        self.comm, self.tensor, self.request = comm, tensor, None
        self.staged = comm._stage(tensor) if comm.size > 1 else tensor       # kept alive until wait()
        with comm.stats.measure(f"{comm.name}/{purpose}", self.staged.numel() * self.staged.element_size()):
            if comm.size > 1:
                self.request = comm._start_allreduce(self.staged, "sum")

    def test(self) -> bool:
        """Whether the sum has arrived (never blocks; MPI moves the messages along inside this call)."""
        return self.request is None or self.comm._test(self.request)

    def wait(self) -> torch.Tensor:
        """Block until the sum is in ``tensor`` (timed as ``"<communicator>/wait"``); returns ``tensor``."""
        if self.request is not None:
            with self.comm.stats.measure(f"{self.comm.name}/wait", 0):
                self.comm._complete(self.request, "all-reduce (non-blocking, sum)")
            _unstage(self.staged, self.tensor)
            self.request = None
        self.staged = None
        return self.tensor


def _exclusive_prefix_sum(values: list[int]) -> list[int]:
    """[3, 0, 2] -> [0, 3, 3]: where each block starts."""
    return list(itertools.accumulate(values, initial=0))[:-1]


def _check_full_precision(tensor: torch.Tensor) -> None:
    if tensor.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"all-reduce {tensor.dtype} tensors in float32 (cast first): the sum must not round")


def _unstage(staged: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a collective's result back into ``tensor`` if the engine worked on a host or contiguous copy."""
    if staged.data_ptr() != tensor.data_ptr():
        tensor.copy_(staged)
