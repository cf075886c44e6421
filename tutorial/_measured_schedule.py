"""Notebook 06, section 6: a real pipelined MoE layer, measured, beside the schedule the notebook predicts.

``profile_a_run`` trains a few steps under ``mpirun`` with ``--profile_steps`` and returns the merged trace
(fastmoe_edu/observe.py); ``forward_pass`` finds one MoE layer's pipelined forward pass on one rank in it;
``task_seconds`` reduces that pass to the per-chunk task times the notebook's list scheduler takes.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from fastmoe_edu.distributed import mpirun_command
from fastmoe_edu.observe import MERGED_TRACE, named_ranges

#: the parts of one chunk of a pipelined pass, in the order the loop runs them (pipeline.py)
PARTS = ("send", "receive", "experts", "send back", "receive back")


def profile_a_run(ranks: int, degree: int, steps: int = 3) -> dict:
    """Train the default model ``steps`` steps on ``ranks`` MPI ranks with ``pipeline_degree=degree``,
    profiling the last step; returns the merged trace (a track per rank)."""
    with tempfile.TemporaryDirectory() as out:
        args = ["-m", "fastmoe_edu.train", f"--out_dir={out}", f"--max_steps={steps}", f"--profile_steps={steps}:{steps}",
                f"--pipeline_degree={degree}", "--eval_interval=0", "--eval_iters=1", "--sample_tokens=0",
                "--tensorboard=false", "--progress=false"]
        done = subprocess.run(mpirun_command(ranks, args), capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"mpirun -n {ranks} failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(out) / MERGED_TRACE).read_text())


def forward_pass(trace: dict, rank: int, degree: int) -> list[tuple[str, float, float]]:
    """The first pipelined forward pass of an MoE layer on ``rank``: its chunks' ranges, as (name, start ms,
    end ms), from chunk 0's send to the last chunk's receive back."""
    ranges = [(name, start, end) for r, name, start, end in named_ranges(trace)
              if r == rank and name.startswith("pipeline/forward chunk ")]
    first = next(i for i, (name, _, _) in enumerate(ranges) if name == "pipeline/forward chunk 0 send")
    last = f"pipeline/forward chunk {degree - 1} receive back"
    end = next(i for i in range(first, len(ranges)) if ranges[i][0] == last)
    return ranges[first:end + 1]


def task_seconds(ranges: list[tuple[str, float, float]]) -> dict[str, float]:
    """Mean seconds per chunk: ``exchange`` (one way: a send and its receive, the way there and back
    averaged) and ``experts``."""
    total = {part: 0.0 for part in PARTS}
    for name, start, end in ranges:
        total[name.split(" ", 3)[3]] += (end - start) / 1e3
    chunks = sum(1 for name, _, _ in ranges if name.endswith(" experts"))
    exchange = (total["send"] + total["receive"] + total["send back"] + total["receive back"]) / 2
    return {"exchange": exchange / chunks, "experts": total["experts"] / chunks}
