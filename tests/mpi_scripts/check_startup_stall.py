"""Run under ``mpirun`` or ``torchrun`` with 2 ranks: rank 1 stalls before start-up, rank 0 trains.

    check_startup_stall.py TRAIN_OPTIONS...

Rank 1 hangs (a sleep, as in a slow import or a hung file system) before it reaches the engine; rank 0
runs ``python -m fastmoe_edu.train TRAIN_OPTIONS`` and waits for it inside the engine's start-up
(``MPI_Init``, torch's rendezvous). Past ``collective_timeout_s`` rank 0 must say so and end the job.
"""
import sys
import time

from fastmoe_edu.distributed import launch_rank
from fastmoe_edu.train import main

if __name__ == "__main__":
    if launch_rank() == 1:
        time.sleep(600)
    main(sys.argv[1:])
