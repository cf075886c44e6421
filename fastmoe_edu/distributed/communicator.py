"""One MPI communicator, spoken to with torch tensors: the collectives this project needs, nothing more.

mpi4py has two ways to send data: lower-case methods (``comm.alltoall(obj)``) pickle arbitrary Python
objects; upper-case methods (``comm.Alltoallv([array, (counts, displacements), MPI.DOUBLE], ...)``)
hand a raw memory buffer to the MPI library. The hot path here only uses the buffer form: a CPU
torch tensor is viewed as a numpy array *without copying* (``tensor.numpy()`` shares memory), and
counts and displacements are given in *elements*, never bytes.

Where the bytes live:

* CPU tensors: MPI reads and writes the tensor's own memory.
* CUDA tensors with a **CUDA-aware** MPI (detected once, see :func:`cuda_aware_mpi`): the tensor is
  handed to MPI directly (mpi4py reads its ``__cuda_array_interface__``) after waiting for the
  current CUDA stream, so the GPU has finished writing it.
* CUDA tensors otherwise (the PyPI ``mpich`` wheel is not CUDA-aware): each message goes through a
  host copy — ``tensor.cpu()`` before sending, ``.to(device)`` after receiving.

Every call is timed and its bytes counted in a shared :class:`CommunicationStats`.

Waiting: MPI's blocking calls *busy-poll* while they wait for the other ranks. With more ranks than
cores (``mpirun -n 8`` on 2 cores) the waiting ranks then steal the cores from the ranks that still
compute, and everything slows down. With ``sleep_while_waiting`` set, every call is started as its
non-blocking variant (``Ialltoallv``, ``Iallreduce``, ...) and completed by checking ``Test()``
with short sleeps in between, which hands the core back to the operating system. ParallelLayout
switches this on by itself when the machine is oversubscribed.

The row exchange comes in two versions that give identical results (the tests check it):

* ``method="pairwise"`` — the readable one: P−1 rounds; in round s every rank sends to
  ``rank + s`` and receives from ``rank − s`` (mod P) with one ``Sendrecv``. Every pair of ranks
  meets exactly once and no round can deadlock, because each send has its matching receive in
  the same round.
* ``method="alltoallv"`` — the fast one: a single ``Alltoallv`` call; the MPI library schedules the
  messages itself (and can overlap them).
"""
from __future__ import annotations

import ctypes
import functools
import time

import torch
from mpi4py import MPI

from .stats import CommunicationStats

EXCHANGE_METHODS = ("pairwise", "alltoallv")

# torch dtype -> the MPI datatype of one element. 16-bit floats travel as their int16 bit patterns
# (numpy has no bfloat16, and MPI only has to move the bits, not understand them); they are never
# summed by MPI: gradient all-reduces of 16-bit tensors are done in float32 by the caller.
_MPI_TYPES = {
    torch.float64: MPI.DOUBLE,
    torch.float32: MPI.FLOAT,
    torch.int64: MPI.INT64_T,
    torch.int32: MPI.INT32_T,
    torch.int16: MPI.INT16_T,
    torch.uint8: MPI.UINT8_T,
    torch.bool: MPI.C_BOOL,
}
_SENT_AS_INT16 = (torch.float16, torch.bfloat16)
_TAG_ROWS = 17


@functools.cache
def cuda_aware_mpi() -> bool:
    """Whether the MPI library in use accepts GPU memory directly.

    Open MPI and MPICH ≥ 4 export ``MPIX_Query_cuda_support()``; mpi4py does not wrap it, so it is
    looked up with ctypes in the libraries mpi4py's extension module was loaded with. No such
    symbol (or no GPU build) means no: rows then go through host buffers.
    """
    query = getattr(MPI, "Query_cuda_support", None)           # in case a future mpi4py wraps it
    if query is not None:
        return bool(query())
    try:
        function = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    function.restype = ctypes.c_int
    return bool(function())


def transfer_path(device: torch.device | str) -> str:
    """How tensors on ``device`` reach MPI, in words (printed at start-up)."""
    if torch.device(device).type != "cuda":
        return "host memory (CPU tensors, zero-copy numpy views)"
    if cuda_aware_mpi():
        return "CUDA-aware MPI (GPU buffers handed to MPI directly)"
    return "host buffers (MPI is not CUDA-aware: GPU rows are copied to the CPU and back)"


class Communicator:
    """An ``MPI.Comm`` plus tensor conversion and counters. ``name`` labels the counters ("expert", "data", ...)."""

    def __init__(self, comm: MPI.Comm, name: str, stats: CommunicationStats | None = None,
                 sleep_while_waiting: float | None = None):
        self.comm, self.name = comm, name
        self.stats = stats if stats is not None else CommunicationStats()
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        # Seconds to sleep between completion checks while waiting; None = MPI's blocking wait.
        self.sleep_while_waiting = sleep_while_waiting

    def __repr__(self) -> str:
        return f"Communicator({self.name!r}, rank={self.rank}, size={self.size})"

    # ------------------------------------------------------------------------------------------
    # Counts: every rank sends `m` integers to every rank.
    # ------------------------------------------------------------------------------------------
    def alltoall(self, send: torch.Tensor) -> torch.Tensor:
        """``send[P·m]`` -> ``received[P·m]``: block p of ``send`` goes to rank p; block s of the result came from rank s."""
        if send.numel() % self.size:
            raise ValueError(f"alltoall needs a multiple of {self.size} elements, got {send.numel()}")
        send_host = self._stage(send)
        received = torch.empty_like(send_host)
        per_peer = send.numel() // self.size
        with self.stats.measure(f"{self.name}/alltoall", per_peer * (self.size - 1) * send.element_size()):
            self._wait(self.comm.Ialltoall(self._buffer(send_host), self._buffer(received)))
        return received.to(send.device)

    # ------------------------------------------------------------------------------------------
    # Rows: a variable number of rows to every rank (the token exchange of expert parallelism).
    # ------------------------------------------------------------------------------------------
    def alltoallv(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int],
                  method: str = "alltoallv") -> torch.Tensor:
        """Send ``send_rows[p]`` consecutive rows of ``rows`` to rank p (in rank order); receive ``recv_rows[s]`` from rank s.

        ``rows`` is ``[Σ send_rows, width]``; the result is ``[Σ recv_rows, width]`` with the rows from
        rank 0 first, then rank 1, ... Not differentiable by itself (see exchange.py for that).
        """
        if method not in EXCHANGE_METHODS:
            raise ValueError(f"method={method!r} is not a known exchange; allowed: {', '.join(EXCHANGE_METHODS)}")
        if len(send_rows) != self.size or len(recv_rows) != self.size:
            raise ValueError(f"need one send and one receive count per rank ({self.size}), "
                             f"got {len(send_rows)} and {len(recv_rows)}")
        if rows.shape[0] != sum(send_rows):
            raise ValueError(f"{rows.shape[0]} rows given but the send counts add up to {sum(send_rows)}")
        width = rows.shape[1] if rows.dim() > 1 else 1
        send_host = self._stage(rows)
        received = send_host.new_empty((sum(recv_rows),) + tuple(rows.shape[1:]))
        bytes_to_others = (sum(send_rows) - send_rows[self.rank]) * width * rows.element_size()
        with self.stats.measure(f"{self.name}/{method}", bytes_to_others):
            if method == "alltoallv":
                self._exchange_alltoallv(send_host, received, send_rows, recv_rows, width)
            else:
                self._exchange_pairwise(send_host, received, send_rows, recv_rows)
        return received.to(rows.device)

    def _exchange_alltoallv(self, send, received, send_rows, recv_rows, width):
        """One collective. Counts and displacements are in elements: rows × width."""
        send_counts = [count * width for count in send_rows]
        recv_counts = [count * width for count in recv_rows]
        self._wait(self.comm.Ialltoallv(self._buffer(send, send_counts, _exclusive_prefix_sum(send_counts)),
                                        self._buffer(received, recv_counts, _exclusive_prefix_sum(recv_counts))))

    def _exchange_pairwise(self, send, received, send_rows, recv_rows):
        """The same exchange written out: P−1 rounds of one Sendrecv (a matched receive and send) each."""
        send_start, recv_start = _exclusive_prefix_sum(send_rows), _exclusive_prefix_sum(recv_rows)

        def outgoing(peer):   # the rows this rank sends to `peer`: one contiguous block
            return send[send_start[peer]: send_start[peer] + send_rows[peer]]

        def incoming(peer):   # where the rows from `peer` land: one contiguous block
            return received[recv_start[peer]: recv_start[peer] + recv_rows[peer]]

        incoming(self.rank).copy_(outgoing(self.rank))                  # rows that stay here: a copy
        for shift in range(1, self.size):
            destination = (self.rank + shift) % self.size
            source = (self.rank - shift) % self.size
            receiving = self.comm.Irecv(self._buffer(incoming(source)), source=source, tag=_TAG_ROWS)
            sending = self.comm.Isend(self._buffer(outgoing(destination)), dest=destination, tag=_TAG_ROWS)
            self._wait(receiving)
            self._wait(sending)

    # ------------------------------------------------------------------------------------------
    # Reductions and broadcasts (data parallelism, statistics)
    # ------------------------------------------------------------------------------------------
    def allreduce_(self, tensor: torch.Tensor, average: bool = False, purpose: str = "allreduce") -> torch.Tensor:
        """In place: ``tensor ← Σ_ranks tensor`` (divided by the size if ``average``). Returns ``tensor``.

        ``purpose`` names the counter (``"<communicator>/<purpose>"``), so gradient all-reduces and the
        small statistics all-reduces can be told apart in the stats.
        """
        if tensor.dtype in _SENT_AS_INT16:
            raise TypeError(f"all-reduce {tensor.dtype} tensors in float32 (cast first): MPI cannot add them")
        if self.size > 1:
            staged = self._stage(tensor)
            with self.stats.measure(f"{self.name}/{purpose}", staged.numel() * staged.element_size()):
                self._wait(self.comm.Iallreduce(MPI.IN_PLACE, self._buffer(staged), op=MPI.SUM))
            if staged.data_ptr() != tensor.data_ptr():            # a host copy or a contiguous copy
                tensor.copy_(staged)
        if average:
            tensor /= self.size
        return tensor

    def broadcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """In place: every rank's ``tensor`` becomes rank ``root``'s. Returns ``tensor``."""
        if self.size > 1:
            staged = self._stage(tensor)
            sent = staged.numel() * staged.element_size() * (self.size - 1) if self.rank == root else 0
            with self.stats.measure(f"{self.name}/bcast", sent):
                self._wait(self.comm.Ibcast(self._buffer(staged), root=root))
            if staged.data_ptr() != tensor.data_ptr():            # a host copy or a contiguous copy
                tensor.copy_(staged)
        return tensor

    def barrier(self) -> None:
        with self.stats.measure(f"{self.name}/barrier", 0):
            self._wait(self.comm.Ibarrier())

    def _wait(self, request: MPI.Request) -> None:
        """Block until ``request`` completes: MPI's busy wait, or test-and-sleep (see the module docstring)."""
        if self.sleep_while_waiting is None:
            request.Wait()
            return
        while not request.Test():
            time.sleep(self.sleep_while_waiting)

    # ------------------------------------------------------------------------------------------
    # Tensor <-> MPI buffer
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _stage(tensor: torch.Tensor) -> torch.Tensor:
        """The contiguous tensor MPI will touch: the tensor itself (CPU, or GPU with a CUDA-aware MPI) or a host copy."""
        tensor = tensor.detach()
        if tensor.is_cuda:
            if cuda_aware_mpi():
                torch.cuda.current_stream(tensor.device).synchronize()   # the GPU must be done writing it
                return tensor.contiguous()
            return tensor.cpu()                                           # host buffer (synchronous copy)
        return tensor.contiguous()

    @staticmethod
    def _buffer(tensor: torch.Tensor, counts: list[int] | None = None, displacements: list[int] | None = None):
        """mpi4py's buffer specification ``[memory, (counts, displacements), datatype]`` for ``tensor``."""
        if tensor.dtype in _SENT_AS_INT16:
            tensor = tensor.view(torch.int16)
        if tensor.dtype not in _MPI_TYPES:
            raise TypeError(f"no MPI datatype for torch dtype {tensor.dtype}")
        memory = tensor.numpy() if tensor.device.type == "cpu" else tensor
        if counts is None:
            return [memory, _MPI_TYPES[tensor.dtype]]
        return [memory, (counts, displacements), _MPI_TYPES[tensor.dtype]]


def _exclusive_prefix_sum(values: list[int]) -> list[int]:
    """[3, 0, 2] -> [0, 3, 3]: where each block starts."""
    starts, total = [], 0
    for value in values:
        starts.append(total)
        total += value
    return starts
