"""CPU kernels: the tasks of ``kernel_bodies.py`` compiled by ``numba.njit``, run in ``prange`` loops.

Every kernel takes numpy views of torch tensors (no copies; ``numba_backend.py`` makes them) and
writes into outputs allocated by the caller. The same names, with the same arguments, exist in
``numba_cuda.py``, so ``numba_backend.py`` calls ``target.scatter_rows(...)`` without caring which
target it has.

``prange`` splits the loop over tasks (tokens, rows, chunks) among numba's threads; each task writes
its own outputs, so there are no races and no atomics.
"""
import numba
import torch
from numba import prange

from . import kernel_bodies as bodies

#: Assignments per chunk in the two-pass ranking: large enough that the per-chunk counts table
#: (chunks × E) stays small, small enough that T·k = 32k assignments still give every thread work.
ASSIGNMENTS_PER_CHUNK = 2048


def _compile(body):
    """One task of kernel_bodies.py, compiled for the CPU (cached on disk after the first run)."""
    return numba.njit(cache=True)(body)


count_chunk = _compile(bodies.count_chunk)
offsets_over_chunks = _compile(bodies.offsets_over_chunks)
rank_chunk = _compile(bodies.rank_chunk)
exclusive_scan = _compile(bodies.exclusive_scan)
row_sources = _compile(bodies.row_sources)
copy_source_row = _compile(bodies.copy_source_row)
sum_token_copies = _compile(bodies.sum_token_copies)
combine_token = _compile(bodies.combine_token)
weighted_source_row = _compile(bodies.weighted_source_row)
slot_weight_grad = _compile(bodies.slot_weight_grad)
select_top_k = _compile(bodies.select_top_k)
softmax_top_k_weights = _compile(bodies.softmax_top_k_weights)
softmax_top_k_backward = _compile(bodies.softmax_top_k_backward)
sigmoid_selection_scores = _compile(bodies.sigmoid_selection_scores)
best_two_group_scores = _compile(bodies.best_two_group_scores)
mask_outside_best_groups = _compile(bodies.mask_outside_best_groups)
sigmoid_top_k_weights = _compile(bodies.sigmoid_top_k_weights)
sigmoid_top_k_backward = _compile(bodies.sigmoid_top_k_backward)


def array(tensor: torch.Tensor):
    """A numpy view of a contiguous CPU tensor (shares memory; keep the tensor alive)."""
    return tensor.detach().numpy()


# ----------------------------------------------------------------------------------------------------
# Integer kernels
# ----------------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def count_chunks(expert_ids, chunk_size, slot_major, chunk_counts):
    """Pass 1: chunk_counts[c, e] for every chunk c (parallel over chunks)."""
    for chunk in prange(chunk_counts.shape[0]):
        count_chunk(expert_ids, chunk, chunk_size, slot_major, chunk_counts)


@numba.njit(parallel=True, cache=True)
def scan_chunk_counts(chunk_counts, starts, ends):
    """Pass 2: turn counts into each chunk's first rank per expert; ends[e] = starts[e] + count[e]."""
    for expert in prange(chunk_counts.shape[1]):
        ends[expert] = offsets_over_chunks(chunk_counts, expert, starts[expert])


@numba.njit(parallel=True, cache=True)
def rank_chunks(expert_ids, chunk_size, slot_major, chunk_offsets, ranks):
    """Pass 3: ranks[t, s] for every assignment (parallel over chunks)."""
    for chunk in prange(chunk_offsets.shape[0]):
        rank_chunk(expert_ids, chunk, chunk_size, slot_major, chunk_offsets, ranks)


@numba.njit(cache=True)
def exclusive_prefix_sum(counts, starts):
    exclusive_scan(counts, starts)


# ----------------------------------------------------------------------------------------------------
# Scatter / combine kernels and their backward passes
# ----------------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def find_row_sources(rows, sources):
    for token in prange(rows.shape[0]):
        row_sources(rows, token, sources)


@numba.njit(parallel=True, cache=True)
def scatter_rows(x, sources, top_k, buffer):
    for row in prange(buffer.shape[0]):
        copy_source_row(x, sources, top_k, row, 0, 1, buffer)


@numba.njit(parallel=True, cache=True)
def scatter_rows_backward(grad_buffer, rows, grad_x):
    for token in prange(grad_x.shape[0]):
        sum_token_copies(grad_buffer, rows, token, 0, 1, grad_x)


@numba.njit(parallel=True, cache=True)
def gather_combine(expert_out, rows, weights, y):
    for token in prange(y.shape[0]):
        combine_token(expert_out, rows, weights, token, 0, 1, y)


@numba.njit(parallel=True, cache=True)
def gather_combine_backward_rows(grad_y, weights, sources, top_k, grad_expert_out):
    for row in prange(grad_expert_out.shape[0]):
        weighted_source_row(grad_y, weights, sources, top_k, row, 0, 1, grad_expert_out)


@numba.njit(parallel=True, cache=True)
def gather_combine_backward_weights(grad_y, expert_out, rows, grad_weights):
    for token in prange(rows.shape[0]):
        for slot in range(rows.shape[1]):
            slot_weight_grad(grad_y, expert_out, rows, token, slot, grad_weights)


# ----------------------------------------------------------------------------------------------------
# Router kernels (one token per task)
# ----------------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def softmax_topk_route(logits, renormalize, expert_ids, weights):
    for token in prange(logits.shape[0]):
        select_top_k(logits, token, expert_ids.shape[1], expert_ids)
        softmax_top_k_weights(logits, expert_ids, token, renormalize, weights)


@numba.njit(parallel=True, cache=True)
def softmax_topk_route_backward(logits, expert_ids, weights, grad_weights, renormalize, grad_logits):
    for token in prange(logits.shape[0]):
        softmax_top_k_backward(logits, expert_ids, weights, grad_weights, token, renormalize, grad_logits)


@numba.njit(parallel=True, cache=True)
def sigmoid_topk_route(logits, bias, route_scale, num_groups, topk_groups, selection, group_scores,
                       expert_ids, weights):
    """``num_groups = 0`` switches group-limited routing off; ``selection``, ``group_scores`` are scratch."""
    for token in prange(logits.shape[0]):
        sigmoid_selection_scores(logits, bias, token, selection)
        if num_groups > 0:
            best_two_group_scores(selection, token, num_groups, group_scores)
            mask_outside_best_groups(group_scores, token, num_groups, topk_groups, selection)
        select_top_k(selection, token, expert_ids.shape[1], expert_ids)
        sigmoid_top_k_weights(logits, expert_ids, token, route_scale, weights)


@numba.njit(parallel=True, cache=True)
def sigmoid_topk_route_backward(logits, expert_ids, grad_weights, route_scale, grad_logits):
    for token in prange(logits.shape[0]):
        sigmoid_top_k_backward(logits, expert_ids, grad_weights, token, route_scale, grad_logits)
