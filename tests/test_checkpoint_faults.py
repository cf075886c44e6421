"""Checkpoint, precision and option faults of issue 29 ("nothing silent, round three").

Each test is the scenario that went wrong before its fix: a resume that crashed after saying
"resumed", saves that deleted folders of the user's, two runs destroying each other's checkpoints,
unbounded pipeline degrees, and raw errors where one clear line belongs.
"""
import errno
import json
import os
import re
import socket
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import fastmoe_edu.checkpoint as checkpoint
from fastmoe_edu.checkpoint import MANIFEST, MARKER, exclusive_out_dir, read_manifest
from fastmoe_edu.config import ConfigError, parse_args
from fastmoe_edu.model import build_model
from fastmoe_edu.precision import store_parameters
from fastmoe_edu.runtime import Runtime
from fastmoe_edu.train import build_dataset, configure_optimizer, train
from launcher import ENGINES, launch
from tiny_runs import run_main
from tiny_runs import tiny as tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out_dir, *argv) -> list[str]:
    return tiny_run(out_dir, *argv, max_steps=3)


def start(out_dir, *argv, steps: int = 2) -> None:
    """The first ``steps`` of a ``tiny`` run, stopped as if interrupted (a checkpoint per step)."""
    train(parse_args(tiny(out_dir, *argv)), stop_at=steps)


def restored(out_dir, *argv):
    """The model and optimizer of a run configured by ``tiny(out_dir, *argv)``, loaded from out_dir."""
    cfg = parse_args(tiny(out_dir, *argv))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, build_dataset(cfg).vocab_size)
    store_parameters(model, cfg.dtype, cfg.master_weights)
    optimizer = configure_optimizer(model, cfg)
    Runtime().load(out_dir, model, optimizer)
    return model, optimizer


def saved_weights(out_dir) -> dict:
    folder = Path(out_dir) / read_manifest(out_dir)["folder"]
    return {**torch.load(folder / "ckpt.pt", weights_only=True)["model"],
            **torch.load(folder / "experts-rank00000.pt", weights_only=True)["model"]}


# ----------------------------------------------------------------------------------------------------
# 4. master_weights changed on resume
# ----------------------------------------------------------------------------------------------------
BF16_MASTERS = ("--dtype=bfloat16", "--master_weights=optimizer")


def test_a_float32_checkpoint_resumes_with_bfloat16_master_weights(tmp_path):
    """It said "resumed", then raised KeyError: 'master' at the first step."""
    start(tmp_path)
    model, optimizer = restored(tmp_path, *BF16_MASTERS)
    weights = saved_weights(tmp_path)
    for name, param in model.named_parameters():
        master = optimizer.state[param]["master"]
        assert master.dtype == torch.float32 and torch.equal(master, weights[name])   # exact, not rounded
        assert torch.equal(param, weights[name].to(param.dtype))
    status, err = run_main(tiny(tmp_path, "--resume", *BF16_MASTERS))
    assert status == 0, err
    assert read_manifest(tmp_path)["step"] == 3


def test_bfloat16_master_weights_resume_as_float32_parameters(tmp_path):
    """The other way: the float32 master copies become the parameters (not their bfloat16 rounding)."""
    start(tmp_path, *BF16_MASTERS)
    state = torch.load(tmp_path / read_manifest(tmp_path)["folder"] / "ckpt.pt", weights_only=True)
    masters = [s["master"] for _, s in sorted(state["optimizer"]["state"].items())]
    model, optimizer = restored(tmp_path)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for param, master in zip(ordered, masters):
        assert param.dtype == torch.float32 and torch.equal(param, master)
        assert "master" not in optimizer.state[param]
    assert run_main(tiny(tmp_path, "--resume"))[0] == 0


# ----------------------------------------------------------------------------------------------------
# 5. only this project's checkpoints are ever deleted
# ----------------------------------------------------------------------------------------------------
def test_saving_deletes_only_step_folders_it_wrote(tmp_path):
    """Every save deleted any folder named step-* in out_dir, the user's own included."""
    mine = tmp_path / "step-mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    lookalike = tmp_path / "step-00000002"                  # the user's, named like one of ours
    lookalike.mkdir()
    (lookalike / "ckpt.pt").write_text("another program's checkpoint")
    status, err = run_main(tiny(tmp_path))
    assert status == 1 and f"{lookalike} has no {MARKER} file" in err and "move it out of" in err
    assert (lookalike / "ckpt.pt").read_text() == "another program's checkpoint"     # not written into
    lookalike.rename(tmp_path / "step-00000009")
    lookalike = tmp_path / "step-00000009"
    start(tmp_path, "--max_steps=4", steps=3)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (lookalike / "ckpt.pt").read_text() == "another program's checkpoint"
    assert not (tmp_path / "step-00000002").exists()        # ours, superseded: deleted
    # A user's file put into one of our folders stays, with its folder; our files in it go.
    extra = tmp_path / "step-00000003" / "my_notes.txt"
    extra.write_text("mine")
    assert run_main(tiny(tmp_path, "--resume", "--max_steps=4"))[0] == 0
    assert sorted(p.name for p in extra.parent.iterdir()) == ["my_notes.txt"]
    assert sorted(p.name for p in (tmp_path / "step-00000004").iterdir()) == [
        "ckpt.pt", "experts-rank00000.pt", MARKER]


def test_an_empty_out_dir_is_refused(tmp_path, monkeypatch):
    """--out_dir= meant the current directory, whose step-* folders the saves then deleted."""
    monkeypatch.chdir(tmp_path)
    status, err = run_main(tiny(""))
    assert status == 2 and "out_dir='' is empty" in err and "out_dir=. for the current directory" in err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# 6. one out_dir, one run
# ----------------------------------------------------------------------------------------------------
def test_a_second_run_into_a_busy_out_dir_is_refused(tmp_path):
    """Two runs into one out_dir destroyed each other's checkpoints."""
    start(tmp_path)
    before = (tmp_path / MANIFEST).read_text()
    with exclusive_out_dir(tmp_path, Runtime()):            # the first run, still going
        status, err = run_main(tiny(tmp_path))
    assert status == 1
    assert (f"out_dir={str(tmp_path)!r} is in use by another training run (pid {os.getpid()} on host "
            f"{socket.gethostname()}, since") in err and "give this one another --out_dir" in err
    assert (tmp_path / MANIFEST).read_text() == before    # its checkpoint untouched
    assert run_main(tiny(tmp_path, "--resume"))[0] == 0    # free again once it ended


@pytest.mark.mpi
@pytest.mark.parametrize("engine", ENGINES)
def test_every_rank_of_a_second_run_stops(tmp_path, engine):
    """The main rank holds the lock; the refusal must end every rank of the job, under both launchers."""
    with exclusive_out_dir(tmp_path, Runtime()):
        done = launch(engine, 2, ["-m", "fastmoe_edu.train", *tiny(tmp_path, "--num_experts=2")], timeout=120)
    assert done.returncode != 0
    assert (done.stdout + done.stderr).count(f"out_dir={str(tmp_path)!r} is in use by another training run") == 1
    assert not (tmp_path / MANIFEST).exists()


# ----------------------------------------------------------------------------------------------------
# 7. pipeline degrees are bounded
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("pipeline_degree", 10 ** 4), ("backward_pipeline_degree", 2 ** 63)])
def test_pipeline_degrees_are_bounded(tmp_path, key, value):
    """10^4 made a 3 s run take 50 s; 2^63 grew one rank to 10.6 GB."""
    status, err = run_main(tiny(tmp_path / "run", f"--{key}={value}"))
    assert status == 2 and f"{key}={value} is out of range; it must be <= 64" in err
    assert not (tmp_path / "run").exists()                   # before any work
    assert parse_args([f"--{key}=64"]) and parse_args([f"--{key}=auto"])


# ----------------------------------------------------------------------------------------------------
# Unclear cases, each now one line
# ----------------------------------------------------------------------------------------------------
def test_a_resume_with_another_model_shape_names_the_options(tmp_path):
    """It was torch's raw "Error(s) in loading state_dict" over 13 keys."""
    start(tmp_path)
    status, err = run_main(tiny(tmp_path, "--resume", "--d_model=32"))
    assert status == 1 and "Error(s) in loading" not in err
    assert "checkpoint has d_model=16, this run d_model=32" in err
    assert "resume with the checkpoint's options or start a new out_dir" in err


def test_a_full_disk_during_the_files_is_named_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """torch.save reports a full disk as "unexpected pos ..."; the error now says what happened."""
    real_save = torch.save

    def full_at_step_2(state, path, *args, **kwargs):
        if isinstance(state, dict) and state.get("step") == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/3: unexpected pos 4096 vs 2048")
        return real_save(state, path, *args, **kwargs)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.torch, "save", full_at_step_2)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(10 ** 9, 10 ** 9 - 4096, 4096))
    status, err = run_main(tiny(tmp_path))
    assert status == 1 and re.search(rf"no space left in {re.escape(str(tmp_path / 'step-00000002'))} "
                                     r"\(needs ~0\.[1-9] MB, 0\.0 MB free\)", err), err
    assert "the previous checkpoint" in err and "is kept" in err
    assert read_manifest(tmp_path)["step"] == 1


def test_a_full_disk_at_the_manifest_is_named_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """At the manifest's write a full disk was an uncaught traceback."""
    real_open, saves = open, []

    def full_at_second_manifest(path, mode="r", *args, **kwargs):
        if Path(path).name.startswith(f".{MANIFEST}.") and "w" in mode:
            saves.append(path)
            if len(saves) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open", full_at_second_manifest, raising=False)
    status, err = run_main(tiny(tmp_path))
    assert status == 1 and f"no space left in {tmp_path} (needs ~0.0 MB" in err and "is kept" in err
    assert read_manifest(tmp_path)["step"] == 1
    monkeypatch.undo()
    assert run_main(tiny(tmp_path, "--resume"))[0] == 0


def test_skipped_steps_have_a_limit(tmp_path):
    """nonfinite=skip_step had none: a float16 run skipped 59 of 60 steps and exited 0."""
    argv = tiny(tmp_path, "--lr=1e30", "--min_lr=0", "--grad_clip=0", "--nonfinite=skip_step", "--max_steps=6")
    status, err = run_main([*argv, "--max_consecutive_skips=2"])
    assert status == 1
    assert "steps 2 to 3: 2 steps in a row had a non-finite loss or gradient norm and were skipped" in err
    assert "max_consecutive_skips=2" in err and "raise max_consecutive_skips" in err
    assert read_manifest(tmp_path)["step"] == 2
    assert parse_args([]).max_consecutive_skips == 10
    with pytest.raises(ConfigError, match="max_consecutive_skips=0 is out of range"):
        parse_args(["--max_consecutive_skips=0"])


def test_an_old_format_checkpoint_is_kept_with_advice_that_keeps_it(tmp_path):
    """The advice was "train without --resume first", which abandons the old run."""
    old = tmp_path / "ckpt.pt"
    torch.save({"step": 100, "model": {}}, old)
    status, err = run_main(tiny(tmp_path, "--resume"))
    assert status == 1 and "train without --resume" not in err
    assert f"{old} is a checkpoint of the format before commit ee16a85" in err
    assert "git checkout ee16a85~1" in err and "another --out_dir" in err
    assert old.exists()


def test_every_run_has_its_own_id_and_a_resume_keeps_it(tmp_path):
    """run_id came from the seed: every run with the default seed had the same one."""
    start(tmp_path / "a", steps=1)
    start(tmp_path / "b", steps=1)
    first, second = read_manifest(tmp_path / "a")["run_id"], read_manifest(tmp_path / "b")["run_id"]
    assert first != second
    assert run_main(tiny(tmp_path / "a", "--resume"))[0] == 0
    assert read_manifest(tmp_path / "a")["run_id"] == first
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["step"] == 3


def test_a_full_disk_at_the_history_is_named(tmp_path, monkeypatch):
    """history.json, written beside each checkpoint, raised a raw OSError."""
    real_write_text = Path.write_text

    def full_for_the_history(path, *args, **kwargs):
        if path.name.startswith(".history.json."):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_the_history)
    status, err = run_main(tiny(tmp_path))
    assert status == 1 and f"history.json: no space left in {tmp_path}" in err
