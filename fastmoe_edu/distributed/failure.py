"""Fail loudly, never hang: an uncaught exception on any rank ends the whole job.

Without this, a rank that raises simply exits, while the other ranks wait forever inside the next
collective for a partner that will never come. With :func:`abort_on_exception` installed, the
failing rank prints its traceback prefixed with its rank, waits a moment for the launcher to relay
it, then ends the job:

* MPI: ``MPI.COMM_WORLD.Abort(1)`` — mpirun kills every other rank within seconds;
* torch.distributed: the process exits with status 1 at once — torchrun's agent sees a failed worker
  and terminates the others (its default: no restarts).

    from fastmoe_edu.distributed.failure import abort_on_exception
    abort_on_exception("mpi")          # first thing in main(), before any collective
"""
from __future__ import annotations

import os
import sys
import time
import traceback

from .engines import launch_rank, launch_world_size

#: Seconds the failing rank waits between printing its traceback and ending the job. A launcher
#: relays each rank's output through its own event loop; an abort that reaches it first can end the
#: job before the message is relayed (seen once with MPICH's hydra on a loaded 2-core machine: the
#: job failed with no output at all). The other ranks are blocked anyway, so it costs only this second.
ABORT_GRACE_SECONDS = 1.0


def abort_on_exception(engine: str = "mpi") -> None:
    """Install a ``sys.excepthook`` that prints ``[rank r/P]``-tagged tracebacks and ends all ranks.

    Calling it again does nothing (the hook is installed once).
    """
    previous_hook = sys.excepthook
    if getattr(previous_hook, "aborts_the_job", False):
        return

    def hook(exc_type, exc_value, exc_traceback):
        size = launch_world_size()
        if size == 1:
            previous_hook(exc_type, exc_value, exc_traceback)      # a single process: nothing to abort
            return
        tag = f"[rank {launch_rank()}/{size}]"
        lines = traceback.format_exception(exc_type, exc_value, exc_traceback)
        text = "".join(f"{tag} {line}" for chunk in lines for line in chunk.splitlines(keepends=True))
        sys.stderr.write(f"{tag} uncaught exception, ending the job on all ranks:\n{text}")
        sys.stderr.flush()
        sys.stdout.flush()
        time.sleep(ABORT_GRACE_SECONDS)
        if engine == "mpi":
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)
        os._exit(1)                                   # torchrun terminates the other workers

    hook.aborts_the_job = True
    sys.excepthook = hook
