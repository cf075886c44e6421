"""GPU kernels: the tasks of ``numba_cpu.py`` compiled by ``numba.cuda.jit``, one task per thread.

The public functions have the same names and arguments as in ``numba_cpu.py``; each launches a
kernel whose thread runs one task: one chunk of assignments, one expert, one token, one (token,
slot), or — for the row copies, which are the memory-heavy part — one *element* (row, column), so
neighbouring threads touch neighbouring addresses (coalesced loads and stores).

Kernels run on torch's current CUDA stream (``cuda.external_stream``), so they are ordered with the
torch operations around them and torch's caching allocator may reuse their buffers safely. Arrays
come from torch tensors through ``__cuda_array_interface__`` (``cuda.as_cuda_array``): no copies.

In numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is first imported) the same
kernels run on the CPU, one Python thread per GPU thread: that is how the tests check this file on
machines without a GPU. There, "device arrays" are numpy views of CPU tensors.
"""
import math
import warnings

import numba
import numpy
import torch

if not hasattr(numpy, "row_stack") and not numba.config.ENABLE_CUDASIM:
    # numba-cuda 0.30 registers a kernel overload for numpy.row_stack, an alias of numpy.vstack that
    # NumPy 2.5 removed, the first time it compiles a kernel, and every compilation fails without it
    # (seen on an H200 with numpy 2.5.2, numba-cuda 0.30.4). Put the alias back before numba.cuda loads.
    numpy.row_stack = numpy.vstack

from numba import cuda  # after the alias above

# Some launches are small on purpose (one thread per expert, or one for a prefix sum over E counts):
# numba's "Grid size N will likely result in GPU under-utilization" warning (its text starts with a
# terminal colour code, hence the leading .*) says nothing useful there.
warnings.filterwarnings("ignore", message=r".*Grid size \d+ will likely result in GPU under-utilization")

from . import numba_cpu

#: Assignments per chunk in the two-pass ranking (one thread walks one chunk): small, so that
#: T·k = 32k assignments give 1k threads; the counts table (chunks × E int64) stays a few MB at most.
ASSIGNMENTS_PER_CHUNK = 32
#: Threads per block: 128 is a good default for these memory-bound kernels on NVIDIA GPUs.
MAX_THREADS_PER_BLOCK = 128


def _compile(task):
    """One task of numba_cpu.py (plain Python), compiled as a CUDA device function."""
    return cuda.jit(device=True)(task)


count_chunk = _compile(numba_cpu.count_chunk)
rank_chunk = _compile(numba_cpu.rank_chunk)
exclusive_prefix_sum_task = _compile(numba_cpu.exclusive_prefix_sum_task)
row_sources = _compile(numba_cpu.row_sources)
copy_source_row = _compile(numba_cpu.copy_source_row)
sum_token_copies = _compile(numba_cpu.sum_token_copies)
combine_token = _compile(numba_cpu.combine_token)
weighted_source_row = _compile(numba_cpu.weighted_source_row)
slot_weight_grad = _compile(numba_cpu.slot_weight_grad)
select_top_k = _compile(numba_cpu.select_top_k)
softmax_top_k_weights = _compile(numba_cpu.softmax_top_k_weights)
softmax_top_k_backward = _compile(numba_cpu.softmax_top_k_backward)
softmax_selection_scores = _compile(numba_cpu.softmax_selection_scores)
group_max_scores = _compile(numba_cpu.group_max_scores)
sigmoid_selection_scores = _compile(numba_cpu.sigmoid_selection_scores)
copy_with_group_max_scores = _compile(numba_cpu.copy_with_group_max_scores)
best_two_group_scores = _compile(numba_cpu.best_two_group_scores)
mask_outside_best_groups = _compile(numba_cpu.mask_outside_best_groups)
sigmoid_top_k_weights = _compile(numba_cpu.sigmoid_top_k_weights)
sigmoid_top_k_backward = _compile(numba_cpu.sigmoid_top_k_backward)


def simulator_enabled() -> bool:
    """Whether numba.cuda is the CPU simulator (decided by numba when it was first imported)."""
    return bool(numba.config.ENABLE_CUDASIM)


def array(tensor: torch.Tensor):
    """A numba device array viewing a contiguous CUDA tensor (shares memory; keep the tensor alive).
    In the simulator, CPU tensors stand in for GPU ones and a numpy view is the "device array"."""
    if tensor.is_cuda:
        return cuda.as_cuda_array(tensor.detach())
    if not simulator_enabled():
        raise RuntimeError("numba.cuda kernels need CUDA tensors (or numba's CUDA simulator for CPU tensors)")
    return tensor.detach().numpy()


def torch_stream():
    """torch's current stream, so our kernels queue behind (and before) torch's own work."""
    if simulator_enabled():
        return 0
    return cuda.external_stream(torch.cuda.current_stream().cuda_stream)


def _launch(kernel, num_tasks, *args):
    """Run ``kernel`` with at least ``num_tasks`` threads (each checks its index against the work).
    A small launch gets a small block: a GPU runs it in one warp either way, and the simulator,
    which starts a Python thread per GPU thread, stays fast."""
    if num_tasks == 0:
        return
    threads = min(MAX_THREADS_PER_BLOCK, num_tasks)
    blocks = math.ceil(num_tasks / threads)
    kernel[blocks, threads, torch_stream()](*args)


# ----------------------------------------------------------------------------------------------------
# Integer kernels
# ----------------------------------------------------------------------------------------------------
@cuda.jit
def _count_chunks_kernel(expert_ids, chunk_size, slot_major, ordered, token_order, chunk_counts):
    chunk = cuda.grid(1)
    if chunk < chunk_counts.shape[0]:
        count_chunk(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, chunk_counts)


@cuda.jit
def _rank_chunks_kernel(expert_ids, chunk_size, slot_major, ordered, token_order, chunk_offsets, ranks):
    chunk = cuda.grid(1)
    if chunk < chunk_offsets.shape[0]:
        rank_chunk(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, chunk_offsets, ranks)


@cuda.jit
def _exclusive_prefix_sum_kernel(counts, starts):
    if cuda.grid(1) == 0:
        exclusive_prefix_sum_task(counts, starts)


def count_chunks(expert_ids, chunk_size, slot_major, ordered, token_order, chunk_counts):
    _launch(_count_chunks_kernel, chunk_counts.shape[0], expert_ids, chunk_size, slot_major, ordered, token_order,
            chunk_counts)


def rank_chunks(expert_ids, chunk_size, slot_major, ordered, token_order, chunk_offsets, ranks):
    _launch(_rank_chunks_kernel, chunk_offsets.shape[0], expert_ids, chunk_size, slot_major, ordered, token_order,
            chunk_offsets, ranks)


def exclusive_prefix_sum(counts, starts):
    _launch(_exclusive_prefix_sum_kernel, 1, counts, starts)


# ----------------------------------------------------------------------------------------------------
# Scatter / combine kernels and their backward passes: one thread per output element
# ----------------------------------------------------------------------------------------------------
@cuda.jit
def _find_row_sources_kernel(rows, sources):
    token = cuda.grid(1)
    if token < rows.shape[0]:
        row_sources(rows, token, sources)


@cuda.jit
def _scatter_rows_kernel(x, sources, top_k, buffer):
    index = cuda.grid(1)
    width = buffer.shape[1]
    if index < buffer.shape[0] * width:
        col = index % width
        copy_source_row(x, sources, top_k, index // width, col, col + 1, buffer)


@cuda.jit
def _scatter_rows_backward_kernel(grad_buffer, rows, grad_x):
    index = cuda.grid(1)
    width = grad_x.shape[1]
    if index < grad_x.shape[0] * width:
        col = index % width
        sum_token_copies(grad_buffer, rows, index // width, col, col + 1, grad_x)


@cuda.jit
def _gather_combine_kernel(expert_out, rows, weights, y):
    index = cuda.grid(1)
    width = y.shape[1]
    if index < y.shape[0] * width:
        col = index % width
        combine_token(expert_out, rows, weights, index // width, col, col + 1, y)


@cuda.jit
def _gather_combine_backward_rows_kernel(grad_y, weights, sources, top_k, grad_expert_out):
    index = cuda.grid(1)
    width = grad_expert_out.shape[1]
    if index < grad_expert_out.shape[0] * width:
        col = index % width
        weighted_source_row(grad_y, weights, sources, top_k, index // width, col, col + 1, grad_expert_out)


@cuda.jit
def _gather_combine_backward_weights_kernel(grad_y, expert_out, rows, grad_weights):
    index = cuda.grid(1)
    top_k = rows.shape[1]
    if index < rows.shape[0] * top_k:
        slot_weight_grad(grad_y, expert_out, rows, index // top_k, index % top_k, grad_weights)


def find_row_sources(rows, sources):
    _launch(_find_row_sources_kernel, rows.shape[0], rows, sources)


def scatter_rows(x, sources, top_k, buffer):
    _launch(_scatter_rows_kernel, buffer.size, x, sources, top_k, buffer)


def scatter_rows_backward(grad_buffer, rows, grad_x):
    _launch(_scatter_rows_backward_kernel, grad_x.size, grad_buffer, rows, grad_x)


def gather_combine(expert_out, rows, weights, y):
    _launch(_gather_combine_kernel, y.size, expert_out, rows, weights, y)


def gather_combine_backward_rows(grad_y, weights, sources, top_k, grad_expert_out):
    _launch(_gather_combine_backward_rows_kernel, grad_expert_out.size, grad_y, weights, sources, top_k,
            grad_expert_out)


def gather_combine_backward_weights(grad_y, expert_out, rows, grad_weights):
    _launch(_gather_combine_backward_weights_kernel, rows.size, grad_y, expert_out, rows, grad_weights)


# ----------------------------------------------------------------------------------------------------
# Router kernels: one thread per token
# ----------------------------------------------------------------------------------------------------
@cuda.jit
def _softmax_top_k_route_kernel(logits, renormalize, num_groups, top_k_groups, has_bias, bias, selection, group_scores,
                                expert_ids, weights):
    token = cuda.grid(1)
    if token < logits.shape[0]:
        if has_bias:
            softmax_selection_scores(logits, bias, token, selection)
            if num_groups > 0:
                group_max_scores(selection, token, num_groups, group_scores)
                mask_outside_best_groups(group_scores, token, num_groups, top_k_groups, selection)
            select_top_k(selection, token, expert_ids.shape[1], expert_ids)
        elif num_groups > 0:
            copy_with_group_max_scores(logits, token, num_groups, selection, group_scores)
            mask_outside_best_groups(group_scores, token, num_groups, top_k_groups, selection)
            select_top_k(selection, token, expert_ids.shape[1], expert_ids)
        else:
            select_top_k(logits, token, expert_ids.shape[1], expert_ids)
        softmax_top_k_weights(logits, expert_ids, token, renormalize, weights)


@cuda.jit
def _softmax_top_k_route_backward_kernel(logits, expert_ids, weights, grad_weights, renormalize, grad_logits):
    token = cuda.grid(1)
    if token < logits.shape[0]:
        softmax_top_k_backward(logits, expert_ids, weights, grad_weights, token, renormalize, grad_logits)


@cuda.jit
def _sigmoid_top_k_route_kernel(logits, bias, route_scale, renormalize, num_groups, top_k_groups, min_total,
                               selection, group_scores, expert_ids, weights):
    token = cuda.grid(1)
    if token < logits.shape[0]:
        sigmoid_selection_scores(logits, bias, token, selection)
        if num_groups > 0:
            best_two_group_scores(selection, token, num_groups, group_scores)
            mask_outside_best_groups(group_scores, token, num_groups, top_k_groups, selection)
        select_top_k(selection, token, expert_ids.shape[1], expert_ids)
        sigmoid_top_k_weights(logits, expert_ids, token, route_scale, renormalize, min_total, weights)


@cuda.jit
def _sigmoid_top_k_route_backward_kernel(logits, expert_ids, grad_weights, route_scale, renormalize, min_total,
                                         grad_logits):
    token = cuda.grid(1)
    if token < logits.shape[0]:
        sigmoid_top_k_backward(logits, expert_ids, grad_weights, token, route_scale, renormalize, min_total,
                               grad_logits)


def softmax_top_k_route(logits, renormalize, num_groups, top_k_groups, has_bias, bias, selection, group_scores,
                        expert_ids, weights):
    _launch(_softmax_top_k_route_kernel, logits.shape[0], logits, renormalize, num_groups, top_k_groups, has_bias,
            bias, selection, group_scores, expert_ids, weights)


def softmax_top_k_route_backward(logits, expert_ids, weights, grad_weights, renormalize, grad_logits):
    _launch(_softmax_top_k_route_backward_kernel, logits.shape[0], logits, expert_ids, weights, grad_weights,
            renormalize, grad_logits)


def sigmoid_top_k_route(logits, bias, route_scale, renormalize, num_groups, top_k_groups, min_total, selection,
                       group_scores, expert_ids, weights):
    _launch(_sigmoid_top_k_route_kernel, logits.shape[0], logits, bias, route_scale, renormalize, num_groups,
            top_k_groups, min_total, selection, group_scores, expert_ids, weights)


def sigmoid_top_k_route_backward(logits, expert_ids, grad_weights, route_scale, renormalize, min_total, grad_logits):
    _launch(_sigmoid_top_k_route_backward_kernel, logits.shape[0], logits, expert_ids, grad_weights, route_scale,
            renormalize, min_total, grad_logits)
