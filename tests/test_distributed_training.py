"""``python -m fastmoe_edu.train`` under ``mpirun``: the command line, bad launches, exact resumption.

(That P ranks compute the same model as one process is checked in test_distributed.py.)
"""
import json
import subprocess
import time
from pathlib import Path

import pytest

from fastmoe_edu.distributed import mpirun_command

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
    assert out.count("MPI: world=2 = tp 1 × ep 2 × dp 1") == 1          # rank 0 alone prints
    assert out.count("[system]") == 1                                    # the resolved config, once
    assert "2 of 4 experts per rank per MoE layer, 2 of 4 sequences per rank per step" in out
    assert "token exchange 'pairwise'" in out and "host memory" in out
    assert out.count("done: step 3") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt.pt", "config.toml", "experts-rank00000.pt", "experts-rank00001.pt", "history.json"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [record["step"] for record in history["train"]] == [1, 2, 3]
    assert sum(history["train"][0]["tokens_per_expert"][0]) == 4 * 16 * 2   # whole global batch, k = 2


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
        assert {"ckpt.pt", "experts-rank00000.pt", "experts-rank00001.pt"} <= set(runs["checkpoint_files"])
