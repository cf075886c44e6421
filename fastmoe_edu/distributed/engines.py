"""Which engine carries the communication: read from the launcher's environment, opened on demand.

    python -m fastmoe_edu.train                                # no launcher: one process, no engine at all
    mpirun -n 4 python -m fastmoe_edu.train                    # MPI (mpi4py)
    torchrun --nproc-per-node=4 -m fastmoe_edu.train           # torch.distributed (gloo on CPU, NCCL on GPU)

``engine = "auto"`` (the config key) looks at the environment variables the launchers set: torchrun
sets ``WORLD_SIZE`` / ``RANK`` (with MASTER_ADDR / MASTER_PORT); mpirun sets ``PMI_SIZE`` /
``PMI_RANK`` (MPICH's hydra) or ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_RANK`` (Open MPI).
Nothing here imports an engine: detection is plain environment reading, so a single process never
loads mpi4py or initializes a process group. Only :func:`open_world` imports the engine it opens.

A size variable alone is no launch: one left in the shell by another job (``export WORLD_SIZE=2``)
would make a single process wait for ranks that never come. :func:`resolve_engine` refuses a size
without the variables its launcher always sets with it, naming what it found and what to do.
"""
from __future__ import annotations

import os

from .communicator import Communicator

ENGINES = ("auto", "mpi", "torch")
DEFAULT_TIMEOUT_S = 300.0          # the config's collective_timeout_s default: generous for slow machines
# What each launcher puts into every process's environment: (engine, size variable, rank variable,
# the variables that always come with them: one of each "A|B").
_LAUNCHERS = (("torch", "WORLD_SIZE", "RANK", ("MASTER_ADDR", "MASTER_PORT")),   # torchrun (any env:// launch)
              ("mpi", "PMI_SIZE", "PMI_RANK", ("PMI_FD|PMI_PORT",)),              # MPICH's hydra mpirun
              ("mpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", ()))       # Open MPI's mpirun
_COMMANDS = {"torch": "torchrun --nproc-per-node={}", "mpi": "mpirun -n {}"}


def _launch() -> tuple[str | None, int, int]:
    """(engine of the launcher or None, world size, rank), from the environment alone."""
    for engine, size, rank, _ in _LAUNCHERS:
        if size in os.environ:
            return engine, int(os.environ[size]), int(os.environ.get(rank, "0"))
    return None, 1, 0


def launcher() -> str | None:
    """"torch" under torchrun, "mpi" under mpirun, None without a launcher."""
    return _launch()[0]


def launch_world_size() -> int:
    """How many processes the launcher started (1 without one). No communication."""
    return _launch()[1]


def launch_rank() -> int:
    """This process's rank in the launch (0 without a launcher). No communication."""
    return _launch()[2]


def signal_status_note() -> str:
    """For the line of a run stopped by Ctrl-C / SIGTERM: under torchrun, why its status will be 1 anyway."""
    if launcher() != "torch":
        return ""
    return (". torchrun itself exits with status 1 and a SignalException traceback when it received the signal: "
            "its report of the signal, not a failure of this run")


def resolve_engine(requested: str = "auto") -> str | None:
    """The engine to open: ``requested`` checked against the launcher; None = a single process.

    A run of one process needs no engine whatever ``requested`` says (``mpirun -n 1`` included).
    Asking for the engine that did *not* launch the job is an error: its ranks could not find each other.
    """
    if requested not in ENGINES:
        raise ValueError(f"engine={requested!r} is not known; allowed: {', '.join(ENGINES)}")
    if launch_world_size() == 1:
        return None
    _check_launch_environment()
    found = launcher()
    if requested != "auto" and requested != found:
        raise ValueError(f"engine={requested!r} but this job was started by the {found} launcher "
                         f"({'torchrun' if found == 'torch' else 'mpirun'}); use engine=\"auto\" or \"{found}\"")
    return found


def _check_launch_environment() -> None:
    """A size variable without its launcher's other variables is a leftover: say which, and what to do."""
    engine, size, rank, companions = next(entry for entry in _LAUNCHERS if entry[1] in os.environ)
    missing = [names.replace("|", " or ") for names in (rank, *companions)
               if not any(name in os.environ for name in names.split("|"))]
    if missing:
        found = [name for names in (size, rank, *companions) for name in names.split("|") if name in os.environ]
        command = _COMMANDS[engine].format(launch_world_size())
        raise ValueError(f"the environment has {' '.join(f'{name}={os.environ[name]}' for name in found)} but not "
                         f"{', '.join(missing)}: left over from another job, not a launch by {command.split()[0]}. "
                         f"To train in one process unset {' '.join(found)}; to train on {launch_world_size()} "
                         f"ranks start the job with {command}")


def open_world(engine: str = "auto", device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Communicator:
    """The world communicator of ``engine`` ("auto": the launcher's; MPI when there is none).

    ``timeout_s``: the longest any collective may wait (the config's ``collective_timeout_s``).
    """
    engine = resolve_engine(engine) or (engine if engine != "auto" else "mpi")
    if engine == "torch":
        from .torch_engine import torch_world
        return torch_world(device_type=torch_device_type(device), timeout_s=timeout_s)
    from .mpi_engine import mpi_world
    return mpi_world(timeout_s=timeout_s)


def torch_device_type(device) -> str:
    return str(device).split(":")[0]
