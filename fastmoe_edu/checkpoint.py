"""Checkpoints: one writer for every run, a single process or many ranks.

    out_dir/ckpt.pt                    the main rank: the parameters every rank holds alike (replicated),
                                       their optimizer moments, the optimizer's hyper-parameters, the
                                       layout, and the caller's record (step, config, history)
    out_dir/experts-rankNNNNN.pt       every rank: the parameters only it holds (its expert slices and,
                                       with tp > 1, its slices of attention / dense MLPs), their optimizer
                                       moments, its random-number state and the layout that wrote it

In one process nothing is per-rank except the random state, so ``experts-rank00000.pt`` is small.
Every rank reads ``ckpt.pt`` and its own file, so a resumed run continues exactly where the
interrupted one stopped; resuming needs the same layout (the error says so). Files are written to a
temporary name and renamed, so a crash never leaves a half-written file under the real name.

The runtime (``fastmoe_edu/runtime.py`` or ``distributed/runtime.py``) says who this rank is:
``rank``, ``is_main``, ``layout_record()``, ``per_rank_parameters(model)`` and ``barrier()``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

SHARED_FILE = "ckpt.pt"


def rank_file_name(rank: int) -> str:
    return f"experts-rank{rank:05d}.pt"


def save_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, shared: dict,
                    runtime) -> Path:
    """Every rank calls this; the main rank also writes ``shared`` (step, config, history, ...) into ckpt.pt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine_ids = {id(p) for p in runtime.per_rank_parameters(model)}
    mine_keys = {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in mine_ids}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]   # state_dict numbers them 0, 1, ...
    mine_indices = {index for index, p in enumerate(ordered) if id(p) in mine_ids}
    model_state, optimizer_state = model.state_dict(), optimizer.state_dict()

    mine = {
        "model": {k: v for k, v in model_state.items() if k in mine_keys},
        "optimizer_state": {i: s for i, s in optimizer_state["state"].items() if i in mine_indices},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "layout": runtime.layout_record(),
    }
    _atomic_save(mine, out_dir / rank_file_name(runtime.rank))
    if runtime.is_main:
        replicated = {
            "model": {k: v for k, v in model_state.items() if k not in mine_keys},
            "optimizer": {"param_groups": optimizer_state["param_groups"],
                          "state": {i: s for i, s in optimizer_state["state"].items() if i not in mine_indices}},
            "layout": runtime.layout_record(),
            **shared,
        }
        _atomic_save(replicated, out_dir / SHARED_FILE)
    runtime.barrier()        # nobody goes on (or exits) before every file is complete
    return out_dir / SHARED_FILE


def load_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, runtime) -> dict:
    """Restore the model, the optimizer and this rank's RNG; returns ckpt.pt's record (step, history, ...)."""
    out_dir = Path(out_dir)
    shared_path, mine_path = out_dir / SHARED_FILE, out_dir / rank_file_name(runtime.rank)
    for path in (shared_path, mine_path):
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint file {path} (rank {runtime.rank}); "
                                    f"train without --resume first")
    shared = torch.load(shared_path, map_location="cpu", weights_only=True)
    mine = torch.load(mine_path, map_location="cpu", weights_only=True)
    expected = runtime.layout_record()
    for record in (shared.get("layout"), mine.get("layout")):
        if record is None or {k: record.get(k) for k in LAYOUT_KEYS} != {k: expected[k] for k in LAYOUT_KEYS}:
            raise ValueError(f"the checkpoint in {out_dir} was written by layout {record}, this run is "
                             f"{expected}: resume with the same number of ranks and the same tp / ep / dp")
    model.load_state_dict({**shared["model"], **mine["model"]})
    optimizer.load_state_dict({"param_groups": shared["optimizer"]["param_groups"],
                               "state": {**shared["optimizer"]["state"], **mine["optimizer_state"]}})
    torch.set_rng_state(mine["rng"]["torch"])
    if mine["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
    return shared


LAYOUT_KEYS = ("world_size", "tp_size", "ep_size", "dp_size")


def _atomic_save(state: dict, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
