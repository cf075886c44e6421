"""FSMoE's gradient partitioning (``gradient_partitioning = true``): the piece planner, the config key, the command.

That P ranks with the partitioned all-reduce train exactly as with the all-reduce after the backward
(both engines, 2 / 4 / 8 ranks, both backends, dropless and capacity routers, checkpointing) is checked in
tests/test_distributed.py (``test_gradient_partitioning_equals_the_all_reduce_after_the_backward``).
"""
import json
import math
import subprocess

import pytest

from fastmoe_edu.config import ConfigError, parse_args
from fastmoe_edu.distributed import mpirun_command
from fastmoe_edu.distributed.cost_model import (PIECE_LATENCY_SHARE, Hardware, allreduce_piece_cost, allreduce_time,
                                                gradient_piece_bytes, plan_gradient_pieces)
from fastmoe_edu.train import train

TINY = ["--batch_size=4", "--seq_len=16", "--n_layer=2", "--d_model=16", "--n_head=2", "--d_hidden=32",
        "--num_experts=4", "--max_steps=5", "--eval_interval=0", "--eval_iters=1", "--sample_tokens=0"]


def test_plan_cuts_consecutive_pieces_of_at_most_the_target():
    assert plan_gradient_pieces([100, 200, 50, 400, 30], 300) == [2, 1, 1, 1]     # 400 > 300: a piece alone
    assert plan_gradient_pieces([100, 200, 50, 400, 30], math.inf) == [5]
    assert plan_gradient_pieces([8] * 10, 8) == [1] * 10
    assert plan_gradient_pieces([], 100) == []


def test_plan_sends_what_is_ready_when_an_expert_backward_begins():
    sizes = [100, 100, 100, 100, 100, 100]
    assert plan_gradient_pieces(sizes, math.inf, window_starts={2, 4}) == [2, 2, 2]   # one piece per window
    assert plan_gradient_pieces(sizes, math.inf, 150, window_starts={1, 4}) == [4, 2]  # 100 < B_min: wait
    assert plan_gradient_pieces(sizes, 250, window_starts={3}) == [2, 1, 2, 1]        # and B* still caps


def test_piece_size_fits_the_idle_window_unless_latency_forbids():
    a, b = 1e-5, 1e-9                                   # 10 µs per message, 1 GB/s
    smallest, fit = gradient_piece_bytes(a, b, window_seconds=1e-3)
    assert smallest == pytest.approx(a * (1 - PIECE_LATENCY_SHARE) / (PIECE_LATENCY_SHARE * b))     # B_min
    assert a / (a + b * smallest) == pytest.approx(PIECE_LATENCY_SHARE)   # α is exactly s of such a piece
    assert fit == pytest.approx((1e-3 - a) / b)         # B* = B_fit = (W - a) / b: one piece takes W exactly
    assert a + b * fit == pytest.approx(1e-3)
    assert gradient_piece_bytes(a, b, window_seconds=2e-5) == (smallest, smallest)   # W too short: B_min
    assert gradient_piece_bytes(a, 0.0, 1e-3) == (math.inf, math.inf)   # no measurable bandwidth term: one piece


def test_piece_cost_is_the_ring_all_reduce():
    hw = Hardware(alpha_intra=2e-6, beta_intra=1e-10, alpha_inter=1e-5, beta_inter=1e-9, flops_per_second=1e12,
                  ranks_per_node=4)
    a, b = allreduce_piece_cost(8, 8, hw)               # spans two nodes: the inter-node link
    assert a == pytest.approx(2 * 7 * 1e-5) and b == pytest.approx(2 * 7 / 8 * 1e-9)
    assert a + b * 1e6 == pytest.approx(allreduce_time(1e6, 8, 8, hw))


def test_config_key_and_one_process_no_op(tmp_path):
    assert parse_args(["--gradient_partitioning=true"]).gradient_partitioning is True
    assert parse_args([]).gradient_partitioning is False
    with pytest.raises(ConfigError, match="gradient_partitioning='maybe' cannot be read as bool; allowed: true or false"):
        parse_args(["--gradient_partitioning=maybe"])
    runs = [train(parse_args([*TINY, "--max_steps=2", "--progress=false", f"--gradient_partitioning={on}",
                              f"--out_dir={tmp_path / on}"]))["train_loss"] for on in ("false", "true")]
    assert runs[0] == runs[1]                           # one process: nothing to all-reduce, the same run


@pytest.mark.mpi
def test_the_issue_command_trains_and_prints_its_choices(tmp_path):
    """The issue's command (tiny sizes, 2 ranks, one per "node"): it trains and rank 0 prints the plan."""
    args = ["-m", "fastmoe_edu.train", f"--out_dir={tmp_path}", *TINY, "--pipeline_degree=auto",
            "--backward_pipeline_degree=auto", "--ranks_per_node=1", "--gradient_partitioning=true",
            "--shadow_experts=auto"]
    done = subprocess.run(mpirun_command(2, args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.count("gradient partitioning: ") == 1 and "piece(s) [" in out and "B* = max((W - a)/b" in out
    assert out.count("auto pipeline degrees, MoE layer 0") == 1 and out.count("done: step 5") == 1
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["train"]) == 5 and all(math.isfinite(r["loss"]) for r in history["train"])
