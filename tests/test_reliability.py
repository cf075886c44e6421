"""Nothing lost, nothing silent: checkpoints that cannot be mixed or corrupted unnoticed, non-finite
values that stop training, bounded waits, and clear errors for bad input — each with injected faults.

Every test here failed (or hung, or passed silently with a wrong result) before the fix it guards.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastmoe_edu.checkpoint as checkpoint
from fastmoe_edu.checkpoint import MANIFEST, read_manifest
from fastmoe_edu.config import ConfigError, parse_args
from fastmoe_edu.guards import LossWatch
from fastmoe_edu.train import train
from launcher import command, launch
from tiny_runs import run_main, tiny

SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------
# Checkpoints: committed by the manifest, verified before they are trusted
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def saved_run(tmp_path):
    """A finished 4-step run with a checkpoint per step; returns its out_dir."""
    assert run_main(tiny(tmp_path / "run"))[0] == 0
    return tmp_path / "run"


def resume(out_dir) -> tuple[int, str]:
    return run_main(tiny(out_dir, "--resume", "--max_steps=4"))


def test_only_the_last_committed_set_remains(saved_run):
    manifest = read_manifest(saved_run)
    assert manifest["step"] == 4 and manifest["folder"] == "step-00000004"
    assert sorted(p.name for p in saved_run.glob("step-*")) == ["step-00000004"]      # older sets removed
    assert sorted(manifest["files"]) == ["ckpt.pt", "experts-rank00000.pt"]


@pytest.mark.parametrize("name", ["ckpt.pt", "experts-rank00000.pt"])
def test_corrupted_file_is_refused_by_name(saved_run, name):
    path = saved_run / "step-00000004" / name
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(min(4096, len(data) - middle))     # 4 KB of noise mid-file
    path.write_bytes(bytes(data))
    status, err = resume(saved_run)
    assert status == 1 and f"{path} is corrupted" in err


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing"])
def test_truncated_empty_or_missing_file_is_refused(saved_run, damage):
    path = saved_run / "step-00000004" / "experts-rank00000.pt"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:100] if damage == "truncated" else b"")
    status, err = resume(saved_run)
    assert status == 1 and str(path) in err and ("is missing" in err if damage == "missing" else "is corrupted" in err)


def test_file_of_another_step_is_refused_even_with_a_matching_hash(saved_run, tmp_path):
    """A rank file of step 2 put into step 4's set (hash updated too): the step recorded inside disagrees."""
    assert run_main(tiny(tmp_path / "short", "--max_steps=2"))[0] == 0
    stale = tmp_path / "short" / "step-00000002" / "experts-rank00000.pt"
    target = saved_run / "step-00000004" / "experts-rank00000.pt"
    target.write_bytes(stale.read_bytes())
    manifest = json.loads((saved_run / MANIFEST).read_text())
    manifest["files"]["experts-rank00000.pt"] = checkpoint._sha256(target)
    (saved_run / MANIFEST).write_text(json.dumps(manifest))
    status, err = resume(saved_run)
    assert status == 1 and "belongs to step 2 of run" in err and "the manifest is step 4" in err


def test_foreign_file_and_broken_manifest_are_refused(saved_run):
    target = saved_run / "step-00000004" / "ckpt.pt"
    target.write_bytes(b"not a checkpoint at all")
    manifest = json.loads((saved_run / MANIFEST).read_text())
    manifest["files"]["ckpt.pt"] = checkpoint._sha256(target)
    (saved_run / MANIFEST).write_text(json.dumps(manifest))
    status, err = resume(saved_run)
    assert status == 1 and f"{target} cannot be loaded" in err
    (saved_run / MANIFEST).write_text("{ truncated")
    status, err = resume(saved_run)
    assert status == 1 and "is not a readable checkpoint manifest" in err


def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """A full disk during step 3's save: a clear error, exit 1, and step 2's set still resumes."""
    real_save, calls = torch.save, []

    def disk_full_at_step_3(state, path, *args, **kwargs):
        if isinstance(state, dict) and state.get("step") == 3:
            calls.append(path)
            raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed (basic_ios::clear)")
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_step_3)
    status, err = run_main(tiny(tmp_path))
    assert calls and status == 1
    assert "could not write" in err and "basic_ios::clear" in err and "the previous checkpoint" in err
    assert read_manifest(tmp_path)["step"] == 2
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert resume(tmp_path)[0] == 0


# ----------------------------------------------------------------------------------------------------
# Non-finite values
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["lr", "min_lr", "weight_decay", "grad_clip", "capacity_factor",
                                 "collective_timeout_s", "router_options.z_loss_weight"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_config_values_are_refused(key, value):
    with pytest.raises(ConfigError, match=r"is not a finite number|out of range"):
        parse_args([f"--{key}={value}"])


def test_lr_inf_is_refused_before_any_work(tmp_path):
    status, err = run_main(tiny(tmp_path, "--lr=inf"))
    assert status == 2 and "lr=inf is not a finite number" in err
    assert not (tmp_path / MANIFEST).exists()


def test_a_run_that_goes_non_finite_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    # lr 1e30 is finite (accepted), but step 1 throws the weights to ~1e30: step 2's loss is NaN.
    status, err = run_main(tiny(tmp_path, "--lr=1e30", "--min_lr=0", "--grad_clip=0"))
    assert status == 1 and "step 2: the loss is nan" in err and 'nonfinite="stop"' in err
    assert read_manifest(tmp_path)["step"] == 1                          # step 1's set, intact
    state = torch.load(tmp_path / "step-00000001" / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skip_step_drops_the_updates_and_goes_on(tmp_path):
    result = train(parse_args(tiny(tmp_path, "--lr=1e30", "--min_lr=0", "--grad_clip=0", "--nonfinite=skip_step")))
    records = result["history"]["train"]
    assert len(records) == 4 and not records[0]["skipped"] and all(r["skipped"] for r in records[1:])
    assert all(torch.isfinite(p).all() for p in result["model"].parameters())


def test_a_loss_far_above_its_minimum_gets_a_warning():
    watch = LossWatch()
    assert all(watch.check(step, 2.0 - 0.01 * step) is None for step in range(1, 20))
    warning = watch.check(20, 9.0)
    assert warning and "step 20: loss 9 is" in warning and "learning rate may be too high" in warning
    assert watch.check(21, 9.0) is None                                   # not again right away


# ----------------------------------------------------------------------------------------------------
# Bad places and signals
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dir", ["a_file", "/proc/fastmoe_edu_cannot_write_here"])
def test_unwritable_out_dir_is_refused_at_start(tmp_path, out_dir):
    if out_dir == "a_file":
        out_dir = tmp_path / "a_file"
        out_dir.write_text("I am a file")
    status, err = run_main(tiny(out_dir))
    assert status == 2 and f"out_dir={str(out_dir)!r} is not a writable directory" in err


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path):
    args = [sys.executable, "-m", "fastmoe_edu.train",
            *tiny(tmp_path, "--max_steps=100000", "--checkpoint_interval=0", "--progress=true")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "config.toml").exists() and time.monotonic() < deadline:   # training has begun
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted: checkpoint of step" in out
    assert read_manifest(tmp_path)["step"] >= 1


# ----------------------------------------------------------------------------------------------------
# Several ranks: stalls end the job; kills during saves never leave a mixed set
# ----------------------------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("engine,bound", [("mpi", 30), ("torch", 60)])
def test_a_stalled_rank_ends_the_job(engine, bound):
    """Rank 1 stops (SIGSTOP). MPI: the job ends within the 3 s timeout plus the abort. torchrun: plus the
    agent's grace period before it kills the stopped worker (30 s)."""
    start = time.monotonic()
    done = launch(engine, 2, [str(SCRIPTS / "check_stall.py"), "3"], timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode != 0 and "not reached" not in done.stdout
    assert ("allreduce_after_the_stall (sum) on communicator 'data' did not complete within 3 s"
            in done.stdout + done.stderr)
    assert elapsed < bound


def consistent(out_dir: Path) -> bool:
    """What --resume checks, without loading: every file named by the manifest hashes right and agrees on step/run."""
    manifest = read_manifest(out_dir)
    for name in manifest["files"]:
        checkpoint._verified(out_dir, manifest, name)
    return True


@pytest.mark.mpi
@pytest.mark.slow
def test_kills_during_saves_never_leave_a_mixed_set(tmp_path):
    """A 4-rank job saving every step, killed (SIGKILL, every process) at random moments, 3 times; after
    each kill the checkpoint on disk is one complete set, and the last one resumes under mpirun."""
    out_dir = tmp_path / "run"
    argv = tiny(out_dir, "--max_steps=100000", "--num_experts=4", "--batch_size=8")
    random.seed(1234)
    for attempt in range(3):
        args = argv + (["--resume"] if (out_dir / MANIFEST).exists() else [])
        proc = subprocess.Popen(command("mpi", 4, ["-m", "fastmoe_edu.train", *args]), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (out_dir / MANIFEST).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(random.uniform(0.5, 3.0))
        os.killpg(proc.pid, signal.SIGKILL)                               # mpirun and every rank, mid-whatever
        proc.wait(timeout=60)
        assert consistent(out_dir), attempt
        assert len(list(out_dir.glob("step-*/experts-rank*.pt"))) >= 4
    done = launch("mpi", 4, [str(SCRIPTS / "resume_one_step.py"), *argv], timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed at step" in done.stdout
