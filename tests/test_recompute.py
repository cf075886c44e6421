"""Activation checkpointing (model.py) and its communication-aware recomputation (distributed/recompute.py).

One process: checkpointed training gives bitwise the same losses. Under mpirun / torchrun with 4 ranks
(tests/mpi_scripts/check_recompute.py): tp × ep with duplicate token dropping, pipelined expert
parallelism and ep × dp with capacity give bitwise the same parameters and losses with checkpointing
on and off, and every communicator counts the same collectives and bytes, while a naive
recomputation (no replay) sends more.
"""
import json
from pathlib import Path

import pytest
import torch

from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed.recompute import CollectiveStash, stash_contexts
from fastmoe_edu.train import train
from launcher import launch

SCRIPT = Path(__file__).resolve().parent / "mpi_scripts" / "check_recompute.py"


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_checkpointed_training_is_bitwise_the_same(tmp_path, backend):
    def losses(checkpointing: bool):
        cfg = parse_args(["--progress=false", "--sample_tokens=0", "--max_steps=4", "--eval_interval=0",
                          "--eval_iters=1", "--batch_size=8", "--seq_len=32", f"--backend={backend}",
                          f"--activation_checkpointing={str(checkpointing).lower()}",
                          f"--out_dir={tmp_path / str(checkpointing)}"])
        return train(cfg)["train_loss"]
    assert losses(True) == losses(False)


def test_stash_replays_in_order_and_refuses_a_different_collective():
    record, replay = stash_contexts()
    stash: CollectiveStash = record.stash
    with record:
        stash.record("expert/alltoallv", torch.ones(2))
        stash.record("data/allreduce_", torch.zeros(1))
    for _ in range(2):                                   # a block may be recomputed twice: both replay
        with replay:
            assert torch.equal(stash.replay("expert/alltoallv"), torch.ones(2))
            assert torch.equal(stash.replay("data/allreduce_"), torch.zeros(1))
    with replay, pytest.raises(RuntimeError, match="called data/allreduce_ where the forward pass called expert/alltoallv"):
        stash.replay("data/allreduce_")
    with replay, pytest.raises(RuntimeError, match="which the forward pass of this block did not"):
        stash.replay("expert/alltoallv"), stash.replay("data/allreduce_"), stash.replay("expert/alltoallv")


@pytest.mark.mpi
@pytest.mark.parametrize("engine", ["mpi", "torch"])
def test_recomputation_replays_every_collective(tmp_path, engine):
    output = tmp_path / "results.json"
    done = launch(engine, 4, [str(SCRIPT), str(output)], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(output.read_text())
    assert set(results) == {"tp2_ep2_drop", "ep4_pipelined", "ep2_dp2_capacity"}
    for case, r in results.items():
        assert r["max_param_difference"] == 0.0 and r["max_loss_difference"] == 0.0, (case, r)
        assert not r["counters_differ_on_some_rank"], (case, r)
        assert r["calls_on"] == r["calls_off"] and r["bytes_on"] == r["bytes_off"] > 0, (case, r)
        assert r["alltoall_calls"] > 0 and r["calls_naive"] > r["calls_on"], (case, r)
