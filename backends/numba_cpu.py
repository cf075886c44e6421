"""The numba backend's algorithms, and the CPU kernels that run them.

Part 1, the *tasks*: every function there does the work of one parallel task — one chunk of
assignments, one token's routing — written once as plain Python and compiled twice: below with
``numba.njit`` (CPU kernels run the tasks in a ``prange`` loop), and in ``numba_cuda.py`` with
``numba.cuda.jit(device=True)`` (GPU kernels run one task per thread). So the CPU and GPU routing and
ranking cannot drift apart: they are the same code. Part 1 also holds the 16-bit rounding rules
(float32 bits -> bfloat16 / float16 bits), shared the same way.

The *row* kernels (scatter, combine and their backward passes: the memory-bound part) are written
once per target instead, because the two targets want different loops: the CPU one row per task in a
plain loop (which the compiler vectorizes), the GPU one warp per row with its 32 threads striding
over the columns (``numba_cuda.py``). Both are *token-major*: a task owns token t, reads x[t] (or
grad_y[t]) once and touches its k buffer rows rows[t, 0..k-1]; no (row -> token) inverse is built.

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
row -1. ``rows`` are stable positions (``stable_positions`` with starts = the exclusive prefix sum of
the counts), so the kept assignments own buffer rows 0..kept-1 exactly; rows kept..num_rows-1 of a
buffer belong to nobody and are 0. Every output element is written by exactly one task and its sum
runs in a fixed order (slots in order 0..k-1, columns in order), so two runs are bitwise identical.
Long reductions (a dot product over d, softmax's sum over E) accumulate in a Python float, which
numba types as float64; the k-term sums accumulate in float32 (float64 for float64 tensors).

16-bit tensors (bfloat16, float16) go into the row kernels as they are, as their 16-bit patterns
(a uint16 view: numba has no bfloat16, and its CPU target no float16): a lookup table of the 65,536
values decodes them (exact), sums run in float32, and the result is rounded back to the nearest even
16-bit value, as torch rounds. A pure copy (the scatter) moves the bits untouched.

Part 2, the *CPU kernels*: numpy views of torch tensors in (no copies; ``numba_backend.py`` makes
them), outputs allocated by the caller. ``numba_cuda.py`` has the same kernel names with the same
arguments, so ``numba_backend.py`` calls ``target.scatter_rows(...)`` whichever target it has. Each
task writes its own outputs: no races, no atomics.
"""
import math

import numba
import numpy as np
import torch
from numba import prange
from numba.core import types
from numba.extending import overload

# ====================================================================================================
# Part 1: the tasks (plain Python; compiled for the CPU below and for the GPU in numba_cuda.py)
# ====================================================================================================
# ----------------------------------------------------------------------------------------------------
# Integer steps: counting and stable ranking, in chunks of the assignment list.
#
# The T·k assignments are walked in a fixed order, cut into chunks of ``chunk_size`` consecutive
# assignments. Ranking is two-pass, which is what makes it both parallel and stable:
#   1. count_chunk:   chunk_counts[c, e] = #{assignments to e in chunk c}                 (parallel over c)
#   2. a scan down each expert's column: inclusive[c, e] = Σ_{c' <= c} chunk_counts[c', e]
#   3. rank_chunk:    cursor[e] = start_e + inclusive[c, e] − chunk_counts[c, e]; walk chunk c again,
#                     each assignment to e takes cursor[e]++                               (parallel over c)
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


def rank_chunk(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, starts, chunk_counts, inclusive,
               ranks):
    """Second walk of one chunk: ranks[t, s] = cursor[e]++ for an assignment to e, -1 for a dropped one,
    the cursor starting at start_e + Σ_{c' < chunk} chunk_counts[c', e] (kept in inclusive[chunk], which
    this task overwrites: its row is its own). With starts = segment starts the rank is the buffer row."""
    num_tokens, top_k = expert_ids.shape
    for expert in range(starts.shape[0]):
        inclusive[chunk, expert] += starts[expert] - chunk_counts[chunk, expert]      # the chunk's first rank
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
            ranks[token, slot] = inclusive[chunk, expert]
            inclusive[chunk, expert] += 1
        else:
            ranks[token, slot] = -1


def exclusive_prefix_sum_task(counts, starts):
    """starts[e] = Σ_{j<e} counts[j]. Sequential: E is a few hundred at most (one task)."""
    running = 0
    for expert in range(counts.shape[0]):
        starts[expert] = running
        running += counts[expert]


# ----------------------------------------------------------------------------------------------------
# 16-bit rounding: the bits of a float32 value -> the bits of the nearest bfloat16 / float16, ties to even
# (what torch's .to(torch.bfloat16) / .to(torch.float16) do). Decoding needs no rule: a bfloat16 is the
# top half of a float32 (bits << 16), and every float16 is exactly a float32 (a table or the GPU converts).
# ----------------------------------------------------------------------------------------------------
def bfloat16_bits(bits):
    """float32 bits -> bfloat16 bits: add 0x7FFF + (the lowest kept bit) and drop the low 16 bits (round to
    nearest, ties to even); any NaN becomes the quiet NaN 0x7FC0 (as c10::BFloat16 does)."""
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return 0x7FC0
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def float16_bits(bits):
    """float32 bits -> float16 bits, round to nearest even; overflow -> ±inf, underflow -> ±0 or a subnormal
    (NumPy's npy_floatbits_to_halfbits, which torch's conversion agrees with)."""
    sign = (bits & 0x80000000) >> 16
    exponent = bits & 0x7F800000
    if exponent >= 0x47800000:                                      # |x| >= 65536: inf, NaN or overflow
        mantissa = bits & 0x007FFFFF
        if exponent == 0x7F800000 and mantissa != 0:                # NaN: keep the top payload bits, stay NaN
            payload = 0x7C00 + (mantissa >> 13)
            return sign + (payload + 1 if payload == 0x7C00 else payload)
        return sign + 0x7C00                                        # ±inf
    if exponent <= 0x38000000:                                      # a float16 subnormal (or 0)
        if exponent < 0x33000000:
            return sign                                             # below half the smallest subnormal: ±0
        shift = 113 - (exponent >> 23)
        mantissa = (0x00800000 + (bits & 0x007FFFFF)) >> shift
        if (mantissa & 0x3FFF) != 0x1000 or (bits & 0x7FF) != 0:    # not an exact tie to even: round up at bit 12
            mantissa += 0x1000
        return sign + (mantissa >> 13)
    half_exponent = (exponent - 0x38000000) >> 13
    mantissa = bits & 0x007FFFFF
    if (mantissa & 0x3FFF) != 0x1000:                               # not an exact tie to even: round up at bit 12
        mantissa += 0x1000
    return sign + half_exponent + (mantissa >> 13)                  # a carry into the exponent is right (inf too)


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

    Renormalized, the partition function cancels: w_s = e^{l_s − m} / Σ_{s'} e^{l_{s'} − m} over the k chosen
    logits l_s (m = the largest of them, so every term is at most 1 and the sum at least 1): k exponentials
    instead of E + k. Plain, w_s = e^{l_s − M} / Z with M = max_j l_j and Z = Σ_j e^{l_j − M}.
    """
    num_experts, top_k = logits.shape[1], expert_ids.shape[1]
    if renormalize:
        largest = logits[token, expert_ids[token, 0]]
        for slot in range(1, top_k):
            largest = max(largest, logits[token, expert_ids[token, slot]])
        kept = 0.0
        for slot in range(top_k):
            term = math.exp(logits[token, expert_ids[token, slot]] - largest)        # e^{l_s − m}
            weights[token, slot] = term
            kept += term
        for slot in range(top_k):
            weights[token, slot] = weights[token, slot] / kept
        return
    largest = logits[token, 0]
    for expert in range(1, num_experts):
        largest = max(largest, logits[token, expert])
    partition = 0.0
    for expert in range(num_experts):
        partition += math.exp(logits[token, expert] - largest)          # Z = Σ_j e^{l_j − M}
    for slot in range(top_k):
        weights[token, slot] = math.exp(logits[token, expert_ids[token, slot]] - largest) / partition


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
#: Tokens per task of the row kernels: one task's scratch rows are allocated once, not once per token.
TOKENS_PER_TASK = 64
#: How a row kernel stores its floats (``kind``): as the tensor's own float type, or as 16-bit patterns.
NATIVE, BFLOAT16, FLOAT16 = 0, 1, 2


def _compile(task):
    """A task compiled for the CPU (no cache of its own: the kernels inline it and are cached)."""
    return numba.njit(task)


count_chunk_cpu = _compile(count_chunk)
rank_chunk_cpu = _compile(rank_chunk)
exclusive_prefix_sum_task_cpu = _compile(exclusive_prefix_sum_task)
bfloat16_bits_cpu = _compile(bfloat16_bits)
float16_bits_cpu = _compile(float16_bits)
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
    """A numpy view of a contiguous CPU tensor (shares memory; keep the tensor alive). A bfloat16 or float16
    tensor is viewed as its 16-bit patterns (uint16): numba's CPU target has neither type."""
    tensor = tensor.detach()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def decoding_table(dtype: torch.dtype):
    """For a 16-bit dtype, float32[65536]: the value of each of its bit patterns (exact: float32 holds them
    all); for another dtype a one-element placeholder (the kernels read no table then)."""
    return _TABLES.get(dtype, _NO_TABLE)


def storage_kind(dtype: torch.dtype) -> int:
    """How the row kernels store elements of ``dtype``: NATIVE floats, or BFLOAT16 / FLOAT16 bit patterns."""
    return {torch.bfloat16: BFLOAT16, torch.float16: FLOAT16}.get(dtype, NATIVE)


def sum_type(dtype: torch.dtype):
    """A one-element array whose dtype the row kernels sum in: float64 for float64, else float32."""
    return _SUM_TYPES[dtype == torch.float64]


#: A pure copy (the scatter) moves elements of any type; on the CPU the plain view is as fast as any.
copy_array = array

_SUM_TYPES = {False: np.zeros(1, np.float32), True: np.zeros(1, np.float64)}
_TABLES = {dtype: torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).float().numpy()
           for dtype in (torch.bfloat16, torch.float16)}
_NO_TABLE = np.zeros(1, np.float32)


# ----------------------------------------------------------------------------------------------------
# Element access: a stored element as a float, and a float32 scratch row stored back, for either kind
# of array (numba picks the version by the element type when it compiles a kernel).
# ----------------------------------------------------------------------------------------------------
def decoded(value, table):
    """A stored element's value: itself, or table[bits] for a 16-bit pattern."""


@overload(decoded)
def _decoded(value, table):
    if isinstance(value, types.Integer):
        return lambda value, table: table[value]
    return lambda value, table: value


def store_row(scratch, out, row, kind):
    """out[row, :] = scratch, rounded to nearest even where ``out`` holds 16-bit patterns of ``kind``."""


@overload(store_row)
def _store_row(scratch, out, row, kind):
    if isinstance(out.dtype, types.Integer):
        def store(scratch, out, row, kind):
            bits = scratch.view(np.uint32)                       # the float32 sums, as their bits
            for col in range(scratch.shape[0]):
                out[row, col] = bfloat16_bits_cpu(bits[col]) if kind == BFLOAT16 else float16_bits_cpu(bits[col])
        return store

    def store(scratch, out, row, kind):
        for col in range(scratch.shape[0]):
            out[row, col] = scratch[col]
    return store


@numba.njit
def dot_row(values, other, row, table, partial):
    """Σ_c values[c] · other[row, c] in float64, as ``partial.size`` (8) interleaved partial sums: independent
    chains the compiler vectorizes, where one running sum waits on every add. A fixed order (partials, then
    their sum in order, then the remainder): bitwise reproducible."""
    lanes = partial.shape[0]
    width = values.shape[0]
    main = width - width % lanes
    partial[:] = 0.0
    for first in range(0, main, lanes):
        for lane in range(lanes):
            partial[lane] += values[first + lane] * decoded(other[row, first + lane], table)
    total = 0.0
    for lane in range(lanes):
        total += partial[lane]
    for col in range(main, width):
        total += values[col] * decoded(other[row, col], table)
    return total


@numba.njit
def zero_rows_past_kept(rows, out):
    """out[r] = 0 for the rows nobody owns: r >= kept, the number of kept assignments (rows are stable
    positions, so the kept ones own rows 0..kept-1)."""
    kept = 0
    for token in range(rows.shape[0]):
        for slot in range(rows.shape[1]):
            kept += rows[token, slot] >= 0
    for row in range(kept, out.shape[0]):
        for col in range(out.shape[1]):
            out[row, col] = 0


# ----------------------------------------------------------------------------------------------------
# Integer kernels: each step is one call (its passes and scratch tables inside)
# ----------------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def count_experts(expert_ids, chunk_size, counts):
    """counts[e] = Σ_c chunk_counts[c, e]: count_chunk over the token-major walk, parallel over chunks."""
    num_chunks = (expert_ids.size + chunk_size - 1) // chunk_size
    chunk_counts = np.empty((num_chunks, counts.shape[0]), np.int64)
    no_order = np.empty(1, np.int64)
    for chunk in prange(num_chunks):
        count_chunk_cpu(expert_ids, chunk, chunk_size, False, False, no_order, chunk_counts)
    for expert in range(counts.shape[0]):
        counts[expert] = 0
        for chunk in range(num_chunks):
            counts[expert] += chunk_counts[chunk, expert]


@numba.njit(parallel=True, cache=True)
def rank_assignments(expert_ids, chunk_size, slot_major, ordered, token_order, starts, ranks):
    """ranks[t, s] = starts[e] + the assignment's rank among those to e, in walk order (-1 if dropped):
    count (parallel over chunks), scan each expert's column, rank (parallel over chunks)."""
    num_chunks = (expert_ids.size + chunk_size - 1) // chunk_size
    chunk_counts = np.empty((num_chunks, starts.shape[0]), np.int64)
    for chunk in prange(num_chunks):
        count_chunk_cpu(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, chunk_counts)
    inclusive = np.empty_like(chunk_counts)
    for expert in range(starts.shape[0]):
        running = 0
        for chunk in range(num_chunks):
            running += chunk_counts[chunk, expert]
            inclusive[chunk, expert] = running
    for chunk in prange(num_chunks):
        rank_chunk_cpu(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, starts, chunk_counts,
                       inclusive, ranks)


@numba.njit(cache=True)
def exclusive_prefix_sum(counts, starts):
    exclusive_prefix_sum_task_cpu(counts, starts)


# ----------------------------------------------------------------------------------------------------
# Row kernels, token-major: a task owns TOKENS_PER_TASK consecutive tokens
# ----------------------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def scatter_rows(x, rows, buffer):
    """buffer[rows[t, s]] = x[t] for each kept (t, s): x[t] read once, written to its k rows; rows past
    the kept ones are 0. Any element type: 16-bit tensors are copied as their bits."""
    zero_rows_past_kept(rows, buffer)
    for token in prange(rows.shape[0]):
        for slot in range(rows.shape[1]):
            row = rows[token, slot]
            if row >= 0:
                buffer[row, :] = x[token, :]


@numba.njit(parallel=True, cache=True)
def scatter_rows_backward(grad_buffer, rows, table, kind, sum_type, grad_x):
    """Scatter's backward: grad_x[t] = Σ_{s kept} grad_buffer[rows[t, s]], slots in order 0..k-1, summed in
    ``sum_type``'s dtype (float32; float64 for float64)."""
    num_tokens, width = grad_x.shape
    for task in prange((num_tokens + TOKENS_PER_TASK - 1) // TOKENS_PER_TASK):
        total = np.empty(width, sum_type.dtype)
        for token in range(task * TOKENS_PER_TASK, min((task + 1) * TOKENS_PER_TASK, num_tokens)):
            total[:] = 0
            for slot in range(rows.shape[1]):
                row = rows[token, slot]
                if row >= 0:
                    for col in range(width):
                        total[col] += decoded(grad_buffer[row, col], table)
            store_row(total, grad_x, token, kind)


@numba.njit(parallel=True, cache=True)
def gather_combine(expert_out, rows, weights, table, kind, sum_type, y):
    """Gather + combine: y[t] = Σ_{s kept} w[t, s] · expert_out[rows[t, s]], slots in order, summed in
    ``sum_type``'s dtype; a token with no kept slot gets 0."""
    num_tokens, width = y.shape
    for task in prange((num_tokens + TOKENS_PER_TASK - 1) // TOKENS_PER_TASK):
        total = np.empty(width, sum_type.dtype)
        for token in range(task * TOKENS_PER_TASK, min((task + 1) * TOKENS_PER_TASK, num_tokens)):
            total[:] = 0
            for slot in range(rows.shape[1]):
                row = rows[token, slot]
                if row >= 0:
                    weight = decoded(weights[token, slot], table)
                    for col in range(width):
                        total[col] += weight * decoded(expert_out[row, col], table)
            store_row(total, y, token, kind)


@numba.njit(parallel=True, cache=True)
def gather_combine_backward(grad_y, expert_out, rows, weights, table, kind, sum_type, want_rows, want_weights,
                            grad_expert_out, grad_weights):
    """Combine's backward, both gradients in one token-major pass (grad_y[t] decoded once, then per slot):

        grad_expert_out[rows[t, s]] = w[t, s] · grad_y[t]                (rows nobody reads: 0)
        grad_w[t, s]                = <grad_y[t], expert_out[rows[t, s]]>  (0 for a dropped slot; dot_row)

    ``want_rows`` / ``want_weights`` say which of the two autograd asked for."""
    num_tokens, width = grad_y.shape
    if want_rows:
        zero_rows_past_kept(rows, grad_expert_out)
    for task in prange((num_tokens + TOKENS_PER_TASK - 1) // TOKENS_PER_TASK):
        grad = np.empty(width, sum_type.dtype)
        scaled = np.empty(width, sum_type.dtype)
        dot = np.empty((1, rows.shape[1]), np.float32)           # the k dot products, before storing
        partial = np.empty(8)                                     # dot_row's partial sums
        for token in range(task * TOKENS_PER_TASK, min((task + 1) * TOKENS_PER_TASK, num_tokens)):
            for col in range(width):
                grad[col] = decoded(grad_y[token, col], table)
            for slot in range(rows.shape[1]):
                row = rows[token, slot]
                if want_rows and row >= 0:
                    weight = decoded(weights[token, slot], table)
                    for col in range(width):
                        scaled[col] = weight * grad[col]
                    store_row(scaled, grad_expert_out, row, kind)
                if want_weights:
                    total = dot_row(grad, expert_out, row, table, partial) if row >= 0 else 0.0
                    if kind == NATIVE:
                        grad_weights[token, slot] = total
                    else:
                        dot[0, slot] = total
            if want_weights and kind != NATIVE:
                store_row(dot[0], grad_weights, token, kind)


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
