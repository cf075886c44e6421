"""Expert and data parallelism over MPI (mpi4py): REFERENCE §4.

Run any script under ``mpirun -n P``; each of the P processes ("ranks") holds a slice of the experts
and reads a slice of the batch. The pieces, one file each:

    layout.py           ParallelLayout: world = tp × ep × dp, one MPI communicator per role
    communicator.py     Communicator: Alltoall / Alltoallv / Allreduce / Bcast on torch tensors
                        (numpy views, no pickling), host buffers for GPU tensors unless CUDA-aware
    stats.py            CommunicationStats: calls, seconds and bytes per collective
    exchange.py         the differentiable global scatter / gather of token rows, and the regroup
    expert_parallel.py  ExpertParallel + make_expert_parallel: an MoELayer with E/ep experts per rank
    balance.py          global-batch balance loss and sigmoid-router load
    gradients.py        broadcast of initial weights, bucketed gradient all-reduce, global grad norm
    failure.py          abort_on_exception: one rank's error stops the whole job (no hang)
    launch.py           mpirun_command: how tests and benchmarks start MPI jobs

Typical use::

    from fastmoe_edu.distributed import (ParallelLayout, abort_on_exception, allreduce_gradients,
                                         broadcast_parameters, make_expert_parallel)
    abort_on_exception()
    layout = ParallelLayout()                       # ep = world size
    torch.manual_seed(0); model = build_model()     # the whole model, same seed on every rank
    make_expert_parallel(model, layout)             # keep E/ep experts per rank
    broadcast_parameters(model, layout)
    ...
    loss.backward(); allreduce_gradients(model, layout); optimizer.step()
"""
from .communicator import EXCHANGE_METHODS, Communicator, cuda_aware_mpi, transfer_path
from .expert_parallel import ExpertParallel, expert_parameters, keep_local_experts, make_expert_parallel
from .failure import abort_on_exception
from .gradients import (DEFAULT_BUCKET_BYTES, allreduce_gradients, broadcast_parameters, clip_grad_norm_,
                        split_parameters)
from .launch import mpirun_command, mpirun_path
from .layout import ParallelLayout
from .stats import CommunicationStats

__all__ = [
    "EXCHANGE_METHODS", "Communicator", "cuda_aware_mpi", "transfer_path",
    "ExpertParallel", "expert_parameters", "keep_local_experts", "make_expert_parallel",
    "abort_on_exception",
    "DEFAULT_BUCKET_BYTES", "allreduce_gradients", "broadcast_parameters", "clip_grad_norm_", "split_parameters",
    "mpirun_command", "mpirun_path",
    "ParallelLayout", "CommunicationStats",
]
