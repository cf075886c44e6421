"""Run under ``mpirun -n P`` or ``torchrun --nproc-per-node=P``: every distributed equality check, in one
launch; rank 0 writes the JSON.

    mpirun -n 4 python tests/mpi_scripts/run_checks.py results.json
    torchrun --nproc-per-node=4 tests/mpi_scripts/run_checks.py results.json

Output: ``{"world_size": P, "results": {case: {quantity: worst error over the ranks}}, "skipped": ...}``.
The checks themselves: check_expert_parallel.py (one MoE layer), check_training_steps.py (the model, and
gradient_partitioning = true against false).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_expert_parallel import layer_checks          # noqa: E402
from check_training_steps import gradient_partitioning_checks, training_checks   # noqa: E402

from fastmoe_edu.backends import set_cpu_threads   # noqa: E402
from fastmoe_edu.distributed import ParallelLayout, abort_on_exception   # noqa: E402


def main(output: str) -> None:
    world = ParallelLayout()
    abort_on_exception(world.world.engine)
    set_cpu_threads(1, "numba")          # tiny tensors, P ranks on CI's 2 cores: one thread each (torch and numba)
    results, skipped = layer_checks(world)
    results.update(training_checks(world))
    results.update(gradient_partitioning_checks(world, [b for b in ("reference", "numba") if b not in skipped]))
    for errors in results.values():                      # the worst rank decides
        for key, value in errors.items():
            errors[key] = world.world.allreduce_(torch.tensor([float(value)], dtype=torch.float64), op="max").item()
    if world.is_main:
        Path(output).write_text(json.dumps({"world_size": world.world_size, "results": results,
                                            "skipped": skipped, "engine": world.world.engine,
                                            "stats": world.stats.as_dict()}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
