"""Measure the all-to-all of expert parallelism and fit the cost model  t = α·(P−1) + β·bytes.

    python bench/bench_alltoall.py                       # launches mpirun -n 2, 4, 8 itself
    python bench/bench_alltoall.py --ranks 2 4 --method pairwise
    python bench/bench_alltoall.py --engine torch        # torchrun instead (torch.distributed, gloo on CPU)
    mpirun -n 4 python bench/bench_alltoall.py --worker out.json    # one world size by hand

Every rank sends the same number of bytes to every other rank (``bytes_per_peer``), so one rank
sends ``bytes_per_rank = bytes_per_peer · (P − 1)`` in all. A call's time is the *slowest* rank's
time (the exchange is done when everyone is done); the median over repeats is kept as ``seconds``,
with the spread of the repeats (``seconds_min``/``seconds_q25``/``seconds_q75``/``seconds_max``).

The fit: the cost model of docs/moe_systems.md §4.2, ``t = α·(P−1) + β·bytes_per_rank`` — α the per-message
latency, β the inverse bandwidth — by least squares over every (P, size) point. The times span
several orders of magnitude, so each equation is divided by its measured t (least squares on the
*relative* error); otherwise the largest messages alone would decide α.
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

BYTES_PER_PEER = [8, 64, 512, 4096, 32_768, 262_144, 1_048_576]
WARMUP_EXCHANGES = 10


def worker(output: str, method: str, repeats: int, engine: str) -> None:
    """Runs on every rank of one launch: time the exchange at every size, rank 0 writes the results."""
    from fastmoe_edu.distributed import ParallelLayout, abort_on_exception, open_world

    layout = ParallelLayout(open_world(engine))
    abort_on_exception(layout.world.engine)
    comm, ranks = layout.expert, layout.expert.size
    results = []
    # The first exchanges of a fresh job also set up the connections between ranks (much slower than
    # any later call): a few untimed exchanges first, so that this does not land on the first size.
    for _ in range(WARMUP_EXCHANGES):
        comm.alltoallv(torch.zeros(ranks, 1), [1] * ranks, [1] * ranks, method)
    for bytes_per_peer in BYTES_PER_PEER:
        # One float32 row per peer, as wide as the message: counts [1, 1, ..., 1].
        rows = torch.randn(ranks, bytes_per_peer // 4)
        counts = [1] * ranks
        sent = rows.shape[1] * 4
        times = []
        for attempt in range(repeats + 2):                        # 2 warm-up calls
            comm.barrier()
            start = time.perf_counter()
            comm.alltoallv(rows, counts, counts, method)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            elapsed = comm.allreduce_(elapsed, op="max").item()  # the exchange ends with the slowest rank
            if attempt >= 2:
                times.append(elapsed)
        results.append({"ranks": ranks, "bytes_per_peer": sent, "bytes_per_rank": sent * (ranks - 1),
                        "seconds": float(np.median(times)), "repeats": len(times),
                        "seconds_min": float(np.min(times)), "seconds_max": float(np.max(times)),
                        "seconds_q25": float(np.percentile(times, 25)),
                        "seconds_q75": float(np.percentile(times, 75))})
    if layout.is_main:
        Path(output).write_text(json.dumps(results))


def fit_alpha_beta(points: list[dict]) -> tuple[float, float]:
    """Least squares on relative error: minimise Σ ((α·(P−1) + β·bytes − t) / t)²."""
    design = np.array([[p["ranks"] - 1, p["bytes_per_rank"]] for p in points], dtype=float)
    times = np.array([p["seconds"] for p in points])
    (alpha, beta), *_ = np.linalg.lstsq(design / times[:, None], np.ones_like(times), rcond=None)
    return float(alpha), float(beta)


def launch(ranks: list[int], method: str, repeats: int, engine: str) -> list[dict]:
    from fastmoe_edu.distributed import mpirun_command, torchrun_command

    launcher = mpirun_command if engine == "mpi" else torchrun_command
    points = []
    with tempfile.TemporaryDirectory() as folder:
        for count in ranks:
            output = Path(folder) / f"alltoall_{count}.json"
            command = launcher(count, [__file__, "--worker", str(output), "--method", method,
                                       "--repeats", str(repeats), "--engine", engine])
            started = time.perf_counter()
            subprocess.run(command, check=True, timeout=600)
            points.extend(json.loads(output.read_text()))
            print(f"{count} ranks: done in {time.perf_counter() - started:.1f} s", flush=True)
    return points


def report(points: list[dict], method: str) -> str:
    alpha, beta = fit_alpha_beta(points)
    lines = [f"#### All-to-all (`{method}`): measured times and the fit t = α·(P−1) + β·bytes_per_rank", "",
             "| ranks | bytes per peer | bytes per rank | measured (µs) | model (µs) |",
             "|---:|---:|---:|---:|---:|"]
    for p in points:
        model = alpha * (p["ranks"] - 1) + beta * p["bytes_per_rank"]
        lines.append(f"| {p['ranks']} | {p['bytes_per_peer']:,} | {p['bytes_per_rank']:,} | "
                     f"{p['seconds'] * 1e6:,.1f} | {model * 1e6:,.1f} |")
    lines += ["", "| fitted on | α (µs per peer) | β (ns/byte) | 1/β (GB/s) |", "|---|---:|---:|---:|"]
    fits = [("all points", points)] + [(f"P = {count} only", [p for p in points if p["ranks"] == count])
                                       for count in sorted({p["ranks"] for p in points})]
    for label, subset in fits:
        alpha, beta = fit_alpha_beta(subset)
        bandwidth = f"{1 / beta / 1e9:.2f}" if beta > 0 else "n/a"
        lines.append(f"| {label} | {alpha * 1e6:,.1f} | {beta * 1e9:.3f} | {bandwidth} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--method", choices=["alltoallv", "pairwise"], default="alltoallv")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--engine", choices=["mpi", "torch"], default="mpi",
                        help="launch with mpirun (MPI) or torchrun (torch.distributed)")
    parser.add_argument("--worker", metavar="OUTPUT_JSON", help="(internal) run as one rank of a launched job")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.method, args.repeats, args.engine)
        return
    points = launch(args.ranks, args.method, args.repeats, args.engine)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, engine {args.engine}")
    print(report(points, args.method))


if __name__ == "__main__":
    main()
