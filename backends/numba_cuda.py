"""GPU kernels: the tasks of ``numba_cpu.py`` compiled by ``numba.cuda.jit``, and the row kernels written
the way memory-bound GPU kernels are.

The public functions have the same names and arguments as in ``numba_cpu.py``. Two kinds of kernel:

* **Task kernels** (routing, the chunked ranking): one thread runs one task of ``numba_cpu.py``
  (one token, one chunk of assignments), the same plain Python the CPU runs.
* **Row kernels** (scatter, combine and their backward passes — the bytes of the layer): one *warp*
  (32 threads) per token, ``ROWS_PER_BLOCK`` tokens per block. The 32 threads of a warp stride over the
  columns (thread ``lane`` takes columns lane, lane + 32, ...), so a warp's loads and stores cover
  consecutive addresses (coalesced), no thread divides an index to find its (row, column), and each
  index is 32-bit. They are *token-major*: a warp reads x[t] (or grad_y[t]) once and touches the token's
  k buffer rows; the combine is a gather-and-sum with no atomics. The scatter, a pure copy, moves the
  widest words (8 bytes: int64) that the row length and alignment allow, whatever the float type.

16-bit tensors go in as they are: float16 as numba.cuda's own float16, bfloat16 (which numba lacks) as its
bit patterns in an int16 array: ``load_bfloat16`` widens the 16 bits to a float32 (bits << 16, a bit
cast), ``store_bfloat16`` rounds a float32 to the nearest even bfloat16 (``numba_cpu.bfloat16_bits``).
Sums run in float32 (float64 for float64 tensors): the ``sum_type`` argument is a one-element array of
that dtype, and ``sum_type[0]`` (a zero) starts each sum with the right type.

Kernels run on torch's current CUDA stream (``cuda.external_stream``), so they are ordered with the
torch operations around them and torch's caching allocator may reuse their buffers safely. Arrays
come from torch tensors through ``__cuda_array_interface__`` (``cuda.as_cuda_array(..., sync=False)``): no
copies, and no host synchronization anywhere in this file (every size a launch needs is a tensor shape).

In numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is first imported) the same
kernels run on the CPU, one Python thread per GPU thread: that is how the tests check this file on
machines without a GPU. There, "device arrays" are numpy views of CPU tensors, and the two bit casts
(which the simulator lacks) are numpy views.
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
WARP = 32
#: Row kernels: one warp per token, so a block of MAX_THREADS_PER_BLOCK threads handles this many tokens.
ROWS_PER_BLOCK = MAX_THREADS_PER_BLOCK // WARP
NATIVE, BFLOAT16 = numba_cpu.NATIVE, numba_cpu.BFLOAT16


def simulator_enabled() -> bool:
    """Whether numba.cuda is the CPU simulator (decided by numba when it was first imported)."""
    return bool(numba.config.ENABLE_CUDASIM)


def _compile(task):
    """One task of numba_cpu.py (plain Python), compiled as a CUDA device function."""
    return cuda.jit(device=True)(task)


count_chunk = _compile(numba_cpu.count_chunk)
rank_chunk = _compile(numba_cpu.rank_chunk)
exclusive_prefix_sum_task = _compile(numba_cpu.exclusive_prefix_sum_task)
bfloat16_bits = _compile(numba_cpu.bfloat16_bits)
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


# ----------------------------------------------------------------------------------------------------
# bfloat16 <-> float32 (the only two bit casts: libdevice's on a GPU, numpy views in the simulator)
# ----------------------------------------------------------------------------------------------------
if simulator_enabled():
    def _load_bfloat16(stored):
        return numpy.array([(int(stored) & 0xFFFF) << 16], numpy.uint32).view(numpy.float32)[0]

    def _store_bfloat16(value):
        rounded = bfloat16_bits(int(numpy.array([value], numpy.float32).view(numpy.uint32)[0]))
        return rounded - 65536 if rounded > 32767 else rounded                 # as an int16
else:
    from numba.cuda import libdevice

    def _load_bfloat16(stored):
        return libdevice.int_as_float(numba.int32(numba.int32(stored) << 16))  # the high half of a float32

    def _store_bfloat16(value):
        bits = numba.uint32(libdevice.float_as_int(numba.float32(value)))
        return numba.int16(bfloat16_bits(bits))

load_bfloat16 = cuda.jit(device=True)(_load_bfloat16)
store_bfloat16 = cuda.jit(device=True)(_store_bfloat16)


@cuda.jit(device=True)
def load(array, row, col, kind, zero):
    """array[row, col] as a float of the sums' type (``zero``'s: float32, or float64), so float16 and bfloat16
    values are widened before any arithmetic (a bfloat16 bit pattern by a bit cast)."""
    if kind == BFLOAT16:
        return load_bfloat16(array[row, col]) + zero
    return array[row, col] + zero


@cuda.jit(device=True)
def store(array, row, col, value, kind):
    """array[row, col] = value, rounded to the array's float type (bfloat16: to nearest even)."""
    if kind == BFLOAT16:
        array[row, col] = store_bfloat16(value)
    else:
        array[row, col] = value


def array(tensor: torch.Tensor):
    """A numba device array viewing a contiguous CUDA tensor (shares memory; keep the tensor alive); a
    bfloat16 tensor as its bit patterns (int16). In the simulator, CPU tensors stand in for GPU ones and
    a numpy view is the "device array"."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    if tensor.is_cuda:
        # sync=False: numba would otherwise wait on the stream named in torch's interface (a host sync per
        # array); our kernels run on that same stream, so they are ordered after its work anyway.
        return cuda.as_cuda_array(tensor, sync=False)
    if not simulator_enabled():
        raise RuntimeError("numba.cuda kernels need CUDA tensors (or numba's CUDA simulator for CPU tensors)")
    return tensor.numpy()


def copy_array(tensor: torch.Tensor):
    """A 2-D tensor viewed as rows of the widest words (8, 4 or 2 bytes) that its row length and address
    allow: a copy kernel moves 8 bytes per load whatever the float type."""
    row_bytes = tensor.shape[1] * tensor.element_size()
    for word in (torch.int64, torch.int32, torch.int16):
        if word.itemsize >= tensor.element_size() and row_bytes % word.itemsize == 0 \
                and tensor.data_ptr() % word.itemsize == 0:
            return array(tensor.view(word))
    return array(tensor)


def decoding_table(dtype: torch.dtype):
    """None: the GPU converts 16-bit values itself (float16 natively, bfloat16 by bit casts)."""
    return None


def storage_kind(dtype: torch.dtype) -> int:
    """BFLOAT16 (int16 bit patterns) for bfloat16; every other float type is numba's own (NATIVE)."""
    return BFLOAT16 if dtype == torch.bfloat16 else NATIVE


_SUM_TYPES = {}


def sum_type(dtype: torch.dtype):
    """A one-element device array whose dtype the row kernels sum in (float64 for float64, else float32);
    made once per device and dtype, so a launch allocates nothing."""
    sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    device = torch.device("cuda", torch.cuda.current_device()) if not simulator_enabled() else torch.device("cpu")
    key = (sum_dtype, device)
    if key not in _SUM_TYPES:
        zero = torch.zeros(1, dtype=sum_dtype, device=device)
        _SUM_TYPES[key] = (zero, array(zero))                  # the tensor keeps the memory alive
    return _SUM_TYPES[key][1]


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


def _launch_rows(kernel, num_rows, *args):
    """Run a row kernel: one warp per row (token), ROWS_PER_BLOCK rows per block of 128 threads."""
    if num_rows == 0:
        return
    kernel[math.ceil(num_rows / ROWS_PER_BLOCK), MAX_THREADS_PER_BLOCK, torch_stream()](*args)


# ----------------------------------------------------------------------------------------------------
# Integer kernels: a histogram, and the chunked ranking (numba_backend.py runs torch.cumsum between the two)
# ----------------------------------------------------------------------------------------------------
@cuda.jit
def _count_experts_kernel(expert_ids, counts):
    """counts[e] += 1 for each assignment to e: one thread per assignment (integer atomics: the counts do not
    depend on the order the threads add in)."""
    index = cuda.grid(1)
    top_k = expert_ids.shape[1]
    if index < expert_ids.shape[0] * top_k:
        expert = expert_ids[index // top_k, index % top_k]
        if expert >= 0:
            cuda.atomic.add(counts, expert, 1)


@cuda.jit
def _count_chunks_kernel(expert_ids, chunk_size, slot_major, ordered, token_order, chunk_counts):
    chunk = cuda.grid(1)
    if chunk < chunk_counts.shape[0]:
        count_chunk(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, chunk_counts)


@cuda.jit
def _rank_chunks_kernel(expert_ids, chunk_size, slot_major, ordered, token_order, starts, chunk_counts, inclusive,
                        ranks):
    chunk = cuda.grid(1)
    if chunk < chunk_counts.shape[0]:
        rank_chunk(expert_ids, chunk, chunk_size, slot_major, ordered, token_order, starts, chunk_counts, inclusive,
                   ranks)


@cuda.jit
def _exclusive_prefix_sum_kernel(counts, starts):
    if cuda.grid(1) == 0:
        exclusive_prefix_sum_task(counts, starts)


def count_experts(expert_ids, chunk_size, counts):
    """counts (zeroed by the caller) += the histogram of expert_ids; ``chunk_size`` is the CPU's (unused here)."""
    _launch(_count_experts_kernel, expert_ids.size, expert_ids, counts)


def count_chunks(expert_ids, chunk_size, slot_major, ordered, token_order, chunk_counts):
    _launch(_count_chunks_kernel, chunk_counts.shape[0], expert_ids, chunk_size, slot_major, ordered, token_order,
            chunk_counts)


def rank_chunks(expert_ids, chunk_size, slot_major, ordered, token_order, starts, chunk_counts, inclusive, ranks):
    _launch(_rank_chunks_kernel, chunk_counts.shape[0], expert_ids, chunk_size, slot_major, ordered, token_order,
            starts, chunk_counts, inclusive, ranks)


def exclusive_prefix_sum(counts, starts):
    _launch(_exclusive_prefix_sum_kernel, 1, counts, starts)


# ----------------------------------------------------------------------------------------------------
# Row kernels: one warp per token, its 32 threads striding over the columns
# ----------------------------------------------------------------------------------------------------
#: Threads of the one block that zeroes the rows nobody owns (and first counts the kept ones: T·k reads,
#: so a full block on a GPU; the simulator starts a Python thread per GPU thread, so one warp there).
TAIL_THREADS = WARP if simulator_enabled() else 1024


@cuda.jit
def _zero_rows_past_kept_kernel(rows, out):
    """out[r] = 0 for r >= kept = #{rows[t, s] >= 0} (rows are stable positions: the kept assignments own
    rows 0..kept-1). One block: its threads count a share of ``rows`` each, thread 0 adds the shares, then
    warp w zeroes rows kept + w, kept + w + TAIL_THREADS / 32, ... (nothing to do when every row is owned)."""
    shares = cuda.shared.array(TAIL_THREADS, numba.int64)
    thread = cuda.threadIdx.x
    mine = 0
    for token in range(thread, rows.shape[0], TAIL_THREADS):
        for slot in range(rows.shape[1]):
            if rows[token, slot] >= 0:
                mine += 1
    shares[thread] = mine
    cuda.syncthreads()
    if thread == 0:
        for other in range(1, TAIL_THREADS):
            mine += shares[other]
        shares[0] = mine
    cuda.syncthreads()
    for row in range(shares[0] + (thread >> 5), out.shape[0], TAIL_THREADS >> 5):
        for col in range(thread & 31, out.shape[1], WARP):
            out[row, col] = 0


def _zero_rows_past_kept(rows, out):
    if out.shape[0] > 0:
        _zero_rows_past_kept_kernel[1, TAIL_THREADS, torch_stream()](rows, out)


@cuda.jit
def _scatter_rows_kernel(x, rows, buffer):
    """buffer[rows[t, s]] = x[t]: warp t reads each word of x[t] once and writes it to the token's kept rows."""
    token = numba.int32(cuda.blockIdx.x * ROWS_PER_BLOCK + (cuda.threadIdx.x >> 5))
    if token < rows.shape[0]:
        for col in range(cuda.threadIdx.x & 31, x.shape[1], WARP):
            value = x[token, col]
            for slot in range(rows.shape[1]):
                row = numba.int32(rows[token, slot])
                if row >= 0:
                    buffer[row, col] = value


@cuda.jit
def _scatter_rows_backward_kernel(grad_buffer, rows, kind, sum_type, grad_x):
    """grad_x[t] = Σ_{s kept} grad_buffer[rows[t, s]], slots in order (sums in sum_type's dtype)."""
    token = numba.int32(cuda.blockIdx.x * ROWS_PER_BLOCK + (cuda.threadIdx.x >> 5))
    if token < rows.shape[0]:
        for col in range(cuda.threadIdx.x & 31, grad_x.shape[1], WARP):
            zero = sum_type[0]
            total = zero
            for slot in range(rows.shape[1]):
                row = numba.int32(rows[token, slot])
                if row >= 0:
                    total += load(grad_buffer, row, col, kind, zero)
            store(grad_x, token, col, total, kind)


@cuda.jit
def _gather_combine_kernel(expert_out, rows, weights, kind, sum_type, y):
    """y[t] = Σ_{s kept} w[t, s] · expert_out[rows[t, s]], slots in order: a gather-and-sum, no atomics."""
    token = numba.int32(cuda.blockIdx.x * ROWS_PER_BLOCK + (cuda.threadIdx.x >> 5))
    if token < rows.shape[0]:
        for col in range(cuda.threadIdx.x & 31, y.shape[1], WARP):
            zero = sum_type[0]
            total = zero
            for slot in range(rows.shape[1]):
                row = numba.int32(rows[token, slot])
                if row >= 0:
                    total += load(weights, token, slot, kind, zero) * load(expert_out, row, col, kind, zero)
            store(y, token, col, total, kind)


@cuda.jit
def _gather_combine_backward_kernel(grad_y, expert_out, rows, weights, kind, sum_type, want_rows, want_weights,
                                    grad_expert_out, grad_weights):
    """Both gradients of the combine where the data already is: warp t, slot s (row r = rows[t, s]) writes
    grad_expert_out[r] = w[t, s] · grad_y[t] and, from the same loads of grad_y[t], sums its columns' share of
    grad_w[t, s] = <grad_y[t], expert_out[r]>; the 32 shares meet in shared memory and lane 0 adds them in
    lane order (a fixed order: bitwise reproducible). Every thread reaches both barriers of every slot."""
    shares = cuda.shared.array(MAX_THREADS_PER_BLOCK, numba.float64)
    thread = cuda.threadIdx.x
    lane = thread & 31
    token = numba.int32(cuda.blockIdx.x * ROWS_PER_BLOCK + (thread >> 5))
    active = token < rows.shape[0]
    for slot in range(rows.shape[1]):
        row = numba.int32(rows[token, slot]) if active else numba.int32(-1)
        zero = sum_type[0]
        total = zero
        if row >= 0:
            weight = load(weights, token, slot, kind, zero)
            for col in range(lane, grad_y.shape[1], WARP):
                gradient = load(grad_y, token, col, kind, zero)
                if want_rows:
                    store(grad_expert_out, row, col, weight * gradient, kind)
                if want_weights:
                    total += gradient * load(expert_out, row, col, kind, zero)
        if want_weights:
            shares[thread] = total
            cuda.syncthreads()
            if lane == 0 and active:
                dot = 0.0
                for other in range(thread, thread + WARP):
                    dot += shares[other]
                store(grad_weights, token, slot, dot, kind)
            cuda.syncthreads()


def scatter_rows(x, rows, buffer):
    _zero_rows_past_kept(rows, buffer)
    _launch_rows(_scatter_rows_kernel, rows.shape[0], x, rows, buffer)


def scatter_rows_backward(grad_buffer, rows, table, kind, sum_type, grad_x):
    _launch_rows(_scatter_rows_backward_kernel, rows.shape[0], grad_buffer, rows, kind, sum_type, grad_x)


def gather_combine(expert_out, rows, weights, table, kind, sum_type, y):
    _launch_rows(_gather_combine_kernel, rows.shape[0], expert_out, rows, weights, kind, sum_type, y)


def gather_combine_backward(grad_y, expert_out, rows, weights, table, kind, sum_type, want_rows, want_weights,
                            grad_expert_out, grad_weights):
    if want_rows:
        _zero_rows_past_kept(rows, grad_expert_out)
    _launch_rows(_gather_combine_backward_kernel, rows.shape[0], grad_y, expert_out, rows, weights, kind, sum_type,
                 want_rows, want_weights, grad_expert_out, grad_weights)


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
