"""The numba backend's algorithms, and the CPU kernels that run them.

Part 1, the *tasks*: every function there does the work of one parallel task — one token, one buffer
row, one chunk of assignments, one expert — written once as plain Python and compiled twice:
below with ``numba.njit`` (CPU kernels run the tasks in a ``prange`` loop), and in ``numba_cuda.py``
with ``numba.cuda.jit(device=True)`` (GPU kernels run one task per thread). So the CPU and GPU kernels
cannot drift apart: they are the same code.

Why plain functions and not ``@numba.njit`` functions that the CUDA kernels call directly? On a real
GPU numba.cuda can call an ``@njit`` function, but numba's CUDA *simulator* (which runs the GPU tests
on machines without a GPU) cannot: it hands the function simulated device arrays, which the CPU
compiler refuses ("Cannot determine Numba type of FakeWithinKernelCUDAArray"). Compiling the plain
source once per target works on the CPU, on the GPU and in the simulator. It is also why the tasks
never call each other: a plain function cannot know which target's compiled copy of a helper to call.

Why the tasks live in this file and not in one of their own: the CPU kernels are cached on disk
(``cache=True``: 15 s of compiling once, not in every process), and numba checks a cached kernel only
against the file that defines it. A kernel inlines its tasks, so a task edited in another file would
leave the old compiled kernel in use; here, editing a task changes this file and recompiles.

Conventions. ``expert_ids``/``rows``/``weights`` are ``[T, k]``; a dropped assignment has id -1 and
row -1. Row tasks handle the columns ``first_col <= col < end_col`` of their row: the CPU passes
``(0, width)`` (the whole row, one task per row), the GPU ``(col, col + 1)`` (one element per
thread); a unit-step range is also what lets the CPU compiler vectorize the loop. Every output
element is written by exactly one task and its sum runs in a fixed order (slots in order 0..k-1,
columns in order), so two runs are bitwise identical.
Long reductions (a dot product over d, softmax's sum over E) accumulate in a Python float, which
numba types as float64; the k-term sums accumulate in the output's own dtype, like the reference.

Part 2, the *CPU kernels*: numpy views of torch tensors in (no copies; ``numba_backend.py`` makes
them), outputs allocated by the caller. ``numba_cuda.py`` has the same kernel names with the same
arguments, so ``numba_backend.py`` calls ``target.scatter_rows(...)`` whichever target it has. Each
task writes its own outputs: no races, no atomics.
"""
import math

import numba
import torch
from numba import prange

# ====================================================================================================
# Part 1: the tasks (plain Python; compiled for the CPU below and for the GPU in numba_cuda.py)
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# Integer steps: counting and stable ranking, in chunks of the assignment list.
#
# The T·k assignments are walked in a fixed order, cut into chunks of ``chunk_size`` consecutive
# assignments. Ranking is two-pass, which is what makes it both parallel and stable:
#   1. count_chunk:         chunk_counts[c, e] = #{assignments to e in chunk c}        (parallel over c)
#   2. (torch.cumsum in numba_backend.py) offset[c, e] = start_e + Σ_{c'<c} chunk_counts[c', e]
#   3. rank_chunk:          walk chunk c again; each assignment to e takes offset[c, e]++ (parallel over c)
# Inside a chunk the walk is sequential, and chunks are laid out in walk order, so an assignment's
# rank counts exactly the earlier assignments (in walk order) to the same expert.
#
# Walk orders: token-major i = t·k + s (stable positions, counts) and slot-major i = s·T + t
# (capacity priority: every token's first choice before any second choice). A slot-major walk may be
# ``ordered``: its j-th token is then token_order[j] instead of j (batch-prioritized routing: the tokens
# sorted by decreasing priority), so the walk, and every rank, follows that order. The order is an input
# (sorted before the kernels run), so the kernels stay free of atomics and deterministic.
# ----------------------------------------------------------------------------------------------------
def count_chunk(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, chunk_counts):
    """chunk_counts[chunk, e] = number of assignments to expert e among walk positions
    [chunk·chunk_size, (chunk+1)·chunk_size)."""
    num_tokens, top_k = expert_ids.shape
    for expert in range(chunk_counts.shape[1]):
        chunk_counts[chunk, expert] = 0
    begin = chunk * chunk_size
    end = min(begin + chunk_size, num_tokens * top_k)
    for position in range(begin, end):
        if slot_major:
            token, slot = position % num_tokens, position // num_tokens
            if ordered:
                token = token_order[token]
        else:
            token, slot = position // top_k, position % top_k
        expert = expert_ids[token, slot]
        if expert >= 0:
            chunk_counts[chunk, expert] += 1


def rank_chunk(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, chunk_offsets, ranks):
    """Second walk of one chunk: ranks[t, s] = chunk_offsets[chunk, e]++ for an assignment to e,
    -1 for a dropped one. With offsets started at start[e] the rank is the row in the sorted buffer."""
    num_tokens, top_k = expert_ids.shape
    begin = chunk * chunk_size
    end = min(begin + chunk_size, num_tokens * top_k)
    for position in range(begin, end):
        if slot_major:
            token, slot = position % num_tokens, position // num_tokens
            if ordered:
                token = token_order[token]
        else:
            token, slot = position // top_k, position % top_k
        expert = expert_ids[token, slot]
        if expert >= 0:
            ranks[token, slot] = chunk_offsets[chunk, expert]
            chunk_offsets[chunk, expert] += 1
        else:
            ranks[token, slot] = -1


def exclusive_prefix_sum_task(counts, starts):
    """starts[e] = Σ_{j<e} counts[j]. Sequential: E is a few hundred at most (one task)."""
    running = 0
    for expert in range(counts.shape[0]):
        starts[expert] = running
        running += counts[expert]


# ----------------------------------------------------------------------------------------------------
# Float steps: scatter to the expert-sorted buffer, gather + combine, and their backward passes.
# ----------------------------------------------------------------------------------------------------
def row_sources(rows, token, sources):
    """The inverse of ``rows`` for one token: sources[rows[t, s]] = t·k + s for each kept slot.
    A buffer row then knows which (token, slot) it came from, so kernels can be parallel over rows."""
    top_k = rows.shape[1]
    for slot in range(top_k):
        row = rows[token, slot]
        if row >= 0:
            sources[row] = token * top_k + slot


def copy_source_row(x, sources, top_k, row, first_col, end_col, buffer):
    """Scatter, seen from the buffer: buffer[row] = x[t] for the (t, s) that owns the row, else 0."""
    source = sources[row]
    if source < 0:
        for col in range(first_col, end_col):
            buffer[row, col] = 0
    else:
        token = source // top_k
        for col in range(first_col, end_col):
            buffer[row, col] = x[token, col]


def sum_token_copies(grad_buffer, rows, token, first_col, end_col, grad_x):
    """Scatter's backward: grad_x[t] = Σ_{s kept} grad_buffer[rows[t, s]], slots in order 0..k-1."""
    for col in range(first_col, end_col):
        grad_x[token, col] = 0
    for slot in range(rows.shape[1]):
        row = rows[token, slot]
        if row >= 0:
            for col in range(first_col, end_col):
                grad_x[token, col] += grad_buffer[row, col]


def combine_token(expert_out, rows, weights, token, first_col, end_col, y):
    """Gather + combine: y[t] = Σ_{s kept} w[t, s] · expert_out[rows[t, s]], slots in order."""
    for col in range(first_col, end_col):
        y[token, col] = 0
    for slot in range(rows.shape[1]):
        row = rows[token, slot]
        if row >= 0:
            weight = weights[token, slot]
            for col in range(first_col, end_col):
                y[token, col] += weight * expert_out[row, col]


def weighted_source_row(grad_y, weights, sources, top_k, row, first_col, end_col, grad_expert_out):
    """Combine's backward for expert_out: grad_expert_out[row] = w[t, s] · grad_y[t] for the
    (t, s) that owns the row (0 for a row no slot reads)."""
    source = sources[row]
    if source < 0:
        for col in range(first_col, end_col):
            grad_expert_out[row, col] = 0
    else:
        token, slot = source // top_k, source % top_k
        weight = weights[token, slot]
        for col in range(first_col, end_col):
            grad_expert_out[row, col] = weight * grad_y[token, col]


def slot_weight_grad(grad_y, expert_out, rows, token, slot, grad_weights):
    """Combine's backward for the weights: grad_w[t, s] = <grad_y[t], expert_out[rows[t, s]]>
    (0 for a dropped slot)."""
    row = rows[token, slot]
    total = 0.0
    if row >= 0:
        for col in range(grad_y.shape[1]):
            total += grad_y[token, col] * expert_out[row, col]
    grad_weights[token, slot] = total


# ----------------------------------------------------------------------------------------------------
# Routing: top-k selection and the weights of the two fused routers, one token per task.
# ----------------------------------------------------------------------------------------------------
def select_top_k(values, token, top_k, expert_ids):
    """expert_ids[t, :] = the k largest of values[t, :], largest first (ties: lower expert first).

    No scratch memory: pass s takes the largest value among the experts that rank *after* pass
    s-1's pick in the order (value descending, expert ascending). O(k·E) per token.
    """
    for slot in range(top_k):
        best = -1
        for expert in range(values.shape[1]):
            value = values[token, expert]
            if slot > 0:
                previous = expert_ids[token, slot - 1]
                previous_value = values[token, previous]
                if value > previous_value or (value == previous_value and expert <= previous):
                    continue                                   # picked already, or ranks before it
            if best < 0 or value > values[token, best]:
                best = expert
        expert_ids[token, slot] = best


def softmax_top_k_weights(logits, expert_ids, token, renormalize, weights):
    """w_s = p_{e_s} with p = softmax(logits[t]); renormalized: w_s = p_{e_s} / Σ_{s'} p_{e_s'}.

    Selecting by logits equals selecting by p (softmax is increasing), so select_top_k ran on logits.
    """
    num_experts = logits.shape[1]
    largest = logits[token, 0]
    for expert in range(1, num_experts):
        largest = max(largest, logits[token, expert])
    partition = 0.0
    for expert in range(num_experts):
        partition += math.exp(logits[token, expert] - largest)          # Z = Σ_j e^{l_j − m}
    kept = 0.0
    for slot in range(expert_ids.shape[1]):
        prob = math.exp(logits[token, expert_ids[token, slot]] - largest) / partition   # p = e^{l − m} / Z
        weights[token, slot] = prob
        kept += prob
    if renormalize:
        for slot in range(expert_ids.shape[1]):
            weights[token, slot] = weights[token, slot] / kept


def softmax_selection_scores(logits, bias, token, selection):
    """selection[t, e] = p_e + b_e, p = softmax(logits[t]): what ERNIE-4.5-MoE ranks experts by.

    p is computed as in softmax_top_k_weights (e^{l − m} / Z, Z summed in expert order), so the weights
    of the chosen experts are the same numbers that were ranked."""
    num_experts = logits.shape[1]
    largest = logits[token, 0]
    for expert in range(1, num_experts):
        largest = max(largest, logits[token, expert])
    partition = 0.0
    for expert in range(num_experts):
        partition += math.exp(logits[token, expert] - largest)          # Z = Σ_j e^{l_j − m}
    for expert in range(num_experts):
        selection[token, expert] = math.exp(logits[token, expert] - largest) / partition + bias[expert]


def group_max_scores(selection, token, num_groups, group_scores):
    """group_scores[t, g] = the largest selection score of group g (equal consecutive groups)."""
    group_size = selection.shape[1] // num_groups
    for group in range(num_groups):
        best = -math.inf
        for expert in range(group * group_size, (group + 1) * group_size):
            best = max(best, selection[token, expert])
        group_scores[token, group] = best


def softmax_top_k_backward(logits, expert_ids, weights, grad_weights, token, renormalize, grad_logits):
    """∂L/∂logits[t] from g = ∂L/∂w[t], with dot = Σ_s g_s · w_s:

        renormalized (w = softmax over the k chosen logits):   ∂l_{e_s} = w_s · (g_s − dot), else 0
        plain        (w_s = p_{e_s}, p = softmax over all E):  ∂l_j = p_j · ([j = e_s] g_s − dot)
    """
    num_experts = logits.shape[1]
    top_k = expert_ids.shape[1]
    dot = 0.0
    for slot in range(top_k):
        dot += grad_weights[token, slot] * weights[token, slot]
    if renormalize:
        for expert in range(num_experts):
            grad_logits[token, expert] = 0
    else:
        largest = logits[token, 0]
        for expert in range(1, num_experts):
            largest = max(largest, logits[token, expert])
        partition = 0.0
        for expert in range(num_experts):
            partition += math.exp(logits[token, expert] - largest)
        for expert in range(num_experts):
            grad_logits[token, expert] = -math.exp(logits[token, expert] - largest) / partition * dot
    for slot in range(top_k):
        # renormalized: w_s is the selected softmax; plain: w_s is p_{e_s} itself.
        grad_logits[token, expert_ids[token, slot]] = weights[token, slot] * (grad_weights[token, slot] - dot)


#: The sigmoid tasks take σ(l) = e^l below this logit: there σ(l) = e^l / (1 + e^l) equals e^l to float64
#: precision (e^l < 5e-18), while 1 / (1 + e^{−l}) needs e^{−l}, which overflows below l ≈ −709 (numba's
#: CUDA simulator runs Python's math.exp, which then raises OverflowError where a CPU or GPU returns inf).
SIGMOID_EXP_BELOW = -40.0


def sigmoid_selection_scores(logits, bias, token, selection):
    """selection[t, e] = σ(logits[t, e]) + b_e: what DeepSeek-V3 ranks experts by."""
    for expert in range(logits.shape[1]):
        logit = logits[token, expert]
        score = 1.0 / (1.0 + math.exp(-logit)) if logit > SIGMOID_EXP_BELOW else math.exp(logit)    # s = σ(l)
        selection[token, expert] = score + bias[expert]


def copy_with_group_max_scores(logits, token, num_groups, selection, group_scores):
    """selection[t, :] = logits[t, :]; group_scores[t, g] = the largest logit of group g.

    DeepSeek-V2's group-limited softmax scores a group by its largest probability; softmax is increasing,
    so ranking the groups by their largest *logit* ranks them the same way (no exp needed)."""
    group_size = selection.shape[1] // num_groups
    for group in range(num_groups):
        best = -math.inf
        for expert in range(group * group_size, (group + 1) * group_size):
            value = logits[token, expert]
            selection[token, expert] = value
            best = max(best, value)
        group_scores[token, group] = best


def best_two_group_scores(selection, token, num_groups, group_scores):
    """group_scores[t, g] = sum of the two largest selection scores in group g (the one, for
    groups of a single expert). Experts are split into ``num_groups`` equal consecutive groups."""
    group_size = selection.shape[1] // num_groups
    for group in range(num_groups):
        first = second = -math.inf
        for expert in range(group * group_size, (group + 1) * group_size):
            value = selection[token, expert]
            if value > first:
                second = first
                first = value
            elif value > second:
                second = value
        group_scores[token, group] = first + second if group_size > 1 else first


def mask_outside_best_groups(group_scores, token, num_groups, top_k_groups, selection):
    """Group-limited routing: selection[t, e] = −∞ for experts outside the ``top_k_groups`` best groups
    (rank by group score, ties to the lower group)."""
    group_size = selection.shape[1] // num_groups
    for group in range(num_groups):
        score = group_scores[token, group]
        rank = 0
        for other in range(num_groups):
            other_score = group_scores[token, other]
            if other_score > score or (other_score == score and other < group):
                rank += 1
        if rank >= top_k_groups:
            for expert in range(group * group_size, (group + 1) * group_size):
                selection[token, expert] = -math.inf


def sigmoid_top_k_weights(logits, expert_ids, token, route_scale, renormalize, min_total, weights):
    """w_s = σ(l_{e_s}) / Σ_{s'} σ(l_{e_s'}) · route_scale  (the bias only selected; it is not here);
    not renormalized: w_s = σ(l_{e_s}) · route_scale.

    If the chosen σ sum below ``min_total`` (routers.min_score_sum: logits so far below 0 that σ
    underflows and the ratio would be 0/0), σ(l) = e^l to float precision there, and the ratio is taken
    of e^{l − max l} instead: the common factor e^{−max l} cancels, and the largest term is 1.
    """
    top_k = expert_ids.shape[1]
    total = 0.0
    largest = logits[token, expert_ids[token, 0]]
    for slot in range(top_k):
        logit = logits[token, expert_ids[token, slot]]
        score = 1.0 / (1.0 + math.exp(-logit)) if logit > SIGMOID_EXP_BELOW else math.exp(logit)    # s = σ(l)
        weights[token, slot] = score
        total += score
        largest = max(largest, logit)
    if not renormalize:
        total = 1.0                                                     # not renormalized: w = σ · scale
    elif total < min_total:
        total = 0.0
        for slot in range(top_k):
            score = math.exp(logits[token, expert_ids[token, slot]] - largest)                # s ∝ e^l
            weights[token, slot] = score
            total += score
    for slot in range(top_k):
        weights[token, slot] = weights[token, slot] / total * route_scale


def sigmoid_top_k_backward(logits, expert_ids, grad_weights, token, route_scale, renormalize, min_total,
                           grad_logits):
    """∂L/∂logits[t] from g = ∂L/∂w[t]. With σ_s = σ(l_{e_s}), S = Σ_s σ_s, u_s = σ_s / S:

        ∂σ_r = route_scale / S · (g_r − Σ_s g_s u_s),    ∂l_{e_r} = ∂σ_r · σ_r (1 − σ_r),
    (not renormalized: ∂σ_r = route_scale · g_r) and 0 for the experts not chosen. Where the forward
    rescaled (S < min_total), σ_s is e^{l_s − max l}
    in these formulas and 1 − σ_r is 1 (σ_r < min_total is far below float precision).
    """
    top_k = expert_ids.shape[1]
    for expert in range(logits.shape[1]):
        grad_logits[token, expert] = 0
    if not renormalize:
        for slot in range(top_k):
            logit = logits[token, expert_ids[token, slot]]
            score = 1.0 / (1.0 + math.exp(-logit)) if logit > SIGMOID_EXP_BELOW else math.exp(logit)
            grad_logits[token, expert_ids[token, slot]] = route_scale * grad_weights[token, slot] * score * (1.0 - score)
        return
    total = 0.0
    largest = logits[token, expert_ids[token, 0]]
    for slot in range(top_k):
        logit = logits[token, expert_ids[token, slot]]
        total += 1.0 / (1.0 + math.exp(-logit)) if logit > SIGMOID_EXP_BELOW else math.exp(logit)
        largest = max(largest, logit)
    rescaled = total < min_total
    if rescaled:
        total = 0.0
        for slot in range(top_k):
            total += math.exp(logits[token, expert_ids[token, slot]] - largest)
    dot = 0.0
    for slot in range(top_k):
        logit = logits[token, expert_ids[token, slot]]
        if rescaled:
            score = math.exp(logit - largest)
        else:
            score = 1.0 / (1.0 + math.exp(-logit)) if logit > SIGMOID_EXP_BELOW else math.exp(logit)
        dot += grad_weights[token, slot] * score / total
    for slot in range(top_k):
        logit = logits[token, expert_ids[token, slot]]
        if rescaled:
            score = math.exp(logit - largest)
            slope = 1.0                                                        # 1 − σ(l), σ(l) < min_total
        else:
            score = 1.0 / (1.0 + math.exp(-logit)) if logit > SIGMOID_EXP_BELOW else math.exp(logit)
            slope = 1.0 - score                                                # σ'(l) = σ(l) (1 − σ(l))
        grad_score = route_scale / total * (grad_weights[token, slot] - dot)
        grad_logits[token, expert_ids[token, slot]] = grad_score * score * slope


# ====================================================================================================
# Part 2: the CPU kernels
# ====================================================================================================
#: Assignments per chunk in the two-pass ranking: large enough that the per-chunk counts table
#: (chunks × E) stays small, small enough that T·k = 32k assignments still give every thread work.
ASSIGNMENTS_PER_CHUNK = 2048


def _compile(task):
    """A task compiled for the CPU (no cache of its own: the kernels inline it and are cached)."""
    return numba.njit(task)


count_chunk_cpu = _compile(count_chunk)
rank_chunk_cpu = _compile(rank_chunk)
exclusive_prefix_sum_task_cpu = _compile(exclusive_prefix_sum_task)
row_sources_cpu = _compile(row_sources)
copy_source_row_cpu = _compile(copy_source_row)
sum_token_copies_cpu = _compile(sum_token_copies)
combine_token_cpu = _compile(combine_token)
weighted_source_row_cpu = _compile(weighted_source_row)
slot_weight_grad_cpu = _compile(slot_weight_grad)
select_top_k_cpu = _compile(select_top_k)
softmax_top_k_weights_cpu = _compile(softmax_top_k_weights)
softmax_top_k_backward_cpu = _compile(softmax_top_k_backward)
softmax_selection_scores_cpu = _compile(softmax_selection_scores)
group_max_scores_cpu = _compile(group_max_scores)
sigmoid_selection_scores_cpu = _compile(sigmoid_selection_scores)
copy_with_group_max_scores_cpu = _compile(copy_with_group_max_scores)
best_two_group_scores_cpu = _compile(best_two_group_scores)
mask_outside_best_groups_cpu = _compile(mask_outside_best_groups)
sigmoid_top_k_weights_cpu = _compile(sigmoid_top_k_weights)
sigmoid_top_k_backward_cpu = _compile(sigmoid_top_k_backward)


def array(tensor: torch.Tensor):
    """A numpy view of a contiguous CPU tensor (shares memory; keep the tensor alive)."""
    return tensor.detach().numpy()


# ----------------------------------------------------------------------------------------------------
# Integer kernels
# ----------------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def count_chunks(expert_ids, chunk_size, slot_major, ordered, token_order, chunk_counts):
    """Pass 1: chunk_counts[c, e] for every chunk c (parallel over chunks)."""
    for chunk in prange(chunk_counts.shape[0]):
        count_chunk_cpu(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, chunk_counts)


@numba.njit(parallel=True, cache=True)
def rank_chunks(expert_ids, chunk_size, slot_major, ordered, token_order, chunk_offsets, ranks):
    """Pass 3: ranks[t, s] for every assignment (parallel over chunks)."""
    for chunk in prange(chunk_offsets.shape[0]):
        rank_chunk_cpu(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, chunk_offsets, ranks)


@numba.njit(cache=True)
def exclusive_prefix_sum(counts, starts):
    exclusive_prefix_sum_task_cpu(counts, starts)


# ----------------------------------------------------------------------------------------------------
# Scatter / combine kernels and their backward passes
# ----------------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def find_row_sources(rows, sources):
    for token in prange(rows.shape[0]):
        row_sources_cpu(rows, token, sources)


@numba.njit(parallel=True, cache=True)
def scatter_rows(x, sources, top_k, buffer):
    for row in prange(buffer.shape[0]):
        copy_source_row_cpu(x, sources, top_k, row, 0, buffer.shape[1], buffer)


@numba.njit(parallel=True, cache=True)
def scatter_rows_backward(grad_buffer, rows, grad_x):
    for token in prange(grad_x.shape[0]):
        sum_token_copies_cpu(grad_buffer, rows, token, 0, grad_x.shape[1], grad_x)


@numba.njit(parallel=True, cache=True)
def gather_combine(expert_out, rows, weights, y):
    for token in prange(y.shape[0]):
        combine_token_cpu(expert_out, rows, weights, token, 0, y.shape[1], y)


@numba.njit(parallel=True, cache=True)
def gather_combine_backward_rows(grad_y, weights, sources, top_k, grad_expert_out):
    for row in prange(grad_expert_out.shape[0]):
        weighted_source_row_cpu(grad_y, weights, sources, top_k, row, 0, grad_expert_out.shape[1],
                                grad_expert_out)


@numba.njit(parallel=True, cache=True)
def gather_combine_backward_weights(grad_y, expert_out, rows, grad_weights):
    for token in prange(rows.shape[0]):
        for slot in range(rows.shape[1]):
            slot_weight_grad_cpu(grad_y, expert_out, rows, token, slot, grad_weights)


# ----------------------------------------------------------------------------------------------------
# Router kernels (one token per task)
# ----------------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def softmax_top_k_route(logits, renormalize, num_groups, top_k_groups, has_bias, bias, selection, group_scores,
                        expert_ids, weights):
    """``num_groups = 0`` switches group-limited routing off; ``has_bias`` ranks by p + bias (else ``bias`` is
    unused); ``selection``, ``group_scores`` are scratch."""
    for token in prange(logits.shape[0]):
        if has_bias:                               # ERNIE-4.5: top-k of p + b (groups scored by max p + b)
            softmax_selection_scores_cpu(logits, bias, token, selection)
            if num_groups > 0:
                group_max_scores_cpu(selection, token, num_groups, group_scores)
                mask_outside_best_groups_cpu(group_scores, token, num_groups, top_k_groups, selection)
            select_top_k_cpu(selection, token, expert_ids.shape[1], expert_ids)
        elif num_groups > 0:                       # DeepSeek-V2: top-k among the best groups' experts
            copy_with_group_max_scores_cpu(logits, token, num_groups, selection, group_scores)
            mask_outside_best_groups_cpu(group_scores, token, num_groups, top_k_groups, selection)
            select_top_k_cpu(selection, token, expert_ids.shape[1], expert_ids)
        else:
            select_top_k_cpu(logits, token, expert_ids.shape[1], expert_ids)
        softmax_top_k_weights_cpu(logits, expert_ids, token, renormalize, weights)


@numba.njit(parallel=True, cache=True)
def softmax_top_k_route_backward(logits, expert_ids, weights, grad_weights, renormalize, grad_logits):
    for token in prange(logits.shape[0]):
        softmax_top_k_backward_cpu(logits, expert_ids, weights, grad_weights, token, renormalize, grad_logits)


@numba.njit(parallel=True, cache=True)
def sigmoid_top_k_route(logits, bias, route_scale, renormalize, num_groups, top_k_groups, min_total, selection,
                       group_scores, expert_ids, weights):
    """``num_groups = 0`` switches group-limited routing off; ``selection``, ``group_scores`` are scratch."""
    for token in prange(logits.shape[0]):
        sigmoid_selection_scores_cpu(logits, bias, token, selection)
        if num_groups > 0:
            best_two_group_scores_cpu(selection, token, num_groups, group_scores)
            mask_outside_best_groups_cpu(group_scores, token, num_groups, top_k_groups, selection)
        select_top_k_cpu(selection, token, expert_ids.shape[1], expert_ids)
        sigmoid_top_k_weights_cpu(logits, expert_ids, token, route_scale, renormalize, min_total, weights)


@numba.njit(parallel=True, cache=True)
def sigmoid_top_k_route_backward(logits, expert_ids, grad_weights, route_scale, renormalize, min_total, grad_logits):
    for token in prange(logits.shape[0]):
        sigmoid_top_k_backward_cpu(logits, expert_ids, grad_weights, token, route_scale, renormalize, min_total,
                                   grad_logits)
