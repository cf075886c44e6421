"""Checkpoints: one writer for every run (one process or many ranks), committed atomically and verified.

    out_dir/checkpoint.json                  the manifest: step, run id, layout, and the SHA-256 of every file
    out_dir/step-00000500/ckpt.pt            the main rank: the parameters every rank holds alike (replicated),
                                             their optimizer moments, the optimizer's hyper-parameters, and
                                             the caller's record (step, config, history)
    out_dir/step-00000500/experts-rankNNNNN.pt   every rank: the parameters only it holds (its expert slices
                                             and, with tp > 1, its slices of attention / dense MLPs), their
                                             optimizer moments, its random-number state

Every file records the step and the run's identity. Saving is a commit in three moves: (1) every
rank writes its file into the step's folder and hashes it; (2) the ranks agree that all writes
succeeded, and the main rank writes the manifest under a temporary name and *renames* it over the
old one — the single moment the new set becomes the checkpoint; (3) older step folders are deleted.
A crash, a kill or a full disk before (2) leaves the previous manifest pointing at the previous,
complete set; nothing can pair one rank's file of step N with another's of step N+1.

Loading verifies before it trusts: the manifest must parse; every file it names must exist, hash to
the recorded SHA-256, load, and record the manifest's step and run; the layout must be this run's.
Any mismatch is a :class:`CheckpointError` naming the file and what is wrong, on every rank.

The runtime (``fastmoe_edu/runtime.py`` or ``distributed/runtime.py``) says who this rank is:
``rank``, ``is_main``, ``layout_record()``, ``per_rank_parameters(model)``, ``any(flag)``,
``allgather(tensor)`` and ``barrier()``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

MANIFEST = "checkpoint.json"
SHARED_FILE = "ckpt.pt"
LAYOUT_KEYS = ("world_size", "tp_size", "ep_size", "dp_size")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a checkpoint on disk is not one this run can trust."""


def rank_file_name(rank: int) -> str:
    return f"experts-rank{rank:05d}.pt"


def step_folder(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, shared: dict,
                    runtime) -> Path:
    """Every rank calls this. ``shared`` must hold ``step`` and ``run_id``; the main rank stores all of it."""
    out_dir, step, run_id = Path(out_dir), shared["step"], shared["run_id"]
    folder = out_dir / step_folder(step)
    mine_ids = {id(p) for p in runtime.per_rank_parameters(model)}
    mine_keys = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in mine_ids}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]   # state_dict numbers them 0, 1, ...
    mine_indices = {index for index, p in enumerate(ordered) if id(p) in mine_ids}
    model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    stamp = {"step": step, "run_id": run_id, "layout": runtime.layout_record()}

    files = {rank_file_name(runtime.rank): {
        **stamp,
        "model": {k: v for k, v in model_state.items() if k in mine_keys},
        "optimizer_state": {i: s for i, s in optimizer_state["state"].items() if i in mine_indices},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }}
    if runtime.is_main:
        files[SHARED_FILE] = {
            **stamp, **shared,
            "model": {k: v for k, v in model_state.items() if k not in mine_keys},
            "optimizer": {"param_groups": optimizer_state["param_groups"],
                          "state": {i: s for i, s in optimizer_state["state"].items() if i not in mine_indices}},
        }
    # (1) write and hash; a failure anywhere (full disk, read-only folder) stops every rank alike.
    digests, error = {}, None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, state in files.items():
            digests[name] = _write(state, folder / name)
    except (OSError, RuntimeError) as failure:         # torch.save reports a full disk as a RuntimeError
        error = f"rank {runtime.rank} could not write {folder}: {failure}"
    if runtime.any(error is not None):
        raise CheckpointError((error or "another rank could not write its checkpoint file")
                              + f"; the previous checkpoint in {out_dir} is kept")
    # (2) the manifest: the rank files' digests come to the main rank, which commits the set by a rename.
    mine = torch.frombuffer(bytearray(bytes.fromhex(digests[rank_file_name(runtime.rank)])), dtype=torch.uint8)
    every_rank = runtime.allgather(mine).reshape(-1, 32)
    if runtime.is_main:
        manifest = {**stamp, "folder": step_folder(step), "config": shared.get("config", {}),
                    "files": {SHARED_FILE: digests[SHARED_FILE],
                              **{rank_file_name(r): bytes(d.tolist()).hex() for r, d in enumerate(every_rank)}}}
        temporary = out_dir / (MANIFEST + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=1))
        _flush_to_disk(temporary)
        os.replace(temporary, out_dir / MANIFEST)
        for old in out_dir.glob("step-*"):                       # (3) older sets are no longer referenced
            if old.name != step_folder(step) and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()        # nobody goes on (or exits) before the set is committed
    return out_dir / MANIFEST


def load_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, runtime) -> dict:
    """Verify, then restore the model, the optimizer and this rank's RNG; returns the main rank's record."""
    manifest, shared, mine, error = None, None, None, None
    try:
        manifest = read_manifest(out_dir)
        expected = runtime.layout_record()
        if any(manifest["layout"].get(k) != expected[k] for k in LAYOUT_KEYS):
            raise CheckpointError(f"the checkpoint in {out_dir} was written by layout {manifest['layout']}, this run "
                                  f"is {expected}: resume with the same number of ranks and the same tp / ep / dp")
        shared = _verified(out_dir, manifest, SHARED_FILE)
        mine = _verified(out_dir, manifest, rank_file_name(runtime.rank))
    except CheckpointError as failure:
        error = failure
    if runtime.any(error is not None):                         # every rank refuses together
        raise error or CheckpointError(f"another rank found the checkpoint in {out_dir} unusable (see its message)")
    model.load_state_dict({**shared["model"], **mine["model"]})
    optimizer.load_state_dict({"param_groups": shared["optimizer"]["param_groups"],
                               "state": {**shared["optimizer"]["state"], **mine["optimizer_state"]}})
    torch.set_rng_state(mine["rng"]["torch"])
    if mine["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
    return shared


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint in {out_dir} (no {MANIFEST}); train without --resume first")
    try:
        manifest = json.loads(path.read_text())
        manifest["files"], manifest["step"], manifest["run_id"], manifest["folder"], manifest["layout"]
    except (OSError, ValueError, KeyError, TypeError) as failure:
        raise CheckpointError(f"{path} is not a readable checkpoint manifest ({failure!r})") from None
    return manifest


def _verified(out_dir: str | Path, manifest: dict, name: str) -> dict:
    """The file's contents, after checking its presence, hash, readability, step and run."""
    path = Path(out_dir) / manifest["folder"] / name
    if name not in manifest["files"]:
        raise CheckpointError(f"{path} is not part of the checkpoint (the manifest does not list it)")
    if not path.exists():
        raise CheckpointError(f"{path} is missing (the manifest of step {manifest['step']} lists it)")
    if _sha256(path) != manifest["files"][name]:
        raise CheckpointError(f"{path} is corrupted: its SHA-256 differs from the one recorded when it was written")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as failure:                                  # noqa: BLE001  (any unpickling failure)
        raise CheckpointError(f"{path} cannot be loaded: {failure}") from None
    if (state.get("step"), state.get("run_id")) != (manifest["step"], manifest["run_id"]):
        raise CheckpointError(f"{path} belongs to step {state.get('step')} of run {state.get('run_id')}, but the "
                              f"manifest is step {manifest['step']} of run {manifest['run_id']}")
    return state


def _write(state: dict, path: Path) -> str:
    """torch.save to a temporary name, flush it to disk, rename; returns the file's SHA-256."""
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    _flush_to_disk(temporary)
    os.replace(temporary, path)
    return _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())
