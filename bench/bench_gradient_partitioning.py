"""FSMoE's gradient partitioning: the exposed gradient all-reduce time, with and without.

    python bench/bench_gradient_partitioning.py                      # launches mpirun -n 4 itself (ep = 4)
    python bench/bench_gradient_partitioning.py --ranks 2 --steps 2 --n-layer 1 --d-model 32   # tiny
    mpirun -n 4 python bench/bench_gradient_partitioning.py --worker out.json

The language model of fastmoe_edu.model (default here: 4 blocks, d_model 256, 8 SwiGLU experts of 512
hidden units, top-2, 16 sequences of 64 tokens per step, float32), expert-parallel over all ranks
(tp 1, dp 1: only the replicated parameters are all-reduced). In one launch, the settings take turns
step by step (so drift on a shared machine hits them alike):

    off          gradient_partitioning = false: the all-reduce after the backward, blocking (today's path)
    cost model   gradient_partitioning = true, the piece size the cost model chooses at start-up
    N kB         gradient_partitioning = true, pieces of at most N kB (--piece-kb)

Per setting, rank 0 prints the median over the timed steps of: the backward, ``reduce_gradients``
(the exposed all-reduce: the time the optimizer waits for it) and the whole step, each the slowest
rank's; ratios are setting ÷ off. Beside the exposed time, the cost model's prediction of it from the
a, b (one piece's all-reduce, t = a + b·B) and W (an expert backward's idle window) that the "cost model"
setting measured at start-up: max(t_last, Σ t_i − (L − 1)·W) for L MoE layers; "off": a + b·(all bytes).
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


def worker(output: str, args) -> None:
    from fastmoe_edu.config import parse_args
    from fastmoe_edu.distributed import launch_world_size
    from fastmoe_edu.distributed.engines import resolve_engine
    from fastmoe_edu.train import parallel_runtime
    from fastmoe_edu.model import build_model
    from fastmoe_edu.train import build_dataset, configure_optimizer, get_batch

    P = launch_world_size()
    cfg = parse_args(["--progress=false", f"--n_layer={args.n_layer}", f"--d_model={args.d_model}",
                      f"--n_head={args.n_head}", f"--d_hidden={2 * args.d_model}", f"--num_experts={2 * P}",
                      f"--batch_size={args.sequences_per_rank * P}", f"--seq_len={args.seq_len}", "--top_k=2",
                      "--num_threads=1"])
    torch.set_num_threads(1)
    dataset = build_dataset(cfg)
    settings = [("off", False, None), ("cost model", True, None)] + [(f"{kb:g} kB", True, kb * 1e3)
                                                                     for kb in args.piece_kb]
    runs = []
    for name, on, piece_bytes in settings:
        cfg.gradient_partitioning = on
        rt = parallel_runtime(cfg, resolve_engine("auto"))          # (one rank's error ends the job)
        rt.gradient_piece_bytes = piece_bytes
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, dataset.vocab_size)
        rt.shard_model(model)
        runs.append({"name": name, "rt": rt, "model": model, "optimizer": configure_optimizer(model, cfg),
                     "pieces": len(rt.gradient_pieces.pieces) if on else 1, "times": []})
    replicated_bytes = sum(p.numel() * p.element_size() for p in runs[0]["model"].parameters()) - sum(
        p.numel() * p.element_size() for m in runs[0]["model"].moe_layers() for p in m.experts.parameters())
    for step in range(args.warmup + args.steps):
        batch = get_batch(dataset, cfg, "train", step)
        for run in runs:                                      # the settings take turns, step by step
            rt, model = run["rt"], run["model"]
            x, y, _ = rt.shard_batch(batch)
            run["optimizer"].zero_grad(set_to_none=True)
            rt.barrier()
            start = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            backward_done = time.perf_counter()
            rt.reduce_gradients(model)
            reduced = time.perf_counter()
            run["optimizer"].step()
            if step >= args.warmup:
                run["times"].append([backward_done - start, reduced - backward_done, time.perf_counter() - start])
    # The cost model's prediction of the exposed all-reduce, from the a, b, W the "cost model" setting measured:
    # piece i costs t_i = a + b·B_i; the L − 1 expert-backward windows after the first pieces hide up to
    # (L − 1)·W of them, the last piece (the embeddings') is always exposed; "off" is one all-reduce after it all.
    costs = runs[1]["rt"].gradient_pieces.costs
    moe_layers = len(runs[0]["model"].moe_layers())
    for run in runs:
        pieces = ([sum(p.numel() * p.element_size() for p in piece) for piece in run["rt"].gradient_pieces.pieces]
                  if run["rt"].gradient_pieces else [replicated_bytes])
        seconds = [costs["a"] + costs["b"] * size for size in pieces]
        run["predicted_ms"] = 1e3 * (seconds[0] if len(seconds) == 1 else
                                     max(seconds[-1], sum(seconds) - (moe_layers - 1) * costs["window"]))
    results = []
    for run in runs:                                          # the slowest rank's time of each step
        worst = run["rt"].layout.world.allreduce_(torch.tensor(run["times"], dtype=torch.float64), op="max")
        columns = list(zip(*worst.tolist()))
        results.append({"name": run["name"], "pieces": run["pieces"], "predicted_ms": run["predicted_ms"],
                        "describe": run["rt"].gradient_pieces.describe() if run["rt"].gradient_pieces else "",
                        **{key: 1e3 * statistics.median(column)
                           for key, column in zip(("forward_backward_ms", "exposed_ms", "step_ms"), columns)}})
    if runs[0]["rt"].is_main:
        Path(output).write_text(json.dumps({"results": results, "replicated_bytes": replicated_bytes, "ranks": P,
                                            "engine": runs[0]["rt"].layout.world.engine}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--engine", choices=("mpi", "torch"), default="mpi")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sequences-per-rank", type=int, default=4)
    parser.add_argument("--piece-kb", type=float, nargs="*", default=[64.0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", metavar="OUTPUT_JSON", help="(internal) run as one rank of a launched job")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    from fastmoe_edu.distributed import mpirun_command, torchrun_command
    launch = mpirun_command if args.engine == "mpi" else torchrun_command
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "gradient_partitioning.json"
        forwarded = ["--n-layer", str(args.n_layer), "--d-model", str(args.d_model), "--n-head", str(args.n_head),
                     "--seq-len", str(args.seq_len), "--sequences-per-rank", str(args.sequences_per_rank),
                     "--steps", str(args.steps), "--warmup", str(args.warmup),
                     "--piece-kb", *map(str, args.piece_kb)]
        subprocess.run(launch(args.ranks, [__file__, "--worker", str(output), *forwarded]), check=True, timeout=1800)
        report = json.loads(output.read_text())
    results = report["results"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, engine "
          f"{report['engine']}, {report['ranks']} ranks (ep = {report['ranks']}), {time.strftime('%Y-%m-%d')}")
    print(f"model: {args.n_layer} blocks, d_model {args.d_model}, {args.seq_len * args.sequences_per_rank} tokens "
          f"per rank; replicated gradients {report['replicated_bytes'] / 1e3:,.1f} kB; median of {args.steps} steps")
    for r in results:
        if r["describe"]:
            print(f"  {r['name']}: {r['describe']}")
    off = results[0]
    print("| setting | pieces | forward + backward (ms) | exposed all-reduce: reduce_gradients (ms) "
          "| predicted exposed (ms) | step (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = ("" if r is off else
                 f" ({r['exposed_ms'] / off['exposed_ms']:.2f}×)" if off["exposed_ms"] > 0 else "")
        step_ratio = "" if r is off else f" ({r['step_ms'] / off['step_ms']:.2f}×)"
        print(f"| {r['name']} | {r['pieces']} | {r['forward_backward_ms']:.1f} | {r['exposed_ms']:.2f}{ratio} "
              f"| {r['predicted_ms']:.2f} | {r['step_ms']:.1f}{step_ratio} |")


if __name__ == "__main__":
    main()
