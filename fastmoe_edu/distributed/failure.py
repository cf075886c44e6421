"""Fail loudly, never hang: an uncaught exception on any rank aborts the whole MPI job.

Without this, a rank that raises simply exits, while the other ranks wait forever inside the next
collective for a partner that will never come. With :func:`abort_on_exception` installed, the
failing rank prints its traceback prefixed with its rank, then calls ``MPI.COMM_WORLD.Abort(1)``:
the launcher (mpirun) kills every other rank within seconds and exits with a non-zero status.

    from fastmoe_edu.distributed import abort_on_exception
    abort_on_exception()          # first thing in main(), before any collective

``python -m mpi4py your_script.py`` gives a similar guarantee for any script without code changes.
"""
from __future__ import annotations

import sys
import traceback

from mpi4py import MPI


def abort_on_exception() -> None:
    """Install a ``sys.excepthook`` that prints ``[rank r/P]``-tagged tracebacks and aborts all ranks.

    Calling it again does nothing (the hook is installed once).
    """
    previous_hook = sys.excepthook
    if getattr(previous_hook, "aborts_mpi_job", False):
        return

    def hook(exc_type, exc_value, exc_traceback):
        world = MPI.COMM_WORLD
        if world.Get_size() == 1:
            previous_hook(exc_type, exc_value, exc_traceback)      # a single process: nothing to abort
            return
        tag = f"[rank {world.Get_rank()}/{world.Get_size()}]"
        lines = traceback.format_exception(exc_type, exc_value, exc_traceback)
        text = "".join(f"{tag} {line}" for chunk in lines for line in chunk.splitlines(keepends=True))
        sys.stderr.write(f"{tag} uncaught exception, aborting all ranks:\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
        world.Abort(1)

    hook.aborts_mpi_job = True
    sys.excepthook = hook
