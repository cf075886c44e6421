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
complete set; nothing can pair one rank's file of step N with another's of step N+1. A failed write
(full disk, read-only folder) is a :class:`CheckpointError` on every rank; a full disk is named as
such, with the size the checkpoint needs.

Only what this module wrote is ever deleted or overwritten: the main rank creates every step folder
with a marker file in it (``fastmoe_edu-checkpoint``) before any rank writes, and refuses a folder of
that name that holds something else and no marker; clean-up removes only marked folders, and in them
only files with this module's names (a folder that still holds something else is left). Temporary
files carry the host and process id in their names.

One out_dir belongs to one run: :func:`exclusive_out_dir` holds an exclusive ``flock`` on
``out_dir/run.lock`` for the run's life (main rank) and refuses a second run, naming the holder.

Loading verifies before it trusts: the manifest must parse; every file it names must exist, hash to
the recorded SHA-256, load, and record the manifest's step and run; the layout must be this run's,
and the tensors this model's (names and shapes, else :class:`ModelMismatch`). Any mismatch is a
:class:`CheckpointError` naming the file and what is wrong, on every rank. A checkpoint written with
the other ``master_weights`` loads too: the float32 master copies move (precision.py).

The runtime (``fastmoe_edu/runtime.py`` or ``distributed/runtime.py``) says who this rank is:
``rank``, ``is_main``, ``layout_record()``, ``per_rank_parameters(model)``, ``any(flag)`` and
``allgather(tensor)``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import torch
from torch import nn

from .precision import move_master_copies

MANIFEST = "checkpoint.json"
SHARED_FILE = "ckpt.pt"
MARKER = "fastmoe_edu-checkpoint"          # in every step folder this module writes
LOCK = "run.lock"
LAYOUT_KEYS = ("world_size", "tp_size", "ep_size", "dp_size")
_OURS = r"ckpt\.pt|experts-rank\d{5}\.pt|" + re.escape(MARKER)
_OUR_FILE = re.compile(rf"({_OURS})|\.({_OURS})\..+\.tmp")        # a file, or its temporary (_temporary)
_STEP_FOLDER = re.compile(r"step-\d{8}")
#: the commit that replaced out_dir/ckpt.pt by manifest-committed step folders
_MANIFEST_COMMIT = "ee16a85"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or a checkpoint on disk is not one this run can trust."""


class ModelMismatch(CheckpointError):
    """The checkpoint's tensors do not fit this run's model (another shape, or other parameters)."""


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
    # (0) the main rank creates the step's folder and marks it ours, before any rank writes into it.
    error = None
    if runtime.is_main:
        try:
            _claim(folder, stamp)
        except CheckpointError as refusal:
            error = str(refusal)
        except OSError as failure:
            error = write_failure(failure, out_dir, 0)
    if runtime.any(error is not None):
        raise CheckpointError((error or f"the main rank could not create {folder}")
                              + f"; the previous checkpoint in {out_dir} is kept")
    # (1) write and hash; a failure anywhere (full disk, read-only folder) stops every rank alike.
    digests = {}
    try:
        for name, state in files.items():
            digests[name] = _write(state, folder / name)
    except (OSError, RuntimeError) as failure:         # torch.save reports a full disk as a RuntimeError
        error = f"rank {runtime.rank}: " + write_failure(failure, folder, sum(map(_tensor_bytes, files.values())))
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
        text = json.dumps(manifest, indent=1).encode()
        try:
            _write_bytes(out_dir / MANIFEST, text)
        except OSError as failure:
            error = write_failure(failure, out_dir, len(text))
        else:
            _remove_old_sets(out_dir, keep=step_folder(step))   # (3) older sets are no longer referenced
    # nobody goes on (or exits) before the set is committed, or every rank knows it was not
    if runtime.any(error is not None):
        raise CheckpointError((error or f"the main rank could not write {out_dir / MANIFEST}")
                              + f"; the previous checkpoint in {out_dir} is kept")
    return out_dir / MANIFEST


def _claim(folder: Path, stamp: dict) -> None:
    """Create ``folder`` with this module's marker in it; a folder of that name with something else in
    it and no marker is someone else's, and is refused rather than written into."""
    if folder.is_dir() and not (folder / MARKER).exists() and any(folder.iterdir()):
        raise CheckpointError(f"{folder} has no {MARKER} file: it is not a checkpoint folder of this version "
                              f"(another program's, or an older fastmoe_edu's), so this run will not write into "
                              f"it; move it out of {folder.parent}")
    folder.mkdir(parents=True, exist_ok=True)
    _write_bytes(folder / MARKER, json.dumps(stamp).encode())


def write_failure(failure: Exception, directory: Path, needed: int) -> str:
    """One line for a failed write: "no space left in DIR (needs ~N MB, M MB free)" when the disk is
    full (torch.save says "unexpected pos ..." or "file write failed", without an errno), else the error."""
    try:
        free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    except OSError:
        free = needed                                        # unknown: only the errno can tell
    if getattr(failure, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < needed:
        return (f"no space left in {directory} (needs ~{_megabytes(needed)} MB, {_megabytes(free)} MB free); "
                f"free some space or choose another --out_dir")
    return f"could not write in {directory}: {failure}"


def _megabytes(size: int) -> str:
    return f"{size / 2 ** 20:.1f}"


def _tensor_bytes(value) -> int:
    """The bytes of every tensor in a nested dict / list: about the size of its file."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(map(_tensor_bytes, value.values()))
    if isinstance(value, (list, tuple)):
        return sum(map(_tensor_bytes, value))
    return 0


def _remove_old_sets(out_dir: Path, keep: str) -> None:
    """Delete the step folders this module wrote (marked), except ``keep``: only files of ours inside,
    the marker last; a folder that still holds anything else stays."""
    for folder in out_dir.glob("step-*"):
        if folder.name == keep or not _STEP_FOLDER.fullmatch(folder.name) or not (folder / MARKER).is_file():
            continue
        with contextlib.suppress(OSError):                   # the new set is committed: a leftover is harmless
            for path in folder.iterdir():
                if path.name != MARKER and _OUR_FILE.fullmatch(path.name):
                    path.unlink()
            (folder / MARKER).unlink()
            folder.rmdir()


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
        weights = {**shared["model"], **mine["model"]}
        _check_fits(out_dir, model, weights)
    except CheckpointError as failure:
        error = failure
    if runtime.any(error is not None):                         # every rank refuses together
        raise error or CheckpointError(f"another rank found the checkpoint in {out_dir} unusable (see its message)")
    state = {**shared["optimizer"]["state"], **mine["optimizer_state"]}
    move_master_copies(model, optimizer, weights, state)       # master_weights changed on resume?
    model.load_state_dict(weights)
    optimizer.load_state_dict({"param_groups": shared["optimizer"]["param_groups"], "state": state})
    torch.set_rng_state(mine["rng"]["torch"])
    if mine["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
    return shared


def read_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists() and (Path(out_dir) / SHARED_FILE).exists():
        raise CheckpointError(
            f"--resume: {Path(out_dir) / SHARED_FILE} is a checkpoint of the format before commit "
            f"{_MANIFEST_COMMIT} (no {MANIFEST}), which this version cannot resume; it is kept as it is. To "
            f"continue that run, resume it with the version that wrote it (git checkout {_MANIFEST_COMMIT}~1); "
            f"to start a new run, give it another --out_dir")
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


def _check_fits(out_dir, model: nn.Module, weights: dict) -> None:
    """Before anything is loaded: the checkpoint has exactly this model's tensors, of the same shapes."""
    expected = model.state_dict()
    differences = [f"{k}: {list(weights[k].shape)} in the checkpoint, {list(v.shape)} in this model"
                   for k, v in expected.items() if k in weights and weights[k].shape != v.shape]
    differences += [f"{k}: only in this model" for k in expected if k not in weights]
    differences += [f"{k}: only in the checkpoint" for k in weights if k not in expected]
    if differences:
        raise ModelMismatch(f"the checkpoint in {out_dir} holds a model of another shape ({len(differences)} "
                            f"tensors differ, e.g. {differences[0]}); resume with the checkpoint's options "
                            f"or start a new out_dir")


@contextlib.contextmanager
def exclusive_out_dir(out_dir: str | Path, runtime):
    """Every rank enters; the main rank holds an exclusive lock on ``out_dir/run.lock`` until the block
    ends (or the process does). A second run into the same out_dir is refused on every rank, naming
    the holder (its pid and host, as the holder wrote them into the lock file)."""
    lock, error = None, None
    if runtime.is_main:
        try:
            lock = _lock(Path(out_dir) / LOCK)
        except CheckpointError as failure:
            error = failure
    if runtime.any(error is not None):                         # only the main rank can have failed
        raise error or CheckpointError(f"out_dir={str(out_dir)!r} is in use by another run (see rank 0's message)")
    try:
        yield
    finally:
        if lock:
            lock.close()                                     # closing the file releases the lock


def _lock(path: Path):
    """The open, exclusively locked lock file, with this process written into it."""
    out_dir = str(path.parent)
    try:
        handle = open(path, "a+")
    except OSError as failure:
        raise CheckpointError(f"out_dir={out_dir!r}: cannot open {path}: {failure}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as failure:
        handle.seek(0)
        holder = handle.read().strip() or "its pid not yet recorded"
        handle.close()
        if failure.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise CheckpointError(f"out_dir={out_dir!r}: cannot lock {path} ({failure.strerror}); this file "
                                  f"system may not support flock: choose an --out_dir on a local disk") from None
        raise CheckpointError(f"out_dir={out_dir!r} is in use by another training run ({holder}); an out_dir "
                              f"holds one run: wait for that run to end, or give this one another --out_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, "
                 f"since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def _temporary(path: Path) -> Path:
    """A name of this process alone for the file about to become ``path``."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


def _write(state: dict, path: Path) -> str:
    """torch.save to a temporary name, flush it to disk, rename; returns the file's SHA-256."""
    temporary = _temporary(path)
    try:
        torch.save(state, temporary)
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)                    # a partial file would hold the space
    return _sha256(path)


def _write_bytes(path: Path, data: bytes) -> None:
    """``data`` into ``path`` atomically: a temporary name, flushed to disk, renamed."""
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flush_to_disk(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())
