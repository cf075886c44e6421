"""Starting parallel jobs from Python (tests and benchmarks launch ``mpirun`` / ``torchrun`` themselves).

The ``mpich`` wheel installs ``mpirun`` next to the virtual environment's ``python``; that one
matches the MPI library mpi4py loads, so it is preferred to any ``mpirun`` on the PATH.

    subprocess.run(mpirun_command(4, ["-m", "fastmoe_edu.train", "--max_steps=10"]), check=True)
    subprocess.run(torchrun_command(4, ["-m", "fastmoe_edu.train", "--max_steps=10"]), check=True)

torchrun ships with torch; ``python -m torch.distributed.run`` is the same program.
"""
from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path


def mpirun_path() -> str:
    """The ``mpirun`` beside ``sys.executable``, else the first one on the PATH."""
    beside_python = Path(sys.executable).parent / "mpirun"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("mpirun") or shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("no mpirun found next to the Python interpreter or on the PATH; "
                                "install the 'mpich' wheel (pip install mpich)")
    return found


def mpirun_command(num_ranks: int, python_args: list[str]) -> list[str]:
    """``mpirun -n N <this python> <python_args...>``: N copies of this interpreter."""
    return [mpirun_path(), "-n", str(num_ranks), sys.executable, *python_args]


def torchrun_command(num_ranks: int, python_args: list[str], port: int | None = None) -> list[str]:
    """``torchrun --nproc-per-node=N <python_args...>`` with this interpreter's torch (``python -m torch.distributed.run``).

    ``port``: the rendezvous port of rank 0 (default: a free one, so parallel jobs do not collide).
    """
    port = free_port() if port is None else port
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={num_ranks}",
            f"--master-port={port}", *python_args]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
