"""Calibrate the TED cost model on this machine, check its predictions, and extrapolate to 8..2048 GPUs.

    python bench/bench_cost_model.py                  # launches mpirun -n 1, 2, 4, 8 itself (a few minutes)
    python bench/bench_cost_model.py --ranks 1 2 4    # fewer world sizes
    python bench/bench_cost_model.py --json out.json  # also write every number

What one launch of P ranks measures (``--worker``), every rank at once, so that the figures include
the contention of P ranks sharing this machine's cores:

1. α, β: the all-to-all-v of equal rows to every peer at 6 sizes (slowest rank, best of 5);
2. the compute rate of one rank: a float32 matmul timed while all P ranks run it (best of 3);
3. training steps of a small TED model (forward, backward, gradient all-reduce) for every
   layout tp × ep × dp = P, with and without duplicate token dropping: step time (slowest rank,
   best of 5 after 2 warm-ups) and the routing load imbalance (rows of the busiest expert-rank / mean).

Best-of rather than median: this machine is shared, and other processes only ever add time; the
minimum is the closest estimate of the undisturbed time.

Calibration: α, β are fitted on all (P, bytes) points (``cost_model.fit_alpha_beta``); the per-layer
overhead (Python, small kernels: fixed + per token) comes from two one-rank runs (batch 16 and 4),
converted to equivalent flops. Every multi-rank step is then predicted twice and compared with its
measurement: *a priori* (compute rate = the matmul rate measured with P busy ranks) and with the
compute rate *fitted per world size* on its pure data-parallel run (tp = ep = 1), which leaves the
other layouts of that P as a test of what the model says about tp, ep and token dropping.

Extrapolation: the same model with an assumed GPU cluster (stated in the output) for 8..2048 GPUs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastmoe_edu.distributed.cost_model import (Hardware, Layout, MoEShape, choose_pipeline_degree,  # noqa: E402
                                                choose_shadowing, choose_step_degrees, fit_alpha_beta, predict_step)

BYTES_PER_PEER = [64, 512, 4096, 32_768, 131_072, 524_288]
MODEL = dict(vocab_size=64, seq_len=32, n_layer=2, n_head=8, d_model=64, d_hidden=128, num_experts=8, top_k=2)
GLOBAL_BATCH = 16
STEPS, WARMUP = 5, 2


def layouts_for(world: int) -> list[tuple[int, int, int, bool, int]]:
    """(tp, ep, dp, drop, global batch) of every measured run; one rank also runs a 4× smaller batch."""
    if world == 1:
        return [(1, 1, 1, False, GLOBAL_BATCH), (1, 1, 1, False, GLOBAL_BATCH // 4)]
    out = []
    for tp in (1, 2, 4, 8):
        for ep in (1, 2, 4, 8):
            if world % (tp * ep) or tp * ep > world:
                continue
            dp = world // (tp * ep)
            out += [(tp, ep, dp, False, GLOBAL_BATCH)]
            out += [(tp, ep, dp, True, GLOBAL_BATCH)] if tp > 1 and ep > 1 else []
    return out


# ----------------------------------------------------------------------------------------------------
# One launch
# ----------------------------------------------------------------------------------------------------
def worker(output: str) -> None:
    from fastmoe_edu.distributed import (ParallelLayout, abort_on_exception, allreduce_gradients, open_world,
                                         parallelize)
    from fastmoe_edu.layer import MoELayer
    from fastmoe_edu.model import ModelConfig, MoETransformer

    world = open_world()                      # once: every layout below is a split of this communicator
    abort_on_exception(world.engine)
    torch.set_num_threads(1)
    P, rank = world.size, world.rank

    def slowest(seconds: float) -> float:
        return world.allreduce_(torch.tensor([seconds], dtype=torch.float64), op="max").item()

    # 1. α, β
    alltoall = []
    if P > 1:
        for per_peer in BYTES_PER_PEER:
            rows = torch.randn(P, per_peer // 4)
            times = []
            for attempt in range(7):
                world.barrier()
                start = time.perf_counter()
                world.alltoallv(rows, [1] * P, [1] * P, "alltoallv")
                if attempt >= 2:
                    times.append(slowest(time.perf_counter() - start))
            alltoall.append({"ranks": P, "bytes_per_rank": per_peer * (P - 1), "seconds": min(times)})

    # 2. compute rate (all ranks at once)
    a, w = torch.randn(256, 256), torch.randn(256, 256)
    best = float("inf")
    for _ in range(3):
        world.barrier()
        start = time.perf_counter()
        for _ in range(40):
            a @ w
        best = min(best, slowest(time.perf_counter() - start))
    rate = 40 * 2 * 256**3 / best

    # 3. TED training steps
    steps = []
    for tp, ep, dp, drop, batch in layouts_for(P):
        layout = ParallelLayout(world, tp=tp, ep=ep, dp=dp)
        torch.manual_seed(0)
        model = MoETransformer(ModelConfig(**MODEL))
        plan = parallelize(model, layout, exchange="alltoallv", drop_duplicate_tokens=drop)
        shard = batch // (ep * dp)
        x = torch.randint(0, MODEL["vocab_size"], (shard, MODEL["seq_len"]))
        times, imbalance = [], []
        for step in range(WARMUP + STEPS):
            world.barrier()
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            _, loss = model(x, x)
            loss.backward()
            allreduce_gradients(model, layout, plan)
            elapsed = slowest(time.perf_counter() - start)
            if step >= WARMUP:
                times.append(elapsed)
        for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
            counts = layer.last_routing.tokens_per_expert.to(torch.float64)
            layout.data.allreduce_(counts)                             # rows per expert over all shards
            per_rank = counts.reshape(ep, -1).sum(1)
            imbalance.append(float(per_rank.max() / per_rank.mean()))
        steps.append({"tp": tp, "ep": ep, "dp": dp, "drop": drop, "batch": batch, "seconds": min(times),
                      "load_imbalance": statistics.mean(imbalance)})
    if rank == 0:
        Path(output).write_text(json.dumps({"ranks": P, "alltoall": alltoall, "flops_per_second": rate,
                                            "steps": steps}))


def launch(ranks: list[int]) -> list[dict]:
    from fastmoe_edu.distributed import mpirun_command

    results = []
    with tempfile.TemporaryDirectory() as folder:
        for count in ranks:
            output = Path(folder) / f"cost_{count}.json"
            subprocess.run(mpirun_command(count, [__file__, "--worker", str(output)]), check=True, timeout=900)
            results.append(json.loads(output.read_text()))
    return results


# ----------------------------------------------------------------------------------------------------
# Calibration and prediction
# ----------------------------------------------------------------------------------------------------
def shape_for(step: dict, load_imbalance: float) -> MoEShape:
    tokens = step["batch"] // (step["ep"] * step["dp"]) * MODEL["seq_len"]
    return MoEShape(tokens_per_rank=tokens, d_model=MODEL["d_model"], d_hidden=MODEL["d_hidden"],
                    num_experts=MODEL["num_experts"], top_k=MODEL["top_k"], n_layer=MODEL["n_layer"],
                    seq_len=MODEL["seq_len"], vocab_size=MODEL["vocab_size"], bytes_per_element=4,
                    load_imbalance=load_imbalance)


def calibrate(runs: list[dict]) -> tuple[float, float, tuple[float, float], list[dict]]:
    """α, β, overhead (flops per layer, per layer and token); then every run's predictions next to its measurement.

    The overhead: the two one-rank runs (batch B and B/4) minus their predicted matmul time give
    two equations  residual · rate / n_layer = fixed + per_token · T,  solved for (fixed, per_token).

    Two predictions per run:
    * ``a_priori``: compute rate = the matmul rate measured with P ranks busy at once;
    * ``per_world``: compute rate fitted to *one* run of that world size (pure data parallel, tp = ep = 1),
      so the other layouts of the same P test only what the model says about tp, ep and token dropping.
    """
    points = [p for run in runs for p in run["alltoall"]]
    alpha, beta = fit_alpha_beta(points) if points else (0.0, 0.0)
    one = next(run for run in runs if run["ranks"] == 1)
    rate1 = one["flops_per_second"]
    hw0 = Hardware(alpha, beta, alpha, beta, rate1, ranks_per_node=64)
    equations = []
    for step in one["steps"]:
        shape = shape_for(step, step["load_imbalance"])
        residual = step["seconds"] - predict_step(shape, Layout(1, 1, 1), hw0)["total"]
        equations.append((shape.tokens_per_rank, residual * rate1 / MODEL["n_layer"]))
    (t_big, r_big), (t_small, r_small) = equations
    per_token = max((r_big - r_small) / (t_big - t_small), 0.0)
    fixed = max(r_big - per_token * t_big, 0.0)

    def hardware(rate):
        return Hardware(alpha, beta, alpha, beta, rate, ranks_per_node=64,
                        overhead_flops_per_layer=fixed, overhead_flops_per_token=per_token)

    def predict(step, hw):
        layout = Layout(step["tp"], step["ep"], step["dp"], drop_duplicate_tokens=step["drop"])
        return predict_step(shape_for(step, step["load_imbalance"]), layout, hw)

    rows = []
    for run in runs:
        a_priori = hardware(run["flops_per_second"])
        # time = communication + work / rate  ->  rate that reproduces the pure data-parallel run exactly.
        reference = next(s for s in run["steps"] if s["tp"] == 1 and s["ep"] == 1 and s["batch"] == GLOBAL_BATCH)
        parts = predict(reference, a_priori)
        work = (parts["compute"] + parts["overhead"]) * run["flops_per_second"]
        communication = parts["total"] - parts["compute"] - parts["overhead"]
        per_world = hardware(work / max(reference["seconds"] - communication, 1e-9))
        for step in run["steps"]:
            rows.append({**step, "ranks": run["ranks"], "a_priori": predict(step, a_priori)["total"],
                         "per_world": predict(step, per_world)["total"], "parts": predict(step, per_world),
                         "calibration_run": step is reference or run["ranks"] == 1})
    return alpha, beta, (fixed, per_token), rows


def calibration_table(alpha, beta, overhead, runs, rows) -> str:
    lines = [f"alpha = {alpha * 1e6:.1f} us per message, beta = {beta * 1e9:.3f} ns/byte "
             f"({1 / beta / 1e9 if beta else float('inf'):.2f} GB/s); overhead per layer = {overhead[0] / 1e6:.1f} Mflop "
             f"+ {overhead[1] / 1e3:.1f} kflop per token (equivalent)",
             "compute rate per rank while all ranks compute: " +
             ", ".join(f"P={r['ranks']}: {r['flops_per_second'] / 1e9:.1f} GF/s" for r in runs),
             "",
             "| P | tp | ep | dp | drop | batch | imbalance | measured ms | a-priori ms | error | per-P fit ms | error |",
             "|---|----|----|----|------|-------|-----------|-------------|-------------|-------|--------------|-------|"]
    for r in rows:
        mark = " (fit)" if r["calibration_run"] else ""
        lines.append(f"| {r['ranks']} | {r['tp']} | {r['ep']} | {r['dp']} | {'on' if r['drop'] else 'off'} | "
                     f"{r['batch']} | {r['load_imbalance']:.2f} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['a_priori'] * 1e3:.1f} | {(r['a_priori'] - r['seconds']) / r['seconds']:+.0%} | "
                     f"{r['per_world'] * 1e3:.1f}{mark} | {(r['per_world'] - r['seconds']) / r['seconds']:+.0%} |")
    checked = [r for r in rows if not r["calibration_run"]]
    if checked:
        for key, label in (("a_priori", "a-priori (matmul rate)"), ("per_world", "per-P fitted rate")):
            errors = [abs(r[key] - r["seconds"]) / r["seconds"] for r in checked]
            lines.append(f"\n{label}: mean |error| {sum(errors) / len(errors):.0%}, worst {max(errors):.0%} "
                         f"over the {len(checked)} runs not used for fitting")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Extrapolation
# ----------------------------------------------------------------------------------------------------
GPU_CLUSTER = Hardware(alpha_intra=5e-6, beta_intra=1 / 150e9, alpha_inter=15e-6, beta_inter=1 / 25e9,
                       flops_per_second=120e12, ranks_per_node=8)
GPU_CLUSTER_TEXT = ("assumed GPU cluster: 8 GPUs per node, NVLink alpha 5 us / 150 GB/s, InfiniBand alpha 15 us / "
                    "25 GB/s per GPU (200 Gb/s), 120 TFLOP/s sustained bf16")


def big_shape(ep: int) -> MoEShape:
    """A GPT-3-XL-sized MoE: d 2048, 24 blocks, SwiGLU experts of 5632, 2 experts per expert-rank, top-2, bf16."""
    return MoEShape(tokens_per_rank=8192, d_model=2048, d_hidden=5632, num_experts=2 * ep, top_k=2, n_layer=24,
                    seq_len=2048, vocab_size=50_257, bytes_per_element=2, load_imbalance=1.2)


def extrapolation_tables() -> str:
    lines = [GPU_CLUSTER_TEXT,
             "model: d_model 2048, 24 MoE blocks, SwiGLU experts d_hidden 5632, 2 experts per expert rank, top-2, "
             "8192 tokens per batch shard, load imbalance 1.2, bf16. Times are ms per training step; a2a = the "
             "exposed all-to-all time of a step (4 exchanges per block). In this first table pipelining is "
             "combined with the flat exchange, one D for both passes searched in 1..16 (the next table combines "
             "everything).", "",
             "| GPUs | layout | a2a flat | a2a hier | step flat | step flat+drop | step hier+drop | best D | "
             "step flat+drop+D |",
             "|------|--------|----------|----------|-----------|----------------|----------------|--------|"
             "------------------|"]
    for gpus in (8, 16, 32, 64, 128, 256, 512, 1024, 2048):
        for tp in (1, 4):
            ep = gpus // tp
            shape = big_shape(ep)
            drop = tp > 1
            flat = predict_step(shape, Layout(tp, ep, 1), GPU_CLUSTER)
            hier = predict_step(shape, Layout(tp, ep, 1, hierarchical=True), GPU_CLUSTER)
            flat_drop = predict_step(shape, Layout(tp, ep, 1, drop_duplicate_tokens=drop), GPU_CLUSTER)
            hier_drop = predict_step(shape, Layout(tp, ep, 1, drop_duplicate_tokens=drop, hierarchical=True),
                                     GPU_CLUSTER)
            best = choose_pipeline_degree(shape, Layout(tp, ep, 1, drop_duplicate_tokens=drop), GPU_CLUSTER, 16)
            piped = predict_step(shape, Layout(tp, ep, 1, drop, False, best), GPU_CLUSTER)
            lines.append(f"| {gpus} | tp{tp}·ep{ep} | {flat['alltoall'] * 1e3:.0f} | {hier['alltoall'] * 1e3:.0f} | "
                         f"{flat['total'] * 1e3:.0f} | {flat_drop['total'] * 1e3:.0f} | "
                         f"{hier_drop['total'] * 1e3:.0f} | {best} | {piped['total'] * 1e3:.0f} |")
    lines += ["", "Pipeline degree D (flat exchange, tp1, 64 GPUs): step ms for D = 1..8: " +
              ", ".join(f"{predict_step(big_shape(64), Layout(1, 64, 1, pipeline_degree=D), GPU_CLUSTER)['total'] * 1e3:.0f}"
                        for D in range(1, 9))]
    return "\n".join(lines) + "\n\n" + all_techniques_table()


def all_techniques_table() -> str:
    """The step with every technique added in turn, each as the project applies it (cost model only)."""
    lines = ["All four techniques, added in turn (same model and cluster; hierarchical exchange throughout; tp 4 "
             "with TED's duplicate token dropping; ms per step): TED = hierarchical + dropping; + D_f/D_b = "
             "pipelined, degrees chosen separately among powers of 2 up to 16 (FSMoE, `pipeline_degree = "
             "backward_pipeline_degree = auto`); + pieces = gradient partitioning; + shadowing = FasterMoE's "
             "decision for the hot expert (imbalance 1.2), taken only where the model says it pays.", "",
             "| GPUs | layout | TED | D_f/D_b | + D_f/D_b | + pieces | grad all-reduce exposed (ms) | + shadowing "
             "| all ÷ TED |",
             "|------|--------|-----|---------|-----------|----------|------------------------------|-------------"
             "|-----------|"]
    for gpus in (8, 64, 512, 2048):
        for tp in (1, 4):
            ep = gpus // tp
            shape, hw = big_shape(ep), GPU_CLUSTER
            ted = Layout(tp, ep, 1, drop_duplicate_tokens=tp > 1, hierarchical=True)
            forward, backward = choose_step_degrees(shape, ted, hw)
            piped = replace(ted, pipeline_degree=forward, backward_pipeline_degree=backward)
            pieces = replace(piped, gradient_partitioning=True)
            shadowed = replace(pieces, shadowed_experts=choose_shadowing(shape, pieces, hw))
            t = {name: predict_step(shape, layout, hw) for name, layout in
                 (("ted", ted), ("piped", piped), ("pieces", pieces), ("shadowed", shadowed))}
            ms = {name: value["total"] * 1e3 for name, value in t.items()}
            lines.append(f"| {gpus} | tp{tp}·ep{ep} | {ms['ted']:.0f} | {forward}/{backward} | {ms['piped']:.0f} | "
                         f"{ms['pieces']:.0f} | {t['piped']['grad_allreduce'] * 1e3:.0f} → "
                         f"{t['pieces']['grad_allreduce'] * 1e3:.0f} | "
                         + (f"{ms['shadowed']:.0f}" if shadowed.shadowed_experts else "not chosen")
                         + f" | {ms['shadowed'] / ms['ted']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--json", help="write the measurements and predictions here")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if 1 not in args.ranks:
        raise SystemExit(f"--ranks={args.ranks}: 1 must be among them (the overhead is calibrated on one rank)")
    runs = launch(sorted(args.ranks))
    alpha, beta, overhead, rows = calibrate(runs)
    print("## Calibration on this machine\n")
    print(calibration_table(alpha, beta, overhead, runs, rows))
    print("\n## Extrapolation\n")
    print(extrapolation_tables())
    if args.json:
        Path(args.json).write_text(json.dumps({"alpha": alpha, "beta": beta, "overhead_flops": overhead,
                                               "runs": runs, "predictions": rows}, indent=1))


if __name__ == "__main__":
    main()
