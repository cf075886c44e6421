"""The experts: E small feed-forward networks whose weights are stacked into single tensors.

Stacking (``w1[E, d_hidden, d_model]`` rather than E separate ``nn.Linear``) is what lets a backend
run all experts as one *grouped GEMM* over the expert-contiguous buffer built by ``dispatch.py``.

    SwiGLU  (Shazeer 2020, used by Mixtral):  expert_e(x) = W2_e · ( silu(W1_e·x) ⊙ (W3_e·x) )
    GELU    (GPT-2 style MLP):                expert_e(x) = W2_e · gelu(W1_e·x)
"""
from __future__ import annotations

import math

import torch
from torch import nn

EXPERT_KINDS = ("swiglu", "gelu")


class Experts(nn.Module):
    """``num_experts`` feed-forward experts, run segment by segment on an expert-sorted buffer."""

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, kind: str = "swiglu", bias: bool = False):
        super().__init__()
        if kind not in EXPERT_KINDS:
            raise ValueError(f"expert={kind!r} is not a known expert kind; allowed: {', '.join(EXPERT_KINDS)}")
        self.num_experts, self.d_model, self.d_hidden, self.kind = num_experts, d_model, d_hidden, kind
        # Same scale as nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        self.w1 = nn.Parameter(_uniform(num_experts, d_hidden, d_model))
        self.w2 = nn.Parameter(_uniform(num_experts, d_model, d_hidden))
        self.w3 = nn.Parameter(_uniform(num_experts, d_hidden, d_model)) if kind == "swiglu" else None
        if bias:
            self.b1 = nn.Parameter(torch.zeros(num_experts, d_hidden))
            self.b2 = nn.Parameter(torch.zeros(num_experts, d_model))
            self.b3 = nn.Parameter(torch.zeros(num_experts, d_hidden)) if kind == "swiglu" else None
        else:
            self.b1 = self.b2 = self.b3 = None

    def forward(self, rows: torch.Tensor, counts: torch.Tensor, grouped_matmul) -> torch.Tensor:
        """rows [N, d_model] sorted by expert (counts[e] rows for expert e) -> [N, d_model].

        ``grouped_matmul(rows, weight[E, out, in], counts)`` is the backend's grouped GEMM.
        """
        # expert_of_row[n]: the expert whose segment row n sits in; each row gets that expert's bias.
        # A gather (bias[expert_of_row]), not bias.repeat_interleave(counts): the gradient of a gather
        # is a sort-based scatter-add on GPUs, the same bits in every run, where repeat_interleave's
        # backward (index_add_) adds with atomics in whatever order the threads arrive.
        expert_of_row = None
        if self.b1 is not None:
            experts = torch.arange(counts.numel(), device=counts.device)
            expert_of_row = experts.repeat_interleave(counts, output_size=rows.shape[0])
        hidden = self._linear(rows, self.w1, self.b1, counts, expert_of_row, grouped_matmul)    # W1·x
        if self.kind == "swiglu":
            gate = self._linear(rows, self.w3, self.b3, counts, expert_of_row, grouped_matmul)  # W3·x
            hidden = nn.functional.silu(hidden) * gate                                         # silu(W1x) ⊙ W3x
        else:
            hidden = nn.functional.gelu(hidden)                                                # gelu(W1x)
        return self._linear(hidden, self.w2, self.b2, counts, expert_of_row, grouped_matmul)   # W2·h

    @staticmethod
    def _linear(rows, weight, bias, counts, expert_of_row, grouped_matmul):
        out = grouped_matmul(rows, weight, counts)
        return out if bias is None else out + bias[expert_of_row]


def _uniform(num_experts: int, fan_out: int, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(num_experts, fan_out, fan_in).uniform_(-bound, bound)
