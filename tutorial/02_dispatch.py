# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (fastmoe_edu)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Dispatch: moving tokens to their experts and back
#
# The router (notebook 01) decided, for every token `t` and each of its `k` slots `s`, an expert id
# and a weight. Dispatch is the data movement that follows. Experts run fastest on *contiguous*
# blocks of rows (one matrix product per expert), so the tokens are first sorted by expert:
#
# ```
# count → positions → scatter → experts → gather → combine
# ```
#
# 1. the six steps on a tiny example, printed tensor by tensor, with the reference functions of
#    `fastmoe_edu.dispatch` (plain PyTorch, written to be read);
# 2. the same steps with the numba kernels of `backends/numba_backend.py`: the CPU kernels, and the
#    CUDA kernels run in numba's CUDA *simulator* (no GPU needed) — the tensors must be identical;
# 3. how such a GPU kernel is laid out: grid, blocks, threads, atomics and a stable order;
# 4. a live timing of reference vs numba over token counts.
#
# **`QUICK`** (`FASTMOE_EDU_QUICK=1`, set by the tests): smaller timing sizes.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from fastmoe_edu import MoELayer, dispatch
from fastmoe_edu.backends import get_backend

QUICK = os.environ.get("FASTMOE_EDU_QUICK", "0") == "1"
torch.set_num_threads(1)
NOTEBOOK_START = time.perf_counter()
torch.set_printoptions(precision=2, sci_mode=False, linewidth=120)
print(f"QUICK={QUICK}")

# %% [markdown]
# ## 1. The steps on a tiny example (reference functions)
#
# Six tokens of width 4, four experts, `top_k = 2`. To make rows easy to follow, column 0 of token
# `t` holds the number `t` (the other columns are random): wherever a row travels, its first entry
# tells which token it is. The routing comes from a real router (`softmax_topk`) with a capacity of
# 3 rows per expert, so an expert overflows and an assignment is dropped (id `-1`).

# %%
T, D, E, K = 6, 4, 4, 2
g = torch.Generator().manual_seed(10)
x = torch.cat([torch.arange(T, dtype=torch.float32)[:, None], 2 * torch.randn(T, D - 1, generator=g)], dim=1)
torch.manual_seed(10)
gate_layer = MoELayer(D, 8, E, top_k=K, router="softmax_topk")
with torch.no_grad():
    routed, _ = gate_layer.gate(x)           # the router alone: ids [T, k] and weights [T, k]
expert_ids, weights = routed.expert_ids, routed.weights
CAPACITY = 3

print("x (column 0 = token number)\n", x)
print("router's expert ids [T, k]\n", expert_ids)
print("router's weights [T, k]\n", weights)

# %% [markdown]
# **Capacity.** Each expert takes at most `C` assignments; every token's first choice claims a place
# before any second choice does (slot-major order). The rest become `-1`.

# %%
ids = dispatch.prune_capacity(expert_ids, E, CAPACITY)
w = weights * (ids >= 0)                                      # a dropped slot contributes nothing
print(f"after prune_capacity(C={CAPACITY})\n", ids)

# %% [markdown]
# **Count** (a histogram) and **positions**: the exclusive prefix sum of the counts is where each
# expert's segment starts in the sorted buffer; inside a segment the rows keep token order, so slot
# `(t, s)` goes to row `start[e] + (number of earlier assignments to e)`. Earlier means earlier in
# the flattened order `t·k + s`; that is what makes the layout *stable* (deterministic).

# %%
counts = dispatch.count_tokens_per_expert(ids, E)
starts = dispatch.exclusive_prefix_sum(counts)
rows = dispatch.stable_positions(ids, starts)
print("counts[e]      ", counts.tolist())
print("starts[e]      ", starts.tolist())
print("rows[t, s] (-1 = dropped)\n", rows)

# %% [markdown]
# **Scatter**: copy token `t` into row `rows[t, s]` for each kept slot. The buffer is now sorted by
# expert: read column 0 to see which tokens each expert received.

# %%
num_rows = int(counts.sum())
buffer = dispatch.scatter_rows(x, rows, num_rows)
segment_of_row = torch.repeat_interleave(torch.arange(E), counts)
for r in range(num_rows):
    print(f"buffer row {r}: {np.round(buffer[r].numpy(), 2)}   ← token {int(buffer[r, 0])}, "
          f"expert {int(segment_of_row[r])}")

# %% [markdown]
# **Experts**: one matrix product per contiguous segment, a *grouped GEMM*. For this demo expert `e`
# is simply "multiply by `10·(e+1)`", so the output shows who processed each row.

# %%
toy_weight = torch.stack([10.0 * (e + 1) * torch.eye(D) for e in range(E)])     # [E, d_out, d_in]
expert_out = dispatch.grouped_matmul(buffer, toy_weight, counts)
print("expert_out (row r scaled by its expert's factor)\n", expert_out)

# %% [markdown]
# **Gather + combine**: every token reads back its `k` rows and sums them with its routing weights,
# `y[t] = Σ_s w[t, s] · expert_out[rows[t, s]]`. A token whose slots were all dropped gets 0 (in a
# transformer the residual connection carries it unchanged).

# %%
y = dispatch.gather_combine(expert_out, rows, w)
y_direct = torch.stack([sum(w[t, s] * 10.0 * (ids[t, s] + 1) * x[t] for s in range(K) if ids[t, s] >= 0)
                        if (ids[t] >= 0).any() else torch.zeros(D) for t in range(T)])
print("y\n", y)
print("max |y − direct per-token loop| =", float((y - y_direct).abs().max()))
assert torch.allclose(y, y_direct)

# %% [markdown]
# The picture of the same permutation: each line joins a token (left) to its row in the
# expert-sorted buffer (right), coloured by expert, with the line width showing the routing weight.

# %%
colors = plt.cm.tab10(np.arange(E))
fig, ax = plt.subplots(figsize=(7, 4))
for t in range(T):
    ax.text(-0.05, -t, f"token {t}", ha="right", va="center")
    for s in range(K):
        if rows[t, s] >= 0:
            e, r = int(ids[t, s]), int(rows[t, s])
            ax.plot([0, 1], [-t, -r * (T - 1) / max(num_rows - 1, 1)], color=colors[e], lw=1 + 4 * float(w[t, s]))
        else:
            ax.text(0.03, -t + 0.15, "dropped", color="red", fontsize=8)
for r in range(num_rows):
    e = int(segment_of_row[r])
    ax.text(1.05, -r * (T - 1) / max(num_rows - 1, 1), f"row {r} (expert {e})", va="center", color=colors[e])
ax.set_xlim(-0.5, 1.6)
ax.axis("off")
ax.set_title("scatter: token rows → expert-contiguous buffer")
plt.show()

# %% [markdown]
# Finally, the real layer: `MoELayer.forward` is exactly these calls (with its SwiGLU experts instead
# of the toy ones). Re-running the steps by hand reproduces its output.

# %%
torch.manual_seed(0)
layer = MoELayer(16, 32, 4, top_k=2, router="softmax_topk", capacity_factor=1.0)
tokens = torch.randn(10, 16)
with torch.no_grad():
    y_layer = layer(tokens)
    r, _ = layer.gate(tokens)
    ids_l = dispatch.prune_capacity(r.expert_ids, 4, r.capacity)
    counts_l = dispatch.count_tokens_per_expert(ids_l, 4)
    rows_l = dispatch.stable_positions(ids_l, dispatch.exclusive_prefix_sum(counts_l))
    buf_l = dispatch.scatter_rows(tokens, rows_l, int(counts_l.sum()))
    out_l = layer.experts(buf_l, counts_l, dispatch.grouped_matmul)
    y_manual = dispatch.gather_combine(out_l, rows_l, r.weights * (ids_l >= 0))
print("layer output == step-by-step output:", torch.equal(y_layer, y_manual))
assert torch.equal(y_layer, y_manual)
