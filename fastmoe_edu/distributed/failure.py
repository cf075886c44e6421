"""Fail loudly, never hang: an uncaught exception on any rank ends the whole job.

Without this, a rank that raises simply exits, while the other ranks wait forever inside the next
collective for a partner that will never come. With :func:`abort_on_exception` installed, the
failing rank prints its traceback prefixed with its rank, waits a moment for the launcher to relay
it, then ends the job:

* MPI: ``MPI.COMM_WORLD.Abort(1)`` — mpirun kills every other rank within seconds;
* torch.distributed: the process exits with status 1 at once — torchrun's agent sees a failed worker
  and terminates the others (its default: no restarts).

Two watchdogs cover what no exception reports (both started by ``ParallelRuntime``):

* :func:`start_up_deadline` — start-up (MPI initialization, torch's rendezvous, the layout's
  communicators) waits for every rank, outside any collective's timeout; a rank that never arrives
  would hold the others there forever. Past ``collective_timeout_s`` the waiting rank says so and ends.
* :func:`end_if_launcher_dies` — a torchrun killed with SIGKILL cannot stop its workers, which would
  train on unsupervised; each worker ends as soon as its launcher is gone.

Everything here writes to file descriptor 2 directly (:func:`write_stderr`): torch's
``init_process_group`` wraps ``sys.excepthook`` and points ``sys.stderr`` at a buffer while the
wrapped hook runs, so a hook that ends the process with ``os._exit`` would take that buffer with it.

    from fastmoe_edu.distributed.failure import abort_on_exception
    abort_on_exception("mpi")          # first thing in main(), before any collective
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback

from .communicator import start_up_timeout
from .engines import launch_rank, launch_world_size

#: Seconds the failing rank waits between printing its traceback and ending the job. A launcher
#: relays each rank's output through its own event loop; an abort that reaches it first can end the
#: job before the message is relayed (seen once with MPICH's hydra on a loaded 2-core machine: the
#: job failed with no output at all). The other ranks are blocked anyway, so it costs only this second.
ABORT_GRACE_SECONDS = 1.0

#: What the kernel sends a rank when its launcher dies (:func:`end_if_launcher_dies`). Not SIGINT,
#: SIGTERM, SIGHUP or SIGQUIT, which torchrun relays to its workers, nor SIGUSR1, SLURM's ``--signal``.
LAUNCHER_DEATH_SIGNAL = signal.SIGUSR2
_PR_SET_PDEATHSIG = 1                 # prctl's option, from <linux/prctl.h>
_WATCH_THREAD = "fastmoe_edu launcher watch"


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
        sys.stdout.flush()
        write_stderr(f"{tag} uncaught exception, ending the job on all ranks:\n{text}")
        time.sleep(ABORT_GRACE_SECONDS)
        if engine == "mpi":
            from mpi4py import MPI
            MPI.COMM_WORLD.Abort(1)
        os._exit(1)                                   # torchrun terminates the other workers

    hook.aborts_the_job = True
    sys.excepthook = hook


def write_stderr(text: str) -> None:
    """``text`` straight to file descriptor 2, past any Python-level redirection of ``sys.stderr``."""
    data = text.encode(errors="replace")
    while data:
        data = data[os.write(2, data):]


@contextlib.contextmanager
def start_up_deadline(timeout_s: float, what: str):
    """End this rank with a clear line if the block (``what``: the start-up step) takes over ``timeout_s``.

    The watchdog is a small helper process, not a thread: mpi4py keeps the interpreter's lock (the
    GIL) during ``MPI_Init``, so no thread of this process runs while it waits for a missing rank.
    The helper waits on a pipe from this process; leaving the block (or dying) closes it, and past
    the deadline the helper prints the line and kills this rank (SIGKILL: ``MPI_Init`` heeds nothing
    else), which makes the launcher end the job.
    """
    message = f"[rank {launch_rank()}/{launch_world_size()}] {start_up_timeout(timeout_s, what)}\n"
    helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _DEADLINE_HELPER, str(os.getpid()), str(timeout_s),
                               message], stdin=subprocess.PIPE)
    try:
        yield
    finally:
        helper.stdin.close()
        helper.wait()


# The start-up deadline's helper: ARGV = the rank's pid, the seconds, the message. Its stdin is the pipe.
_DEADLINE_HELPER = """
import os, select, signal, sys
pid, timeout_s, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], timeout_s)[0]:      # neither closed nor written: still starting
    os.write(2, message.encode(errors="replace"))
    os.kill(pid, signal.SIGKILL)
"""


def end_if_launcher_dies() -> None:
    """Watch the launcher (this process's parent); end this rank as soon as it is gone, with a clear line.

    Two watchers (installed once per process), so that no checkpoint is written after the launcher's death:

    * Linux: the kernel sends :data:`LAUNCHER_DEATH_SIGNAL` the moment the parent exits
      (``prctl(PR_SET_PDEATHSIG)``); its handler runs in the main thread before the next Python
      line, so a save in progress never reaches its commit. The handler ignores the signal while the
      parent lives (sent by hand, or at the end of the parent *thread* that started this process).
    * a thread waiting for the parent's end (a pidfd on Linux, else ``os.getppid()`` polled every
      0.2 s): it also ends a rank whose main thread is blocked inside the engine, where no handler runs.
    """
    if any(thread.name == _WATCH_THREAD for thread in threading.enumerate()):
        return                                                        # one watch per process
    launcher_pid = os.getppid()

    def end():
        with contextlib.suppress(Exception):                          # (a signal may interrupt a print)
            sys.stdout.flush()
        write_stderr(f"[rank {launch_rank()}/{launch_world_size()}] the launcher that started this rank "
                     f"(pid {launcher_pid}) is gone: ending this rank instead of training on unsupervised; no "
                     f"checkpoint is written after it. Start the job again (--resume continues from the last "
                     f"committed checkpoint)\n")
        os._exit(1)

    def on_signal(signum, frame):
        if os.getppid() != launcher_pid:
            end()

    def watch():
        try:
            launcher = os.pidfd_open(launcher_pid)
        except (AttributeError, OSError):                  # not Linux >= 5.3
            while os.getppid() == launcher_pid:
                time.sleep(0.2)
        else:
            select.select([launcher], [], [])
        end()

    if threading.current_thread() is threading.main_thread():        # (handlers belong to the main thread)
        signal.signal(LAUNCHER_DEATH_SIGNAL, on_signal)
        _signal_on_parent_death(LAUNCHER_DEATH_SIGNAL)
    threading.Thread(target=watch, name=_WATCH_THREAD, daemon=True).start()


def _signal_on_parent_death(signum: int) -> None:
    """Ask Linux to send ``signum`` to this process when its parent exits (elsewhere: nothing)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)

