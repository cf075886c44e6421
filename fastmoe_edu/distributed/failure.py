"""Fail loudly, never hang: an uncaught exception on any rank aborts the whole MPI job.

Without this, a rank that raises simply exits, while the other ranks wait forever inside the next
collective for a partner that will never come. With :func:`abort_on_exception` installed, the
failing rank prints its traceback prefixed with its rank, waits a moment for mpirun to relay it,
then calls ``MPI.COMM_WORLD.Abort(1)``: the launcher (mpirun) kills every other rank within seconds
and exits with a non-zero status.

    from fastmoe_edu.distributed import abort_on_exception
    abort_on_exception()          # first thing in main(), before any collective

``python -m mpi4py your_script.py`` gives a similar guarantee for any script without code changes.
"""
from __future__ import annotations

import sys
import time
import traceback

from mpi4py import MPI

#: Seconds the failing rank waits between printing its traceback and aborting. mpirun relays each
#: rank's output through its own event loop; an Abort that reaches the launcher first can end the
#: job before the message is relayed (seen once with MPICH's hydra on a loaded 2-core machine: the
#: job failed with no output at all). The pause lets the message out; the other ranks are blocked
#: anyway, so it costs nothing but this second.
ABORT_GRACE_SECONDS = 1.0


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
        time.sleep(ABORT_GRACE_SECONDS)
        world.Abort(1)

    hook.aborts_mpi_job = True
    sys.excepthook = hook
