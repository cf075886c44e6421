"""A tiled grouped GEMM in numba.cuda: all experts' matrix products in one kernel launch.

    out[n, o] = Σ_i rows[n, i] · weight[e, o, i]         for every row n of expert e's segment

The classic shared-memory tiling, extended to segments. The output is cut into TILE × TILE tiles;
a tile's rows must belong to one expert, so each segment is cut into its own row tiles
(ceil(count_e / TILE) of them) and a small *tile table* says, for every row tile, its expert and
its first row. The grid is (row tiles of all segments) × (output-column tiles): one launch, however
uneven the segments, and an empty segment simply has no tiles. (Row tiles go on the grid's x axis,
the only one allowed more than 65535 blocks.)

Each block loads a TILE × TILE block of ``rows`` and one of ``weight[e]`` into shared memory, every
thread adds TILE products for its output element, and the block moves on along the inner dimension:

    for i0 in 0, TILE, 2·TILE, ...:   acc += Σ_{i < TILE} A_tile[ty, i] · W_tile[tx, i]

Each output element is one thread's sum in a fixed order, so results are bitwise reproducible.
The backward pass is two more launches:

    grad_rows[segment e] = grad_out[segment e] · weight[e]      the same kernel, with weight[e]ᵀ
    grad_weight[e]       = grad_out[segment e]ᵀ · rows[segment e]
                           (grid: E × d_out tiles × d_in tiles; a block walks its segment's rows)

This is the readable version of what CUTLASS / Triton grouped GEMMs do (they add register tiling,
tensor cores, pipelined loads). TILE is a parameter so the simulator tests can use tiny tiles: the
kernels are built per tile size (shared-array shapes must be compile-time constants).
"""
from __future__ import annotations

import functools
import math

import numba
import torch
from numba import cuda

from fastmoe_edu.dispatch import grouped_matmul as reference_grouped_matmul

from . import numba_cuda
from .second_order import create_graph_requested, reference_vjp

DEFAULT_TILE = 16
_NUMBA_TYPES = {torch.float32: numba.float32, torch.float64: numba.float64}


@functools.lru_cache(maxsize=None)
def _kernels(tile: int, dtype):
    """The forward and weight-gradient kernels for TILE = ``tile`` and element type ``dtype`` (a numba
    type): both are compile-time constants of the shared arrays and of the accumulator."""

    @cuda.jit
    def segment_matmul(rows, weight, tile_expert, tile_first_row, segment_end, out):
        """out[n, o] = Σ_i rows[n, i] · weight[e, o, i]; block = (row tile, column tile)."""
        a_tile = cuda.shared.array((tile, tile), dtype=dtype)
        w_tile = cuda.shared.array((tile, tile), dtype=dtype)
        tx = cuda.threadIdx.x                       # output column inside the tile
        ty = cuda.threadIdx.y                       # output row inside the tile
        row_tile = cuda.blockIdx.x
        expert = tile_expert[row_tile]
        end = segment_end[row_tile]
        row = tile_first_row[row_tile] + ty
        first_col = cuda.blockIdx.y * tile
        inner = rows.shape[1]
        acc = dtype(0)
        for i0 in range(0, inner, tile):
            # A_tile[ty, tx] = rows[row, i0 + tx];  W_tile[ty, tx] = weight[e, first_col + ty, i0 + tx]
            a_tile[ty, tx] = rows[row, i0 + tx] if (row < end and i0 + tx < inner) else 0
            w_row = first_col + ty
            w_tile[ty, tx] = weight[expert, w_row, i0 + tx] if (w_row < weight.shape[1] and i0 + tx < inner) else 0
            cuda.syncthreads()
            for i in range(tile):
                acc += a_tile[ty, i] * w_tile[tx, i]
            cuda.syncthreads()
        col = first_col + tx
        if row < end and col < out.shape[1]:
            out[row, col] = acc

    @cuda.jit
    def segment_outer(grad_out, rows, segment_begin, grad_weight):
        """grad_weight[e, o, i] = Σ_{n in segment e} grad_out[n, o] · rows[n, i]; block = (i tile, o tile, e)."""
        g_tile = cuda.shared.array((tile, tile), dtype=dtype)
        x_tile = cuda.shared.array((tile, tile), dtype=dtype)
        tx = cuda.threadIdx.x                       # inner column i inside the tile
        ty = cuda.threadIdx.y                       # output column o inside the tile
        expert = cuda.blockIdx.z
        first_i = cuda.blockIdx.x * tile
        first_o = cuda.blockIdx.y * tile
        begin = segment_begin[expert]
        end = segment_begin[expert + 1]
        acc = dtype(0)
        for n0 in range(begin, end, tile):
            # G_tile[r, c] = grad_out[n0 + r, first_o + c];  X_tile[r, c] = rows[n0 + r, first_i + c]
            n = n0 + ty
            g_tile[ty, tx] = grad_out[n, first_o + tx] if (n < end and first_o + tx < grad_out.shape[1]) else 0
            x_tile[ty, tx] = rows[n, first_i + tx] if (n < end and first_i + tx < rows.shape[1]) else 0
            cuda.syncthreads()
            for r in range(tile):
                acc += g_tile[r, ty] * x_tile[r, tx]
            cuda.syncthreads()
        o = first_o + ty
        i = first_i + tx
        if o < grad_weight.shape[1] and i < grad_weight.shape[2]:
            grad_weight[expert, o, i] = acc

    return segment_matmul, segment_outer


def _numba_type(dtype: torch.dtype):
    if dtype not in _NUMBA_TYPES:
        raise TypeError(f"the tiled grouped GEMM takes float32 or float64 tensors, got {dtype}")
    return _NUMBA_TYPES[dtype]


def _tile_table(counts: torch.Tensor, tile: int):
    """For every row tile of every segment: its expert, its first row, and its segment's end row."""
    ends = torch.cumsum(counts, dim=0)
    starts = ends - counts
    tiles_per_expert = (counts + tile - 1) // tile                                  # ceil(count_e / TILE)
    tile_expert = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), tiles_per_expert)
    first_tile = torch.cumsum(tiles_per_expert, dim=0) - tiles_per_expert
    index_in_segment = torch.arange(tile_expert.numel(), device=counts.device) - first_tile[tile_expert]
    tile_first_row = starts[tile_expert] + index_in_segment * tile
    return tile_expert, tile_first_row, ends[tile_expert]


def _matmul(rows, weight, counts, tile):
    """out = per-segment rows · weight[e]ᵀ with the tiled kernel (no autograd)."""
    segment_matmul, _ = _kernels(tile, _numba_type(rows.dtype))
    rows, weight = rows.contiguous(), weight.contiguous()
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    tile_expert, tile_first_row, segment_end = _tile_table(counts, tile)
    if tile_expert.numel() and out.numel():
        grid = (tile_expert.numel(), math.ceil(weight.shape[1] / tile))
        segment_matmul[grid, (tile, tile), numba_cuda.torch_stream()](
            *(numba_cuda.array(t) for t in (rows, weight, tile_expert, tile_first_row, segment_end, out)))
    return out


def _weight_grad(grad_out, rows, counts, tile):
    """grad_weight[e] = grad_out[segment e]ᵀ · rows[segment e] with the tiled kernel."""
    _, segment_outer = _kernels(tile, _numba_type(rows.dtype))
    grad_out, rows = grad_out.contiguous(), rows.contiguous()
    num_experts, d_out, d_in = counts.numel(), grad_out.shape[1], rows.shape[1]
    grad_weight = rows.new_empty(num_experts, d_out, d_in)
    segment_begin = torch.cat([counts.new_zeros(1), torch.cumsum(counts, dim=0)])
    if grad_weight.numel():
        grid = (math.ceil(d_in / tile), math.ceil(d_out / tile), num_experts)
        segment_outer[grid, (tile, tile), numba_cuda.torch_stream()](
            *(numba_cuda.array(t) for t in (grad_out, rows, segment_begin, grad_weight)))
    return grad_weight


class TiledGroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, counts, tile):
        ctx.tile = tile
        ctx.save_for_backward(rows, weight, counts)
        return _matmul(rows, weight, counts, tile)

    @staticmethod
    def backward(ctx, grad_out):
        rows, weight, counts = ctx.saved_tensors
        if create_graph_requested():
            return (*reference_vjp(reference_grouped_matmul, (rows, weight, counts), grad_out), None)
        grad_rows = grad_weight = None
        if ctx.needs_input_grad[0]:
            # g_e · W_e = g_e · (W_eᵀ)ᵀ: the forward kernel with the transposed weights.
            grad_rows = _matmul(grad_out, weight.transpose(1, 2), counts, ctx.tile)
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_grad(grad_out, rows, counts, ctx.tile)
        return grad_rows, grad_weight, None, None


def grouped_matmul_tiled(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                         tile: int = DEFAULT_TILE) -> torch.Tensor:
    """Segment-wise ``rows[segment e] · weight[e]ᵀ`` (rows [N, d_in], weight [E, d_out, d_in]) with the
    tiled numba.cuda kernel; float32 or float64 CUDA tensors (CPU tensors in numba's simulator)."""
    if not (rows.is_cuda or numba_cuda.simulator_enabled()):
        raise RuntimeError("the tiled grouped GEMM is a numba.cuda kernel: it needs CUDA tensors "
                           "(or, for tests, CPU tensors in numba's CUDA simulator)")
    return TiledGroupedMatmul.apply(rows, weight, counts.to(rows.device), tile)
