"""Under ``mpirun -n 4`` / ``torchrun``: activation checkpointing changes neither the numbers nor the messages.

    mpirun -n 4 python tests/mpi_scripts/check_recompute.py results.json

For each layout (tp 2 × ep 2 with duplicate token dropping, pipelined expert parallelism over 4 ranks,
data × expert parallelism), the language model is trained three steps in float64 with
``activation_checkpointing`` off and then on, from the same seed. Recomputing a block redoes the same
arithmetic on the same inputs, so every loss, gradient norm and parameter must be *bitwise* equal; and
because the recomputation replays the block's recorded collectives (distributed/recompute.py), each
communicator must count exactly the same collectives and bytes in both runs (and a third run, with
the replay switched off, shows how many more a naive recomputation sends). Rank 0 writes
``{case: {"max_param_difference", "max_loss_difference", "counters_differ_on_some_rank", "calls_off",
"calls_on", "calls_naive", "alltoall_calls", "bytes_off", "bytes_on"}}`` (differences: the worst over
the ranks; counts: rank 0's).
"""
import json
import sys
from pathlib import Path

import torch

from fastmoe_edu.backends import set_cpu_threads
from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed import abort_on_exception
from fastmoe_edu.distributed.engines import resolve_engine
from fastmoe_edu.model import build_model, no_recompute_contexts
from fastmoe_edu.train import (build_dataset, configure_optimizer, get_batch, parallel_runtime, seed_random_draws,
                               train_step)

STEPS = 3
LAYOUTS = {
    "tp2_ep2_drop": ["--tp=2", "--ep=2", "--drop_duplicate_tokens=true", "--n_head=2"],
    "ep4_pipelined": ["--ep=4", "--pipeline_degree=2"],
    "ep2_dp2_capacity": ["--ep=2", "--dp=2", "--capacity_factor=1.0", "--router=gshard"],
}


def run(extra: list[str], checkpointing: bool, replay: bool = True):
    cfg = parse_args(["--progress=false", "--batch_size=8", "--seq_len=12", "--n_layer=2", "--d_model=16",
                      "--d_hidden=24", "--num_experts=8", "--warmup_steps=1", "--lr=0.01",
                      f"--activation_checkpointing={str(checkpointing).lower()}", *extra])
    dataset = build_dataset(cfg)
    rt = parallel_runtime(cfg, resolve_engine(cfg.engine))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset.vocab_size).double()
    rt.shard_model(model)
    if not replay:                                            # naive recomputation: messages sent again
        model.recompute_contexts = no_recompute_contexts
    seed_random_draws(cfg, rt)
    optimizer = configure_optimizer(model, cfg)
    rt.layout.stats.reset()                                   # count the training steps' messages only
    records = [train_step(model, optimizer, get_batch(dataset, cfg, "train", step), cfg, step, rt)
               for step in range(STEPS)]
    counters = {key: (c.calls, c.bytes_sent) for key, c in rt.layout.stats.counters.items()}
    return model, records, counters, rt


def main(output: str) -> None:
    set_cpu_threads(1, "numba")        # tiny tensors, 4 ranks on CI's 2 cores: one thread each
    results = {}
    for case, extra in LAYOUTS.items():
        off_model, off_records, off_counts, rt = run(extra, False)
        on_model, on_records, on_counts, _ = run(extra, True)
        _, _, naive_counts, _ = run(extra, True, replay=False)
        param_difference = max(float((a - b).detach().abs().max())
                               for a, b in zip(off_model.parameters(), on_model.parameters()))
        loss_difference = max(abs(a[k] - b[k]) for a, b in zip(off_records, on_records)
                              for k in ("loss", "grad_norm"))
        mine = torch.tensor([param_difference, loss_difference, float(off_counts != on_counts)],
                            dtype=torch.float64)
        worst = rt.layout.world.allreduce_(mine, op="max")
        results[case] = {"max_param_difference": float(worst[0]), "max_loss_difference": float(worst[1]),
                         "counters_differ_on_some_rank": bool(worst[2]),
                         "calls_off": sum(calls for calls, _ in off_counts.values()),
                         "calls_on": sum(calls for calls, _ in on_counts.values()),
                         "alltoall_calls": sum(calls for key, (calls, _) in on_counts.items()
                                               if "alltoall" in key or "exchange" in key),
                         "calls_naive": sum(calls for calls, _ in naive_counts.values()),
                         "bytes_off": sum(b for _, b in off_counts.values()),
                         "bytes_on": sum(b for _, b in on_counts.values())}
    if rt.layout.world.rank == 0:
        Path(output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    abort_on_exception(resolve_engine("auto"))
    main(sys.argv[1])
