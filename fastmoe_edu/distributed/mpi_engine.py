"""The MPI engine (mpi4py): a :class:`Communicator` over an ``MPI.Comm``. Chosen when ``mpirun`` started the job.

    mpirun -n 4 python -m fastmoe_edu.train

mpi4py has two ways to send data: lower-case methods (``comm.alltoall(obj)``) pickle arbitrary Python
objects; upper-case methods (``comm.Ialltoallv([array, (counts, displacements), MPI.FLOAT], ...)``)
hand a raw memory buffer to the MPI library. Only the buffer form is used here: a CPU torch tensor
is viewed as a numpy array *without copying* (``tensor.numpy()`` shares memory), and counts and
displacements are given in elements, never bytes.

Where the bytes live: CPU tensors — MPI reads and writes the tensor's own memory. CUDA tensors with a
**CUDA-aware** MPI (:func:`cuda_aware_mpi`) — handed to MPI directly (mpi4py reads their
``__cuda_array_interface__``). CUDA tensors otherwise (the PyPI ``mpich`` wheel is not CUDA-aware) —
each message goes through a host copy.

Waiting: MPI's blocking calls *busy-poll*. With more ranks than cores (``mpirun -n 8`` on 2 cores)
the waiting ranks then steal the cores from the ranks that still compute. With ``sleep_while_waiting``
every collective is posted non-blocking and completed by ``Test()`` with short sleeps in between,
which hands the core back to the operating system. :func:`mpi_world` switches this on by itself when
the machine is oversubscribed.
"""
from __future__ import annotations

import ctypes
import functools
import os
import time

import torch
from mpi4py import MPI

from .communicator import Communicator, _exclusive_prefix_sum
from .stats import CommunicationStats

# torch dtype -> the MPI datatype of one element. 16-bit floats travel as their int16 bit patterns
# (numpy has no bfloat16, and MPI only has to move the bits); they are never summed by MPI.
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
_OPS = {"sum": MPI.SUM, "max": MPI.MAX}
_TAG_ROWS = 17
_SLEEP_SECONDS = 1e-4      # between completion checks while waiting, when oversubscribed


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


class MPICommunicator(Communicator):
    """A :class:`Communicator` over an ``MPI.Comm``."""

    engine = "mpi"

    def __init__(self, comm: MPI.Comm, name: str, timeout_s: float | None = None,
                 stats: CommunicationStats | None = None, sleep_while_waiting: float | None = None):
        members = MPI.Group.Translate_ranks(comm.Get_group(), list(range(comm.Get_size())), MPI.COMM_WORLD.Get_group())
        super().__init__(name, comm.Get_rank(), comm.Get_size(), list(members), timeout_s, stats)
        self.comm = comm
        # Seconds to sleep between completion checks while waiting; None = MPI's blocking wait.
        self.sleep_while_waiting = sleep_while_waiting

    def ranks_on_this_node(self) -> int:
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        count = node.Get_size()
        node.Free()
        return count

    def _start_alltoallv(self, send, received, send_counts, recv_counts):
        return self.comm.Ialltoallv(_buffer(send, send_counts), _buffer(received, recv_counts))

    def _start_sendrecv(self, send, destination, received, source):
        return [self.comm.Irecv(_buffer(received), source=source, tag=_TAG_ROWS),
                self.comm.Isend(_buffer(send), dest=destination, tag=_TAG_ROWS)]

    def _start_allreduce(self, tensor, op):
        return self.comm.Iallreduce(MPI.IN_PLACE, _buffer(tensor), op=_OPS[op])

    def _start_broadcast(self, tensor, root):
        return self.comm.Ibcast(_buffer(tensor), root=root)

    def _allgatherv(self, send, gathered, counts):
        self._complete(self.comm.Iallgatherv(_buffer(send), _buffer(gathered, counts)), "all-gather")

    def _start_barrier(self):
        return self.comm.Ibarrier()

    def _wait(self, request, timeout_s) -> bool:
        """MPI's busy wait, or test-and-sleep (see the module docstring), until the deadline."""
        if self.sleep_while_waiting is None and timeout_s is None:
            request.Wait()
            return True
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else float("inf"))
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            if self.sleep_while_waiting is not None:
                time.sleep(self.sleep_while_waiting)
        return True

    def _test(self, request) -> bool:
        return request.Test()

    def _split(self, color, key, name):
        return MPICommunicator(self.comm.Split(color, key), name, self.timeout_s, self.stats, self.sleep_while_waiting)

    def transfer_path(self, device) -> str:
        if torch.device(device).type != "cuda":
            return "host memory (CPU tensors, zero-copy numpy views)"
        if cuda_aware_mpi():
            return "CUDA-aware MPI (GPU buffers handed to MPI directly)"
        return "host buffers (MPI is not CUDA-aware: GPU rows are copied to the CPU and back)"

    def _reads_device_memory(self, device) -> bool:
        return device.type == "cuda" and cuda_aware_mpi()


def mpi_world(timeout_s: float | None = None, sleep_while_waiting: bool | None = None) -> MPICommunicator:
    """``MPI.COMM_WORLD`` as a Communicator; ``sleep_while_waiting=None``: only when oversubscribed."""
    world = MPICommunicator(MPI.COMM_WORLD, "world", timeout_s)
    if sleep_while_waiting is None:
        sleep_while_waiting = world.ranks_on_this_node() > len(os.sched_getaffinity(0))
    world.sleep_while_waiting = _SLEEP_SECONDS if sleep_while_waiting else None
    return world


def _buffer(tensor: torch.Tensor, counts: list[int] | None = None):
    """mpi4py's buffer specification ``[memory, (counts, displacements), datatype]`` for ``tensor``, the
    displacements of consecutive blocks of ``counts`` elements (or ``[memory, datatype]``: the whole tensor)."""
    if tensor.dtype in _SENT_AS_INT16:
        tensor = tensor.view(torch.int16)
    if tensor.dtype not in _MPI_TYPES:
        raise TypeError(f"no MPI datatype for torch dtype {tensor.dtype}")
    memory = tensor.numpy() if tensor.device.type == "cpu" else tensor
    if counts is None:
        return [memory, _MPI_TYPES[tensor.dtype]]
    return [memory, (counts, _exclusive_prefix_sum(counts)), _MPI_TYPES[tensor.dtype]]
