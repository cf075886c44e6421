"""FasterMoE's expert shadowing under skewed routing: bytes moved and time, with and without.

    python bench/bench_shadowing.py                 # launches mpirun -n 4 itself (ep = 4)
    python bench/bench_shadowing.py --skew 0 2 4    # how strongly the router prefers expert 0
    mpirun -n 4 python bench/bench_shadowing.py --worker out.json

One MoE layer (d_model 256, 8 SwiGLU experts of 512 hidden units, top-2, 4096 tokens per rank),
expert-parallel over 4 ranks, forward + backward. A *skew* s adds s to every token's router logit for
expert 0, so that expert gets a growing share of the rows (a popular expert, the case shadowing is
for). Per skew and per setting (shadowing off / on: FasterMoE's greedy policy on the latency model, with
the bandwidth and GEMM rate measured when the layer is made parallel), rank 0 reports: the
share of rows expert 0 received, which experts were shadowed, the bytes it sent through the token
all-to-all and through the shadowing collectives (weight broadcasts, gradient all-reduces, the
counts), the median time of forward + backward, and the latency model's prediction T(S) for the step
(shadowing.py; the same measured rates for both settings). Ratios are on ÷ off.
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

D_MODEL, D_HIDDEN, EXPERTS, TOKENS = 256, 512, 8, 4096


def worker(output: str, skews: list[float], repeats: int, tokens: int) -> None:
    from fastmoe_edu import MoELayer
    from fastmoe_edu.distributed import ParallelLayout, abort_on_exception, open_world, parallelize

    from fastmoe_edu.distributed.shadowing import predicted_time, weights_per_expert

    world = open_world("auto")
    abort_on_exception(world.engine)
    torch.set_num_threads(1)
    results = []
    for skew in skews:
        rates = None                                                # the latency model's β, γ for this skew
        for shadowing in (True, False):                             # "on" first: its measured rates price both
            torch.manual_seed(0)
            layer = MoELayer(D_MODEL, D_HIDDEN, EXPERTS, top_k=2)
            layout = ParallelLayout(world, tp=1, ep=world.size, dp=1)
            parallelize(layer, layout, shadow_experts="auto" if shadowing else 0)
            x = torch.randn(tokens, D_MODEL, generator=torch.Generator().manual_seed(world.rank))
            with torch.no_grad():                                   # expert 0 gets a logit bonus of `skew`
                layer.router.weight[0] += skew * x.mean(0) / x.mean(0).square().sum()
            seconds, sent = [], {}
            for repeat in range(repeats + 1):
                layout.stats.reset()
                world.barrier()
                start = time.perf_counter()
                layer(x).square().mean().backward()
                if repeat:                                          # the first one is a warm-up
                    seconds.append(time.perf_counter() - start)
            for key, counter in layout.stats.counters.items():
                kind = ("token all-to-all" if key.split("/")[1] in ("alltoallv", "pairwise") else
                        "shadowing" if "shadow" in key or key.endswith("/bcast") else "other")
                sent[kind] = sent.get(kind, 0) + counter.bytes_sent
            share = float(layer.last_routing.tokens_per_expert[0] / layer.last_routing.tokens_per_expert.sum())
            runner, experts = layer.expert_runner, layer.experts
            if shadowing:                                           # the "on" run measured them (parallelize)
                rates = runner.shadow_rates
            rank_counts = world.allgather(layer.last_routing.tokens_per_expert.to(torch.int64)).reshape(world.size, -1)
            weights = weights_per_expert(experts)
            shadowed = list(runner.last_shadowed or [])
            predicted = predicted_time(rank_counts, shadowed, runner.num_local_experts,
                                       D_MODEL * experts.w1.element_size(), weights,
                                       weights * experts.w1.element_size(), rates, runner.shadow_cost_ratio)
            results.append({"skew": skew, "shadowing": shadowing, "expert0_share": share, "shadowed": shadowed,
                            "bytes": sent, "ms": 1000 * statistics.median(seconds), "predicted_ms": 1000 * predicted})
    if world.rank == 0:
        Path(output).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--skew", type=float, nargs="+", default=[0.0, 2.0, 4.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per rank")
    parser.add_argument("--worker", metavar="OUTPUT_JSON", help="(internal) run as one rank of a launched job")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.skew, args.repeats, args.tokens)
        return
    from fastmoe_edu.distributed import mpirun_command
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "shadowing.json"
        subprocess.run(mpirun_command(args.ranks, [__file__, "--worker", str(output), "--skew",
                                                   *map(str, args.skew), "--repeats", str(args.repeats),
                                                   "--tokens", str(args.tokens)]),
                       check=True, timeout=900)
        results = json.loads(output.read_text())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.ranks} ranks (ep = {args.ranks}), {time.strftime('%Y-%m-%d')}")
    print("| skew | expert 0's share of rows | shadowing | shadowed experts | token all-to-all (kB, rank 0) "
          "| shadowing collectives (kB) | forward + backward (ms) | latency model (ms) |")
    print("|---:|---:|---|---|---:|---:|---:|---:|")
    for on, off in zip(results[::2], results[1::2]):
        for r in (off, on):
            a2a, extra = r["bytes"].get("token all-to-all", 0), r["bytes"].get("shadowing", 0)
            ratio = "" if r is off else (f" ({a2a / max(off['bytes'].get('token all-to-all', 1), 1):.2f}×)")
            time_ratio = "" if r is off else f" ({r['ms'] / off['ms']:.2f}×)"
            print(f"| {r['skew']:g} | {r['expert0_share']:.0%} | {'on' if r['shadowing'] else 'off'} | "
                  f"{r['shadowed'] or '-'} | {a2a / 1e3:,.0f}{ratio} | {extra / 1e3:,.0f} | {r['ms']:.1f}{time_ratio} "
                  f"| {r['predicted_ms']:.1f} |")


if __name__ == "__main__":
    main()
