"""The numba backend: the reference's dispatch and routing functions, as numba kernels.

The functions of the Backend Protocol (``backends/interface.py``), with the same results as
``backends/reference.py`` (which re-exports ``fastmoe_edu/dispatch.py`` and the two routing
functions of ``fastmoe_edu/routing.py``; read their docstrings for the semantics). Each function
picks its *target* from the tensor's device:

    CPU tensors   ->  numba_cpu.py    (numba.njit + prange)
    CUDA tensors  ->  numba_cuda.py   (numba.cuda kernels on torch's current stream)

and both targets run the same algorithms (routing and ranking: the same *tasks* of ``numba_cpu.py``;
the row kernels: the same token-major passes, a row loop on the CPU, a warp per row on the GPU). This file
does the
torch side: allocate outputs, hand the kernels zero-copy views (numpy arrays on the CPU,
``__cuda_array_interface__`` on the GPU; the torch tensors stay referenced here for as long as a
kernel uses them), and wrap the differentiable steps in ``torch.autograd.Function``s whose backward
passes are kernels too:

    scatter_rows         backward: grad_x[t] = Σ_s grad_buffer[rows[t, s]]                (slots in order)
    gather_combine       backward: grad_expert_out[rows[t, s]] = w[t, s] · grad_y[t]
                                   grad_w[t, s] = <grad_y[t], expert_out[rows[t, s]]>
    softmax_top_k_route   backward: ∂L/∂logits through the (renormalized) softmax weights (groups, bias only select)
    sigmoid_top_k_route   backward: ∂L/∂logits through the (normalized) sigmoid weights
    expert_feed_forward  SwiGLU experts one expert at a time: torch's products, the activation one fused pass each
                         way (numba_activation.py), its hidden units recomputed in the backward, not kept (CPU
                         float32/float64; other kinds and devices: the reference's function, this grouped GEMM)

Asked for second-order gradients (``create_graph=True``), each backward returns the reference's instead,
built from torch operations that can be differentiated again (``second_order.py``).

What makes it faster than the reference on a CPU: the reference's ranking builds a [T·k, E] one-hot
matrix and cumsums it (O(T·k·E) memory traffic); here ranking is a two-pass count over chunks,
O(T·k), in one kernel call. Scatter and combine are single token-major passes (x[t] or grad_y[t] read
once, its k rows touched) instead of index_select + index_copy + einsum, and the combine's backward
computes both gradients in one pass. The experts' SwiGLU is one vectorized pass forward and one
backward where torch runs three and four (numba_activation.py), run on each expert's rows right after
its products, while they are in cache. The grouped GEMM is the same arithmetic
as the reference's (torch's matrix products, one call or one per segment, with an explicit backward):
on a CPU the expert GEMMs are most of a step for both backends, so the layer speed-up is bounded by
what runs outside them (docs/benchmarks.md).

16-bit tensors (bfloat16, float16) go into the row kernels as they are (zero-copy views of their
16-bit patterns; float32 sums inside, rounded to nearest even once). Routing runs in float32, as the
reference routes: 16-bit logits [T, E] are converted (the reference does the same).

On a GPU nothing here waits for the device: no .item()/.tolist(), every launch size is a tensor shape,
and numba takes torch's arrays without synchronizing (numba_cuda.array).

Integer results are deterministic and equal to the reference's; float results are bitwise
reproducible from run to run (no float atomics; every output element is one task's fixed-order sum).
"""
from __future__ import annotations

import math
import types

import numba
import torch

from fastmoe_edu import dispatch as reference_dispatch
from fastmoe_edu import routing as reference_routing
from fastmoe_edu.experts import expert_feed_forward as reference_expert_feed_forward, run_experts
from fastmoe_edu.routing import min_score_sum

from . import grouped_gemm_torch, numba_activation, numba_cpu
from .second_order import create_graph_requested, linear_input, reference_vjp

NAME = "numba"

#: Float dtypes the row kernels take as they are: bfloat16 and float16 as their 16-bit patterns (numba has
#: no bfloat16, its CPU target no float16), summed in float32 inside (numba_cpu.py). The routers take
#: float32 and float64; 16-bit logits are routed in float32, as the reference routes them.
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ROUTING_DTYPES = (torch.float32, torch.float64)

#: Grouped GEMM implementations (see set_grouped_gemm).
GROUPED_GEMMS = ("grouped_mm", "segments", "tiled")

_grouped_gemm = "grouped_mm"
_grouped_gemm_tile = None
_cuda_kernels_for_cpu_tensors = False


def available(device) -> tuple[bool, str]:
    """The numba backend runs on any CPU, and on CUDA devices when numba.cuda finds a usable GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        from numba import cuda
        if cuda.is_available():
            return True, ""
        return False, ("numba.cuda.is_available() is False: numba finds no usable CUDA driver/GPU "
                       "(check the NVIDIA driver and that numba's CUDA toolkit bindings are installed)")
    return False, f"the numba backend has kernels for CPU and CUDA tensors, not for device type {device.type!r}"


def set_num_threads(count: int) -> None:
    """Run numba's parallel loops on at most ``count`` threads (numba's pool has NUMBA_NUM_THREADS).

    Starting the pool also sets the OpenMP thread count torch shares, so call this before
    torch.set_num_threads (``set_cpu_threads`` in backends/__init__.py does both, in that order)."""
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))


def set_grouped_gemm(name: str, tile: int | None = None) -> None:
    """Choose how ``grouped_matmul`` runs the experts' matrix products (process-wide):

    ``"grouped_mm"`` one torch._grouped_mm call where torch supports the dtype/device/strides, else
                     the segment loop (the default: never slower than the loop on the benchmark
                     shapes, see docs/benchmarks.md);
    ``"segments"``   one torch.mm per expert segment;
    ``"tiled"``      the numba.cuda tiled kernel of grouped_gemm_cuda.py (CUDA tensors, or CPU tensors
                     in numba's CUDA simulator); ``tile`` sets its tile size (default 16).
    """
    global _grouped_gemm, _grouped_gemm_tile
    if name not in GROUPED_GEMMS:
        raise ValueError(f"grouped GEMM {name!r} is not known; allowed: {', '.join(GROUPED_GEMMS)}")
    if tile is not None and name != "tiled":
        raise ValueError("tile= only applies to the 'tiled' grouped GEMM")
    _grouped_gemm, _grouped_gemm_tile = name, tile


def current_grouped_gemm() -> tuple[str, int | None]:
    """The grouped GEMM implementation and tile size that set_grouped_gemm chose."""
    return _grouped_gemm, _grouped_gemm_tile


def run_cuda_kernels_on_cpu_tensors(enabled: bool) -> None:
    """Test hook for machines without a GPU: send CPU tensors to the numba.cuda kernels, which then run
    in numba's CUDA simulator. Needs ``NUMBA_ENABLE_CUDASIM=1`` set before numba was first imported."""
    global _cuda_kernels_for_cpu_tensors
    if enabled and not numba.config.ENABLE_CUDASIM:
        raise RuntimeError("CUDA kernels can take CPU tensors only in numba's CUDA simulator "
                           "(start Python with NUMBA_ENABLE_CUDASIM=1)")
    _cuda_kernels_for_cpu_tensors = enabled


def _target(tensor: torch.Tensor):
    """The kernel module for this tensor: numba_cuda for CUDA tensors, numba_cpu otherwise."""
    if tensor.is_cuda or _cuda_kernels_for_cpu_tensors:
        from . import numba_cuda
        return numba_cuda
    return numba_cpu


# ----------------------------------------------------------------------------------------------------
# Integer steps (no gradients)
# ----------------------------------------------------------------------------------------------------
def _walk_order(expert_ids, token_order=None):
    """The kernels' (ordered, token_order) arguments: a slot-major walk visits the tokens in the order
    ``token_order`` [T] if one is given, else 0, 1, ..., T-1 (and the kernels never read the one-element
    placeholder passed instead)."""
    if token_order is None:
        return False, torch.empty(1, dtype=torch.int64, device=expert_ids.device)
    return True, token_order.contiguous()


def _ranks(expert_ids, starts, slot_major, token_order=None):
    """ranks[t, s] = starts[e] + number of earlier assignments (in walk order) to the same expert e.

    The chunked ranking of numba_cpu.py: on the CPU one call runs its three passes; on a GPU the scan
    between the two kernels is torch's cumsum (exact on integers, parallel: as a kernel with one thread per
    expert walking every chunk in turn it was a long serial chain, 4.4 ms for T·k = 524k on an H200)."""
    target = _target(expert_ids)
    expert_ids = expert_ids.contiguous()
    ordered, token_order = _walk_order(expert_ids, token_order)
    ranks = torch.empty(expert_ids.shape, dtype=torch.int64, device=expert_ids.device)
    chunk_size = target.ASSIGNMENTS_PER_CHUNK
    arrays = (target.array(expert_ids), chunk_size, slot_major, ordered, target.array(token_order))
    if target is numba_cpu:
        target.rank_assignments(*arrays, target.array(starts), target.array(ranks))
        return ranks
    num_chunks = math.ceil(expert_ids.numel() / chunk_size)
    chunk_counts = torch.empty(num_chunks, starts.numel(), dtype=torch.int64, device=expert_ids.device)
    target.count_chunks(*arrays, target.array(chunk_counts))
    inclusive = chunk_counts.cumsum(0)                                    # Σ_{c' <= c} chunk_counts[c', e]
    target.rank_chunks(*arrays, target.array(starts), target.array(chunk_counts), target.array(inclusive),
                       target.array(ranks))
    return ranks


def prune_capacity(expert_ids: torch.Tensor, num_experts: int, capacity: int | None,
                   tokens_per_group: int | None = None, priority: torch.Tensor | None = None) -> torch.Tensor:
    """Keep at most ``capacity`` assignments per expert, slot-major priority; the rest become -1.

    Per group of ``tokens_per_group`` tokens (a sequence), each group's expert e is ranked as its own
    *virtual* expert g·E + e: the same kernels, walking the same slot-major order, then count each
    group's assignments separately, which is exactly the per-group priority of the reference.

    With a ``priority`` [T] (batch-prioritized routing) the slot-major walk visits the tokens in order of
    decreasing priority, ties in token order (torch's stable sort, before the kernels run: no atomics
    decide the order). One sort of the whole batch serves every group too: a virtual expert only ever
    sees its own group's tokens, and among them the batch order is the group's order."""
    if capacity is None:
        return expert_ids
    num_tokens = expert_ids.shape[0]
    ranked_ids, num_ranked = expert_ids, num_experts
    if tokens_per_group is not None and 0 < tokens_per_group < num_tokens:
        if num_tokens % tokens_per_group:
            raise ValueError(f"tokens_per_group={tokens_per_group} does not divide the {num_tokens} tokens")
        group = torch.arange(num_tokens, device=expert_ids.device) // tokens_per_group
        ranked_ids = torch.where(expert_ids >= 0, expert_ids + group[:, None] * num_experts, -1)   # g·E + e
        num_ranked = num_experts * (num_tokens // tokens_per_group)
    token_order = None if priority is None else priority.argsort(descending=True, stable=True)
    no_offset = torch.zeros(num_ranked, dtype=torch.int64, device=expert_ids.device)
    rank_in_expert = _ranks(ranked_ids, no_offset, slot_major=True, token_order=token_order)   # -1 where dropped
    return torch.where(rank_in_expert < capacity, expert_ids, torch.full_like(expert_ids, -1))


def count_tokens_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """count[e] = number of kept (token, slot) pairs routed to expert e (one kernel call)."""
    target = _target(expert_ids)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    target.count_experts(target.array(expert_ids.contiguous()), target.ASSIGNMENTS_PER_CHUNK, target.array(counts))
    return counts


def exclusive_prefix_sum(counts: torch.Tensor) -> torch.Tensor:
    """start[e] = Σ_{j<e} count[j]."""
    target = _target(counts)
    counts = counts.contiguous()
    starts = torch.empty_like(counts)
    target.exclusive_prefix_sum(target.array(counts), target.array(starts))
    return starts


def stable_positions(expert_ids: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """row[t, s] = start[e] + number of earlier (t·k + s order) assignments to e; -1 if dropped."""
    return _ranks(expert_ids, starts.contiguous(), slot_major=False)


# ----------------------------------------------------------------------------------------------------
# Scatter and gather + combine (differentiable)
# ----------------------------------------------------------------------------------------------------
def _float_arguments(target, dtype):
    """The row kernels' (table, kind, sum_type) for tensors of ``dtype``: how to decode 16-bit patterns,
    which kind of store, and the dtype sums run in (float32; float64 for float64)."""
    return target.decoding_table(dtype), target.storage_kind(dtype), target.sum_type(dtype)


class ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rows, num_rows):
        target = _target(x)
        x, rows = x.contiguous(), rows.contiguous()
        buffer = x.new_empty(num_rows, x.shape[1])
        target.scatter_rows(target.copy_array(x), target.array(rows), target.copy_array(buffer))
        ctx.input_shape = x.shape
        ctx.save_for_backward(rows)
        return buffer

    @staticmethod
    def backward(ctx, grad_buffer):
        (rows,) = ctx.saved_tensors
        if create_graph_requested():
            scatter = lambda x: reference_dispatch.scatter_rows(x, rows, grad_buffer.shape[0])  # noqa: E731
            return (*reference_vjp(scatter, (linear_input(ctx.input_shape, grad_buffer),), grad_buffer), None, None)
        target = _target(grad_buffer)
        grad_buffer = grad_buffer.contiguous()
        grad_x = grad_buffer.new_empty(rows.shape[0], grad_buffer.shape[1])
        target.scatter_rows_backward(target.array(grad_buffer), target.array(rows),
                                     *_float_arguments(target, grad_buffer.dtype), target.array(grad_x))
        return grad_x, None, None


class GatherCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, rows, weights):
        ctx.save_for_backward(expert_out, rows, weights)                 # as received: see second_order.py
        target = _target(expert_out)
        expert_out, rows, weights = expert_out.contiguous(), rows.contiguous(), weights.contiguous()
        y = expert_out.new_empty(rows.shape[0], expert_out.shape[1])
        target.gather_combine(target.array(expert_out), target.array(rows), target.array(weights),
                              *_float_arguments(target, expert_out.dtype), target.array(y))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        expert_out, rows, weights = ctx.saved_tensors
        if create_graph_requested():
            return reference_vjp(reference_dispatch.gather_combine, (expert_out, rows, weights), grad_y)
        expert_out, rows, weights = expert_out.contiguous(), rows.contiguous(), weights.contiguous()
        target = _target(grad_y)
        grad_y = grad_y.contiguous()
        want_rows, want_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        # A gradient nobody asked for gets a one-row placeholder the kernel never writes.
        grad_expert_out = torch.empty_like(expert_out) if want_rows else expert_out.new_empty(1, expert_out.shape[1])
        grad_weights = torch.empty_like(weights) if want_weights else weights.new_empty(rows.shape[0], rows.shape[1])
        target.gather_combine_backward(target.array(grad_y), target.array(expert_out), target.array(rows),
                                       target.array(weights), *_float_arguments(target, expert_out.dtype),
                                       want_rows, want_weights, target.array(grad_expert_out),
                                       target.array(grad_weights))
        return (grad_expert_out if want_rows else None), None, (grad_weights if want_weights else None)


def scatter_rows(x: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """buffer[rows[t, s]] = x[t] for every kept (t, s); rows nobody owns are 0."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"scatter_rows: no kernels for dtype {x.dtype} "
                        f"(they take {', '.join(map(str, KERNEL_DTYPES))})")
    return ScatterRows.apply(x, rows, num_rows)


def gather_combine(expert_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_{s kept} weights[t, s] · expert_out[rows[t, s]]; a token with no kept slot gets 0."""
    if expert_out.dtype not in KERNEL_DTYPES:
        raise TypeError(f"gather_combine: no kernels for dtype {expert_out.dtype} "
                        f"(they take {', '.join(map(str, KERNEL_DTYPES))})")
    return GatherCombine.apply(expert_out, rows, weights.to(expert_out.dtype))


# ----------------------------------------------------------------------------------------------------
# Grouped GEMM
# ----------------------------------------------------------------------------------------------------
def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """out[segment e] = rows[segment e] · weight[e]ᵀ, by the implementation set_grouped_gemm chose."""
    if _grouped_gemm == "tiled":
        from .grouped_gemm_cuda import DEFAULT_TILE, grouped_matmul_tiled
        return grouped_matmul_tiled(rows, weight, counts, _grouped_gemm_tile or DEFAULT_TILE)
    if _grouped_gemm == "grouped_mm" and grouped_gemm_torch.grouped_mm_supports(rows, weight):
        return grouped_gemm_torch.grouped_mm(rows, weight, counts)
    return grouped_gemm_torch.segment_matmul(rows, weight, counts)


# ----------------------------------------------------------------------------------------------------
# The experts: each expert's three products and its SwiGLU, segment by segment (CPU)
# ----------------------------------------------------------------------------------------------------
class SwiGLUExperts(torch.autograd.Function):
    """out[segment e] = W2_e · (silu(W1_e·x) ⊙ W3_e·x), one expert at a time (module docstring).

    Forward per segment: gate, up = x·W1ᵀ, x·W3ᵀ (kept for the backward), h = silu(gate) ⊙ up in one
    fused pass into a scratch block the size of the largest segment (not kept), out = h·W2ᵀ. Backward
    per segment, with g = ∂L/∂out:

        g_h = g·W2                                   (∂L/∂h)
        g_gate, g_up, h = swiglu_backward(gate, up, g_h)           one pass; h recomputed
        ∂L/∂W2_e = gᵀ·h    ∂L/∂W1_e = g_gateᵀ·x    ∂L/∂W3_e = g_upᵀ·x    ∂L/∂x = g_gate·W1 + g_up·W3
    """

    @staticmethod
    def forward(ctx, rows, w1, w3, w2, counts):
        segments = grouped_gemm_torch._segments(counts)
        if (segments[-1][2] if segments else 0) != rows.shape[0]:
            raise ValueError(f"expert_feed_forward: rows has {rows.shape[0]} rows but counts sum to "
                             f"{int(counts.sum())}; each row must belong to one expert's segment")
        forward_kernel, _ = numba_activation.SWIGLU_KERNELS[str(rows.dtype).removeprefix("torch.")]
        width = w1.shape[1]
        gate, up = rows.new_empty(rows.shape[0], width), rows.new_empty(rows.shape[0], width)
        out = rows.new_empty(rows.shape[0], w2.shape[1])
        hidden = rows.new_empty(max((end - begin for _, begin, end in segments), default=0), width)
        # The kernels get numpy views, sliced per expert (slicing the torch tensors would cost ~10 µs a call).
        gate_array, up_array, hidden_array = numba_cpu.array(gate), numba_cpu.array(up), numba_cpu.array(hidden)
        for expert, begin, end in segments:
            x, h = rows[begin:end], hidden[:end - begin]
            torch.mm(x, w1[expert].t(), out=gate[begin:end])                         # W1·x
            torch.mm(x, w3[expert].t(), out=up[begin:end])                           # W3·x
            forward_kernel(gate_array[begin:end], up_array[begin:end], hidden_array[:end - begin])
            torch.mm(h, w2[expert].t(), out=out[begin:end])                          # W2·h
        ctx.segments = segments
        ctx.save_for_backward(rows, w1, w3, w2, counts, gate, up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        rows, w1, w3, w2, counts, gate, up = ctx.saved_tensors
        if create_graph_requested():
            def feed_forward(rows, w1, w3, w2):
                experts = types.SimpleNamespace(w1=w1, w3=w3, w2=w2, b1=None, b2=None, b3=None, kind="swiglu",
                                                swiglu_alpha=None, swiglu_limit=None)
                return reference_expert_feed_forward(experts, rows, counts)
            return (*reference_vjp(feed_forward, (rows, w1, w3, w2), grad_out), None)
        _, backward_kernel = numba_activation.SWIGLU_KERNELS[str(rows.dtype).removeprefix("torch.")]
        grad_out = grad_out.contiguous()
        need_rows, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        grad_rows = torch.empty_like(rows) if need_rows else None
        # Empty segments' weight gradients stay 0.
        grad_w1, grad_w3, grad_w2 = (torch.zeros_like(w) if need else None
                                     for w, need in ((w1, need_w1), (w3, need_w3), (w2, need_w2)))
        most = max((end - begin for _, begin, end in ctx.segments), default=0)
        scratch = [rows.new_empty(most, w1.shape[1]) for _ in range(4)]
        grad_hidden, grad_gate, grad_up, hidden = scratch
        arrays = [numba_cpu.array(tensor) for tensor in (gate, up, *scratch)]
        for expert, begin, end in ctx.segments:
            n, g, x = end - begin, grad_out[begin:end], rows[begin:end]
            g_h, g_gate, g_up, h = grad_hidden[:n], grad_gate[:n], grad_up[:n], hidden[:n]
            torch.mm(g, w2[expert], out=g_h)                                         # ∂L/∂h = g·W2
            backward_kernel(arrays[0][begin:end], arrays[1][begin:end], *(array[:n] for array in arrays[2:]))
            if need_w2:
                torch.mm(g.t(), h, out=grad_w2[expert])                              # gᵀ·h
            if need_w1:
                torch.mm(g_gate.t(), x, out=grad_w1[expert])                         # g_gateᵀ·x
            if need_w3:
                torch.mm(g_up.t(), x, out=grad_w3[expert])                           # g_upᵀ·x
            if need_rows:
                torch.mm(g_gate, w1[expert], out=grad_rows[begin:end])               # g_gate·W1
                grad_rows[begin:end].addmm_(g_up, w3[expert])                        #   + g_up·W3
        return grad_rows, grad_w1, grad_w3, grad_w2, None


def expert_feed_forward(experts, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The experts on their segments (fastmoe_edu.experts.expert_feed_forward). SwiGLU experts without biases on
    float32/float64 CPU tensors: :class:`SwiGLUExperts` (the fused activation of numba_activation.py, each
    expert's work done while its rows are in cache, its hidden units recomputed in the backward instead of
    kept). Every other case (CUDA or 16-bit tensors, other kinds, biases, the tiled GEMM): the reference's
    function with this backend's grouped GEMM."""
    fused = (experts.kind == "swiglu" and experts.b1 is None and experts.b2 is None and rows.device.type == "cpu"
             and not _cuda_kernels_for_cpu_tensors and _grouped_gemm != "tiled"
             and rows.dtype in (torch.float32, torch.float64) and experts.w1.dtype == rows.dtype)
    if not fused:
        return unfused_expert_feed_forward(experts, rows, counts)
    return SwiGLUExperts.apply(rows.contiguous(), experts.w1, experts.w3, experts.w2, counts)


def unfused_expert_feed_forward(experts, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The reference's experts on this backend's grouped GEMM (torch's activation): what CUDA tensors and every
    case SwiGLUExperts does not take run."""
    return run_experts(experts, rows, counts, grouped_matmul)


# ----------------------------------------------------------------------------------------------------
# Fused routers (differentiable in the weights)
# ----------------------------------------------------------------------------------------------------
class SoftmaxTopKRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, received_logits, top_k, renormalize, num_groups, top_k_groups, bias):
        target = _target(received_logits)
        logits = received_logits.contiguous()
        num_tokens = logits.shape[0]
        has_bias = bias is not None
        # Scratch for the selection scores (logits outside the best groups masked, or p + b) and the group scores.
        selection = torch.empty_like(logits) if num_groups or has_bias else logits.new_empty(num_tokens, 1)
        group_scores = logits.new_empty(num_tokens, max(num_groups, 1))
        kernel_bias = bias if has_bias else logits.new_empty(1)                    # never read without a bias
        expert_ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
        weights = logits.new_empty(num_tokens, top_k)
        target.softmax_top_k_route(target.array(logits), renormalize, num_groups, top_k_groups, has_bias,
                                   target.array(kernel_bias), target.array(selection), target.array(group_scores),
                                   target.array(expert_ids), target.array(weights))
        ctx.options = (top_k, renormalize, num_groups or None, top_k_groups or None)
        ctx.mark_non_differentiable(expert_ids)
        ctx.save_for_backward(received_logits, expert_ids, weights, bias)   # as received: see second_order.py
        return expert_ids, weights

    @staticmethod
    def backward(ctx, grad_expert_ids, grad_weights):
        logits, expert_ids, weights, bias = ctx.saved_tensors
        if create_graph_requested():
            route = lambda logits: reference_routing.softmax_top_k_route(logits, *ctx.options, bias)[1]  # noqa: E731
            return (*reference_vjp(route, (logits,), grad_weights), None, None, None, None, None)
        target = _target(logits)
        logits, grad_weights = logits.contiguous(), grad_weights.contiguous()
        grad_logits = torch.empty_like(logits)
        renormalize = ctx.options[1]
        target.softmax_top_k_route_backward(target.array(logits), target.array(expert_ids), target.array(weights),
                                           target.array(grad_weights), renormalize, target.array(grad_logits))
        return grad_logits, None, None, None, None, None


class SigmoidTopKRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, received_logits, bias, top_k, route_scale, num_groups, top_k_groups, renormalize):
        target = _target(received_logits)
        logits = received_logits.contiguous()
        num_tokens = logits.shape[0]
        selection = torch.empty_like(logits)                                       # scratch: σ(l) + b
        group_scores = logits.new_empty(num_tokens, max(num_groups, 1))           # scratch (unused if 0)
        expert_ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
        weights = logits.new_empty(num_tokens, top_k)
        # Below this sum of the chosen σ the kernels normalize e^{l − max l} instead (σ underflows there).
        min_total = min_score_sum(logits.dtype)
        target.sigmoid_top_k_route(target.array(logits), target.array(bias), route_scale, renormalize, num_groups,
                                   top_k_groups, min_total, target.array(selection), target.array(group_scores),
                                   target.array(expert_ids), target.array(weights))
        ctx.options = (top_k, route_scale, num_groups or None, top_k_groups or None, renormalize)
        ctx.min_total = min_total
        ctx.mark_non_differentiable(expert_ids)
        ctx.save_for_backward(received_logits, expert_ids, bias)            # as received: see second_order.py
        return expert_ids, weights

    @staticmethod
    def backward(ctx, grad_expert_ids, grad_weights):
        logits, expert_ids, bias = ctx.saved_tensors
        if create_graph_requested():
            route = lambda logits: reference_routing.sigmoid_top_k_route(logits, bias, *ctx.options)[1]  # noqa: E731
            return (*reference_vjp(route, (logits,), grad_weights), None, None, None, None, None, None)
        target = _target(logits)
        logits, grad_weights = logits.contiguous(), grad_weights.contiguous()
        grad_logits = torch.empty_like(logits)
        _, route_scale, _, _, renormalize = ctx.options
        target.sigmoid_top_k_route_backward(target.array(logits), target.array(expert_ids), target.array(grad_weights),
                                           route_scale, renormalize, ctx.min_total, target.array(grad_logits))
        return grad_logits, None, None, None, None, None, None


def _routing_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Route in at least float32 (as the reference does), and check k like torch.topk would."""
    if not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k={top_k} must be in [1, number of experts={logits.shape[-1]}]")
    return logits if logits.dtype in ROUTING_DTYPES else logits.float()


def softmax_top_k_route(logits: torch.Tensor, top_k: int, renormalize: bool, num_groups: int | None = None,
                        top_k_groups: int | None = None,
                        bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """p = softmax(logits); ids = top-k of p, or of p + bias with a selection bias (within the best
    ``top_k_groups`` of ``num_groups`` groups, each scored by its largest p (+ bias), if given);
    weights = p[ids] (divided by their sum if renormalize)."""
    logits = _routing_logits(logits, top_k)
    if bias is not None:
        bias = bias.detach().to(logits.dtype).contiguous()                         # selects only: no gradient
    return SoftmaxTopKRoute.apply(logits, top_k, bool(renormalize), num_groups or 0, top_k_groups or 0, bias)


def sigmoid_top_k_route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    top_k: int,
    route_scale: float,
    num_groups: int | None,
    top_k_groups: int | None,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: s = sigmoid(logits); select top-k of (s + b); weights = s_sel / Σ s_sel · scale
    (s_sel · scale if not renormalize)."""
    logits = _routing_logits(logits, top_k)
    # The bias only selects (no gradient); it is added in the logits' dtype.
    bias = bias.detach().to(logits.dtype).contiguous()
    return SigmoidTopKRoute.apply(logits, bias, top_k, float(route_scale), num_groups or 0, top_k_groups or 0,
                                  bool(renormalize))
