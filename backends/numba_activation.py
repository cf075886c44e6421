"""The experts' SwiGLU as one fused pass forward and one backward (CPU kernels).

The reference computes an expert's hidden units from gate = W1·x and up = W3·x with torch operations,

    h = silu(gate) ⊙ up,             silu(g) = g · σ(g),   σ(g) = 1 / (1 + e^{-g})

which is three passes over [N, d_hidden] forward (silu, the product, and autograd keeps silu(g) as a
third saved tensor) and four backward (silu again, two products, silu's backward). Here one pass reads
gate and up and writes h; the backward reads gate, up and grad_h once and writes both gradients, and h
again (the experts' backward needs h for W2's gradient; numba_backend.SwiGLUExperts recomputes it here
rather than keep it from the forward):

    grad_up[i]   = grad_h[i] · g σ(g)
    grad_gate[i] = grad_h[i] · up[i] · σ(g) · (1 + g (1 − σ(g)))       (d/dg of g σ(g))

What makes it fast is that the loop vectorizes. numba compiles ``math.exp`` to a scalar libm call, which
keeps the compiler from vectorizing the loop (3.5 ms for 512k float32 elements here, where torch's silu,
vectorized, takes 0.7 ms). ``exp_neg_float32`` below is e^{-a} from additions, multiplications and one
integer shift, which the compiler turns into 8-wide AVX instructions:

    e^{-a} = 2^{-n} · e^{-r},   n = round(a · log2 e),   r = a − n·ln 2   (|r| ≤ ln 2 / 2)

with n·ln 2 subtracted in two parts (ln 2 = LN2_HIGH + LN2_LOW, LN2_HIGH exact in a few bits, so n·LN2_HIGH
is exact: Cody and Waite's reduction), e^{-r} a degree-7 Taylor polynomial (remainder r⁸/8! < 5·10⁻⁹ ≈ 0.04
float32 ulp), and 2^{-n} built directly as a float32's bits ((127 − n) << 23). a is clamped to 87 (e^{-87}
≈ 1.6·10⁻³⁸ is still a normal float32): σ of g < −87 is then 1.6·10⁻³⁸ instead of smaller, an absolute
difference below 10⁻³⁷. Measured against float64: σ within 3 float32 ulp (relative 3.6·10⁻⁷) for every g.
Divisions use ``error_model="numpy"``: numba's default checks every division for zero, which also stops
vectorization (1 + z ≥ 1 is never zero).

float64 tensors take the same passes with ``math.exp`` (exact to float64's rounding, not vectorized). The
backend sends everything else (CUDA tensors, 16-bit tensors, the other expert kinds, second-order
gradients) to the reference's torch operations: see ``numba_backend.expert_feed_forward``.
"""
import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

#: ln 2 split in two: LN2_HIGH has 16 significant bits, so n · LN2_HIGH is exact for n < 2⁸.
LN2_HIGH = np.float32(0.693145751953125)
LN2_LOW = np.float32(1.428606765330187e-06)
LOG2_E = np.float32(1.4426950408889634)
#: e^{-a} is computed for a <= MAX_EXPONENT (n <= 126: 2^{-n} is a normal float32).
MAX_EXPONENT = np.float32(87.0)
#: Rows per parallel task.
ROWS_PER_TASK = 64


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (an LLVM bitcast: no conversion, no memory)."""
    def codegen(context, builder, signature, arguments):
        return builder.bitcast(arguments[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen


@numba.njit(fastmath=True, error_model="numpy", inline="always")
def exp_neg_float32(a):
    """e^{-a} for float32 a >= 0 (module docstring: Cody-Waite reduction, degree-7 polynomial)."""
    a = min(a, MAX_EXPONENT)
    n = np.int32(a * LOG2_E + np.float32(0.5))                    # round(a · log2 e), a >= 0
    n_float = np.float32(n)
    r = (a - n_float * LN2_HIGH) - n_float * LN2_LOW              # a − n ln 2, |r| <= ln 2 / 2
    y = -r
    e = np.float32(1.0) + y * (np.float32(1.0) + y * (np.float32(1 / 2) + y * (np.float32(1 / 6) + y * (
        np.float32(1 / 24) + y * (np.float32(1 / 120) + y * (np.float32(1 / 720) + y * np.float32(1 / 5040)))))))
    return e * float32_from_bits((np.int32(127) - n) << np.int32(23))          # e^{-r} · 2^{-n}


@numba.njit(fastmath=True, error_model="numpy", inline="always")
def sigmoid_float32(g):
    """σ(g) = 1 / (1 + e^{-g}) for g >= 0 and e^{g} / (1 + e^{g}) for g < 0: both from z = e^{-|g|} <= 1,
    so nothing overflows."""
    z = exp_neg_float32(abs(g))
    return (np.float32(1.0) if g >= np.float32(0.0) else z) / (np.float32(1.0) + z)


@numba.njit(error_model="numpy", inline="always")
def sigmoid_float64(g):
    z = math.exp(-abs(g))
    return (1.0 if g >= 0.0 else z) / (1.0 + z)


@numba.njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
def swiglu_forward_float32(gate, up, hidden):
    """hidden = g σ(g) ⊙ up, float32 [N, H] (rows may have any stride, columns contiguous)."""
    num_rows = gate.shape[0]
    for task in prange((num_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for row in range(task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, num_rows)):
            g_row, u_row, h_row = gate[row], up[row], hidden[row]
            for col in range(g_row.shape[0]):
                g = g_row[col]
                h_row[col] = g * sigmoid_float32(g) * u_row[col]


@numba.njit(parallel=True, fastmath=True, error_model="numpy", cache=True)
def swiglu_backward_float32(gate, up, grad_hidden, grad_gate, grad_up, hidden):
    """grad_up = grad_h · g σ(g); grad_gate = grad_h · up · σ(g) (1 + g (1 − σ(g))), float32 [N, H]; and the
    forward's hidden = g σ(g) ⊙ up again (the experts' backward needs it for W2's gradient: recomputing it
    here, from the values this pass reads anyway, is cheaper than keeping it from the forward)."""
    num_rows = gate.shape[0]
    for task in prange((num_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for row in range(task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, num_rows)):
            g_row, u_row, d_row = gate[row], up[row], grad_hidden[row]
            dg_row, du_row, h_row = grad_gate[row], grad_up[row], hidden[row]
            for col in range(g_row.shape[0]):
                g, u, d = g_row[col], u_row[col], d_row[col]
                s = sigmoid_float32(g)
                silu = g * s
                h_row[col] = silu * u
                du_row[col] = d * silu
                dg_row[col] = d * u * s * (np.float32(1.0) + g * (np.float32(1.0) - s))


@numba.njit(parallel=True, error_model="numpy", cache=True)
def swiglu_forward_float64(gate, up, hidden):
    """The float32 kernel's pass in float64, with math.exp."""
    num_rows = gate.shape[0]
    for task in prange((num_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for row in range(task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, num_rows)):
            for col in range(gate.shape[1]):
                g = gate[row, col]
                hidden[row, col] = g * sigmoid_float64(g) * up[row, col]


@numba.njit(parallel=True, error_model="numpy", cache=True)
def swiglu_backward_float64(gate, up, grad_hidden, grad_gate, grad_up, hidden):
    num_rows = gate.shape[0]
    for task in prange((num_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for row in range(task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, num_rows)):
            for col in range(gate.shape[1]):
                g, u, d = gate[row, col], up[row, col], grad_hidden[row, col]
                s = sigmoid_float64(g)
                silu = g * s
                hidden[row, col] = silu * u
                grad_up[row, col] = d * silu
                grad_gate[row, col] = d * u * s * (1.0 + g * (1.0 - s))


#: dtype name -> (forward, backward) kernels.
SWIGLU_KERNELS = {"float32": (swiglu_forward_float32, swiglu_backward_float32),
                  "float64": (swiglu_forward_float64, swiglu_backward_float64)}
