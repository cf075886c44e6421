"""Parallel training: expert, tensor and data parallelism over MPI or torch.distributed (docs/moe_systems.md §4).

Launch any script with ``mpirun -n P`` or ``torchrun --nproc-per-node=P``; each of the P processes
("ranks") holds a slice of the experts (and of the attention, with tp > 1) and reads a slice of the
batch. Importing this package loads no engine: only :func:`open_world` does. The files, one idea each:

    communicator.py     Communicator: the only door to an engine (all-to-all(v), non-blocking all-to-all-v,
                        all-reduce and non-blocking all-reduce, broadcast, all-gather(v), barrier, split)
    mpi_engine.py       the MPI engine (mpi4py): MPICommunicator, mpi_world
    torch_engine.py     the torch.distributed engine (gloo / NCCL): TorchCommunicator, torch_world
    engines.py          which engine launched this job (environment only), open_world
    stats.py            CommunicationStats: calls, seconds and bytes per collective
    layout.py           ParallelLayout: world = tp × ep × dp, one communicator per role
    parallelize.py      parallelize(model, layout) -> ParallelPlan: the one call that makes a model parallel
    plan.py             ParallelOptions (each option once, with its check) and ParallelPlan (what parallelize decided)
    expert_parallel.py  ExpertParallel (a layer's expert runner, TED's duplicate token dropping), SumOverRanks
    exchange.py         the differentiable token exchange with pluggable algorithms, and the regroup
    hierarchical.py     the two-level (intra-node, then inter-node) all-to-all
    pipeline.py         the exchange cut into chunks that overlap the expert compute, both passes
    autotune.py         pipeline_degree="auto": time the layer's first passes, let the cost model pick the degrees
    shadowing.py        FasterMoE's expert shadowing: the most loaded experts' weights go to every rank
    tensor_parallel.py  Megatron-style attention / dense MLP slices, and the tp-group row split / gather
    expert_tensor_parallel.py  DeepSpeed-TED: every expert's hidden units split over the tensor group
    recompute.py        TED's communication-aware checkpointing: recompute a block, replay its messages
    gradients.py        initial-weight broadcast, bucketed gradient all-reduce, global gradient norm
    gradient_partitioning.py  FSMoE: the replicated gradients' all-reduce in pieces, posted during the backward
    runtime.py          ParallelRuntime: what the training loop calls under a launcher
    failure.py          abort_on_exception: one rank's error ends the whole job (no hang)
    launch.py           mpirun_command / torchrun_command: how tests and benchmarks start jobs
    cost_model.py       predicted step time of a layout (α–β communication + GEMM rate)

Typical use::

    from fastmoe_edu.distributed import ParallelLayout, allreduce_gradients, clip_grad_norm_, parallelize
    layout = ParallelLayout()                       # the launcher's engine; ep = world size
    torch.manual_seed(0); model = build_model()     # the whole model, same seed on every rank
    plan = parallelize(model, layout)               # keep E/ep experts per rank, broadcast the rest
    ...
    loss.backward(); allreduce_gradients(model, layout, plan); clip_grad_norm_(model, 1.0, layout, plan)
"""
from .communicator import EXCHANGE_METHODS, Communicator
from .engines import ENGINES, launch_rank, launch_world_size, open_world
from .expert_parallel import ExpertParallel, SumOverRanks, keep_local_experts
from .failure import abort_on_exception
from .gradient_partitioning import GradientPieces
from .gradients import (DEFAULT_BUCKET_BYTES, allreduce_expert_gradients, allreduce_gradients, broadcast_parameters,
                        clip_grad_norm_, split_parameters)
from .launch import mpirun_command, mpirun_path, torchrun_command
from .layout import ParallelLayout
from .parallelize import parallelize
from .plan import EXCHANGES, ExpertSettings, LayerPlan, ParallelOptions, ParallelPlan
from .stats import CommunicationStats

__all__ = [
    "EXCHANGE_METHODS", "Communicator",
    "ENGINES", "launch_rank", "launch_world_size", "open_world",
    "ExpertParallel", "SumOverRanks", "keep_local_experts", "abort_on_exception",
    "GradientPieces", "DEFAULT_BUCKET_BYTES", "allreduce_expert_gradients", "allreduce_gradients",
    "broadcast_parameters", "clip_grad_norm_", "split_parameters",
    "mpirun_command", "mpirun_path", "torchrun_command",
    "ParallelLayout", "EXCHANGES", "ExpertSettings", "LayerPlan", "ParallelOptions", "ParallelPlan", "parallelize",
    "CommunicationStats",
]
