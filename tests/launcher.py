"""Starting the parallel test jobs under either engine: ``mpirun -n N`` or ``torchrun --nproc-per-node=N``.

Every N-ranks-equal-one-process check runs under both engines (ENGINE_RANKS); the scripts in
tests/mpi_scripts/ do not care which launched them (``ParallelLayout()`` opens the launcher's engine).
"""
from __future__ import annotations

import subprocess

from fastmoe_edu.distributed import mpirun_command, torchrun_command

ENGINES = ("mpi", "torch")
# (engine, ranks) of the equality checks: both engines at 2 and 4 ranks, MPI at 8 as well.
ENGINE_RANKS = [("mpi", 2), ("mpi", 4), ("mpi", 8), ("torch", 2), ("torch", 4)]


def command(engine: str, num_ranks: int, python_args: list[str]) -> list[str]:
    if engine == "mpi":
        return mpirun_command(num_ranks, python_args)
    return torchrun_command(num_ranks, python_args)


def launch(engine: str, num_ranks: int, python_args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run the job to its end (or the timeout) and capture its output."""
    return subprocess.run(command(engine, num_ranks, python_args), capture_output=True, text=True, timeout=timeout)
