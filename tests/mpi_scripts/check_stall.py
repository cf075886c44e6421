"""Run under ``mpirun`` or ``torchrun`` with 2 ranks: rank 1 stops itself (SIGSTOP) before a collective.

    check_stall.py TIMEOUT_S

Rank 0 waits in an all-reduce for a partner that never comes. Past ``TIMEOUT_S`` it must say which
collective on which communicator timed out, and the whole job must end (the stopped rank included).
"""
import os
import signal
import sys

import torch

from fastmoe_edu.distributed import ParallelLayout, abort_on_exception, open_world


def main(timeout_s: float) -> None:
    layout = ParallelLayout(open_world(timeout_s=timeout_s))
    abort_on_exception(layout.world.engine)
    layout.world.allreduce_(torch.ones(4))                 # everyone arrives once: the engine is up
    if layout.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)               # stalled: alive, but never arrives again
    layout.data.allreduce_(torch.ones(4), purpose="allreduce_after_the_stall")
    print("not reached", flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]))
