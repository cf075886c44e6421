"""Expert parallelism: pieces in one process, and whole layers under ``mpirun`` and ``torchrun`` (launched from here).

The parallel checks run *one* job per engine and world size (MPI: 2, 4, 8 ranks; torch: 2, 4) executing every
combination inside tests/mpi_scripts/run_checks.py (layer checks: check_expert_parallel.py; three training steps
of the whole model: check_training_steps.py), which writes the worst error of every quantity to a
JSON file that the tests below read. The launch is cached, so each (engine, world size) costs one
launch whatever the number of test cases.

Tolerance: everything runs in float64. The distributed layer does the same arithmetic on the same
rows in the same order as one process (after the regroup each expert's rows are in global token
order) except for how sums are split: the gate gradient is Σ over ranks of partial sums, the
balance-loss fractions are computed from all-reduced counts. Those reassociations change results
by a few ulp (~1e-17 .. 1e-16 on values of order 0.01 .. 1). 1e-10 is far above that and far
below any real mistake (a lost row, a wrong scale or a wrong expert is off by > 1e-3).

For the whole model after three AdamW steps the bound is 1e-9: Adam divides by sqrt(v) + eps, so a
gradient difference Δg can move a weight by up to lr·Δg/eps = 1e-2·Δg/1e-8 = 1e6·Δg per step (for
weights whose gradient is near zero); with Δg ~ 1e-17 that is ~1e-11 per step (measured: < 1e-12).
"""
import json
import sys
import time
from functools import cache
from pathlib import Path

import pytest
import torch

from fastmoe_edu import MoELayer
from fastmoe_edu.checkpoint import load_checkpoint, save_checkpoint
from fastmoe_edu.distributed import (ParallelLayout, allreduce_gradients, clip_grad_norm_, keep_local_experts,
                                     mpirun_command, parallelize)
from fastmoe_edu.distributed.exchange import Permute, regroup_by_expert, regroup_by_source
from fastmoe_edu.distributed.gradients import _buckets
from fastmoe_edu.distributed.mpi_engine import mpi_world
from fastmoe_edu.distributed.runtime import ParallelRuntime
from launcher import ENGINE_RANKS, launch

SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
TOLERANCE = 1e-10
MODEL_TOLERANCE = 1e-9
LAUNCH_TIMEOUT_S = 300


# ----------------------------------------------------------------------------------------------------
# One process: the pieces
# ----------------------------------------------------------------------------------------------------
def _reorder_blocks(rows: torch.Tensor, block_counts: torch.Tensor) -> torch.Tensor:
    """The readable regroup, the oracle: cut the rows into blocks (i, j) laid out i-major, paste them j-major."""
    outer, inner = block_counts.shape
    blocks = torch.split(rows, block_counts.reshape(-1).tolist(), dim=0)
    return torch.cat([blocks[i * inner + j] for j in range(inner) for i in range(outer)] or [rows[:0]])


@pytest.mark.parametrize("sources,experts", [(1, 1), (3, 2), (4, 1), (2, 5)])
def test_regroup_matches_the_block_oracle_and_inverts(sources, experts):
    counts = torch.randint(0, 4, (sources, experts))
    counts[0, 0] = 0                                           # an empty block
    rows = torch.randn(int(counts.sum()), 3, requires_grad=True)
    by_blocks = _reorder_blocks(rows, counts)
    by_index = regroup_by_expert(rows, counts)
    assert torch.equal(by_blocks, by_index)
    # Expert-major means: all rows of local expert 0 (from every source, in source order) first.
    blocks = torch.split(rows.detach(), counts.reshape(-1).tolist())
    expected = torch.cat([blocks[s * experts + e] for e in range(experts) for s in range(sources)])
    assert torch.equal(by_index.detach(), expected)
    assert torch.equal(regroup_by_source(regroup_by_expert(rows, counts), counts), rows)
    # Backward of a permutation is the inverse permutation.
    upstream = torch.randn_like(by_index)
    (grad_blocks,) = torch.autograd.grad(by_blocks, rows, upstream)
    (grad_index,) = torch.autograd.grad(by_index, rows, upstream)
    assert torch.equal(grad_blocks, grad_index)


def test_permute_gradcheck():
    rows = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda r: Permute.apply(r, torch.tensor([3, 0, 4, 1, 2])), (rows,))


@pytest.mark.parametrize("method", ["pairwise", "alltoallv"])
def test_single_rank_exchange_is_a_copy(method):
    comm = mpi_world().split(color=0, key=0, name="solo")
    rows = torch.randn(7, 3)
    assert torch.equal(comm.alltoallv(rows, [7], [7], method), rows)
    assert torch.equal(comm.alltoall(torch.arange(4)), torch.arange(4))
    assert comm.stats.counters[f"solo/{method}"].bytes_sent == 0      # nothing left this rank


def test_layout_checks_raise_clear_errors():
    layout = ParallelLayout()                                   # world size 1 without mpirun
    assert (layout.tp_size, layout.ep_size, layout.dp_size, layout.data_size) == (1, 1, 1, 1)
    assert layout.check_num_experts(6) == 6
    with pytest.raises(ValueError, match=r"tp × ep × dp = 1 × 2 × 1 = 2, but the world size is 1"):
        ParallelLayout(ep=2)


def test_keep_local_experts_takes_the_slice():
    torch.manual_seed(0)
    whole = MoELayer(4, 6, num_experts=8, bias=True)
    torch.manual_seed(0)
    part = MoELayer(4, 6, num_experts=8, bias=True)
    keep_local_experts(part.experts, first=2, count=2)
    assert part.experts.num_experts == 2
    for name, param in part.experts.named_parameters():
        assert torch.equal(param, getattr(whole.experts, name)[2:4])


def test_buckets_respect_size_and_dtype():
    params = [torch.nn.Parameter(torch.zeros(n, dtype=d)) for n, d in
              [(10, torch.float32), (10, torch.float32), (100, torch.float32), (5, torch.float64), (1, torch.float64)]]
    buckets = _buckets(params, bucket_bytes=80)
    assert [[p.numel() for p in b] for b in buckets] == [[10, 10], [100], [5, 1]]


def _small_expert_parallel_model(layout, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), MoELayer(4, 6, num_experts=4, bias=True))
    return model, parallelize(model, layout)


def test_one_rank_gradient_sync_and_clip_match_torch():
    layout = ParallelLayout()
    model, plan = _small_expert_parallel_model(layout)
    twin, _ = _small_expert_parallel_model(layout)
    x = torch.randn(10, 4)
    for m in (model, twin):
        m(x).square().sum().backward()
    allreduce_gradients(model, layout, plan)           # one rank: gradients unchanged
    norm = clip_grad_norm_(model, 0.1, layout, plan)
    twin_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    torch.testing.assert_close(norm, twin_norm)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


class _OneRank(ParallelRuntime):
    """The parallel runtime of a one-rank layout (its checkpoint methods), without a launch."""

    def __init__(self, layout, plan):
        self.layout, self.rank, self.world_size, self.plan = layout, layout.rank, layout.world_size, plan


def test_sharded_checkpoint_round_trip(tmp_path):
    layout = ParallelLayout()
    model, plan = _small_expert_parallel_model(layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(10, 4)).sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path, model, optimizer, {"step": 7, "run_id": "test"}, _OneRank(layout, plan))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.json", "step-00000007"]
    assert sorted(p.name for p in (tmp_path / "step-00000007").iterdir()) == ["ckpt.pt", "experts-rank00000.pt",
                                                                              "fastmoe_edu-checkpoint"]
    expert_file = torch.load(tmp_path / "step-00000007" / "experts-rank00000.pt", weights_only=True)
    assert all(".experts." in f".{key}" for key in expert_file["model"])

    restored, restored_plan = _small_expert_parallel_model(layout, seed=1)
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=0.1)
    shared = load_checkpoint(tmp_path, restored, restored_optimizer, _OneRank(layout, restored_plan))
    assert shared["step"] == 7
    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["exp_avg"], restored_optimizer.state[q]["exp_avg"])


# ----------------------------------------------------------------------------------------------------
# Under mpirun and torchrun
# ----------------------------------------------------------------------------------------------------
@cache
def parallel_check_results(engine: str, num_ranks: int, output_dir: str) -> dict:
    output = Path(output_dir) / f"checks_{engine}_{num_ranks}.json"
    done = launch(engine, num_ranks, [str(SCRIPTS / "run_checks.py"), str(output)], LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, f"{engine} with {num_ranks} ranks failed:\n{done.stdout}\n{done.stderr}"
    report = json.loads(output.read_text())
    assert report["engine"] == engine and report["world_size"] == num_ranks
    return report


@pytest.fixture(scope="module")
def mpi_output_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mpi"))


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("engine,num_ranks", ENGINE_RANKS)
def test_expert_parallel_layer_equals_one_process(engine, num_ranks, backend, mpi_output_dir):
    report = parallel_check_results(engine, num_ranks, mpi_output_dir)
    if backend in report["skipped"]:
        pytest.skip(f"backend {backend!r} cannot be imported: {report['skipped'][backend]}")
    cases = {name: errors for name, errors in report["results"].items() if name.startswith(f"{backend}/")}
    # 4 layer configurations × (2 exchanges + their comparison + shadowing with the pipelined exchange); for
    # the reference backend again with dp = 2 from 4 ranks on (the 2 exchanges and their comparison).
    assert len(cases) == (28 if num_ranks > 2 and backend == "reference" else 16), sorted(cases)
    for name, errors in cases.items():
        if "/pairwise_vs_alltoallv" in name:
            # Same rows moved by two algorithms: bitwise equal.
            assert errors == {"output": 0.0, "input_grad": 0.0}, name
            continue
        if "/pipelined_shadowed" in name:                  # an expert was shadowed (and the rest pipelined)
            assert errors["num_shadowed_experts"] >= 1, name
        checked = {key: value for key, value in errors.items() if not key.startswith(("scale:", "num_"))}
        assert {"output", "input_grad", "aux_loss", "grad:router.weight", "grad:experts.w1"} <= checked.keys()
        for quantity, error in checked.items():
            assert error < TOLERANCE, f"{name}: {quantity} differs by {error:.3e}"


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("engine,num_ranks", ENGINE_RANKS)
def test_three_training_steps_equal_one_process(engine, num_ranks, mpi_output_dir):
    """The whole language model (fastmoe_edu.model) through train_step: P ranks == one process."""
    report = parallel_check_results(engine, num_ranks, mpi_output_dir)
    cases = {name: errors for name, errors in report["results"].items() if name.startswith("train/")}
    drop_capacity = cases.pop("train/tp2_drop_capacity_noise", None)
    every = ["train/shadow_experts", "train/shared_experts", "train/sigmoid", "train/softmax_top_k",
             "train/tp/gshard", "train/tp/noisy_top_k", "train/tp/switch_jitter"]
    assert sorted(cases) == (every if num_ranks < 8 else
                             ["train/shadow_experts", "train/softmax_top_k", "train/tp/gshard"])   # (AT_8_RANKS)
    assert (drop_capacity is not None) == (num_ranks >= 4)
    if drop_capacity is not None:     # noisy routing, dropping and capacity together: tp ranks agree exactly
        assert drop_capacity == {"tp_ranks_loss_difference": 0.0, "scale:finite_losses": 1.0}
    for name, errors in cases.items():
        assert any(key.startswith("param:") and ".experts." in key for key in errors), name
        assert errors["scale:grad_norm"] > 0.5            # the clip (0.5) was active: the global norm matters
        for quantity, error in errors.items():
            if not quantity.startswith("scale:"):
                assert error < MODEL_TOLERANCE, f"{name}: {quantity} differs by {error:.3e}"
    if num_ranks < 8:
        assert report["results"]["train/sigmoid"]["scale:bias_moved"] > 0    # the bias update ran


# gradient_partitioning = true against false at the same P ranks (float64, three AdamW steps): the same sums
# of the same values, scaled alike; only an engine that adds the ranks' values in a size-dependent order
# (gloo's ring) can differ, by ulps. Measured 2026-11-30: 0 with MPICH at 2, 4 and 8 ranks and gloo at 2,
# at most 4.9e-15 with gloo at 4 ranks.
PARTITIONING_TOLERANCE = 1e-12


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("engine,num_ranks", ENGINE_RANKS)
def test_gradient_partitioning_equals_the_all_reduce_after_the_backward(engine, num_ranks, mpi_output_dir):
    """FSMoE's pieces posted from backward hooks == one all-reduce after the backward: dropless and capacity
    routers, reference and numba, forced small pieces and the cost model's, an unused parameter,
    activation checkpointing with pipelining, two backwards before one reduce, tp = 2 at 4 ranks (8 ranks: a subset)."""
    report = parallel_check_results(engine, num_ranks, mpi_output_dir)
    cases = {name[len("gradpart/"):]: errors for name, errors in report["results"].items()
             if name.startswith("gradpart/")}
    expected = {"dropless_reference"} | ({"checkpointing_pipeline"} if num_ranks < 8 else set())
    expected |= set() if "numba" in report["skipped"] else {"capacity_numba_cost_model"}
    expected |= {"tp2_drop_capacity"} if 4 <= num_ranks < 8 else set()           # (8 ranks: AT_8_RANKS only)
    assert set(cases) == expected
    for name, errors in cases.items():
        assert any(key.startswith("param:") and ".experts." in key for key in errors), name
        assert errors["scale:posted_during_backward"] >= 1, name      # pieces left before the backward ended
        if name != "capacity_numba_cost_model":                        # forced 600-byte pieces: many
            assert errors["scale:pieces"] >= 10, name
        for quantity, error in errors.items():
            if not quantity.startswith("scale:"):
                assert error < PARTITIONING_TOLERANCE, f"{name}: {quantity} differs by {error:.3e}"
    dropless = cases["dropless_reference"]
    assert "param:blocks.0.unused" in dropless and "grad:blocks.0.unused" in dropless   # took part with zeros
    assert any(key.startswith("grad:") for key in dropless)            # two backwards, then one reduce


@pytest.mark.mpi
@pytest.mark.parametrize("engine", ["mpi", "torch"])
@pytest.mark.parametrize("mode,num_ranks,message", [
    ("raise", 3, "[rank 1/3] RuntimeError: deliberate failure on rank 1"),
    ("bad_experts", 2, "num_experts=3 is not divisible by the expert-parallel size 2"),
])
def test_a_failing_rank_aborts_the_job(engine, mode, num_ranks, message):
    start = time.monotonic()
    done = launch(engine, num_ranks, [str(SCRIPTS / "check_abort.py"), mode], timeout=60)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "not reached" not in done.stdout
    assert time.monotonic() - start < 60


def test_mpirun_is_found():
    assert Path(mpirun_command(1, [])[0]).exists()
    assert mpirun_command(2, ["x.py"])[-2:] == [sys.executable, "x.py"]
