"""Runtimes: what the training loop asks of "the processes running this job", one process or many.

The loop in train.py calls the same methods whatever the launch, so it has no "if parallel" branches:

    runtime.shard_model(model)          keep this rank's part of the model (one process: all of it)
    runtime.shard_batch(batch)          this rank's slice of the global batch
    runtime.reduce_gradients(model)     per-shard gradients -> gradients of the global batch
    runtime.clip_gradients(model, m)    the norm of the whole model's gradient, clipped to m
    runtime.mean(values), .sum(tensor), .any(flag)     figures of the whole batch / every rank
    runtime.allgather(tensor), .broadcast_(tensor)     small agreements (checkpoint hashes, the run's id)
    runtime.save(...), runtime.load(...)               the checkpoint (checkpoint.py)
    runtime.is_main                     the one rank that prints and writes shared files

:class:`Runtime` is the one-process implementation: all of these are the identity or torch's own.
``fastmoe_edu.distributed.runtime.ParallelRuntime`` overrides them; ``train.start_runtime`` picks one
from the launcher's environment (``engine`` key) and imports the parallel code — and an engine — only
when the job has more than one process. This file imports nothing parallel:

    python -m fastmoe_edu.train                          Runtime (no mpi4py, no process group)
    mpirun -n 4 python -m fastmoe_edu.train              ParallelRuntime over MPI
    torchrun --nproc-per-node=4 -m fastmoe_edu.train     ParallelRuntime over torch.distributed
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint


class Runtime:
    """The runtime of one process: it holds the whole model and reads the whole batch, so every method
    is the identity or torch's own.

    ``ParallelRuntime`` subclasses it and overrides all but :meth:`save` and :meth:`load`.
    """

    rank, world_size = 0, 1
    data_rank = 0                  # which shard of the batch this rank reads

    @property
    def is_main(self) -> bool:
        """Only the main process prints, writes the history and the shared checkpoint file."""
        return self.rank == 0

    def shard_model(self, model: nn.Module) -> nn.Module:
        return model

    def describe(self, model: nn.Module) -> str:
        return "one process (no parallelism)"

    def shard_batch(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return batch

    def reduce_gradients(self, model: nn.Module) -> None:
        pass

    def clip_gradients(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def mean(self, values: list[float]) -> list[float]:
        return list(values)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's equally sized ``tensor``, flattened and concatenated in rank order."""
        return tensor.reshape(-1)

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: every rank gets the main rank's ``tensor`` (e.g. the run's identity)."""
        return tensor

    # -- checkpoints: one writer (checkpoint.py) asks the runtime who holds what -----------------
    def save(self, out_dir, model: nn.Module, optimizer, shared: dict):
        return save_checkpoint(out_dir, model, optimizer, shared, self)

    def load(self, out_dir, model: nn.Module, optimizer) -> dict:
        return load_checkpoint(out_dir, model, optimizer, self)

    def per_rank_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []

    def layout_record(self) -> dict:
        return {"world_size": 1, "tp_size": 1, "ep_size": 1, "dp_size": 1, "rank": 0}

    def barrier(self) -> None:
        pass
