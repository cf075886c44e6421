"""FSMoE's "auto" pipeline degrees: what the cost model predicts for every (D_f, D_b) vs what is measured.

    python bench/bench_schedule.py                        # launches mpirun -n 4 itself (ep = 4)
    python bench/bench_schedule.py --ranks 2 --tokens 4096 --degrees 1 2 4 8
    python bench/bench_schedule.py --ranks-per-node 2     # the hierarchical exchange, each chunk through it
    mpirun -n 4 python bench/bench_schedule.py --worker out.json

One MoE layer (d_model 256, 8 SwiGLU experts of 512 hidden units, top-2), expert-parallel over all
ranks, forward + backward. First the layer runs with ``pipeline_degree = backward_pipeline_degree =
"auto"``: its first passes are timed (autotune.py), the cost model's per-chunk tasks α + β·n are fitted,
and (D_f, D_b) chosen. Then, with the *same fitted tasks*, the model's prediction for every pair of
degrees in ``--degrees`` is put beside the median measured time of the layer run with those degrees
fixed (the same weights and tokens). The table marks the pair the cost model chose, the pair "auto" runs
after checking that choice with one timed pass (autotune.py: a pipelined choice slower than the
unpipelined passes goes back to 1/1), and the fastest measured one; "regret" is how much slower auto's
final pair was than the fastest measured pair.

The prediction and the measurement cover the same thing: the layer's exchange + experts, forward and
backward (the router and the local dispatch/combine, which no degree changes, are in the measurement
only, so the two columns differ by that constant — the error column shows it; what matters for the
choice is whether the *order* of the pairs agrees).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

D_MODEL, D_HIDDEN, EXPERTS = 256, 512, 8


def worker(output: str, tokens: int, degrees: list[int], repeats: int, ranks_per_node: int | None) -> None:
    from fastmoe_edu import MoELayer
    from fastmoe_edu.distributed import ParallelLayout, abort_on_exception, open_world, parallelize
    from fastmoe_edu.distributed.cost_model import predict_layer

    world = open_world("auto")
    abort_on_exception(world.engine)
    torch.set_num_threads(1)
    x = torch.randn(tokens, D_MODEL, generator=torch.Generator().manual_seed(world.rank))

    def build(forward, backward):
        torch.manual_seed(0)
        layer = MoELayer(D_MODEL, D_HIDDEN, EXPERTS, top_k=2)
        layout = ParallelLayout(world, tp=1, ep=world.size, dp=1)
        parallelize(layer, layout, pipeline_degree=forward, backward_pipeline_degree=backward,
                    ranks_per_node=ranks_per_node)
        return layer

    def timed(layer, passes):
        seconds = []
        for _ in range(passes):
            world.barrier()
            start = time.perf_counter()
            layer(x).square().mean().backward()
            seconds.append(time.perf_counter() - start)
        # the slowest rank's time is the step's
        return world.allreduce_(torch.tensor([statistics.median(seconds)], dtype=torch.float64), op="max").item()

    tuned = build("auto", "auto")
    timed(tuned, 8)                          # 4 profiling passes, 2 checking a pipelined choice, the judged ones
    runner = tuned.expert_runner
    chosen, tasks = runner.chosen_degrees, runner.tuner.tuning["tasks"]
    model_choice = runner.tuner.tuning["model_choice"]
    rows = []
    pairs = [(forward, backward) for forward in degrees for backward in degrees]
    for forward, backward in pairs + ([tuple(model_choice)] if tuple(model_choice) not in pairs else []):
        measured = timed(build(forward, backward), repeats + 1)
        rows.append({"forward": forward, "backward": backward, "measured_s": measured,
                     "predicted_s": predict_layer(tasks, forward, backward)["total"]})
    if world.rank == 0:
        Path(output).write_text(json.dumps({
            "ranks": world.size, "tokens_per_rank": tokens, "ranks_per_node": ranks_per_node, "chosen": chosen,
            "model_choice": model_choice,
            "tasks": {k: getattr(tasks, k) for k in ("exchange_alpha", "exchange_seconds", "compute_alpha",
                                                     "compute_seconds", "inter_alpha", "inter_seconds")},
            "rows": rows, "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "torch": torch.__version__}))


def launch(ranks: int, tokens: int, degrees: list[int], repeats: int, ranks_per_node: int | None) -> dict:
    from fastmoe_edu.distributed import mpirun_command
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "schedule.json"
        args = [__file__, "--worker", str(output), "--tokens", str(tokens), "--repeats", str(repeats),
                "--degrees", *map(str, degrees)]
        if ranks_per_node:
            args += ["--ranks-per-node", str(ranks_per_node)]
        subprocess.run(mpirun_command(ranks, args), check=True, timeout=1200)
        return json.loads(output.read_text())


def report(data: dict) -> str:
    rows = data["rows"]
    chosen, model_choice = tuple(data["chosen"]), tuple(data["model_choice"])
    fastest = min(rows, key=lambda r: r["measured_s"])
    chosen_row = next(r for r in rows if (r["forward"], r["backward"]) == chosen)
    model_row = next(r for r in rows if (r["forward"], r["backward"]) == model_choice)
    t = data["tasks"]
    ms = 1e3
    lines = [f"{data['ranks']} ranks ({data['machine']}, torch {data['torch']}), {data['tokens_per_rank']} tokens per "
             f"rank, exchange " + (f"hierarchical, {data['ranks_per_node']} ranks per node" if data["ranks_per_node"]
                                   else "flat"),
             f"fitted tasks: exchange{' (intra-node)' if t['inter_alpha'] or t['inter_seconds'] else ''} "
             f"α {t['exchange_alpha'] * ms:.3f} ms + {t['exchange_seconds'] * ms:.3f} ms, "
             + (f"inter-node α {t['inter_alpha'] * ms:.3f} ms + {t['inter_seconds'] * ms:.3f} ms, "
                if t["inter_alpha"] or t["inter_seconds"] else "") +
             f"experts α {t['compute_alpha'] * ms:.3f} ms + {t['compute_seconds'] * ms:.3f} ms (forward)", "",
             "| D_f | D_b | predicted (ms) | measured (ms) | measured − predicted | |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        marks = []
        if (r["forward"], r["backward"]) == model_choice:
            marks.append("the cost model's choice")
        if (r["forward"], r["backward"]) == chosen:
            marks.append("auto's choice after its check")
        if r is fastest:
            marks.append("fastest measured")
        lines.append(f"| {r['forward']} | {r['backward']} | {r['predicted_s'] * ms:.2f} | {r['measured_s'] * ms:.2f} "
                     f"| {(r['measured_s'] - r['predicted_s']) * ms:+.2f} | {', '.join(marks)} |")
    lines += ["", f"the cost model chose D_f = {model_choice[0]}, D_b = {model_choice[1]} (measured "
              f"{model_row['measured_s'] * ms:.2f} ms); after one timed pass auto runs {chosen[0]}/{chosen[1]}: measured "
              f"{chosen_row['measured_s'] * ms:.2f} ms; fastest measured ({fastest['forward']}, {fastest['backward']}) "
              f"{fastest['measured_s'] * ms:.2f} ms; regret {chosen_row['measured_s'] / fastest['measured_s'] - 1:+.1%}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per pair (median; one more warms up)")
    parser.add_argument("--ranks-per-node", type=int, default=None)
    parser.add_argument("--worker", metavar="OUTPUT_JSON", help="(internal) run as one rank of a launched job")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tokens, args.degrees, args.repeats, args.ranks_per_node)
        return
    print(report(launch(args.ranks, args.tokens, args.degrees, args.repeats, args.ranks_per_node)))


if __name__ == "__main__":
    main()
