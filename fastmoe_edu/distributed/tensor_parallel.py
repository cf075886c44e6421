"""Tensor parallelism (Megatron-LM style) for the non-expert layers, and the tp-group row split / all-gather.

The ``tp`` ranks of one tensor group see the *same* tokens and each hold a slice of every
non-expert matrix. For attention (heads are independent) and for the dense MLP:

    column-parallel   q, k, v = x·W_qᵀ[rows of my heads], ...     (W split by output rows)
                      up      = x·W_upᵀ[my hidden units] + b_up[my units]
    row-parallel      out     = Σ_{tp ranks} y_mine · W_outᵀ[:, my columns]   (W split by input columns)

so a block costs exactly two collectives, both on the tensor group:

    x ─► copy_to_tensor_region ─► column-parallel ─► (per head / per unit) ─► row-parallel ─► reduce_from_tensor_region ─► y
         forward: identity                                                                   forward: all-reduce (Σ)
         backward: all-reduce (Σ)                                                            backward: identity

Why these backwards: after the forward all-reduce every tp rank holds the same ``y`` and computes
the same loss, so ``∂L/∂y`` is already complete and identical on each rank (identity backward).
The input ``x`` feeds *every* rank's column slice, so its gradient is the sum of the slices'
contributions (all-reduce backward). Parameters that every tp rank holds whole (norms, embeddings,
gates, biases added after the all-reduce) therefore get identical, complete gradients on every tp
rank; only the data-parallel average over the ranks with the same tp index is still needed.

The second pair of functions here is what *duplicate token dropping* (TED) uses:

    split_rows_for_tensor_rank   forward: keep my contiguous share of the rows
                                 backward: all-gather the shares' gradients (every rank needs all of them)
    gather_rows_from_tensor_group forward: all-gather the shares (rank order = row order)
                                 backward: keep my share of the gradient — NOT a reduce-scatter:
                                 every tp rank runs the same downstream computation, so each already
                                 holds the full, identical ∂L/∂rows; summing over tp would multiply it by tp.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..precision import at_least_float32
from .communicator import Communicator
from .layout import ParallelLayout


# ----------------------------------------------------------------------------------------------------
# The two Megatron region functions
# ----------------------------------------------------------------------------------------------------
class CopyToTensorRegion(torch.autograd.Function):
    """Identity forward; all-reduce (sum over the tensor group) backward. Placed before column-parallel maps."""

    @staticmethod
    def forward(ctx, x, comm: Communicator):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _sum_over(ctx.comm, grad, "tp_allreduce_backward"), None


class ReduceFromTensorRegion(torch.autograd.Function):
    """All-reduce (sum) forward; identity backward. Placed after row-parallel maps."""

    @staticmethod
    def forward(ctx, partial, comm: Communicator):
        return _sum_over(comm, partial, "tp_allreduce_forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _sum_over(comm: Communicator, tensor: torch.Tensor, purpose: str) -> torch.Tensor:
    """Σ over the tensor group, added in at least float32 (under bfloat16/float16 autocast the partial
    sums come in low precision: they are upcast for the sum and the result cast back)."""
    total = comm.allreduce_(at_least_float32(tensor).contiguous().clone(), purpose=purpose)
    return total.to(tensor.dtype)


def copy_to_tensor_region(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    return CopyToTensorRegion.apply(x, comm) if comm.size > 1 else x


def reduce_from_tensor_region(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    return ReduceFromTensorRegion.apply(x, comm) if comm.size > 1 else x


# ----------------------------------------------------------------------------------------------------
# Rows shared out over the tensor group (duplicate token dropping)
# ----------------------------------------------------------------------------------------------------
def row_shares(num_rows: int, parts: int) -> list[int]:
    """How many rows each of ``parts`` ranks keeps: as equal as possible, the first ``num_rows % parts`` get one more."""
    base, extra = divmod(num_rows, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class SplitRowsForTensorRank(torch.autograd.Function):
    """Forward: rows ``[start, start + shares[rank])`` of a tensor every tp rank holds; backward: all-gather."""

    @staticmethod
    def forward(ctx, rows, shares: list[int], comm: Communicator):
        ctx.shares, ctx.comm = shares, comm
        start = sum(shares[:comm.rank])
        return rows[start:start + shares[comm.rank]].clone()

    @staticmethod
    def backward(ctx, grad_share):
        return ctx.comm.allgatherv(grad_share.contiguous(), ctx.shares, "allgather_backward"), None, None


class GatherRowsFromTensorGroup(torch.autograd.Function):
    """Forward: all-gather the tp ranks' row shares; backward: this rank's share of the (identical) gradient."""

    @staticmethod
    def forward(ctx, share, shares: list[int], comm: Communicator):
        ctx.shares, ctx.comm = shares, comm
        return comm.allgatherv(share.contiguous(), shares, "allgather_forward")

    @staticmethod
    def backward(ctx, grad_all):
        start = sum(ctx.shares[:ctx.comm.rank])
        return grad_all[start:start + ctx.shares[ctx.comm.rank]].contiguous(), None, None


# ----------------------------------------------------------------------------------------------------
# Tensor-parallel layers
# ----------------------------------------------------------------------------------------------------
def check_divisible(what: str, value: int, tp: int) -> int:
    """``value / tp``, or a ValueError that says what to change (plain arithmetic: config.py calls it too)."""
    if value % tp:
        raise ValueError(f"{what}={value} is not divisible by tp={tp}: tensor parallelism splits it evenly over "
                         f"the tp ranks; choose tp among the divisors of {value}")
    return value // tp


class TensorParallelAttention(nn.Module):
    """``CausalSelfAttention`` with ``n_head / tp`` heads on this rank (q/k/v column-, output row-parallel).

    Parameter names stay ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (shapes ``[d/tp, d]`` and ``[d, d/tp]``).
    """

    def __init__(self, attention: nn.Module, comm: Communicator):
        super().__init__()
        self.comm = comm
        heads_here = check_divisible("n_head", attention.n_head, comm.size)
        self.n_head, self.head_dim = heads_here, attention.head_dim
        width = heads_here * attention.head_dim                        # this rank's columns of the d-wide heads
        rows = slice(comm.rank * width, (comm.rank + 1) * width)
        self.q_proj, self.k_proj, self.v_proj = (_linear_from(proj.weight.detach()[rows])
                                                 for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        self.out_proj = _linear_from(attention.out_proj.weight.detach()[:, rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        x = copy_to_tensor_region(x, self.comm)                                   # backward: Σ over tp
        q, k, v = (proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))        # my heads only
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return reduce_from_tensor_region(self.out_proj(y), self.comm)            # forward: Σ over tp

    def sliced_parameters(self) -> list[nn.Parameter]:
        return [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.out_proj.weight]


class TensorParallelMLP(nn.Module):
    """``DenseMLP`` with ``d_hidden / tp`` hidden units here: ``up`` column-parallel, ``down`` row-parallel.

    ``down``'s bias is added once, after the all-reduce (every rank holds it whole).
    """

    def __init__(self, mlp: nn.Module, comm: Communicator):
        super().__init__()
        self.comm = comm
        hidden = mlp.up.weight.shape[0]
        units = check_divisible("d_hidden", hidden, comm.size)
        mine = slice(comm.rank * units, (comm.rank + 1) * units)
        self.up = _linear_from(mlp.up.weight.detach()[mine], mlp.up.bias.detach()[mine])
        self.down = _linear_from(mlp.down.weight.detach()[:, mine])
        self.down_bias = nn.Parameter(mlp.down.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_region(x, self.comm)
        partial = self.down(F.gelu(self.up(x)))                                  # my units' share of the output
        return reduce_from_tensor_region(partial, self.comm) + self.down_bias

    def sliced_parameters(self) -> list[nn.Parameter]:
        """The bias added after the all-reduce is whole: not among them."""
        return [self.up.weight, self.up.bias, self.down.weight]


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


#: Which modules tensor parallelism slices: a module's class name -> the class that builds its slice from it
#: (``Slice(module, tensor_communicator)``, with a ``sliced_parameters()`` method). The language model's
#: two are here by name, so this file imports no model; another model adds its own with
#: :func:`register_tensor_parallel` where it is defined, or passes its own table to make_tensor_parallel.
TENSOR_PARALLEL = {"CausalSelfAttention": TensorParallelAttention, "DenseMLP": TensorParallelMLP}


def register_tensor_parallel(class_name: str, make_slice) -> None:
    """Slice every module of class ``class_name`` with ``make_slice(module, comm)`` under tp > 1."""
    TENSOR_PARALLEL[class_name] = make_slice


def make_tensor_parallel(model: nn.Module, layout: ParallelLayout, table: dict | None = None) -> list[nn.Parameter]:
    """Replace every module named in ``table`` (default :data:`TENSOR_PARALLEL`) by its tensor-parallel slice,
    in place; returns the sliced parameters (each tp rank holds a different slice of them).

    Call on the whole model built from the same seed on every rank, before the optimizer exists.
    Checks all divisibilities first (no communication), so a bad tp fails on every rank alike.
    """
    table = TENSOR_PARALLEL if table is None else table
    comm = layout.tensor
    if comm.size == 1:
        return []
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child).__name__ in table]
    # Every slice is built (each checks its divisibility first) before any is swapped in: a bad tp changes nothing.
    slices = [table[type(child).__name__](child, comm) for _, _, child in targets]
    for (parent, name, _), sliced in zip(targets, slices):
        setattr(parent, name, sliced)
    return [p for sliced in slices for p in sliced.sliced_parameters()]
