"""Starting MPI jobs from Python (tests and benchmarks launch ``mpirun`` themselves).

The ``mpich`` wheel installs ``mpirun`` next to the virtual environment's ``python``; that one
matches the MPI library mpi4py loads, so it is preferred to any ``mpirun`` on the PATH.

    subprocess.run(mpirun_command(4, ["-m", "fastmoe_edu.train", "--max_steps=10"]), check=True)
"""
from __future__ import annotations

import shutil
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
