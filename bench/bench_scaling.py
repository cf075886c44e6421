"""Training throughput on 1, 2, 4, 8 ranks, and the share of the time spent communicating.

    python bench/bench_scaling.py                        # launches mpirun -n 1, 2, 4, 8 itself
    python bench/bench_scaling.py --ranks 1 2 --steps 30 --exchange pairwise
    python bench/bench_scaling.py --engine torch         # torchrun instead (torch.distributed, gloo on CPU)
    mpirun -n 4 python bench/bench_scaling.py --worker out.json     # one world size by hand

*Strong scaling*: the default model of ``fastmoe_edu.train`` with a fixed global batch
(``batch_size`` sequences of ``seq_len`` tokens) and ``num_experts`` = 8 so that every world size
divides it; P ranks each take batch_size / P sequences and 8 / P experts. One step is exactly what
the training loop does: forward, backward, gradient all-reduce, global-norm clipping, AdamW step.

Reported per world size: tokens/s (global tokens per step / median step time), and the time inside
MPI calls (torch.distributed ones with ``--engine torch``), from the communication layer's own
counters (``layout.stats``): per collective, mean over ranks, as a share of the step. The time
inside a collective includes waiting for the slowest rank, so on an oversubscribed machine (more
ranks than cores) it mostly measures waiting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def worker(output: str, steps: int, warmup: int, backend: str, exchange: str, engine: str) -> None:
    from fastmoe_edu.config import TrainConfig
    from fastmoe_edu.data import batch_rng, get_dataset
    from fastmoe_edu.distributed import (ParallelLayout, abort_on_exception, allreduce_gradients, clip_grad_norm_,
                                         open_world, parallelize)
    from fastmoe_edu.backends import set_cpu_threads
    from fastmoe_edu.model import build_model

    layout = ParallelLayout(open_world(engine))
    abort_on_exception(layout.world.engine)
    set_cpu_threads(max(1, (os.cpu_count() or 1) // layout.ranks_on_this_node), backend)
    cfg = TrainConfig(num_experts=8, backend=backend)
    per_rank = layout.check_batch_size(cfg.batch_size)
    layout.check_num_experts(cfg.num_experts)
    dataset = get_dataset(cfg.dataset)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset.vocab_size)
    distributed = layout.world_size > 1
    if distributed:
        plan = parallelize(model, layout, exchange=exchange)   # local experts; replicated weights from rank 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    mine = slice(layout.data_rank * per_rank, (layout.data_rank + 1) * per_rank)

    step_seconds, comm_seconds, per_collective = [], [], {}
    for step in range(warmup + steps):
        x, y, _ = dataset.sample_batch("train", cfg.batch_size, cfg.seq_len, batch_rng(cfg.seed, "train", step))
        layout.world.barrier()                            # every rank starts the step together
        layout.stats.reset()
        start = time.perf_counter()
        _, loss = model(x[mine], y[mine])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if distributed:
            allreduce_gradients(model, layout, plan)
            clip_grad_norm_(model, cfg.grad_clip, layout, plan)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        model.update_router_biases()
        elapsed = time.perf_counter() - start
        if step >= warmup:
            # This step's counters, read before the all-reduces below add their own.
            counters = layout.stats.as_dict()
            keys = sorted(counters)                       # the same collectives, in the same order, on every rank
            seconds = torch.tensor([layout.stats.total_seconds()] + [counters[k]["seconds"] for k in keys],
                                   dtype=torch.float64)
            layout.world.allreduce_(seconds, average=True)                   # mean over ranks
            slowest = layout.world.allreduce_(torch.tensor([elapsed], dtype=torch.float64), op="max").item()
            step_seconds.append(slowest)                  # the step ends with the slowest rank
            comm_seconds.append(seconds[0].item())
            for key, mean in zip(keys, seconds[1:].tolist()):
                per_collective.setdefault(key, []).append((mean, counters[key]["bytes_sent"], counters[key]["calls"]))
    if layout.is_main:
        step_time = float(np.median(step_seconds))
        result = {
            "ranks": layout.world_size, "step_seconds": step_time,
            "tokens_per_second": cfg.batch_size * cfg.seq_len / step_time,
            "comm_seconds": float(np.median(comm_seconds)),
            "collectives": {key: {"seconds": float(np.median([v[0] for v in values])),
                                  "bytes_sent_rank0": values[-1][1], "calls": values[-1][2]}
                            for key, values in sorted(per_collective.items())},
            "config": {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "num_experts": cfg.num_experts,
                       "d_model": cfg.d_model, "n_layer": cfg.n_layer, "top_k": cfg.top_k, "backend": backend,
                       "exchange": repr(model.moe_layers()[0].expert_runner.exchange) if distributed else None,
                       "engine": layout.world.engine, "threads_per_rank": torch.get_num_threads()},
        }
        Path(output).write_text(json.dumps(result))


def launch(ranks: list[int], steps: int, warmup: int, backend: str, exchange: str, engine: str) -> list[dict]:
    from fastmoe_edu.distributed import mpirun_command, torchrun_command

    launcher = mpirun_command if engine == "mpi" else torchrun_command
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for count in ranks:
            output = Path(folder) / f"scaling_{count}.json"
            args = [__file__, "--worker", str(output), "--steps", str(steps), "--warmup", str(warmup),
                    "--backend", backend, "--exchange", exchange, "--engine", engine]
            started = time.perf_counter()
            subprocess.run(launcher(count, args), check=True, timeout=900)
            results.append(json.loads(output.read_text()))
            print(f"{count} ranks: {results[-1]['tokens_per_second']:,.0f} tokens/s "
                  f"(launch and run {time.perf_counter() - started:.1f} s)", flush=True)
    return results


def report(results: list[dict]) -> str:
    base = results[0]["tokens_per_second"]
    cfg = results[0]["config"]
    exchange = next((r["config"]["exchange"] for r in results if r["config"]["exchange"]), "-")
    engine = "MPI" if cfg["engine"] == "mpi" else "torch.distributed"
    lines = [f"#### Training throughput (strong scaling, global batch {cfg['batch_size']}×{cfg['seq_len']} tokens, "
             f"{cfg['num_experts']} experts, {cfg['n_layer']} MoE layers, d_model {cfg['d_model']}, "
             f"backend `{cfg['backend']}`, exchange `{exchange}`)", "",
             f"| ranks | threads/rank | step (ms) | tokens/s | speedup | in {engine} (share of step) | "
             "token all-to-all (ms) | gradient all-reduce (ms) | other collectives (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        collectives = r["collectives"]
        exchange_ms = sum(v["seconds"] for k, v in collectives.items() if k.startswith("expert/")) * 1e3
        gradient_ms = sum(v["seconds"] for k, v in collectives.items() if k.endswith("/allreduce_gradients")) * 1e3
        other_ms = r["comm_seconds"] * 1e3 - exchange_ms - gradient_ms
        lines.append(f"| {r['ranks']} | {r['config']['threads_per_rank']} | {r['step_seconds'] * 1e3:.1f} | "
                     f"{r['tokens_per_second']:,.0f} | {r['tokens_per_second'] / base:.2f}× | "
                     f"{r['comm_seconds'] / r['step_seconds']:.0%} | {exchange_ms:.1f} | {gradient_ms:.1f} | "
                     f"{max(other_ms, 0.0):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per world size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--exchange", choices=["auto", "alltoallv", "pairwise"], default="auto",
                        help="the token exchange of parallelize(); auto = alltoallv")
    parser.add_argument("--engine", choices=["mpi", "torch"], default="mpi",
                        help="launch with mpirun (MPI) or torchrun (torch.distributed)")
    parser.add_argument("--worker", metavar="OUTPUT_JSON", help="(internal) run as one rank of a launched job")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.backend, args.exchange, args.engine)
        return
    results = launch(args.ranks, args.steps, args.warmup, args.backend, args.exchange, args.engine)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, engine {args.engine}")
    print(report(results))


if __name__ == "__main__":
    main()
