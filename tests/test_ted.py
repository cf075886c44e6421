"""TED 3D parallelism, duplicate token dropping, overlapped and hierarchical all-to-alls, cost model.

The MPI checks run in *one* ``mpirun -n 8`` of tests/mpi_scripts/check_ted.py (about a minute on
2 cores): every factorization of 8 ranks into (tp, ep, dp), each with and without duplicate token
dropping when tp > 1, plus pipelined (degree 2, 3) and hierarchical (2 and 4 ranks per node)
variants. Each case compares the logits, the global loss and every gradient with one process
running the whole global batch.

Tolerance 1e-12 (float64, values of order 1e-3 .. 1). The parallel model does the same arithmetic
as one process except for how sums are split: the row-parallel all-reduce adds tp partial products
instead of one dot product, gradient all-reduces add per-shard sums, pipelined chunks add D partial
expert-weight gradients. Each reassociation moves a float64 result by a few ulp (observed ≤ 7e-16);
1e-12 leaves three orders of magnitude for that and is nine below a real mistake (a wrong slice, a
lost token, a doubled tp gradient all show up at ≥ 1e-4).
"""
import json
import subprocess
from functools import cache
from pathlib import Path

import pytest
import torch

from fastmoe_edu.distributed import mpirun_command
from fastmoe_edu.distributed.cost_model import (Hardware, Layout, MoEShape, fit_alpha_beta,
                                                predict_step, choose_pipeline_degree)
from fastmoe_edu.distributed.hierarchical import check_ranks_per_node, count_flat_messages
from fastmoe_edu.distributed.pipeline import check_pipeline_degree, chunk_rows
from fastmoe_edu.distributed.ted import _counts_in_share
from fastmoe_edu.distributed.tensor_parallel import row_shares

SCRIPT = Path(__file__).resolve().parent / "mpi_scripts" / "check_ted.py"
TOLERANCE = 1e-12
FACTORIZATIONS = [(1, 8, 1), (2, 4, 1), (4, 2, 1), (8, 1, 1), (1, 4, 2), (2, 2, 2), (1, 2, 4), (1, 1, 8),
                  (4, 1, 2), (2, 1, 4)]


# ----------------------------------------------------------------------------------------------------
# One process: the pieces
# ----------------------------------------------------------------------------------------------------
def test_row_shares_cover_the_rows_evenly():
    assert row_shares(10, 4) == [3, 3, 2, 2]
    assert row_shares(3, 4) == [1, 1, 1, 0]
    assert sum(row_shares(101, 8)) == 101


def test_counts_in_share_add_up_to_the_counts():
    counts = torch.tensor([3, 0, 5, 2, 7])
    shares = row_shares(int(counts.sum()), 3)
    parts = [_counts_in_share(counts, shares, r) for r in range(3)]
    assert torch.equal(sum(parts), counts)
    assert [int(p.sum()) for p in parts] == shares


@pytest.mark.parametrize("degree", [1, 2, 3, 5])
def test_chunks_partition_each_expert_segment(degree):
    counts = torch.tensor([4, 0, 7, 1])
    indices, chunk_counts = chunk_rows(counts, degree)
    assert torch.equal(chunk_counts.sum(0), counts)
    assert torch.equal(torch.sort(torch.cat(indices)).values, torch.arange(int(counts.sum())))
    starts = torch.cumsum(counts, 0) - counts
    for idx, cc in zip(indices, chunk_counts):               # each chunk is itself expert-sorted
        expert_of_row = torch.searchsorted(starts + counts, idx, right=True)
        assert torch.equal(torch.bincount(expert_of_row, minlength=4), cc)


def test_bad_options_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"ranks_per_node=3 .* allowed: 1, 2, 4, 8"):
        check_ranks_per_node(3, 8)
    with pytest.raises(ValueError, match=r"pipeline_degree=0 must be an integer >= 1"):
        check_pipeline_degree(0)


def test_flat_message_count():
    # 8 ranks, 2 per node: rank 3 sends to 7 peers, 1 on its node and 6 on others.
    assert count_flat_messages([1] * 8, 3, 2) == {"intra_node": 1, "inter_node": 6}


def test_cost_model_fit_recovers_alpha_beta():
    points = [{"ranks": p, "bytes_per_rank": b, "seconds": 2e-5 * (p - 1) + 1e-9 * b}
              for p in (2, 4, 8) for b in (1e3, 1e5, 1e7)]
    alpha, beta = fit_alpha_beta(points)
    assert alpha == pytest.approx(2e-5, rel=1e-6) and beta == pytest.approx(1e-9, rel=1e-6)


def test_cost_model_predictions_move_the_right_way():
    shape = MoEShape(tokens_per_rank=4096, d_model=1024, d_hidden=4096, num_experts=64, top_k=2, n_layer=12)
    hw = Hardware(alpha_intra=5e-6, beta_intra=1 / 200e9, alpha_inter=2e-5, beta_inter=1 / 12.5e9,
                  flops_per_second=100e12, ranks_per_node=8)
    # 16 expert ranks on 4 nodes: dropping halves the bytes (tp=2) but not the per-message latency.
    flat = predict_step(shape, Layout(tp=2, ep=16, dp=1), hw)
    dropped = predict_step(shape, Layout(tp=2, ep=16, dp=1, drop_duplicate_tokens=True), hw)
    assert flat["alltoall"] / 2 < dropped["alltoall"] < 0.7 * flat["alltoall"]
    assert dropped["compute"] < flat["compute"]                     # each tp rank also computes 1/tp of the rows
    # 512 expert ranks: latency-bound; the hierarchical exchange sends 4 + 127 messages instead of 511.
    flat = predict_step(shape, Layout(tp=2, ep=512, dp=1), hw)
    hier = predict_step(shape, Layout(tp=2, ep=512, dp=1, hierarchical=True), hw)
    assert hier["alltoall"] < flat["alltoall"] / 2
    assert choose_pipeline_degree(shape, Layout(tp=2, ep=16, dp=1), hw) > 1


# ----------------------------------------------------------------------------------------------------
# mpirun -n 8: everything against one process
# ----------------------------------------------------------------------------------------------------
@cache
def mpi_results(tmp: str = "/tmp") -> dict:
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "ted.json"
        subprocess.run(mpirun_command(8, [str(SCRIPT), str(output)]), check=True, timeout=480,
                       capture_output=True, text=True)
        return json.loads(output.read_text())["results"]


def _names():
    names = []
    for tp, ep, dp in FACTORIZATIONS:
        names.append(f"tp{tp}_ep{ep}_dp{dp}")
        if tp > 1:
            names.append(f"tp{tp}_ep{ep}_dp{dp}_drop")
    return names + ["tp1_ep8_dp1_pipe3", "tp2_ep2_dp2_drop_pipe2", "tp1_ep4_dp2_pipe2_alltoallv",
                    "tp1_ep8_dp1_hier2", "tp1_ep8_dp1_hier4", "tp2_ep4_dp1_drop_hier2", "tp1_ep4_dp2_hier2",
                    "tp1_ep8_dp1_alltoallv", "tp2_ep4_dp1_drop_alltoallv"]


@pytest.mark.parametrize("case", _names())
def test_ted_layout_equals_one_process(case):
    errors = mpi_results()[case]["errors"]
    assert errors["logits"] < TOLERANCE, errors
    assert errors["loss"] < TOLERANCE, errors
    assert errors["grad"] < TOLERANCE, errors


@pytest.mark.parametrize("tp,ep,dp", [f for f in FACTORIZATIONS if f[0] > 1 and f[1] > 1])
def test_duplicate_token_dropping_cuts_alltoall_bytes_by_tp(tp, ep, dp):
    results = mpi_results()
    without = results[f"tp{tp}_ep{ep}_dp{dp}"]["totals"]["exchange_bytes"]
    with_dropping = results[f"tp{tp}_ep{ep}_dp{dp}_drop"]["totals"]["exchange_bytes"]
    assert without > 0
    # Exact: the tp shares partition the rows, and all tp ranks of a group share one expert-rank index.
    assert with_dropping * tp == without


def test_pipelined_exchange_moves_the_same_bytes():
    results = mpi_results()
    assert results["tp1_ep8_dp1_pipe3"]["totals"]["exchange_bytes"] == results["tp1_ep8_dp1"]["totals"]["exchange_bytes"]
    assert (results["tp2_ep2_dp2_drop_pipe2"]["totals"]["exchange_bytes"]
            == results["tp2_ep2_dp2_drop"]["totals"]["exchange_bytes"])


@pytest.mark.parametrize("case", ["tp1_ep8_dp1_hier2", "tp1_ep8_dp1_hier4", "tp1_ep4_dp2_hier2"])
def test_hierarchical_exchange_sends_fewer_inter_node_messages(case):
    totals = mpi_results()[case]["totals"]
    assert 0 < totals["hier_inter_node_messages"] < totals["flat_inter_node_messages"]
