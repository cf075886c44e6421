"""Exercise 5 · the grouped expert FFN on the expert-sorted buffer (tutorial/02_dispatch.py, section 1).

Model answer.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A grouped GEMM: out[segment e] = rows[segment e] · weight[e]ᵀ, segment e = the next counts[e] rows.

    Args:
        rows: [N, d_in], expert-contiguous (segment e has counts[e] rows; a segment may be empty).
        weight: [E, d_out, d_in].
        counts: [E] int64, Σ counts = N.
    Returns:
        [N, d_out].
    """
    outputs, start = [], 0
    for expert, count in enumerate(counts.tolist()):
        segment = rows[start:start + count]                                   # expert e's rows
        outputs.append(segment @ weight[expert].t())                          # x · W_eᵀ
        start += count
    return torch.cat(outputs) if outputs else rows.new_zeros(0, weight.shape[1])


def swiglu_experts(rows: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   w3: torch.Tensor) -> torch.Tensor:
    """Every expert's SwiGLU FFN on its segment: expert_e(x) = W2_e · (silu(W1_e·x) ⊙ (W3_e·x)).

    silu(z) = z · σ(z). Build it from :func:`grouped_matmul` (three grouped GEMMs), differentiable in
    rows, w1, w2 and w3.

    Args:
        rows: [N, d_model], expert-contiguous (counts[e] rows for expert e).
        counts: [E] int64.
        w1, w3: [E, d_hidden, d_model] (gate and up); w2: [E, d_model, d_hidden] (down).
    Returns:
        [N, d_model].
    """
    gate = grouped_matmul(rows, w1, counts)                                   # W1·x
    up = grouped_matmul(rows, w3, counts)                                     # W3·x
    hidden = F.silu(gate) * up                                                # silu(W1·x) ⊙ W3·x
    return grouped_matmul(hidden, w2, counts)                                 # W2·h
