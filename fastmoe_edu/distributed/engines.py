"""Which engine carries the communication: read from the launcher's environment, opened on demand.

    python -m fastmoe_edu.train                                # no launcher: one process, no engine at all
    mpirun -n 4 python -m fastmoe_edu.train                    # MPI (mpi4py)
    torchrun --nproc-per-node=4 -m fastmoe_edu.train           # torch.distributed (gloo on CPU, NCCL on GPU)

``engine = "auto"`` (the config key) looks at the environment variables the launchers set: torchrun
sets ``TORCHELASTIC_RUN_ID`` (and RANK / WORLD_SIZE / MASTER_ADDR); mpirun sets ``PMI_RANK`` /
``PMI_SIZE`` (MPICH's hydra) or ``OMPI_COMM_WORLD_SIZE`` (Open MPI). Nothing here imports an engine:
detection is plain environment reading, so a single process never loads mpi4py or initializes a
process group. Only :func:`open_world` imports the engine it opens.
"""
from __future__ import annotations

import os

from .communicator import Communicator

ENGINES = ("auto", "mpi", "torch")

_TORCH_VARIABLES = ("TORCHELASTIC_RUN_ID",)
_TORCH_ENV_INIT = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launcher() -> str | None:
    """"torch" under torchrun (or env:// variables), "mpi" under mpirun, None without a launcher."""
    if any(v in os.environ for v in _TORCH_VARIABLES) or all(v in os.environ for v in _TORCH_ENV_INIT):
        return "torch"
    if any(v in os.environ for v in _MPI_SIZE_VARIABLES):
        return "mpi"
    return None


def launch_world_size() -> int:
    """How many processes the launcher started (1 without one). No communication."""
    found = launcher()
    if found == "torch":
        return int(os.environ.get("WORLD_SIZE", "1"))
    if found == "mpi":
        return int(next(os.environ[v] for v in _MPI_SIZE_VARIABLES if v in os.environ))
    return 1


def launch_rank() -> int:
    """This process's rank in the launch (0 without a launcher). No communication."""
    names = ("RANK",) if launcher() == "torch" else _MPI_RANK_VARIABLES
    return int(next((os.environ[v] for v in names if v in os.environ), "0"))


def resolve_engine(requested: str = "auto") -> str | None:
    """The engine to open: ``requested`` checked against the launcher; None = a single process.

    A run of one process needs no engine whatever ``requested`` says (``mpirun -n 1`` included).
    Asking for the engine that did *not* launch the job is an error: its ranks could not find each other.
    """
    if requested not in ENGINES:
        raise ValueError(f"engine={requested!r} is not known; allowed: {', '.join(ENGINES)}")
    if launch_world_size() == 1:
        return None
    found = launcher()
    if requested != "auto" and requested != found:
        raise ValueError(f"engine={requested!r} but this job was started by the {found} launcher "
                         f"({'torchrun' if found == 'torch' else 'mpirun'}); use engine=\"auto\" or \"{found}\"")
    return found


def open_world(engine: str = "auto", device: str = "cpu") -> Communicator:
    """The world communicator of ``engine`` ("auto": the launcher's; MPI when there is none)."""
    engine = resolve_engine(engine) or (engine if engine != "auto" else "mpi")
    if engine == "torch":
        from .torch_engine import torch_world
        return torch_world(device_type=torch_device_type(device))
    from .mpi_engine import mpi_world
    return mpi_world()


def torch_device_type(device) -> str:
    return str(device).split(":")[0]
