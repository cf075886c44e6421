"""out_dir: what a run keeps there, and how ``--resume`` picks the run up from it (train.py calls these).

    check_out_dir       at start, not at the first checkpoint: out_dir is (or becomes) a writable directory
    start_or_resume     the first step, the history and the run id: a fresh run's, or the checkpoint's
                        (its weights, optimizer state and loss scale loaded), after checking what may change
    save_run            the checkpoint (checkpoint.py, through the runtime), then history.json
    write_history       out_dir/history.json, one record per step (the notebooks read it)

What a resumed run may change: how it runs and logs (``config_differences`` warns about the rest), not
the learning-rate schedule (unless ``allow_schedule_change``) nor the optimizer's parameter groups; a
model that does not fit the checkpoint is named by the options that differ (``model_differences``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import MANIFEST, CheckpointError, ModelMismatch, read_manifest, write_failure
from .config import ConfigError, TrainConfig, to_toml
from .precision import LossScaler
from .runtime import Runtime

HISTORY_NAME = "history.json"

SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "max_steps")   # what train.lr_at(step) depends on


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """Settings that differ between a checkpoint and the current run (other than how it runs and logs)."""
    harmless = {"resume", "progress", "eval_interval", "checkpoint_interval", "sample_tokens", "allow_schedule_change",
                "sample_temperature", "num_threads", "out_dir", "exchange", "engine", "collective_timeout_s",
                "tensorboard", "tensorboard_interval", "profile_steps", "max_consecutive_skips"}
    current = cfg.to_dict()
    return [f"{k}: checkpoint {saved.get(k)!r} -> now {current[k]!r}"
            for k in current if k not in harmless and saved.get(k) != current[k]]


def check_schedule_unchanged(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run follows the checkpoint's learning-rate schedule unless told otherwise."""
    changed = [f"{k}={getattr(cfg, k)!r} (checkpoint: {saved.get(k)!r})" for k in SCHEDULE_KEYS
               if saved.get(k) != getattr(cfg, k)]
    if changed and not cfg.allow_schedule_change:
        raise ConfigError(f"--resume with {', '.join(changed)} would change the learning-rate schedule "
                          f"mid-run; keep the checkpoint's values, or pass --allow_schedule_change=true")
    saved_groups = saved.get("optimizer_group_size", 0)
    if saved_groups != cfg.optimizer_group_size:
        raise ConfigError(f"--resume with optimizer_group_size={cfg.optimizer_group_size} (checkpoint: "
                          f"{saved_groups}): the optimizer state is stored per parameter group, so the "
                          f"groups must stay as they were; keep optimizer_group_size={saved_groups}")


def model_differences(saved: dict, cfg: TrainConfig) -> str:
    """The data and model options that differ from a checkpoint's: "checkpoint has d_model=64, this run d_model=32"."""
    changed = [f.name for f in dataclasses.fields(cfg) if f.metadata["section"] in ("data", "model")
               and f.name in saved and saved[f.name] != getattr(cfg, f.name)]
    if not changed:
        return ""
    return (f"checkpoint has {', '.join(f'{k}={saved[k]!r}' for k in changed)}, "
            f"this run {', '.join(f'{k}={getattr(cfg, k)!r}' for k in changed)}")


def check_out_dir(out_dir: str) -> None:
    """Fail at start, not at the first checkpoint: out_dir must be (or become) a writable directory."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as failure:
        raise ConfigError(f"out_dir={out_dir!r} is not a writable directory: {failure.strerror or failure}") from None


def start_or_resume(cfg: TrainConfig, rt: Runtime, model, optimizer, scaler: LossScaler,
                    say: Callable[[str], None]) -> tuple[int, dict, str]:
    """(first step, history, run id): 0, an empty history and a new id, or with ``resume`` the checkpoint's,
    its weights, optimizer state and loss scale loaded. Then out_dir/config.toml is this run's config."""
    start_step, history = 0, {"train": [], "val": []}
    run_id = new_run_id(rt)
    if cfg.resume:
        saved_config = read_manifest(cfg.out_dir).get("config", {})
        check_schedule_unchanged(saved_config, cfg)                  # before any weight is touched
        try:
            saved = rt.load(cfg.out_dir, model, optimizer)
        except ModelMismatch as mismatch:
            differences = model_differences(saved_config, cfg)
            raise ModelMismatch(f"--resume: {differences + ': ' if differences else ''}{mismatch}") from None
        start_step, history, run_id = saved["step"], saved["history"], saved["run_id"]
        if saved.get("loss_scale") and saved["config"].get("dtype") == cfg.dtype:
            scaler.load_state_dict(saved["loss_scale"])
        say(f"resumed from {Path(cfg.out_dir) / MANIFEST} at step {start_step} (run {run_id})")
        for line in config_differences(saved["config"], cfg):
            say(f"warning: the resumed run changes {line}")
    if rt.is_main:                                                   # (check_out_dir created out_dir)
        (Path(cfg.out_dir) / "config.toml").write_text(to_toml(cfg))
    return start_step, history, run_id


def new_run_id(rt: Runtime) -> str:
    """A fresh identity, unique per run: the main rank's start time (UTC) and 4 random bytes, e.g.
    ``20261201-142501-9f3a61c2``, the same on every rank. (A resumed run keeps its checkpoint's.)"""
    mine = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(4).hex()
    return bytes(rt.broadcast_(torch.tensor(list(mine.encode()), dtype=torch.uint8)).tolist()).decode()


def save_run(cfg: TrainConfig, model, optimizer, scaler: LossScaler, step: int, history: dict, run_id: str,
             rt: Runtime) -> None:
    """Checkpoint (every rank its own file, the main rank the shared one), then the history."""
    rt.save(cfg.out_dir, model, optimizer, {"step": step, "run_id": run_id, "config": cfg.to_dict(),
                                            "history": history, "loss_scale": scaler.state_dict()})
    if rt.is_main:
        write_history(cfg, history)


def write_history(cfg: TrainConfig, history: dict) -> None:
    out_dir = Path(cfg.out_dir)
    tmp = out_dir / f".{HISTORY_NAME}.{os.getpid()}.tmp"
    text = json.dumps(history)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, out_dir / HISTORY_NAME)
    except OSError as failure:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{HISTORY_NAME}: " + write_failure(failure, out_dir, len(text))) from None
