"""Grouped GEMM with torch's own kernels: ``torch._grouped_mm``, or one ``torch.mm`` per segment.

    out[segment e] = rows[segment e] · weight[e]ᵀ        rows [N, d_in] expert-sorted, weight [E, d_out, d_in]

Both are ``torch.autograd.Function``s with an explicit backward, the same two products per segment:

    grad_rows[segment e] = grad_out[segment e] · weight[e]
    grad_weight[e]       = grad_out[segment e]ᵀ · rows[segment e]          (0 for an empty segment)

Why an explicit backward rather than autograd through a loop? Autograd through ``weight[e]``
indexing would build a full-size [E, d_out, d_in] gradient for *every* expert and add them up (E
times the weight gradient's traffic; the reference avoids it with ``weight.unbind(0)``, which
stacks the E slices once). Here each expert's gradient slice is written in place, no stacking.

``torch._grouped_mm`` (torch 2.13; private API) takes ``mat_a [N, K]``, ``mat_b [E, K, N_out]`` and
``offs`` = int32 cumulative *end* offsets of the segments; with a 2-D ``mat_b`` [N, N_out] and the
offsets along the shared dimension it returns the per-segment products [E, K, N_out] that the
weight gradient needs. It accepts float32/bfloat16/float16 (not float64) whose rows are a multiple
of 16 bytes long and 16-byte aligned; :func:`grouped_mm_supports` checks that.
"""
from __future__ import annotations

import torch

from fastmoe_edu.dispatch import grouped_matmul as reference_grouped_matmul

from .second_order import create_graph_requested, reference_vjp


def grouped_mm_supports(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands (else use :func:`segment_matmul`)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if rows.device.type == "cpu":
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
    else:
        # On NVIDIA GPUs torch implements it for bfloat16 on compute capability 9.0+ (Hopper).
        dtypes = (torch.bfloat16,) if torch.cuda.get_device_capability(rows.device) >= (9, 0) else ()
    if rows.dtype not in dtypes or weight.dtype != rows.dtype:
        return False
    itemsize = rows.element_size()
    row_bytes_ok = (rows.shape[1] * itemsize) % 16 == 0 and (weight.shape[1] * itemsize) % 16 == 0
    return row_bytes_ok and rows.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0


class GroupedMM(torch.autograd.Function):
    """Grouped GEMM through torch._grouped_mm: one call for all segments, forward and backward."""

    @staticmethod
    def forward(ctx, rows, weight, counts):
        offsets = torch.cumsum(counts, dim=0).to(device=rows.device, dtype=torch.int32)   # segment ends
        ctx.save_for_backward(rows, weight, offsets, counts)
        return torch._grouped_mm(rows.contiguous(), weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, offsets, counts = ctx.saved_tensors
        if create_graph_requested():
            return reference_vjp(reference_grouped_matmul, (rows, weight, counts), grad_out)
        grad_out = grad_out.contiguous()
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch._grouped_mm(grad_out, weight, offs=offsets)            # g_e · W_e
        if ctx.needs_input_grad[1]:
            grad_weight = torch._grouped_mm(grad_out.t(), rows.contiguous(), offs=offsets)   # g_eᵀ · x_e
        return grad_rows, grad_weight, None


class SegmentMatmul(torch.autograd.Function):
    """Grouped GEMM as one torch.mm per non-empty segment, each writing its slice of the output."""

    @staticmethod
    def forward(ctx, rows, weight, counts):
        segments = _segments(counts)
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        for expert, begin, end in segments:
            torch.mm(rows[begin:end], weight[expert].t(), out=out[begin:end])     # x_e · W_eᵀ
        ctx.segments = segments
        ctx.save_for_backward(rows, weight, counts)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, counts = ctx.saved_tensors
        if create_graph_requested():
            return reference_vjp(reference_grouped_matmul, (rows, weight, counts), grad_out)
        grad_rows = rows.new_empty(rows.shape) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None   # empty segments: 0
        for expert, begin, end in ctx.segments:
            if grad_rows is not None:
                torch.mm(grad_out[begin:end], weight[expert], out=grad_rows[begin:end])           # g_e · W_e
            if grad_weight is not None:
                torch.mm(grad_out[begin:end].t(), rows[begin:end], out=grad_weight[expert])       # g_eᵀ · x_e
        return grad_rows, grad_weight, None


def _segments(counts: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, begin, end) of every non-empty segment: the one host synchronisation of the loop."""
    segments, begin = [], 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            segments.append((expert, begin, begin + count))
        begin += count
    return segments


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return GroupedMM.apply(rows, weight, counts)


def segment_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return SegmentMatmul.apply(rows, weight, counts)
