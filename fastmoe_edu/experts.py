"""The experts: E small feed-forward networks whose weights are stacked into single tensors.

Stacking (``w1[E, d_hidden, d_model]`` rather than E separate ``nn.Linear``) is what lets a backend
run all experts as one *grouped GEMM* over the expert-contiguous buffer built by ``dispatch.py``.

Gated kinds (Shazeer 2020, "GLU Variants Improve Transformer"), three matrices per expert:

    swiglu  (Mixtral, DeepSeek, Qwen):        expert_e(x) = W2_e · ( silu(W1_e·x) ⊙ (W3_e·x) )
    geglu   (T5 v1.1 / Gemma style):          expert_e(x) = W2_e · ( gelu(W1_e·x) ⊙ (W3_e·x) )
    clamped_swiglu  (GPT-OSS):                expert_e(x) = W2_e · ( g·σ(α·g) ⊙ (u + 1) ),
                                              g = min(W1_e·x, limit),  u = clamp(W3_e·x, −limit, limit)

Plain kinds, two matrices per expert:

    gelu    (GPT-2 style MLP):                expert_e(x) = W2_e · gelu(W1_e·x)
    relu    (Switch Transformer, NLLB-MoE):   expert_e(x) = W2_e · relu(W1_e·x)

GELU is the exact (erf) one everywhere. ``clamped_swiglu`` has two constants, ``swiglu_alpha`` (α, 1.702
by default: g·σ(1.702·g) is the sigmoid approximation of GELU) and ``swiglu_limit`` (7.0 by default):
the clamps keep huge pre-activations out of the product (the gate is bounded above only, so a very
negative gate still gives g·σ(α·g) ≈ 0). ``SharedExperts`` (below) is the dense counterpart: the
always-on experts of DeepSeek-V2/V3 and Qwen2-MoE, one MLP of the same kind that every token runs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .checks import is_finite_number
from .dispatch import grouped_matmul as reference_grouped_matmul

#: expert kind -> the activation of its first linear map (gated kinds multiply it by W3·x).
ACTIVATIONS = {"swiglu": nn.functional.silu, "geglu": nn.functional.gelu,
               "gelu": nn.functional.gelu, "relu": nn.functional.relu}
#: The kinds with a gate matrix W3 (a GLU: act(W1·x) ⊙ W3·x, or GPT-OSS's clamped variant).
GATED_KINDS = ("swiglu", "geglu", "clamped_swiglu")
EXPERT_KINDS = (*ACTIVATIONS, "clamped_swiglu")
#: GPT-OSS's constants (its config's swiglu_alpha, swiglu_limit): the defaults of clamped_swiglu.
CLAMPED_SWIGLU_DEFAULTS = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0}


def hidden_activation(kind: str, gate: torch.Tensor, up: torch.Tensor | None, alpha: float | None = None,
                      limit: float | None = None) -> torch.Tensor:
    """The expert's hidden units from gate = W1·x (+ b1) and, for the gated kinds, up = W3·x (+ b3)."""
    if kind == "clamped_swiglu":
        gate = gate.clamp(max=limit)                                               # g = min(W1x, limit)
        up = up.clamp(min=-limit, max=limit)                                       # u = clamp(W3x, ±limit)
        return gate * torch.sigmoid(alpha * gate) * (up + 1)                       # g·σ(α·g) ⊙ (u + 1)
    hidden = ACTIVATIONS[kind](gate)                                               # silu / gelu / relu (W1x)
    return hidden if up is None else hidden * up                                   # act(W1x) ⊙ W3x


def check_expert_options(kind: str, swiglu_alpha, swiglu_limit) -> tuple[float | None, float | None]:
    """(α, limit) for ``kind``: GPT-OSS's defaults for clamped_swiglu; an error if set for another kind."""
    if kind not in EXPERT_KINDS:
        raise ValueError(f"expert={kind!r} is not a known expert kind; allowed: {', '.join(EXPERT_KINDS)}")
    if kind != "clamped_swiglu":
        if swiglu_alpha is not None or swiglu_limit is not None:
            raise ValueError(f"swiglu_alpha={swiglu_alpha!r}, swiglu_limit={swiglu_limit!r} are constants of "
                             f"expert='clamped_swiglu' (GPT-OSS); expert={kind!r} has none: leave them unset")
        return None, None
    values = {"swiglu_alpha": swiglu_alpha, "swiglu_limit": swiglu_limit}
    for name, value in values.items():
        if value is None:
            values[name] = CLAMPED_SWIGLU_DEFAULTS[name]
        elif not (is_finite_number(value) and value > 0):
            raise ValueError(f"{name}={value!r} must be a finite number > 0, or None for GPT-OSS's "
                             f"{CLAMPED_SWIGLU_DEFAULTS[name]}")
    return float(values["swiglu_alpha"]), float(values["swiglu_limit"])


class Experts(nn.Module):
    """``num_experts`` feed-forward experts, run segment by segment on an expert-sorted buffer."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, kind: str = "swiglu", bias: bool = False,
                 swiglu_alpha: float | None = None, swiglu_limit: float | None = None):
        super().__init__()
        self.swiglu_alpha, self.swiglu_limit = check_expert_options(kind, swiglu_alpha, swiglu_limit)
        self.num_experts, self.d_model, self.d_hidden, self.kind = num_experts, d_model, d_hidden, kind
        # Same scale as nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.w1 = nn.Parameter(_uniform(num_experts, d_hidden, d_model))
        self.w2 = nn.Parameter(_uniform(num_experts, d_model, d_hidden))
        gated = kind in GATED_KINDS
        self.w3 = nn.Parameter(_uniform(num_experts, d_hidden, d_model)) if gated else None
        self.b1 = nn.Parameter(torch.zeros(num_experts, d_hidden)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.b3 = nn.Parameter(torch.zeros(num_experts, d_hidden)) if bias and gated else None

    def forward(self, rows: torch.Tensor, counts: torch.Tensor, backend) -> torch.Tensor:
        """rows [N, d_model] sorted by expert (counts[e] rows for expert e) -> [N, d_model].

        ``backend`` (backends/) runs them: its ``expert_feed_forward``, which for the reference is the function
        below (the numba backend fuses each expert's three products and its SwiGLU on a CPU).
        """
        return backend.expert_feed_forward(self, rows, counts)


def expert_feed_forward(experts: Experts, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The reference backend's ``expert_feed_forward``: :func:`run_experts` on the reference's grouped GEMM."""
    return run_experts(experts, rows, counts, reference_grouped_matmul)


def run_experts(experts: Experts, rows: torch.Tensor, counts: torch.Tensor, grouped_matmul) -> torch.Tensor:
    """Every expert on its segment of ``rows`` [N, d_model] (expert-sorted, counts[e] rows for expert e):

        out[segment e] = W2_e · act(W1_e·x (+ b1_e)) (⊙ (W3_e·x (+ b3_e))) (+ b2_e)

    ``grouped_matmul(rows, weight[E, out, in], counts)`` is the grouped GEMM that runs the products (the
    reference's loop over the experts, or a backend's own).
    """
    # expert_of_row[n]: the expert whose segment row n sits in; each row gets that expert's bias.
    # A gather (bias[expert_of_row]), not bias.repeat_interleave(counts): the gradient of a gather
    # is a sort-based scatter-add on GPUs, the same bits in every run, where repeat_interleave's
    # backward (index_add_) adds with atomics in whatever order the threads arrive.
    expert_of_row = None
    if experts.b1 is not None:
        expert_of_row = torch.arange(counts.numel(), device=counts.device).repeat_interleave(
            counts, output_size=rows.shape[0])

    def linear(inputs, weight, bias):                                              # W·x (+ b_e) per segment
        out = grouped_matmul(inputs, weight, counts)
        return out if bias is None else out + bias[expert_of_row]

    gate = linear(rows, experts.w1, experts.b1)                                    # W1·x
    up = None if experts.w3 is None else linear(rows, experts.w3, experts.b3)      # W3·x
    hidden = hidden_activation(experts.kind, gate, up, experts.swiglu_alpha, experts.swiglu_limit)
    return linear(hidden, experts.w2, experts.b2)                                  # W2·h


def _uniform(num_experts: int, fan_out: int, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(num_experts, fan_out, fan_in).uniform_(-bound, bound)


class SharedExperts(nn.Module):
    """Always-on experts: one dense MLP that every token runs, added to the routed output.

    DeepSeekMoE (Dai et al. 2024) and DeepSeek-V2/V3 isolate ``num_shared`` shared experts; they see
    every token, so they are one MLP of width ``num_shared · d_hidden`` (the sum of num_shared MLPs of
    width d_hidden *is* that one MLP, its hidden units side by side). Qwen2-MoE scales the MLP by a
    learned per-token gate (``gated=True``):

        DeepSeek:   y = routed(x) + shared(x)
        Qwen2-MoE:  y = routed(x) + σ(x · g) · shared(x)          g [d_model], one scalar per token

    ``shared(x)`` is the kind's formula of ``Experts`` with plain matrices: w1, w3 [width, d_model],
    w2 [d_model, width]. These are replicated parameters, not experts: expert parallelism leaves them
    on every rank (they are not under ``layer.experts``), like attention weights.
    """

    def __init__(self, d_model: int, width: int, kind: str = "swiglu", bias: bool = False, gated: bool = False,
                 swiglu_alpha: float | None = None, swiglu_limit: float | None = None):
        super().__init__()
        self.swiglu_alpha, self.swiglu_limit = check_expert_options(kind, swiglu_alpha, swiglu_limit)
        self.d_model, self.width, self.kind = d_model, width, kind
        self.w1 = nn.Parameter(_uniform(1, width, d_model)[0])
        self.w2 = nn.Parameter(_uniform(1, d_model, width)[0])
        self.w3 = nn.Parameter(_uniform(1, width, d_model)[0]) if kind in GATED_KINDS else None
        self.b1 = nn.Parameter(torch.zeros(width)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.b3 = nn.Parameter(torch.zeros(width)) if bias and self.w3 is not None else None
        self.gate = nn.Parameter(torch.zeros(d_model)) if gated else None          # g: σ(0) = 1/2 at start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, d_model] -> [T, d_model]."""
        linear = nn.functional.linear
        up = None if self.w3 is None else linear(x, self.w3, self.b3)            # W3·x
        hidden = hidden_activation(self.kind, linear(x, self.w1, self.b1), up, self.swiglu_alpha, self.swiglu_limit)
        out = linear(hidden, self.w2, self.b2)                                     # W2·h
        if self.gate is not None:
            out = torch.sigmoid(x @ self.gate)[:, None] * out                      # σ(x·g) · shared(x)
        return out

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, width={self.width}, kind={self.kind!r}, gated={self.gate is not None}"
