"""What observing a run costs: step time with TensorBoard logging off vs on (default interval), side by side.

    python bench/bench_observe.py                  # the default model, 10 + 200 timed steps each
    python bench/bench_observe.py --steps 100

Two copies of the default model (same seed, same batches) train in one process, step by step in
turn, the order swapped every step, so the machine's load falls on both alike: one with
``tensorboard = false``, one with ``tensorboard = true`` at the default ``tensorboard_interval``. Each
step is timed from its start to the end of ``observer.end_step`` (the logging included). Printed: the
mean and median step time of each, on ÷ off (target: ≤ 1.02), and the time spent in ``end_step`` alone (the
logging's own cost, which the noise of a busy machine cannot hide).

"Off" runs what the loop runs with nothing to observe: a few comparisons per step and the named ranges
(profiling.py), which only ask whether a profiler records. Their cost is printed too: the ranges one
step opens (counted in a profiled step) × the measured cost of one idle range, as a share of the step.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import date

import torch

from fastmoe_edu.config import parse_args
from fastmoe_edu.observe import Observer
from fastmoe_edu.profiling import named_range
from fastmoe_edu.runtime import Runtime
from fastmoe_edu.train import build_dataset, configure_optimizer, get_batch, train_step
from fastmoe_edu.model import build_model


class Run:
    """One copy of the default training run: its model, optimizer and observer."""

    def __init__(self, out_dir: str, tensorboard: bool, steps: int):
        self.cfg = parse_args([f"--out_dir={out_dir}", f"--tensorboard={str(tensorboard).lower()}",
                               "--progress=false", f"--max_steps={steps}"])
        self.rt, self.dataset = Runtime(), build_dataset(self.cfg)
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(self.cfg, self.dataset.vocab_size)
        self.optimizer = configure_optimizer(self.model, self.cfg)
        self.observer = Observer(self.cfg, self.rt, start_step=0)
        self.seconds: list[float] = []                             # whole steps
        self.logging: list[float] = []                             # observer.end_step alone

    def step(self, step: int) -> None:
        start = time.perf_counter()
        self.observer.begin_step(step)
        batch = get_batch(self.dataset, self.cfg, "train", step)
        record = train_step(self.model, self.optimizer, batch, self.cfg, step, self.rt)
        record["tokens_per_sec"] = self.cfg.batch_size * self.cfg.seq_len / (time.perf_counter() - start)
        logged = time.perf_counter()
        self.observer.end_step(record)
        self.logging.append(time.perf_counter() - logged)
        self.seconds.append(time.perf_counter() - start)


def ranges_per_step(run: Run, step: int) -> int:
    """How many named ranges one training step opens (a profiled step, counted)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        train_step(run.model, run.optimizer, get_batch(run.dataset, run.cfg, "train", step), run.cfg, step, run.rt)
    return sum(1 for event in profiler.events() if event.name.startswith(("moe/", "ep/", "pipeline/", "gradients/",
                                                                        "recompute/")))


def idle_range_seconds(repeats: int = 200_000) -> float:
    """One named_range entered and left while no profiler records, minus an empty loop's turn."""
    start = time.perf_counter()
    for _ in range(repeats):
        with named_range("moe/route"):
            pass
    ranged = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        pass
    return max(ranged - (time.perf_counter() - start), 0.0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps of each run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each run first")
    args = parser.parse_args()
    torch.set_num_threads(1)                                        # the default config's num_threads
    with tempfile.TemporaryDirectory() as tmp:
        total = args.warmup + args.steps
        off, on = Run(f"{tmp}/off", False, total), Run(f"{tmp}/on", True, total + 1)
        for step in range(total):
            for run in ((off, on) if step % 2 else (on, off)):
                run.step(step)
        on.observer.close()
        ranges = ranges_per_step(off, total)
    idle = idle_range_seconds()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread, "
          f"torch {torch.__version__}, {date.today()}; default model, {args.steps} timed steps each, "
          f"tensorboard_interval {on.cfg.tensorboard_interval}")
    means = {}
    for name, run in (("off", off), ("on", on)):
        timed = run.seconds[args.warmup:]
        means[name] = statistics.fmean(timed)
        print(f"logging {name:>3}: mean {means[name] * 1e3:7.2f} ms/step, median {statistics.median(timed) * 1e3:7.2f} ms")
    print(f"on ÷ off = {means['on'] / means['off']:.4f} (target <= 1.02)")
    logging = statistics.fmean(on.logging[args.warmup:])
    print(f"observer.end_step alone, logging on: {logging * 1e3:.3f} ms per step on average, "
          f"{logging / means['off']:.3%} of a step")
    print(f"named ranges with no profiler: {ranges} per step × {idle * 1e6:.3f} µs = "
          f"{ranges * idle * 1e6:.1f} µs, {ranges * idle / means['off']:.4%} of a step")


if __name__ == "__main__":
    main()
