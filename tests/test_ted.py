"""TED 3D parallelism, duplicate token dropping, overlapped and hierarchical all-to-alls, cost model.

The parallel checks run in *one* job of tests/mpi_scripts/check_ted.py per engine and world size
(MPI: 2, 4, 8 ranks; torch.distributed: 2, 4; 10-20 s each on 2 cores): every factorization of the
world into (tp, ep, dp), each with and without duplicate token dropping when tp > 1, plus pipelined
(degree 2, 3; backward degrees 3 and 1 beside forward degrees 2 and 3), hierarchical (2 and 4 ranks per node) and pairwise-exchange variants. Each case compares the logits, the global loss and every gradient with one process
running the whole global batch.

Tolerance 1e-12 (float64, values of order 1e-3 .. 1). The parallel model does the same arithmetic
as one process except for how sums are split: the row-parallel all-reduce adds tp partial products
instead of one dot product, gradient all-reduces add per-shard sums, pipelined chunks add D partial
expert-weight gradients. Each reassociation moves a float64 result by a few ulp (observed ≤ 7e-16);
1e-12 leaves three orders of magnitude for that and is nine below a real mistake (a wrong slice, a
lost token, a doubled tp gradient all show up at ≥ 1e-4).
"""
import json
import tempfile
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch

from fastmoe_edu.distributed.cost_model import (Hardware, LayerTasks, Layout, MoEShape, choose_pipeline_degree,
                                                choose_pipeline_degrees, choose_shadowing, choose_step_degrees,
                                                fit_alpha_beta, fit_task, predict_layer, predict_step)
from fastmoe_edu.distributed.hierarchical import check_ranks_per_node, count_flat_messages
from fastmoe_edu.distributed.shadowing import ShadowRates, choose_shadowed, predicted_time
from fastmoe_edu.distributed.pipeline import Chunking, check_pipeline_degree, chunk_rows, cut_pieces
from fastmoe_edu.distributed.expert_parallel import _counts_in_share
from fastmoe_edu.distributed.tensor_parallel import row_shares
from launcher import ENGINE_RANKS, launch

SCRIPT = Path(__file__).resolve().parent / "mpi_scripts" / "check_ted.py"
TOLERANCE = 1e-12


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


def test_pieces_split_forward_chunks_along_the_backward_chunks():
    # The docstring's example: one segment of 12 rows, D_f = 2, D_b = 3 -> pieces (0,0) (0,1) (1,1) (1,2).
    counts = torch.tensor([[12]])
    pieces = cut_pieces(counts, Chunking.of(counts, 2, 1), Chunking.of(counts, 3, 1))
    assert [(p.forward_chunk, p.backward_chunk, int(p.counts.sum())) for p in pieces] == [
        (0, 0, 4), (0, 1, 2), (1, 1, 2), (1, 2, 4)]
    # Any counts [P, L]: the pieces of forward chunk c cover it exactly once, those of backward chunk b too,
    # and each piece names the same received rows in both chunks.
    counts = torch.tensor([[3, 0, 5], [1, 7, 2]])
    for D_f, D_b in [(2, 3), (3, 1), (4, 4), (1, 5)]:
        forward, backward = Chunking.of(counts, D_f, 2), Chunking.of(counts, D_b, 2)
        pieces = cut_pieces(counts, forward, backward)
        for c, rows in enumerate(forward.indices):
            places = torch.cat([p.in_forward for p in pieces if p.forward_chunk == c])
            assert torch.equal(torch.sort(places).values, torch.arange(len(rows)))
        for b, rows in enumerate(backward.indices):
            places = torch.cat([p.in_backward for p in pieces if p.backward_chunk == b] or [torch.zeros(0, dtype=torch.int64)])
            assert torch.equal(torch.sort(places).values, torch.arange(len(rows)))
        for p in pieces:
            assert torch.equal(forward.indices[p.forward_chunk][p.in_forward], backward.indices[p.backward_chunk][p.in_backward])
            assert int(p.counts.sum()) == len(p.in_forward)


def test_bad_options_name_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"ranks_per_node=3 .* allowed: 1, 2, 4, 8"):
        check_ranks_per_node(3, 8)
    with pytest.raises(ValueError, match=r"pipeline_degree=0 must be an integer >= 1 or 'auto'"):
        check_pipeline_degree(0)
    with pytest.raises(ValueError, match=r"backward_pipeline_degree='fast' must be an integer >= 1 or 'auto'"):
        check_pipeline_degree("fast", "backward_pipeline_degree")
    assert check_pipeline_degree("auto") == "auto"


def test_cost_model_chooses_forward_and_backward_degrees_separately():
    # Every task α + β·n per chunk (FSMoE). Exchange and experts alike: forward 2 chunks, backward
    # (twice the compute per row) 4; a large per-chunk cost: no pipelining. Always powers of 2.
    tasks = LayerTasks(exchange_alpha=1e-4, exchange_seconds=1e-3, compute_alpha=1e-4, compute_seconds=1e-3)
    assert choose_pipeline_degrees(tasks) == (2, 4)
    times = {D: predict_layer(tasks, D, D) for D in (1, 2, 4, 8, 16)}
    assert min(times, key=lambda D: times[D]["forward"]) == 2 and min(times, key=lambda D: times[D]["backward"]) == 4
    assert choose_pipeline_degrees(LayerTasks(1e-3, 1e-3, 1e-3, 1e-3)) == (1, 1)
    assert choose_pipeline_degrees(LayerTasks(0.0, 1.0, 0.0, 1.0), max_degree=8) == (8, 8)
    # Unpipelined, a pass is scatter + experts + gather; the backward computes twice as much.
    assert predict_layer(tasks, 1, 1) == pytest.approx({"forward": 2 * 1.1e-3 + 1.1e-3,
                                                        "backward": 2 * 1.1e-3 + 2.1e-3, "total": 7.6e-3})
    assert fit_task([(n, 3e-5 + 2e-7 * n) for n in (10, 1000, 5000)]) == pytest.approx((3e-5, 2e-7), rel=1e-6)
    # A hierarchical exchange measured level by level: two lanes. Unpipelined the same as one task of
    # their sum; pipelined, faster (the levels of different chunks overlap), so it chunks at least as much.
    two = LayerTasks(exchange_alpha=1e-4, exchange_seconds=5e-4, compute_alpha=1e-4, compute_seconds=1e-3,
                     inter_alpha=1e-4, inter_seconds=5e-4)
    one = LayerTasks(exchange_alpha=2e-4, exchange_seconds=1e-3, compute_alpha=1e-4, compute_seconds=1e-3)
    assert predict_layer(two, 1, 1) == pytest.approx(predict_layer(one, 1, 1))
    assert predict_layer(two, 4, 4)["total"] < predict_layer(one, 4, 4)["total"]
    assert all(a >= b for a, b in zip(choose_pipeline_degrees(two), choose_pipeline_degrees(one)))


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
    # Separate backward degree: only the backward's exchange part changes.
    both2 = predict_step(shape, Layout(tp=2, ep=16, dp=1, pipeline_degree=2), hw)
    split = predict_step(shape, Layout(tp=2, ep=16, dp=1, pipeline_degree=2, backward_pipeline_degree=4), hw)
    assert split["compute"] == both2["compute"] and split["alltoall"] != both2["alltoall"]
    # TED's options: the combined output gathers k times fewer bytes than the expert rows; tensor-parallel
    # experts trade expert-gradient traffic (no sum over tp) for activation traffic inside the tp group;
    # checkpointing costs one more forward and no communication.
    at_rows = predict_step(shape, Layout(tp=2, ep=16, dp=2, drop_duplicate_tokens=True, drop_duplicate_at="expert_rows"), hw)
    at_combined = predict_step(shape, Layout(tp=2, ep=16, dp=2, drop_duplicate_tokens=True), hw)
    assert at_rows["tp_allgather"] / 2 < at_combined["tp_allgather"] < 0.6 * at_rows["tp_allgather"]   # (+ latency)
    etp = predict_step(shape, Layout(tp=2, ep=16, dp=2, drop_duplicate_tokens=True, expert_tensor_parallel=True), hw)
    assert etp["grad_allreduce"] < at_combined["grad_allreduce"] and etp["tp_allreduce"] > at_combined["tp_allreduce"]
    recomputed = predict_step(shape, Layout(tp=2, ep=16, dp=2, drop_duplicate_tokens=True, activation_checkpointing=True), hw)
    assert recomputed["compute"] == pytest.approx(at_combined["compute"] * 4 / 3)
    assert recomputed["alltoall"] == at_combined["alltoall"] and recomputed["tp_allgather"] == at_combined["tp_allgather"]



def test_cost_model_prices_gradient_pieces_shadowing_and_separate_degrees():
    shape = MoEShape(tokens_per_rank=8192, d_model=2048, d_hidden=5632, num_experts=128, top_k=2, n_layer=24,
                     load_imbalance=1.2)
    hw = Hardware(alpha_intra=5e-6, beta_intra=1 / 150e9, alpha_inter=15e-6, beta_inter=1 / 25e9,
                  flops_per_second=120e12, ranks_per_node=8)
    ted = Layout(tp=1, ep=64, dp=1, hierarchical=True)
    plain = predict_step(shape, ted, hw)
    # Gradient pieces hide in the backward's idle link: less exposed all-reduce, nothing else changes.
    pieces = predict_step(shape, replace(ted, gradient_partitioning=True), hw)
    assert pieces["grad_allreduce"] < plain["grad_allreduce"] / 2
    assert all(pieces[k] == plain[k] for k in ("compute", "alltoall", "tp_allreduce", "shadowing"))
    # ... but not where a piece's latency dwarfs the windows (a ring over 2048 ranks): then blocks are gathered
    # into few pieces, and the prediction stays close to one all-reduce (within one more piece's latency).
    big = replace(shape, num_experts=4096)
    wide = Layout(tp=1, ep=2048, dp=1, hierarchical=True)
    one, cut = (predict_step(big, replace(wide, gradient_partitioning=g), hw)["grad_allreduce"] for g in (False, True))
    assert cut < one + 2 * 2 * 2047 * hw.alpha_inter
    # Shadowing the hot expert: the busiest rank's rows fall to the mean (compute and exchange down by the
    # imbalance), and each layer pays a broadcast and an all-reduce of one expert's weights.
    shadowed = predict_step(shape, replace(ted, shadowed_experts=1), hw)
    assert shadowed["alltoall"] < plain["alltoall"] and shadowed["compute"] < plain["compute"]
    assert plain["shadowing"] == 0 < shadowed["shadowing"]
    assert choose_shadowing(shape, ted, hw) == int(shadowed["total"] < plain["total"])
    # Separate degrees: powers of 2, each no worse than the other's choice for its pass.
    forward, backward = choose_step_degrees(shape, ted, hw)
    assert {forward, backward} <= {1, 2, 4, 8, 16}
    chosen = predict_step(shape, replace(ted, pipeline_degree=forward, backward_pipeline_degree=backward), hw)
    for degree in (1, 2, 4, 8, 16):
        assert chosen["total"] <= predict_step(shape, replace(ted, pipeline_degree=degree), hw)["total"] + 1e-12


# ----------------------------------------------------------------------------------------------------
# mpirun / torchrun: everything against one process
# ----------------------------------------------------------------------------------------------------
@cache
def parallel_results(engine: str, num_ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "ted.json"
        done = launch(engine, num_ranks, [str(SCRIPT), str(output)], timeout=480)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = json.loads(output.read_text())
    assert (report["engine"], report["world_size"]) == (engine, num_ranks)
    return report["results"]


@pytest.mark.mpi
@pytest.mark.parametrize("engine,num_ranks", ENGINE_RANKS)
def test_ted_layouts_equal_one_process(engine, num_ranks):
    results = parallel_results(engine, num_ranks)
    # Every factorization of the world appears, with and without dropping when tp > 1.
    factorizations = {(r["tp"], r["ep"], r["dp"]) for r in results.values()}
    assert {(tp, ep, dp) for tp in (1, 2, 4, 8) for ep in (1, 2, 4, 8) for dp in (1, 2, 4, 8)
            if tp * ep * dp == num_ranks} <= factorizations
    assert any("pipe" in name for name in results) and any("hier" in name for name in results)
    for case, result in results.items():
        for quantity, error in result["errors"].items():
            assert error < TOLERANCE, f"{engine}/{num_ranks} {case}: {quantity} differs by {error:.3e}"


@pytest.mark.mpi
@pytest.mark.parametrize("engine,num_ranks", ENGINE_RANKS)
def test_duplicate_token_dropping_cuts_alltoall_bytes_by_tp(engine, num_ranks):
    results = parallel_results(engine, num_ranks)
    pairs = [(name, name + "_drop") for name, r in results.items() if r["tp"] > 1 and r["ep"] > 1
             and name + "_drop" in results]
    assert pairs or num_ranks < 4
    for without_name, with_name in pairs:
        without = results[without_name]["totals"]["exchange_bytes"]
        with_dropping = results[with_name]["totals"]["exchange_bytes"]
        assert without > 0
        # Exact: the tp shares partition the rows, and all tp ranks of a group share one expert-rank index.
        assert with_dropping * results[without_name]["tp"] == without, without_name


@pytest.mark.mpi
@pytest.mark.parametrize("engine,num_ranks", [(e, n) for e, n in ENGINE_RANKS if n >= 2])
def test_dropping_on_the_combined_output_gathers_k_times_fewer_bytes(engine, num_ranks):
    results = parallel_results(engine, num_ranks)
    pairs = [(name, name + "rows") for name in results if name.endswith("_drop") and name + "rows" in results]
    assert pairs
    for combined, rows in pairs:
        # The same all-to-all bytes (each tp rank exchanges the rows of its 1/tp share either way) ...
        assert results[combined]["totals"]["exchange_bytes"] == results[rows]["totals"]["exchange_bytes"], combined
        # ... and the tp all-gather moves the combined [T, d] instead of the expert rows [k·T, d]:
        # exactly k = 2 times fewer bytes (dropless router, so every token has k rows).
        gathered = results[combined]["totals"]["tp_allgather_forward_bytes"]
        assert gathered > 0 and 2 * gathered == results[rows]["totals"]["tp_allgather_forward_bytes"], combined


@pytest.mark.mpi
@pytest.mark.parametrize("engine,num_ranks", [(e, n) for e, n in ENGINE_RANKS if n >= 2])
def test_tensor_parallel_experts_hold_one_tp_th_of_the_expert_weights(engine, num_ranks):
    results = parallel_results(engine, num_ranks)
    cases = [name for name in results if name.endswith("_etp")]
    assert cases                                    # (their numbers are checked by test_ted_layouts_equal_one_process)
    for name in cases:
        whole = name[:-len("_etp")]
        tp = results[name]["tp"]
        assert (results[name]["totals"]["max_expert_elements_per_rank"] * tp
                == results[whole]["totals"]["max_expert_elements_per_rank"]), name
        # with dropping: the same all-to-all bytes as dropping alone (the shards join inside the tensor group)
        assert (results[name + "_drop"]["totals"]["exchange_bytes"]
                == results[whole + "_drop"]["totals"]["exchange_bytes"]), name


def test_shadowing_policy_follows_the_latency_model():
    """FasterMoE's greedy choice: a popular expert is shadowed, an even load shadows nothing, and
    weights that cost more to move than the rows they keep home are not moved."""
    rates = ShadowRates(seconds_per_byte=1e-9, seconds_per_flop=1e-10)
    popular = torch.tensor([[400] + [50] * 7] * 4)                 # 4 ranks, 8 experts (2 each), expert 0 hot
    even = torch.full((4, 8), 100)
    args = dict(num_local=2, row_bytes=1024, weights=10_000, weight_bytes=40_000, rates=rates, max_shadowed=2)
    assert choose_shadowed(popular, mode="auto", cost_ratio=1.0, **args) == [0]
    assert choose_shadowed(even, mode="auto", cost_ratio=1.0, **args) == []
    assert choose_shadowed(popular, mode="auto", cost_ratio=1e6, **args) == []           # moving weights: too dear
    assert choose_shadowed(even, mode=2, cost_ratio=1.0, **args) == [0, 1]                # N: the N most loaded
    before = predicted_time(popular, [], 2, 1024, 10_000, 40_000, rates, 1.0)
    assert predicted_time(popular, [0], 2, 1024, 10_000, 40_000, rates, 1.0) < before


@pytest.mark.mpi
@pytest.mark.parametrize("engine,num_ranks", ENGINE_RANKS)
def test_shadowing_ran_and_moved_fewer_token_bytes(engine, num_ranks):
    results = parallel_results(engine, num_ranks)
    P = num_ranks
    shadow, plain = results[f"tp1_ep{P}_dp1_shadow"], results[f"tp1_ep{P}_dp1"]
    # Every MoE layer shadowed at least one expert (its numbers are checked with the other cases) ...
    assert shadow["totals"]["min_shadowed_experts"] >= 1
    # ... and the shadowed experts' rows stayed home: fewer bytes through the token all-to-all.
    assert shadow["totals"]["exchange_bytes"] < plain["totals"]["exchange_bytes"]
    # The same with the pipelined exchange carrying the rows that still travel (chunks were posted).
    piped = results[f"tp1_ep{P}_dp1_pipe2_bwd3_shadow"]["totals"]
    assert piped["min_shadowed_experts"] >= 1 and piped["max_ialltoallv_calls"] > 0
    assert piped["exchange_bytes"] < plain["totals"]["exchange_bytes"]


@pytest.mark.mpi
@pytest.mark.parametrize("engine,num_ranks", ENGINE_RANKS)
def test_pipelined_exchange_moves_the_same_bytes(engine, num_ranks):
    results = parallel_results(engine, num_ranks)
    P = num_ranks
    # The backward posts its own D_b chunks: 2 MoE layers × (scatter + gather) × (D_f + D_b) non-blocking exchanges.
    assert results[f"tp1_ep{P}_dp1_pipe2_bwd3"]["totals"]["max_ialltoallv_calls"] == 2 * 2 * (2 + 3)
    assert results[f"tp1_ep{P}_dp1_pipe3"]["totals"]["max_ialltoallv_calls"] == 2 * 2 * (3 + 3)
    assert results[f"tp1_ep{P}_dp1_pipe3"]["totals"]["exchange_bytes"] == results[f"tp1_ep{P}_dp1"]["totals"]["exchange_bytes"]
    if P >= 8:
        assert (results["tp2_ep2_dp2_drop_pipe2"]["totals"]["exchange_bytes"]
                == results["tp2_ep2_dp2_drop"]["totals"]["exchange_bytes"])


@pytest.mark.mpi
@pytest.mark.parametrize("engine,num_ranks", [(e, n) for e, n in ENGINE_RANKS if n >= 4])
def test_hierarchical_exchange_sends_fewer_inter_node_messages(engine, num_ranks):
    results = parallel_results(engine, num_ranks)
    # Two ranks per node and at least two nodes: the flat exchange sends inter-node messages to compare.
    cases = [name for name, r in results.items() if name.endswith("_hier2") and "drop" not in name and r["ep"] > 2]
    assert cases
    for case in cases:
        totals = results[case]["totals"]
        assert 0 < totals["hier_inter_node_messages"] < totals["flat_inter_node_messages"], case
