"""Run under ``mpirun`` or ``torchrun``: ``python -m fastmoe_edu.train`` in which rank 1 raises in its first step.

    check_rank_error.py TRAIN_OPTIONS...

The error must reach stderr, tagged with the rank, and end the job, under either launcher.
"""
import sys

import fastmoe_edu.train as train
from fastmoe_edu.distributed import launch_rank


def failing_step(*args, **kwargs):
    raise RuntimeError("deliberate failure in rank 1's first step")


if __name__ == "__main__":
    if launch_rank() == 1:
        train.train_step = failing_step
    train.main(sys.argv[1:])
