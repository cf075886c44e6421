"""``python -m fastmoe_edu.train`` under ``mpirun`` and ``torchrun``: the command line, both engines giving
the same losses, bad launches, exact resumption, and TED layouts (tp × ep × dp, duplicate token dropping,
overlap, hierarchical) through the whole loop.

(That P ranks compute the same layer / model as one process is checked in test_distributed.py and,
for every TED factorization of 8 ranks, in test_ted.py.)
"""
import json
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

import pytest

from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed import mpirun_command
from fastmoe_edu.train import train
from launcher import launch

SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
TINY = ["--batch_size=4", "--seq_len=16", "--n_layer=1", "--d_model=16", "--n_head=2", "--d_hidden=32",
        "--num_experts=4", "--max_steps=3", "--eval_interval=0", "--eval_iters=1", "--sample_tokens=4"]

pytestmark = pytest.mark.mpi


def run_mpi(num_ranks: int, args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(mpirun_command(num_ranks, args), capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def test_train_command_under_mpirun(tmp_path):
    done, _ = run_mpi(2, ["-m", "fastmoe_edu.train", f"--out_dir={tmp_path}", *TINY], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("parallel: mpi engine, world=2 = tp 1 × ep 2 × dp 1") == 1   # rank 0 alone prints
    assert out.count("[system]") == 1                                    # the resolved config, once
    assert "2 of 4 experts per rank per MoE layer, 2 of 4 sequences per rank per step" in out
    assert "token exchange alltoallv" in out and "host memory" in out
    assert out.count("done: step 3") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json", "config.toml", "history.json", "run.lock", "step-00000003", "tensorboard"]
    assert sorted(p.name for p in (tmp_path / "step-00000003").iterdir()) == [
        "ckpt.pt", "experts-rank00000.pt", "experts-rank00001.pt", "fastmoe_edu-checkpoint"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [record["step"] for record in history["train"]] == [1, 2, 3]
    assert sum(history["train"][0]["tokens_per_expert"][0]) == 4 * 16 * 2   # whole global batch, k = 2


# Tolerance between the engines (float32, 8 AdamW steps, 4 ranks): the same arithmetic on every rank,
# only the all-reduces add the ranks' partial sums in a different order (MPICH's and gloo's
# algorithms), a few float32 ulp per reduction. Measured 2026-11-29 on the default run at 4 ranks:
# at most 5.9e-8 relative over the first 8 steps, 3.6e-7 over 100; from step ~119 on, such ulp-level
# differences flip a near-tie routing decision and the two runs follow different (equally valid)
# trajectories, as two backends do (docs/benchmarks.md). 1e-5 over 8 steps is far below a real fault
# (a missing all-reduce or a wrong scale changes the loss by > 1e-2 from step 2 on).
ENGINE_LOSS_RTOL = 1e-5


@pytest.mark.slow
def test_torchrun_and_mpirun_train_the_same_losses(tmp_path):
    """The README's two launch commands, 4 ranks each: the same per-step losses."""
    losses = {}
    for engine in ("mpi", "torch"):
        out = tmp_path / engine
        args = ["-m", "fastmoe_edu.train", f"--out_dir={out}", *TINY, "--max_steps=8", "--batch_size=8",
                "--num_experts=8", "--pipeline_degree=2"]
        done = launch(engine, 4, args, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert done.stdout.count(f"parallel: {engine} engine, world=4 = tp 1 × ep 4 × dp 1") == 1
        history = json.loads((out / "history.json").read_text())
        losses[engine] = [record["loss"] for record in history["train"]]
    assert len(losses["mpi"]) == 8
    assert losses["torch"] == pytest.approx(losses["mpi"], rel=ENGINE_LOSS_RTOL)


@pytest.mark.parametrize("argv, message", [
    (["--batch_size=3"], "batch_size=3 (the global batch) is not divisible by the data-parallel size 2"),
    (["--num_experts=3"], "num_experts=3 is not divisible by the expert-parallel size 2"),
])
def test_bad_launch_fails_fast_on_every_rank(tmp_path, argv, message):
    done, seconds = run_mpi(2, ["-m", "fastmoe_edu.train", f"--out_dir={tmp_path}", *TINY, *argv], timeout=60)
    assert done.returncode == 2
    assert done.stderr.count(message) == 1                                # one clear line, from rank 0
    assert "Traceback" not in done.stderr
    assert seconds < 60


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    result = tmp_path / "result.json"
    done, _ = run_mpi(2, [str(SCRIPTS / "check_resume.py"), str(tmp_path / "runs"), str(result)], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for case, runs in json.loads(result.read_text()).items():
        assert len(runs["whole"]) == 6
        assert runs["resumed"] == runs["whole"], case                   # bitwise: same losses, every step
        assert runs["resumed_val"] == runs["whole_val"], case
        assert {"checkpoint.json", "step-00000003/ckpt.pt", "step-00000003/experts-rank00000.pt",
                "step-00000003/experts-rank00001.pt"} <= set(runs["checkpoint_files"])


# --------------------------------------------------------------------------------------------------
# TED (tensor × expert × data), overlapped and hierarchical exchanges, through the training loop
# --------------------------------------------------------------------------------------------------
# Tolerance of TED training vs one process (float32, 6 AdamW steps): the parallel run adds the same
# products in a different order (tp all-reduces of partial attention / MLP outputs, sums over shards),
# a few float32 ulp (~1e-7 relative) per reduction. Adam rescales each gradient by 1/sqrt(v), so an
# ulp-level difference in a weight's gradient moves that weight by at most ~lr·1e-6 relative per step;
# over 6 steps the losses (≈ 4.1) stay within ~1e-5 (measured 2026-11-23: at most 1.2e-7 relative over
# the four cases, validation loss identical). 1e-4 relative is far below what a real mistake does (a
# missing all-reduce or a wrong 1/tp scale changes the loss from step 2 on by > 1e-2).
TED_LOSS_RTOL = 1e-4


@cache
def ted_training_launch(tmp: str = "/tmp") -> tuple[dict, str]:
    """check_ted_training.py under mpirun -n 8: (its results, its stdout)."""
    with tempfile.TemporaryDirectory(dir=tmp) as work:
        result = Path(work) / "result.json"
        done, _ = run_mpi(8, [str(SCRIPTS / "check_ted_training.py"), work, str(result)], timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads(result.read_text()), done.stdout


def ted_training_results() -> dict:
    return ted_training_launch()[0]


@cache
def single_process_losses() -> tuple[list[float], float]:
    sys.path.insert(0, str(SCRIPTS))
    from check_ted_training import TINY
    with tempfile.TemporaryDirectory() as work:
        run = train(parse_args([*TINY, f"--out_dir={work}"]))
    return run["train_loss"], run["final_val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["tp2_ep2_dp2_drop", "tp4_ep2_dp1_drop", "tp2_ep4_pipeline2",
                                  "tp1_ep8_hierarchical4"])
def test_ted_training_equals_one_process(case):
    results = ted_training_results()[case]
    losses, val = single_process_losses()
    assert len(results["whole"]) == len(losses) == 6
    assert results["whole"] == pytest.approx(losses, rel=TED_LOSS_RTOL), case
    assert results["whole_val"] == pytest.approx(val, rel=TED_LOSS_RTOL), case
    assert results["whole"][-1] < results["whole"][0]


@pytest.mark.slow
def test_ted_resume_continues_exactly():
    runs = ted_training_results()["tp2_ep2_dp2_drop"]
    assert runs["resumed"] == runs["whole"]                              # bitwise
    assert runs["resumed_val"] == runs["whole_val"]
    assert ({f"step-00000003/experts-rank{r:05d}.pt" for r in range(8)} | {"step-00000003/ckpt.pt", "checkpoint.json"}
            <= set(runs["checkpoint_files"]))


@pytest.mark.slow
def test_ted_options_train_and_print_the_layout():
    """The issue's options (--tp=2 --ep=2 --dp=2 --drop_duplicate_tokens=true, tiny sizes) on 8 ranks: it trains,
    and rank 0 alone prints the layout. Read from the 8-rank TED training launch, whose tp2_ep2_dp2_drop run
    prints: the same parse_args and train as ``python -m fastmoe_edu.train`` (that command line under mpirun:
    test_train_command_under_mpirun, and with --tp=2 --ep=2 on 4 ranks: the mixed-precision tests below)."""
    _, out = ted_training_launch()
    assert out.count("parallel: mpi engine, world=8 = tp 2 × ep 2 × dp 2") == 1
    assert "drop_duplicate_tokens True" in out and out.count("done: step 6") == 1


def test_ted_bad_layouts_fail_fast(tmp_path):
    bad, seconds = run_mpi(2, ["-m", "fastmoe_edu.train", f"--out_dir={tmp_path}", *TINY, "--tp=2", "--ep=2"],
                           timeout=60)
    assert bad.returncode == 2 and seconds < 60
    assert bad.stderr.count("tp × ep × dp = 2 × 2 × 1 = 4, but the world size is 2") == 1, bad.stderr


def test_layout_sizes_fill_in_ep_and_name_the_fix():
    """The launch arithmetic (no MPI): ep defaults to the ranks tp and dp leave; a mismatch says what to change."""
    from fastmoe_edu.distributed.layout import layout_sizes
    assert layout_sizes(parse_args(["--tp=2", "--dp=2"]), 8) == (2, 2, 2)
    assert layout_sizes(parse_args([]), 8) == (1, 8, 1)
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp × dp = 2 × 2; launch a multiple of 4"):
        layout_sizes(parse_args(["--tp=2", "--dp=2"]), 6)
    with pytest.raises(ValueError, match=r"tp × ep × dp = 2 × 2 × 1 = 4, but the world size is 8; launch 4 ranks"):
        layout_sizes(parse_args(["--tp=2", "--ep=2"]), 8)


# Mixed precision under TED (tp 2 × ep 2, duplicate token dropping): the same low-precision arithmetic
# as one process except where the tp group splits a matrix product and adds its partial sums (in float32,
# tensor_parallel._sum_over) instead of one bfloat16/float16 product rounding its whole sum. Measured
# 2026-11-30 over 8 steps: at most 2.6e-4 relative (bfloat16, whose rounding unit is 3.9e-3) and 1e-5
# (float16, 4.9e-4). A missing all-reduce or a wrong loss scale moves the loss by > 1e-2 within two steps.
MIXED_PRECISION_RTOL = 2e-3
SMALL = ["--batch_size=8", "--seq_len=16", "--n_layer=2", "--d_model=32", "--n_head=2", "--d_hidden=64",
         "--num_experts=4", "--max_steps=8", "--eval_interval=0", "--eval_iters=1", "--sample_tokens=0",
         "--progress=false"]


@pytest.mark.parametrize("dtype,master_weights", [("bfloat16", "model"), ("float16", "model"),
                                                   ("bfloat16", "optimizer")])
def test_mixed_precision_ted_training_equals_one_process(tmp_path, dtype, master_weights):
    precision = [f"--dtype={dtype}", f"--master_weights={master_weights}"]
    one = subprocess.run([sys.executable, "-m", "fastmoe_edu.train", *SMALL, *precision,
                          f"--out_dir={tmp_path / 'one'}"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout + one.stderr
    done, _ = run_mpi(4, ["-m", "fastmoe_edu.train", *SMALL, *precision, "--tp=2", "--ep=2",
                          "--drop_duplicate_tokens=true", f"--out_dir={tmp_path / 'four'}"], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    single, parallel = ([r["loss"] for r in json.loads((tmp_path / run / "history.json").read_text())["train"]]
                        for run in ("one", "four"))
    assert len(single) == len(parallel) == 8
    for step, (a, b) in enumerate(zip(single, parallel), start=1):
        assert abs(a - b) <= MIXED_PRECISION_RTOL * abs(a), (step, a, b)
