"""Checkpoints of an expert-parallel model: the replicated part once, the experts one file per rank.

    out_dir/ckpt.pt                     rank 0: replicated weights, their optimizer moments,
                                        the optimizer's hyper-parameters, and whatever the caller
                                        adds (step, config, history)
    out_dir/experts-rank00003.pt        rank 3: its expert slices (and, with tp > 1, its slices of
                                        the tensor-parallel attention / dense MLPs), their optimizer
                                        moments, its random-number state, and the layout that wrote it

Every rank reads ``ckpt.pt`` and its own expert file, so a resumed run continues exactly where
the interrupted one stopped. Resuming needs the same layout (world size, tp, ep, dp); the error says so.
Files are written to a temporary name and renamed, so a crash never leaves a half-written file
under the real name.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .gradients import split_parameters
from .layout import ParallelLayout
from .tensor_parallel import tensor_parallel_parameters

SHARED_NAME = "ckpt.pt"


def expert_file_name(rank: int) -> str:
    return f"experts-rank{rank:05d}.pt"


def save_sharded_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            layout: ParallelLayout, shared: dict) -> None:
    """Every rank calls this; rank 0 also writes ``shared`` (step, config, history, ...) into ckpt.pt."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    expert_keys = _expert_state_keys(model)
    model_state = model.state_dict()
    optimizer_state = optimizer.state_dict()
    expert_indices = _expert_optimizer_indices(model, optimizer)

    mine = {
        "model": {k: v for k, v in model_state.items() if k in expert_keys},
        "optimizer_state": {i: s for i, s in optimizer_state["state"].items() if i in expert_indices},
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "layout": _layout_record(layout),
    }
    _atomic_save(mine, out_dir / expert_file_name(layout.rank))
    if layout.is_main:
        replicated = {
            "model": {k: v for k, v in model_state.items() if k not in expert_keys},
            "optimizer": {"param_groups": optimizer_state["param_groups"],
                          "state": {i: s for i, s in optimizer_state["state"].items() if i not in expert_indices}},
            "layout": _layout_record(layout),
            **shared,
        }
        _atomic_save(replicated, out_dir / SHARED_NAME)
    layout.world.barrier()        # nobody goes on (or exits) before every file is complete


def load_sharded_checkpoint(out_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            layout: ParallelLayout) -> dict:
    """Restore the model, the optimizer and this rank's RNG; returns ckpt.pt (for step, history, ...)."""
    out_dir = Path(out_dir)
    shared_path, mine_path = out_dir / SHARED_NAME, out_dir / expert_file_name(layout.rank)
    for path in (shared_path, mine_path):
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint file {path} (rank {layout.rank}); "
                                    f"train without --resume first")
    shared = torch.load(shared_path, map_location="cpu", weights_only=True)
    mine = torch.load(mine_path, map_location="cpu", weights_only=True)
    expected = _layout_record(layout)
    for record in (shared.get("layout"), mine.get("layout")):
        if record is None or {k: record.get(k, 1) for k in _LAYOUT_KEYS} != {k: expected[k] for k in _LAYOUT_KEYS}:
            raise ValueError(f"the checkpoint in {out_dir} was written by layout {record}, this run is "
                             f"{expected}: resume with the same number of ranks and the same tp / ep / dp")
    model.load_state_dict({**shared["model"], **mine["model"]})
    optimizer.load_state_dict({"param_groups": shared["optimizer"]["param_groups"],
                               "state": {**shared["optimizer"]["state"], **mine["optimizer_state"]}})
    torch.set_rng_state(mine["rng"]["torch"])
    if mine["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["rng"]["cuda"])
    return shared


def _per_rank_ids(model: nn.Module) -> set[int]:
    """Parameters that differ between ranks: expert slices and tensor-parallel slices."""
    _, experts = split_parameters(model)
    return {id(p) for p in experts + tensor_parallel_parameters(model)}


def _expert_state_keys(model: nn.Module) -> set[str]:
    mine = _per_rank_ids(model)
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in mine}


def _expert_optimizer_indices(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    """The optimizer's state_dict numbers parameters 0, 1, 2, ... in param-group order."""
    mine = _per_rank_ids(model)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    return {index for index, p in enumerate(ordered) if id(p) in mine}


_LAYOUT_KEYS = ("world_size", "tp_size", "ep_size", "dp_size")


def _layout_record(layout: ParallelLayout) -> dict:
    return {"world_size": layout.world_size, "tp_size": layout.tp_size, "ep_size": layout.ep_size,
            "dp_size": layout.dp_size, "rank": layout.rank}


def _atomic_save(state: dict, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
