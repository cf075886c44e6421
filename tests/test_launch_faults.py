"""Launch and start-up faults under mpirun and torchrun: each ends the job promptly with a line that says why.

Every test launches the job the way a user does (``python -m fastmoe_edu.train`` under a launcher, or a
script that injects the fault and then calls the same ``main``), and failed before the fix it guards:
an error that torchrun swallowed, a start-up that waited forever, workers that trained on after their
launcher was killed, stray launcher variables that waited or misled.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastmoe_edu.checkpoint import MANIFEST, read_manifest
from fastmoe_edu.distributed.launch import free_port
from fastmoe_edu.train import main
from launcher import command, launch

SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
ENGINES = ("mpi", "torch")


TRAIN = ["-m", "fastmoe_edu.train"]


def tiny(out_dir, *argv) -> list[str]:
    """The options of the smallest training run: one step, a checkpoint every step."""
    return ["--progress=false", "--sample_tokens=0", f"--out_dir={out_dir}",
            "--batch_size=4", "--seq_len=8", "--n_layer=1", "--d_model=16", "--n_head=2", "--d_hidden=16",
            "--num_experts=2", "--max_steps=1", "--eval_interval=0", "--eval_iters=1", "--checkpoint_interval=1",
            "--warmup_steps=1", "--num_threads=1", *argv]


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def children(parent: int) -> list[int]:
    """The running processes whose parent is ``parent`` (torchrun starts each worker in its own session)."""
    return [pid for pid, (_, ppid) in _processes().items() if ppid == parent]


def running(pids: list[int]) -> list[int]:
    """Those of ``pids`` that have not ended (zombies do not count)."""
    table = _processes()
    return [pid for pid in pids if pid in table and table[pid][0] != "Z"]


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (state, parent pid) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:                                   # ended while we looked
            continue
        table[int(stat.parent.name)] = (state, int(ppid))
    return table


@pytest.mark.mpi
@pytest.mark.parametrize("engine", ENGINES)
def test_a_rank_error_reaches_stderr(engine, tmp_path):
    """Rank 1 raises during training. Under torchrun nothing was printed: init_process_group wraps
    sys.excepthook and buffers sys.stderr while our hook runs, and the hook's os._exit lost the buffer."""
    done = launch(engine, 2, [str(SCRIPTS / "check_rank_error.py"), *tiny(tmp_path)], timeout=120)
    assert done.returncode != 0
    assert "[rank 1/2] uncaught exception, ending the job on all ranks" in done.stderr
    assert "RuntimeError: deliberate failure in rank 1's first step" in done.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("engine", ENGINES)
def test_a_rank_stalled_before_start_up_ends_the_job(engine, tmp_path):
    """Rank 1 hangs before it reaches the engine; rank 0 waited forever in MPI_Init (torch: in the rendezvous)."""
    start = time.monotonic()
    done = launch(engine, 2, [str(SCRIPTS / "check_startup_stall.py"), *tiny(tmp_path, "--collective_timeout_s=3")],
                  timeout=120)
    assert done.returncode != 0
    assert f"start-up did not complete within 3 s (collective_timeout_s): opening the {engine} engine's world" \
        in done.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / MANIFEST).exists()


@pytest.mark.mpi
def test_a_killed_torchrun_leaves_no_worker_training(tmp_path):
    """SIGKILL of torchrun alone: its workers trained on to max_steps, still writing checkpoints. Now each
    ends at once, says why, and the checkpoint on disk is the one of the moment of the kill."""
    out_dir, stderr = tmp_path / "run", tmp_path / "stderr"
    with open(stderr, "w") as err:
        job = subprocess.Popen(command("torch", 2, TRAIN + tiny(out_dir, "--max_steps=100000")),
                               stdout=subprocess.DEVNULL, stderr=err)
    workers = []
    try:
        assert wait_until(lambda: (out_dir / MANIFEST).exists() and len(children(job.pid)) == 2, 120), \
            stderr.read_text()[-3000:]
        workers = children(job.pid)
        job.kill()                                       # the launcher only
        job.wait()
        step_at_the_kill = read_manifest(out_dir)["step"]
        assert wait_until(lambda: not running(workers), 15), "the workers are still running"
        assert read_manifest(out_dir)["step"] == step_at_the_kill
        assert stderr.read_text().count(f"the launcher that started this rank (pid {job.pid}) is gone") == 2
    finally:
        job.kill()
        for pid in running(workers):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.mpi
def test_sigterm_under_torchrun_saves_and_explains_its_status(tmp_path):
    """torchrun turns a SIGTERM into status 1 and a traceback of its own even though every worker stopped
    cleanly: the checkpoint is saved, and the line that says so explains the status."""
    out_dir = tmp_path / "run"
    job = subprocess.Popen(command("torch", 2, TRAIN + tiny(out_dir, "--max_steps=100000", "--progress=true")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_until(lambda: (out_dir / MANIFEST).exists() or job.poll() is not None, 120)   # training runs
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 1, err[-3000:]
    assert "SignalException" in err
    assert "interrupted: checkpoint of step" in out and "torchrun itself exits with status 1" in out
    assert read_manifest(out_dir)["step"] >= 1


# ----------------------------------------------------------------------------------------------------
# Launcher variables left in the environment by another job
# ----------------------------------------------------------------------------------------------------
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "PMI_SIZE", "PMI_RANK",
                    "PMI_FD", "PMI_PORT", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


@pytest.mark.parametrize("environment,found,missing,use", [
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}, "WORLD_SIZE=2 MASTER_ADDR=localhost", "RANK, MASTER_PORT",
     "unset WORLD_SIZE MASTER_ADDR; to train on 2 ranks start the job with torchrun --nproc-per-node=2"),
    ({"PMI_SIZE": "4"}, "PMI_SIZE=4", "PMI_RANK, PMI_FD or PMI_PORT",
     "unset PMI_SIZE; to train on 4 ranks start the job with mpirun -n 4"),
], ids=["WORLD_SIZE", "PMI_SIZE"])
def test_stray_launcher_variables_are_named(tmp_path, monkeypatch, capsys, environment, found, missing, use):
    """Stray WORLD_SIZE + MASTER_ADDR: no torchrun started this process; stray PMI_SIZE: a misleading
    layout error ("the world size is 1") before. Now: what was found, what is missing, what to do."""
    for key in LAUNCH_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stop:
        main(tiny(tmp_path))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"config error: the environment has {found} but not {missing}: left over from another job" in err
    assert use in err


def test_a_complete_env_launch_without_torchrun_says_whom_it_waits_for(tmp_path):
    """All four torch.distributed variables, but no torchrun and no other rank: it waited 300 s silently."""
    environment = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    start = time.monotonic()
    done = subprocess.run([sys.executable, *TRAIN, *tiny(tmp_path, "--collective_timeout_s=2")],
                          env={**env, **environment}, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "not started by torchrun; joining the job the environment names (WORLD_SIZE=2 RANK=0" in done.stderr
    assert "start-up did not complete within 2 s (collective_timeout_s)" in done.stderr
    assert time.monotonic() - start < 60
