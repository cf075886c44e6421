"""Data parallelism: identical starting weights, averaged gradients, a global gradient norm.

Every rank computes the loss of its own shard of the global batch (a mean over its tokens), so the
training objective is the mean over the R = ep × dp shards::

    L = (1/R) · Σ_r L_r          (= the global-batch mean, because all shards have the same size)

* **Replicated parameters** (embeddings, attention, norms, gates: every rank holds a copy):
  ``∂L/∂θ = (1/R) Σ_r ∂L_r/∂θ`` — an all-reduce *average* over the data group.
* **Expert parameters** (each expert lives on one rank of the expert group): the backward
  all-to-all already delivers every rank's contribution to the expert's owner, so the owner holds
  ``Σ_{r in its expert group} ∂L_r/∂θ``. Summing that over the dp copies of the expert
  (expert-replica group) gives the sum over all R shards; dividing by R gives ``∂L/∂θ``.
  Expert gradients are therefore *not* averaged across the expert group — they are divided by R.
* **Tensor-parallel slices** (tp > 1) are all-reduced like replicated parameters, over the data
  group of their own tp index; with duplicate token dropping each tp rank's experts saw only 1/tp of
  the rows, so expert gradients are summed over the tensor group as well.

    parameter                          where copies live                 all-reduce over
    tp-sliced, and whole non-expert    ep·dp ranks with my tp index      data group, ×1/R
    experts, no token dropping         dp ranks with my (ep, tp) index   expert_replica group, ×1/R
    experts, duplicate tokens dropped  tp·dp ranks with my ep index      expert_replica ×1/R, then Σ tensor
    tensor-parallel experts            dp ranks with my (ep, tp) index   expert_replica group, ×1/R
                                       (each tp rank's shard saw every row: nothing to sum over tp)

All-reduces are *bucketed*: the gradients are concatenated into a few large flat buffers (default
25 MB, as PyTorch's DDP) and each bucket is one all-reduce. One message of 25 MB costs one latency
α; 200 messages of 125 kB would cost 200 α for the same bytes (docs/moe_systems.md §4).
"""
from __future__ import annotations

import torch
from torch import nn

from .communicator import Communicator
from .layout import ParallelLayout
from .plan import ParallelPlan

DEFAULT_BUCKET_BYTES = 25 * 2**20


def split_parameters(model: nn.Module, plan: ParallelPlan) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(replicated parameters, expert-parallel parameters) of ``model``, each in module order; the expert
    ones are those of ``plan.layers``."""
    expert_ids = {id(p) for p in plan.expert_parameters()}
    replicated = [p for p in model.parameters() if id(p) not in expert_ids]
    experts = [p for p in model.parameters() if id(p) in expert_ids]
    return replicated, experts


@torch.no_grad()
def broadcast_parameters(model: nn.Module, layout: ParallelLayout, plan: ParallelPlan) -> None:
    """Make every copy of every parameter and buffer equal to the copy of its group's rank 0.

    Replicated parameters and all buffers (e.g. the sigmoid router's bias) come from rank 0 of the
    data group; expert slices from rank 0 of their expert-replica group (the ranks holding the same
    slice). Building the model from the same seed everywhere already gives equal weights; this
    makes it true by construction, whatever the seed handling.
    """
    replicated, experts = split_parameters(model, plan)
    for tensor in replicated + list(model.buffers()):
        layout.data.broadcast_(tensor.data, root=0)
    for tensor in experts:
        layout.expert_replica.broadcast_(tensor.data, root=0)


@torch.no_grad()
def allreduce_gradients(model: nn.Module, layout: ParallelLayout, plan: ParallelPlan,
                        bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """After ``loss.backward()`` on every rank: turn the per-shard gradients into ``∂L/∂θ`` of the global batch
    (``plan``: what ``parallelize`` returned)."""
    replicated, _ = split_parameters(model, plan)
    _allreduce_in_buckets(replicated, layout.data, 1.0 / layout.data_size, bucket_bytes)   # (1/R) Σ_r, R = ep·dp
    allreduce_expert_gradients(model, layout, plan, bucket_bytes)


@torch.no_grad()
def allreduce_expert_gradients(model: nn.Module, layout: ParallelLayout, plan: ParallelPlan,
                               bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """The expert half of :func:`allreduce_gradients` (the replicated half may run in pieces during the
    backward instead: gradient_partitioning.py). Each layer's gradient groups are its plan's."""
    _, experts = split_parameters(model, plan)
    shards = layout.data_size                                                     # R = ep · dp
    _allreduce_in_buckets(experts, layout.expert_replica, 1.0 / shards, bucket_bytes)   # (1/R) Σ_dp Σ_ep
    summed = {id(p) for p in plan.expert_parameters_summed_over_tensor()}        # duplicate tokens dropped
    if summed:
        _allreduce_in_buckets([p for p in experts if id(p) in summed], layout.tensor, 1.0, bucket_bytes)


def _allreduce_in_buckets(params: list[nn.Parameter], comm: Communicator, scale: float, bucket_bytes: int) -> None:
    """``grad ← scale · Σ_ranks grad`` for every parameter, a bucket of flat gradients per Allreduce."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:                      # unused on this rank: it still takes part (with zeros),
            p.grad = torch.zeros_like(p)        # or the ranks' buckets would not line up
    if comm.size == 1:
        if scale != 1.0:
            for p in params:
                p.grad.mul_(scale)
        return
    for bucket in _buckets(params, bucket_bytes):
        flat = _flat_gradients(bucket)
        comm.allreduce_(flat, purpose="allreduce_gradients")
        _copy_back(bucket, flat, scale)


def _flat_gradients(params: list[nn.Parameter]) -> torch.Tensor:
    """The gradients of ``params`` in one flat buffer (also gradient_partitioning.py's pieces)."""
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    return flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat   # sum 16-bit grads in float32


def _copy_back(params: list[nn.Parameter], flat: torch.Tensor, scale: float) -> None:
    """``grad ← scale · flat``, each parameter's part of the (summed) flat buffer."""
    flat.mul_(scale)
    for p, part in zip(params, torch.split(flat, [p.numel() for p in params])):
        p.grad.copy_(part.view_as(p.grad))


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters of one dtype and device, at most ``bucket_bytes`` per bucket (a larger tensor gets its own)."""
    buckets, current, current_bytes = [], [], 0
    for p in params:
        size = p.numel() * p.element_size()
        starts_new = current and (current_bytes + size > bucket_bytes
                                  or (p.dtype, p.device) != (current[0].dtype, current[0].device))
        if starts_new:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += size
    if current:
        buckets.append(current)
    return buckets


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, layout: ParallelLayout, plan: ParallelPlan) -> torch.Tensor:
    """Distributed ``torch.nn.utils.clip_grad_norm_``: the norm of the *whole* model's gradient.

    Call after :func:`allreduce_gradients`. Then

        ‖g‖² = Σ whole replicated (equal on every rank: counted once) + Σ_tp tp-sliced + Σ_ep experts

    (the tp ranks hold equal copies of the experts and of the whole replicated parameters). Every
    rank gets the same norm and the same clip factor ``min(1, max_norm / (norm + 1e-6))`` (torch's
    formula), so replicated weights stay identical.
    """
    replicated, experts = split_parameters(model, plan)
    grads = [p.grad for p in replicated + experts if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sliced_ids = {id(p) for p in plan.sliced_parameters}

    def squares(params):
        return sum((p.grad.double().square().sum() for p in params if p.grad is not None),
                   torch.zeros((), dtype=torch.float64))

    whole_sq = squares([p for p in replicated if id(p) not in sliced_ids])
    sliced_sq = layout.tensor.allreduce_(squares([p for p in replicated if id(p) in sliced_ids]).reshape(1),
                                         purpose="allreduce_grad_norm")
    expert_sq = layout.expert.allreduce_(squares(experts).reshape(1), purpose="allreduce_grad_norm")
    if plan.tensor_parallel_experts:                                         # the tp ranks hold different
        expert_sq = layout.tensor.allreduce_(expert_sq, purpose="allreduce_grad_norm")   # expert shards
    total_norm = (whole_sq + sliced_sq[0] + expert_sq[0]).sqrt()
    clip = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(clip.to(g.dtype))
    return total_norm.to(grads[0].dtype)
