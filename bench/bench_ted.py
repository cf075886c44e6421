"""What each DeepSpeed-TED technique saves: bytes per step, expert memory, peak memory, step time.

    python bench/bench_ted.py                          # launches mpirun -n 4 (tp 2 × ep 2) itself
    python bench/bench_ted.py --ranks 8 --tp 2 --ep 2   # tp 2 × ep 2 × dp 2
    python bench/bench_ted.py --engine torch           # torchrun instead
    mpirun -n 4 python bench/bench_ted.py --worker out.json --tp 2 --ep 2   # by hand

One process per rank trains the language model of ``fastmoe_edu.train`` (``--size medium``: d_model
128, 4 blocks, 8 experts of 512 hidden units, batch 16 × 64 tokens; ``small`` for notebooks) a few
steps under each variant:

    baseline                 tp × ep × dp, every tp rank dispatches every token
    drop (expert rows)       duplicate token dropping, the expert output rows [k·T, d] all-gathered
    drop (combined)          TED's dropping: 1/tp of the tokens each, the combined [T, d] all-gathered
    + tensor-parallel experts   every expert's hidden units split over the tp ranks
    + activation checkpointing  blocks recomputed in the backward, their messages replayed

and prints, per variant and from rank 0's point of view: the bytes this rank sent per step by kind
of collective (the communicator's own counters), the expert parameters it holds, the peak memory a
training step allocates on top of what existed before it (the PyTorch profiler's memory timeline,
as bench_optimizer_memory.py), and the median step time. Ratios are ÷ the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "baseline": dict(),
    "drop (expert rows)": dict(drop_duplicate_tokens=True, drop_duplicate_at="expert_rows"),
    "drop (combined)": dict(drop_duplicate_tokens=True),
    "drop + tensor-parallel experts": dict(drop_duplicate_tokens=True, expert_tensor_parallel=True),
    "drop + TP experts + checkpointing": dict(drop_duplicate_tokens=True, expert_tensor_parallel=True,
                                              activation_checkpointing=True),
}
SIZES = {"medium": dict(d_model=128, n_head=4, n_layer=4, d_hidden=512, num_experts=8, batch_size=16, seq_len=64),
         "small": dict(d_model=64, n_head=4, n_layer=2, d_hidden=256, num_experts=8, batch_size=8, seq_len=32)}


def kind_of(key: str) -> str:
    """A communicator counter's key -> the kind of traffic it is."""
    group, operation = key.split("/", 1)
    if group == "expert" and operation in ("alltoallv", "pairwise", "ialltoallv"):
        return "token all-to-all"
    if group == "tensor" and operation == "allreduce_gradients":
        return "expert gradients summed over tp"
    if group == "tensor":
        return "tp activations (all-reduce, all-gather, reduce-scatter)"
    return "other gradients and statistics"


def peak_step_bytes(run_step) -> int:
    """Peak bytes allocated during ``run_step()`` above the start, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run_step()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        current += size if action.name == "CREATE" else -size if action.name == "DESTROY" else 0
        peak = max(peak, current)
    return peak


def worker(output: str, tp: int, ep: int, steps: int, size: str) -> None:
    from fastmoe_edu.config import TrainConfig
    from fastmoe_edu.distributed import (ParallelLayout, abort_on_exception, allreduce_gradients, clip_grad_norm_,
                                         open_world, parallelize)
    from fastmoe_edu.model import build_model
    from fastmoe_edu.train import build_dataset, get_batch

    world = open_world("auto")
    abort_on_exception(world.engine)
    torch.set_num_threads(1)
    dp = world.size // (tp * ep)
    results = {}
    for name, options in VARIANTS.items():
        cfg = TrainConfig(**SIZES[size], activation_checkpointing=options.get("activation_checkpointing", False))
        layout = ParallelLayout(world, tp=tp, ep=ep, dp=dp)
        dataset = build_dataset(cfg)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, dataset.vocab_size)
        plan = parallelize(model, layout, **{k: v for k, v in options.items() if k != "activation_checkpointing"})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rows = layout.check_batch_size(cfg.batch_size)
        mine = slice(layout.data_rank * rows, (layout.data_rank + 1) * rows)

        def step(number: int) -> None:
            x, y, _ = get_batch(dataset, cfg, "train", number)
            _, loss = model(x[mine], y[mine])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            allreduce_gradients(model, layout, plan)
            clip_grad_norm_(model, 1.0, layout, plan)
            optimizer.step()

        step(0)                                                       # warm-up: optimizer state, buffers
        layout.stats.reset()
        seconds = []
        for number in range(1, steps + 1):
            world.barrier()
            start = time.perf_counter()
            step(number)
            seconds.append(time.perf_counter() - start)
        sent: dict[str, int] = {}
        for key, counter in layout.stats.counters.items():
            sent[kind_of(key)] = sent.get(kind_of(key), 0) + counter.bytes_sent // steps
        peak = peak_step_bytes(lambda: step(steps + 1))
        results[name] = {"bytes_per_step": sent, "expert_elements": sum(p.numel() for p in plan.expert_parameters()),
                         "peak_step_bytes": peak, "step_ms": 1000 * statistics.median(seconds)}
    if world.rank == 0:
        Path(output).write_text(json.dumps({"ranks": world.size, "tp": tp, "ep": ep, "dp": dp, "size": size,
                                            "results": results}))


# What the ranks print on a run that worked: PyTorch's profiler announces each start and stop of a trace
# ("USDT: ... profiler_start / profiler_stop", on stderr, once per rank and variant), and its memory
# profile warns about blocks allocated before it started (CPUAllocator.cpp). Counted, not shown.
KNOWN_NOISE = {"profiler start/stop notices": ("profiler_start", "profiler_stop"),
               "CPUAllocator warnings (blocks allocated before the profiler started)": ("CPUAllocator",)}


def summarize_output(text: str) -> str:
    """One line for the launched job's output: how many lines of each known kind, and how many others."""
    # Ranks write at the same time, so one line can hold two ranks' messages: count messages, not lines.
    counts = {kind: sum(text.count(marker) for marker in markers) for kind, markers in KNOWN_NOISE.items()}
    known = tuple(marker for markers in KNOWN_NOISE.values() for marker in markers)
    other = [line for line in text.splitlines() if line.strip() and not any(m in line for m in known)]
    parts = [f"{n} {kind}" for kind, n in counts.items() if n] + ([f"{len(other)} other lines"] if other else [])
    return "; ".join(parts) if parts else "no output"


def launch(ranks: int, tp: int, ep: int, steps: int, engine: str = "mpi", size: str = "medium") -> dict:
    """Run the job; return rank 0's results, with ``output`` (the ranks' stdout + stderr, captured) and
    ``output_summary`` (one line). A failed job raises RuntimeError with the end of that output."""
    from fastmoe_edu.distributed import mpirun_command, torchrun_command
    launcher = mpirun_command if engine == "mpi" else torchrun_command
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "ted.json"
        command = launcher(ranks, [__file__, "--worker", str(output), "--tp", str(tp), "--ep", str(ep),
                                   "--steps", str(steps), "--size", size])
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        printed = done.stdout + done.stderr
        if done.returncode != 0 or not output.exists():
            raise RuntimeError(f"{' '.join(map(str, command[:3]))} ... failed (exit status {done.returncode}); "
                               f"the end of its output:\n{printed[-4000:]}")
        return {**json.loads(output.read_text()), "output": printed, "output_summary": summarize_output(printed)}


def report(data: dict) -> str:
    results, model = data["results"], SIZES[data["size"]]
    base = results["baseline"]
    kinds = sorted({kind for r in results.values() for kind in r["bytes_per_step"]})
    lines = [f"#### TED techniques, {data['ranks']} ranks = tp {data['tp']} × ep {data['ep']} × dp {data['dp']} "
             f"(rank 0; d_model {model['d_model']}, {model['n_layer']} blocks, {model['num_experts']} experts of "
             f"{model['d_hidden']}, batch {model['batch_size']} × {model['seq_len']}, float32)", "",
             "| variant | " + " | ".join(f"{k} (kB/step)" for k in kinds)
             + " | expert weights (k elements) | step's peak memory (MiB) | step (ms) |",
             "|---" * (len(kinds) + 4) + "|"]
    for name, r in results.items():
        cells = []
        for kind in kinds:
            value, ref = r["bytes_per_step"].get(kind, 0), base["bytes_per_step"].get(kind, 0)
            cells.append(f"{value / 1e3:,.0f}" + (f" ({value / ref:.2f}×)" if ref else ""))
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {r['expert_elements'] / 1e3:,.0f} ({r['expert_elements'] / base['expert_elements']:.2f}×)"
                     + f" | {r['peak_step_bytes'] / 2**20:.1f} ({r['peak_step_bytes'] / base['peak_step_bytes']:.2f}×)"
                     + f" | {r['step_ms']:.1f} ({r['step_ms'] / base['step_ms']:.2f}×) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--engine", choices=["mpi", "torch"], default="mpi",
                        help="launch with mpirun (MPI) or torchrun (torch.distributed)")
    parser.add_argument("--worker", metavar="OUTPUT_JSON", help="(internal) run as one rank of a launched job")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tp, args.ep, args.steps, args.size)
        return
    data = launch(args.ranks, args.tp, args.ep, args.steps, args.engine, args.size)
    print(f"the {args.ranks} ranks finished without error; what they printed: {data['output_summary']}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, engine {args.engine}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(report(data))


if __name__ == "__main__":
    main()
