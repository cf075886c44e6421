"""Run under ``mpirun`` or ``torchrun``: one rank fails, the job must end (non-zero) within seconds instead of hanging.

    check_abort.py raise         rank 1 raises while every other rank waits in an Allreduce
    check_abort.py bad_experts   num_experts not divisible by the ranks: every rank raises before any collective
"""
import sys

import torch

from fastmoe_edu import MoELayer
from fastmoe_edu.distributed import ParallelLayout, abort_on_exception, parallelize


def main(mode: str) -> None:
    layout = ParallelLayout()
    abort_on_exception(layout.world.engine)
    if mode == "raise":
        if layout.rank == 1:
            raise RuntimeError("deliberate failure on rank 1")
        layout.world.allreduce_(torch.ones(4))          # the others wait here for rank 1, forever without the hook
    elif mode == "bad_experts":
        parallelize(MoELayer(8, 16, num_experts=layout.world_size + 1), layout)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    print("not reached", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
