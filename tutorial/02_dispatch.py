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
#    CUDA kernels run in numba's CUDA *simulator* (no GPU needed) — the tensors must be identical —
#    and the CUDA kernels' source, to read;
# 3. how such a GPU kernel is laid out: grid, blocks, threads; why atomics give a run-dependent
#    order (shown with real threads racing on this machine) and how a two-pass ranking avoids them;
# 4. a live timing of reference vs numba over token counts, and what that means for a whole layer.
#
# **`QUICK`** (`FASTMOE_EDU_QUICK=1`, set by the tests): smaller timing sizes, fewer repeats.
#
# **Glossary** (each term is explained again where it is first used):
#
# * **token**: one row of the input, a vector of width `d_model`; **expert**: a small feed-forward network;
#   **router**: the layer that picks `k` experts (**top-k**) and a weight for each token.
# * **slot** `(t, s)`: token `t`'s `s`-th choice; an **assignment** is one kept slot.
# * **capacity**: the most rows one expert accepts; assignments past it are **dropped** (id `-1`).
# * **exclusive prefix sum**: `start[e] = counts[0] + … + counts[e−1]`, where expert `e`'s rows begin.
# * **stable** order: rows of one expert keep the tokens' order, so every run gives the same layout.
# * **scatter** / **gather**: copy rows into / read rows back from the expert-sorted buffer;
#   **combine**: the weighted sum of a token's `k` expert outputs.
# * **GEMM**: a general matrix–matrix product; **grouped GEMM**: one GEMM per expert segment.
# * **SwiGLU**: the experts' activation (a gated variant of the usual two-layer network).
# * **numba**: a compiler for a subset of Python; `@njit` compiles for the CPU, **`prange`** is a loop whose
#   iterations run on several CPU threads, `@cuda.jit` compiles a **kernel** for an NVIDIA GPU (**CUDA**).
# * **thread / block / grid**: a kernel runs as many threads, grouped in blocks; all blocks form the grid.
# * **warp**: 32 GPU threads that execute together; warps of a kernel run in an order the hardware picks.
# * **atomic** (fetch-and-add): read a counter and add to it in one step no other thread can split.
# * **race**: a result that depends on which thread got somewhere first.
# * **coalescing**: neighbouring GPU threads reading neighbouring addresses, merged into few memory transactions.
# * **CUDA simulator**: numba's mode that runs CUDA kernels on the CPU, one Python thread per GPU thread.
# * **median** / **spread**: the middle of repeated timings, and the range (fastest–slowest) they cover.
# * **Amdahl's law**: speeding up part of a program cannot speed up the whole beyond what the rest costs.

# %%
import math
import os
import textwrap
import time

# numba's CPU kernels run on OpenMP threads. By default an OpenMP thread that has finished its work
# keeps spinning on the CPU for a while, waiting for the next parallel loop; on a machine with few
# cores those spinning threads steal the core from whatever runs next (here: the reference's torch
# operations, which then measured tens of times slower). "PASSIVE" makes idle threads sleep instead.
# It must be set before numba or torch load their OpenMP library, so before the imports below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

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
# tells which token it is. The routing comes from a real router (`softmax_top_k`) with a capacity of
# 3 rows per expert, so an expert overflows and an assignment is dropped (id `-1`).

# %%
T, D, E, K = 6, 4, 4, 2
g = torch.Generator().manual_seed(10)
x = torch.cat([torch.arange(T, dtype=torch.float32)[:, None], 2 * torch.randn(T, D - 1, generator=g)], dim=1)
torch.manual_seed(10)
gate_layer = MoELayer(D, 8, E, top_k=K, router="softmax_top_k")
with torch.no_grad():
    routed, _ = gate_layer.router(x)           # the router alone: ids [T, k] and weights [T, k]
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
        else:                                  # a dropped slot has no row: a grey stub, not an expert's colour
            ax.plot([0, 0.2], [-t, -t + 0.4], color="grey", ls=":", lw=1.5)
            ax.text(0.21, -t + 0.4, f"slot {s} dropped (no row)", color="dimgrey", fontsize=8, va="center")
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
#
# ✍️ Exercises: write these steps yourself, [ex03_positions.py](exercises/ex03_positions.py) (count, prefix sum, positions), [ex04_scatter.py](exercises/ex04_scatter.py), [ex05_experts.py](exercises/ex05_experts.py) (grouped GEMM, SwiGLU) and [ex06_combine.py](exercises/ex06_combine.py) (combine and its backward); check with `python -m tutorial.exercises.check 3 4 5 6`.

# %%
torch.manual_seed(0)
layer = MoELayer(16, 32, 4, top_k=2, router="softmax_top_k", capacity_factor=1.0)
tokens = torch.randn(10, 16)
with torch.no_grad():
    y_layer = layer(tokens)
    r, _ = layer.router(tokens)
    ids_l = dispatch.prune_capacity(r.expert_ids, 4, r.capacity)
    counts_l = dispatch.count_tokens_per_expert(ids_l, 4)
    rows_l = dispatch.stable_positions(ids_l, dispatch.exclusive_prefix_sum(counts_l))
    buf_l = dispatch.scatter_rows(tokens, rows_l, int(counts_l.sum()))
    out_l = layer.experts(buf_l, counts_l, get_backend("reference"))
    y_manual = dispatch.gather_combine(out_l, rows_l, r.weights * (ids_l >= 0))
print("layer output == step-by-step output:", torch.equal(y_layer, y_manual))
assert torch.equal(y_layer, y_manual)

# %% [markdown]
# ## 2. The same steps with the numba kernels
#
# `backends/numba_backend.py` has one function of the same name and signature for each reference
# function. On CPU tensors it runs numba's CPU target (`@njit` with `prange`); on CUDA tensors the
# `numba.cuda` kernels of `backends/numba_cuda.py`. Both are compiled from the same per-task Python
# functions, so they cannot drift apart. First the CPU kernels, step by step on the same inputs:

# %%
nb = get_backend("numba")                       # the numba backend module for CPU tensors


def run_steps(backend, x, expert_ids, weights, capacity, num_experts, expert_weight):
    """The six steps with one backend's functions; returns every intermediate tensor."""
    out = {}
    out["ids"] = backend.prune_capacity(expert_ids, num_experts, capacity)
    out["counts"] = backend.count_tokens_per_expert(out["ids"], num_experts)
    out["starts"] = backend.exclusive_prefix_sum(out["counts"])
    out["rows"] = backend.stable_positions(out["ids"], out["starts"])
    out["buffer"] = backend.scatter_rows(x, out["rows"], int(out["counts"].sum()))
    out["expert_out"] = backend.grouped_matmul(out["buffer"], expert_weight, out["counts"])
    out["y"] = backend.gather_combine(out["expert_out"], out["rows"], weights * (out["ids"] >= 0))
    return out


started = time.perf_counter()
with torch.no_grad():
    ref_steps = run_steps(dispatch, x, expert_ids, weights, CAPACITY, E, toy_weight)
    cpu_steps = run_steps(nb, x, expert_ids, weights, CAPACITY, E, toy_weight)
print(f"(first numba call compiles the kernels: {time.perf_counter() - started:.1f} s)")
print(f"{'step':<12}{'reference == numba CPU':>24}")
for name in ref_steps:
    print(f"{name:<12}{str(torch.equal(ref_steps[name], cpu_steps[name])):>24}")
print("numba CPU rows\n", cpu_steps["rows"])
assert all(torch.equal(ref_steps[n], cpu_steps[n]) for n in ref_steps)

# %% [markdown]
# ### The CUDA kernels, in numba's CUDA simulator
#
# No GPU here, so the `numba.cuda` kernels run in numba's **CUDA simulator**, which executes every
# GPU thread as a Python thread on the CPU: correct, very slow, fine for tiny tensors. The simulator
# must be switched on (`NUMBA_ENABLE_CUDASIM=1`) *before numba is first imported*, and this kernel
# already imported numba for the CPU kernels, so the simulated part runs in a fresh Python process.
# That process (the script `tutorial/_nbhelpers/simulated_cuda_steps.py`, shown below) loads the
# same inputs, sends the CPU tensors to the CUDA kernels
# (`numba_backend.run_cuda_kernels_on_cpu_tensors(True)`, the project's public switch for this),
# runs the six steps, and saves every tensor. It also runs the experts with the backend's tiled
# `numba.cuda` grouped-GEMM kernel, and a small kernel that records which block and thread handle
# which buffer element when each element gets a thread (used in section 3).

# %%
import subprocess
import sys
import tempfile
from pathlib import Path

from fastmoe_edu.backends import numba_cuda


def launch_config(tasks, max_threads=numba_cuda.MAX_THREADS_PER_BLOCK):
    """(blocks, threads per block) for ``tasks`` tasks: the rule of numba_cuda's launcher (its source is shown below)."""
    threads = min(max_threads, tasks)
    return math.ceil(tasks / threads), threads



from IPython.display import Code, display

SIMULATED = Path("_nbhelpers") / "simulated_cuda_steps.py"        # next to this notebook
display(Code(SIMULATED.read_text(), language="python"))
work = Path(tempfile.mkdtemp(prefix="fastmoe_edu_02_"))

# A bigger example for the thread map (and section 3's positions): 24 tokens, width 8, 4 experts, top-2.
g_big = torch.Generator().manual_seed(5)
big_x = torch.randn(24, 8, generator=g_big)
big_ids = torch.stack([torch.randperm(4, generator=g_big)[:2] for _ in range(24)])
big_counts = dispatch.count_tokens_per_expert(big_ids, 4)
big_starts = dispatch.exclusive_prefix_sum(big_counts)
big_rows = dispatch.stable_positions(big_ids, big_starts)
big_num_rows = int(big_counts.sum())
big_launch = launch_config(big_num_rows * big_x.shape[1])          # one task per buffer element (_launch's rule)
torch.save({"tiny": {"x": x, "expert_ids": expert_ids, "weights": weights, "capacity": CAPACITY, "E": E,
                     "weight": toy_weight},
            "big": {"num_rows": big_num_rows, "width": big_x.shape[1], "launch": big_launch}},
           work / "inputs.pt")

started = time.perf_counter()
print("running the script above in a fresh process (the simulator is slow: some seconds) ...", flush=True)
done = subprocess.run([sys.executable, str(SIMULATED), str(work / "inputs.pt"), str(work / "out.pt")],
                      capture_output=True, text=True, timeout=600)
if done.returncode != 0:
    raise RuntimeError("the CUDA-simulator process failed:\n" + done.stderr[-3000:])
sim = torch.load(work / "out.pt")
print(f"simulator process: {time.perf_counter() - started:.1f} s in all, "
      f"{sim['seconds']:.1f} s for the six steps")
print(f"{'step':<12}{'reference == CUDA (simulated)':>30}")
for name in ref_steps:
    print(f"{name:<12}{str(torch.equal(ref_steps[name], sim['steps'][name])):>30}")
print("rows from the CUDA kernels\n", sim["steps"]["rows"])
print("y from the CUDA kernels\n", sim["steps"]["y"])
integer_steps = ["ids", "counts", "starts", "rows"]
assert all(torch.equal(ref_steps[n], sim["steps"][n]) for n in integer_steps)
assert all(torch.allclose(ref_steps[n], sim["steps"][n]) for n in ref_steps)

# %% [markdown]
# ### Reading the kernels
#
# The kernels are ordinary Python in `backends/numba_cuda.py`; below is their source, taken from
# the module with `inspect.getsource` (so it is always the code that just ran). First the two
# launchers: `_launch` gives each task a thread; `_launch_rows` gives each *token* a warp (32 threads)
# and puts `ROWS_PER_BLOCK` tokens in a block. Then the scatter and the combine, the row kernels: the
# warp of token t reads each element of its row once, its lanes (`threadIdx.x & 31`) striding over the
# columns, and writes (or sums) the token's k rows. Last the two-pass ranking kernels, which call a
# *task* from `backends/numba_cpu.py` — the same plain-Python function that the CPU kernels run in a
# `prange` loop, compiled a second time for the GPU.

# %%
import inspect

from IPython.display import Code, display

from fastmoe_edu.backends import numba_cpu


def show_source(*functions):
    """Display the source of numba kernels / plain functions with syntax highlighting."""
    text = "\n\n".join(inspect.getsource(getattr(f, "py_func", f)) for f in functions)
    display(Code(text, language="python"))


show_source(numba_cuda._launch, numba_cuda._launch_rows)
show_source(numba_cuda._scatter_rows_kernel)
show_source(numba_cuda._gather_combine_kernel, numba_cuda.load)
show_source(numba_cuda._count_chunks_kernel, numba_cpu.count_chunk,
            numba_cuda._rank_chunks_kernel, numba_cpu.rank_chunk)

# What the launcher does with the tiny example above: tasks → blocks × threads per block.
tiny_rows, tiny_width = ref_steps["buffer"].shape
tiny_chunks = math.ceil(T * K / numba_cuda.ASSIGNMENTS_PER_CHUNK)
print("launch configurations for the tiny example (by the launchers' rules above):")
blocks, threads = launch_config(tiny_chunks)
print(f"  {'count / rank chunks (one thread per chunk)':<50}{tiny_chunks:>5} tasks → {blocks} block(s) × {threads} threads")
row_blocks = math.ceil(T / numba_cuda.ROWS_PER_BLOCK)
for name in ("scatter (one warp per token)", "gather + combine (one warp per token)"):
    print(f"  {name:<50}{T:>5} tokens → {row_blocks} block(s) × {numba_cuda.MAX_THREADS_PER_BLOCK} threads "
          f"({numba_cuda.ROWS_PER_BLOCK} warps of 32)")

# %% [markdown]
# ## 3. How a GPU kernel is laid out
#
# A CUDA kernel is one function run by many threads at once. The threads are grouped in **blocks**
# (here at most `numba_cuda.MAX_THREADS_PER_BLOCK` threads each), the blocks form the **grid**, and
# each thread computes its global index `i = blockIdx.x · blockDim.x + threadIdx.x`
# (`cuda.grid(1)`) and uses it to pick its piece of work. The launcher asks for at least one thread
# per task and rounds up to whole blocks, so every kernel starts with `if i < number_of_tasks`.
#
# * **Scatter / combine** move most of the bytes. They give each *token* a warp of 32 threads
#   (`ROWS_PER_BLOCK` tokens per block): lane `l` handles columns `l, l + 32, ...` (no division per
#   element), so neighbouring threads touch neighbouring addresses, which the GPU merges into few
#   wide memory transactions (*coalescing*). The warp reads its token's row once and writes it to
#   the token's k rows (scatter), or sums the k rows into it (combine). Each output element has
#   exactly one writer, so no synchronisation is needed. The simplest layout, one thread per
#   element (`row = i // width`, `col = i % width`, `_launch`'s rule), is the one drawn below.
# * **Positions** are the tricky part. The obvious parallel way is one thread per assignment and an
#   **atomic** counter per expert: `row = start[e] + atomic_add(cursor[e], 1)` (an atomic add
#   returns the value *before* the add, and no two threads can get the same value). Atomics make
#   the rows *unique*, but the order inside an expert's segment is whichever thread got there
#   first: not token order, and not the same from run to run. The project instead ranks in **two
#   passes over chunks** of consecutive assignments: (1) one thread per chunk counts its
#   assignments per expert; (2) a prefix sum down the chunks gives each chunk its first row per
#   expert; (3) one thread per chunk walks its chunk again handing out rows in order. No atomics,
#   and the result is the *stable* order: identical to the reference, every run.
#
# The left plot is measured in the simulator: one thread per element of a 24-token example's buffer,
# `_launch`'s rule (the counting kernels use it; the project's scatter did, before it moved to a warp
# per token), replayed by a kernel that records `blockIdx.x` and `threadIdx.x` per element. The colour
# is the thread's number inside its block; white lines separate the blocks. Element `i` (row by row)
# belongs to block `i // threads` and thread `i % threads`, so each block covers a band of whole rows.
#
# **Seeing the race.** numba's CUDA simulator is no help here: it starts the simulated threads one
# by one, and a short kernel thread usually finishes before the next one starts, so an atomic
# version comes out in thread order run after run (an earlier version of this notebook tried it:
# no difference in 3 of 3 runs). So the race is shown with real operating-system threads on this
# machine's CPU: 4 Python threads each take a contiguous quarter of the assignments (like the
# chunks above) and claim rows with a fetch-and-add guarded by a lock (what an atomic add does in
# hardware). Python runs one thread at a time, but *which* thread runs, and when it is switched
# out, is decided at run time by the interpreter and the operating system — that is all a race
# needs. The cell repeats the run until two runs hand out different rows and reports how many runs
# that took (or that no difference appeared).

# %%
import threading


def atomic_positions(expert_ids, starts, num_threads=4):
    """Rows by fetch-and-add on one counter per expert, from ``num_threads`` racing threads."""
    flat_ids = expert_ids.reshape(-1).tolist()
    starts_list = starts.tolist()
    cursor = [0] * len(starts_list)
    rows = [-1] * len(flat_ids)
    lock = threading.Lock()
    ready = threading.Barrier(num_threads)                 # all threads start together

    def claim(expert):                                     # fetch-and-add: returns the value before the add
        with lock:
            before = cursor[expert]
            cursor[expert] = before + 1
        return before

    def worker(part):
        ready.wait()
        first, end = part * len(flat_ids) // num_threads, (part + 1) * len(flat_ids) // num_threads
        for i in range(first, end):
            if flat_ids[i] >= 0:
                rows[i] = starts_list[flat_ids[i]] + claim(flat_ids[i])
            time.sleep(0)                                  # let the scheduler switch threads here

    threads = [threading.Thread(target=worker, args=(part,)) for part in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return torch.tensor(rows).reshape(expert_ids.shape)


MAX_RACE_RUNS = 50
atomic_runs = [atomic_positions(big_ids, big_starts)]
for _ in range(MAX_RACE_RUNS - 1):                  # usually stops after a few runs: no progress bar needed
    atomic_runs.append(atomic_positions(big_ids, big_starts))
    if not torch.equal(atomic_runs[-1], atomic_runs[0]):
        break
race_differs = not torch.equal(atomic_runs[-1], atomic_runs[0])
runs_to_differ = len(atomic_runs) if race_differs else None
print(f"racing runs: {len(atomic_runs)} of at most {MAX_RACE_RUNS} ("
      + ("stopped at the first that differed from run 1)" if race_differs else "none differed from run 1)"))

# %% [markdown]
# Drawn: on the left, which thread of the simulated launch (one thread per element) writes each element
# of the buffer; on the right, the rows of the first assignments, stable and racing (red: a row a racing
# run handed out differently from the stable order).

# %%
tm = sim["thread_map"]
block_of, thread_of = tm["block_of"].numpy(), tm["thread_of"].numpy()
fig, axes = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1, 1.4]})
ax = axes[0]
image = ax.imshow(thread_of, cmap="viridis", aspect="auto", interpolation="nearest")
fig.colorbar(image, ax=ax, label="threadIdx.x (thread number inside its block)", fraction=0.05)
num_map_rows, width_map = thread_of.shape
for b in range(big_launch[0]):                     # each block: its outline, its name, its first and last thread
    cells = np.argwhere(block_of == b)
    (r0, c0), (r1, c1) = cells[0], cells[-1]
    if b > 0:
        ax.axhline(r0 - 0.5, color="white", lw=2)
    ax.text((width_map - 1) / 2, (r0 + r1) / 2, f"block {b}: rows {r0}–{r1}", ha="center", va="center",
            fontsize=10, bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="none", alpha=0.85))
    for (r, c) in ((r0, c0), (r1, c1)):
        ax.text(c, r, str(thread_of[r, c]), ha="center", va="center", fontsize=8,
                color="white" if thread_of[r, c] < thread_of.max() / 2 else "black")
ax.set(title=f"one thread per element: {big_launch[0]} blocks × {big_launch[1]} threads\n"
             "(numbers: each block's first and last thread)", xlabel="column of the buffer", ylabel="buffer row")

ax = axes[1]
chunk = numba_cuda.ASSIGNMENTS_PER_CHUNK
n = 24                                             # the first 12 tokens' assignments fit the picture
flat_ids = big_ids.reshape(-1).numpy()[:n]
chunk_demo = min(chunk, 8)                         # a smaller chunk so several chunks fit the picture
for i, e in enumerate(flat_ids):
    c = i // chunk_demo
    ax.add_patch(plt.Rectangle((i, 0), 1, 1, fc=plt.cm.tab10(e), ec="white"))
    ax.text(i + 0.5, 0.5, str(e), ha="center", va="center", fontsize=7)
    ax.add_patch(plt.Rectangle((i, 1.15), 1, 0.5, fc=plt.cm.Pastel2(c % 8), ec="white"))
for c in range(math.ceil(n / chunk_demo)):
    ax.text(c * chunk_demo + min(chunk_demo, n - c * chunk_demo) / 2, 1.4, f"thread {c}", ha="center",
            va="center", fontsize=8)
stable = big_rows.reshape(-1).numpy()[:n]
labels = [("row (stable)", stable, None)] + [
    (f"row (atomic, run {i + 1})", run.reshape(-1).numpy()[:n], stable)
    for i, run in ((0, atomic_runs[0]), (len(atomic_runs) - 1, atomic_runs[-1]))]
for level, (label, values, compare) in enumerate(labels):
    y_text = -0.45 - 0.6 * level
    ax.text(-0.5, y_text, label, ha="right", va="center", fontsize=8)
    for i in range(n):
        ax.text(i + 0.5, y_text, str(values[i]), ha="center", va="center", fontsize=7,
                color="red" if compare is not None and values[i] != compare[i] else "black")
ax.text(-0.5, 0.5, "expert id", ha="right", va="center", fontsize=8)
ax.text(-0.5, 1.4, "pass 1+3: chunks", ha="right", va="center", fontsize=8)
ax.set_xlim(-7, n + 0.5)
ax.set_ylim(-0.45 - 0.6 * len(labels), 2.0)
ax.axis("off")
ax.set_title(f"positions of the first {n} assignments (chunks of {chunk_demo} here; the kernel uses {chunk})\n"
             "red: a row the racing threads handed out differently from the stable order")
plt.tight_layout()
plt.show()

# %% [markdown]
# What the racing runs did with the rows: the same set of places, in an order that may change.

# %%
same_set = all(torch.equal(torch.sort(run.reshape(-1)).values, torch.sort(big_rows.reshape(-1)).values)
               for run in atomic_runs)
in_order = sum(torch.equal(run, big_rows) for run in atomic_runs)
print(f"every racing run uses exactly the same set of rows as the stable ranking: {same_set}")
print(f"racing runs equal to the stable (token-ordered) rows: {in_order} of {len(atomic_runs)}")
if race_differs:
    print(f"two racing runs handed out different rows after {runs_to_differ} runs "
          f"(run 1 vs run {runs_to_differ}: {int((atomic_runs[0] != atomic_runs[-1]).sum())} of "
          f"{atomic_runs[0].numel()} rows differ)")
else:
    print(f"in {MAX_RACE_RUNS} runs the racing threads happened to produce the same rows every time: this run "
          "shows no difference (the scheduler kept the same order); rerun the cell to try again")
assert same_set

# %% [markdown]
# Why an order that changes matters: the rows end up in the same *set* of places, but the experts'
# outputs are later summed (in the combine, and in the backward pass's gradient sums), and
# floating-point addition is not associative: `(a + b) + c` can differ from `a + (b + c)` in the last
# bits. The same numbers added one at a time in two orders, in float32:

# %%
g_sum = torch.Generator().manual_seed(3)
values = torch.randn(4096, generator=g_sum) * torch.logspace(-3, 3, 4096)     # float32, magnitudes 0.001–1000


def running_sum(v):
    """Add one number at a time, left to right, in float32: the order is the only thing that varies."""
    total = torch.zeros((), dtype=torch.float32)
    for value in v:
        total = total + value
    return total


in_order_sum = running_sum(values)
order_runs, bits_differ = 0, False
for _ in range(20):
    order_runs += 1
    other = running_sum(values[torch.randperm(values.numel(), generator=g_sum)])
    if other.item() != in_order_sum.item():
        bits_differ = True
        break
print(f"sum in index order: {in_order_sum.item()!r}; in a shuffled order: {other.item()!r} → "
      + (f"different bits after {order_runs} shuffle(s)" if bits_differ
         else f"the same bits in all {order_runs} shuffles tried"))

# %% [markdown]
# ## 4. Reference vs numba: timing
#
# What is compared: the dispatch steps alone (count, positions, scatter, gather + combine; the
# experts are left out, see below) of the reference (`fastmoe_edu.dispatch`, PyTorch operations)
# and of the numba CPU kernels, for growing token counts `T`, `d_model = 64`, 16 experts, top-2,
# float32, one CPU thread each. Each point is the **median** of several timed calls after a warm-up
# call (numba compiles a kernel on its first call; that time is excluded), with the **spread**
# (fastest and slowest call) printed next to it. The machine may be shared with other work, so the
# spread says how much to trust a point. (The first cell set `OMP_WAIT_POLICY=PASSIVE`: without it,
# numba's idle OpenMP threads spin on the few cores of a small machine and the reference, timed
# right after numba, measured tens of times slower than it is.) The reference ranks with a `[T·k, E]` one-hot matrix and
# its running sum; the numba kernels rank in two passes over the ids and write each output once.
# Which is faster, and by how much, is what this machine measures below.

# %%
TOKEN_COUNTS = [256, 1024, 4096] if QUICK else [256, 1024, 4096, 16384, 65536]
REPEATS = 7 if QUICK else 15


def dispatch_only(backend, x, ids, weights, num_experts):
    counts = backend.count_tokens_per_expert(ids, num_experts)
    rows = backend.stable_positions(ids, backend.exclusive_prefix_sum(counts))
    buffer = backend.scatter_rows(x, rows, int(counts.sum()))
    return backend.gather_combine(buffer, rows, weights)


def timed(fn, repeats):
    """Median, fastest and slowest of ``repeats`` calls after one warm-up call (compiling happens there)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": float(np.median(times)), "min": min(times), "max": max(times)}


import numba

numba_threads = numba.get_num_threads()
numba.set_num_threads(1)                                   # one thread each: a like-for-like comparison
timings = {"reference": [], "numba": []}
g_time = torch.Generator().manual_seed(0)
for T_ in tqdm(TOKEN_COUNTS, desc="timing token counts"):
    xt = torch.randn(T_, 64, generator=g_time)
    logits = torch.randn(T_, 16, generator=g_time)
    w_t, ids_t = torch.softmax(logits, -1).topk(2, dim=-1)
    with torch.no_grad():
        out_ref = dispatch_only(dispatch, xt, ids_t, w_t, 16)
        out_nb = dispatch_only(nb, xt, ids_t, w_t, 16)
        assert torch.allclose(out_ref, out_nb, atol=1e-6)
        timings["reference"].append(timed(lambda: dispatch_only(dispatch, xt, ids_t, w_t, 16), REPEATS))
        timings["numba"].append(timed(lambda: dispatch_only(nb, xt, ids_t, w_t, 16), REPEATS))

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for name, values in timings.items():
    med = np.array([v["median"] for v in values]) * 1e3
    low = med - np.array([v["min"] for v in values]) * 1e3
    high = np.array([v["max"] for v in values]) * 1e3 - med
    axes[0].errorbar(TOKEN_COUNTS, med, yerr=[low, high], fmt="o-", capsize=3, label=name)
axes[0].set(xscale="log", yscale="log", xlabel="tokens T", ylabel="ms (median; bars: fastest–slowest)",
            title=f"dispatch + combine time ({REPEATS} calls per point)")
axes[0].legend(loc="lower right")                          # below the slower curve's points
speedup = np.array([r["median"] / n_["median"] for r, n_ in zip(timings["reference"], timings["numba"])])
axes[1].semilogx(TOKEN_COUNTS, speedup, "o-", color="tab:green")
axes[1].axhline(1, color="grey", ls=":")
axes[1].set(xlabel="tokens T", ylabel="reference median / numba median", title="numba speed-up (dispatch only)")
for ax in axes:
    ax.set_xticks(TOKEN_COUNTS, [str(t) for t in TOKEN_COUNTS], minor=False)
    ax.set_xticks([], minor=True)                          # no crowded minor labels between the sizes
plt.tight_layout()
plt.show()
for T_, r, n_, s in zip(TOKEN_COUNTS, timings["reference"], timings["numba"], speedup):
    print(f"T = {T_:>6}: reference {r['median'] * 1e3:7.2f} ms [{r['min'] * 1e3:.2f}–{r['max'] * 1e3:.2f}], "
          f"numba {n_['median'] * 1e3:7.2f} ms [{n_['min'] * 1e3:.2f}–{n_['max'] * 1e3:.2f}], speed-up {s:5.1f}×")
print(f"speed-up range over these sizes: {speedup.min():.1f}× to {speedup.max():.1f}× (medians; the spreads "
      "above show how much one call can vary on this machine)")

# %% [markdown]
# ### The whole layer: Amdahl's law
#
# A training step of an MoE layer is more than dispatch: the router, the experts' matrix products
# (the grouped GEMM and the SwiGLU activation) and the backward pass of all of it. The numba backend
# speeds up the dispatch and routing kernels. The experts' matrix products are torch GEMMs in both
# backends, but run differently (the reference: each product for all experts, then the activation;
# the numba backend: one expert at a time, its products and a fused SwiGLU pass while its rows are in
# cache, `SwiGLUExperts` in `backends/numba_backend.py`), so the cell times the experts of each
# backend separately. If a fraction $f$ of the reference's step can be sped up by a factor $s$, the
# step gets faster by
#
# $$\text{speed-up} = \frac{1}{(1 - f) + f / s} \;<\; \frac{1}{1 - f}.$$
#
# The cell measures it on this machine, same conventions as above (median of several calls after a
# warm-up, one thread, the four measurements taking turns): one forward + backward of a whole
# `MoELayer` with each backend, and its experts alone doing exactly the work they do inside it: the
# rows, counts and grouped-GEMM function the layer hands them (caught once with a forward pre-hook),
# forward + backward. As in the layer, those rows are copies of input tokens that need no gradient,
# so the experts' backward computes weight gradients only (timing it with an input gradient too
# would charge the experts tens of milliseconds the layer never spends). The time outside the
# experts is what dispatch and routing can win back; `reference step / its experts alone` is the
# most a faster dispatch alone could give here. The size is small (the notebook must run in seconds);
# `bench/bench_layer.py` measures larger layers, and on a GPU the balance differs again (the GEMMs
# run on tensor cores, so dispatch is a larger share). The numbers are printed, not assumed.

# %%
LAYER_T, LAYER_D, LAYER_H, LAYER_E = (4096, 64, 128, 16) if QUICK else (16384, 128, 256, 32)
g_layer = torch.Generator().manual_seed(1)
layer_x = torch.randn(LAYER_T, LAYER_D, generator=g_layer)
layer_calls = {}
for name in ("reference", "numba"):
    torch.manual_seed(0)
    moe = MoELayer(LAYER_D, LAYER_H, LAYER_E, top_k=2, backend=name)
    seen = {}                                             # what the layer passes its experts: rows, counts, GEMM
    hook = moe.experts.register_forward_pre_hook(lambda module, args: seen.update(args=args))
    moe(layer_x)
    hook.remove()
    expert_rows, expert_counts, gemm = seen["args"]
    assert not expert_rows.requires_grad                  # copies of layer_x: no input gradient, as in the layer

    def train_step(moe=moe):
        moe.zero_grad(set_to_none=True)
        moe(layer_x).sum().backward()

    def experts_step(moe=moe, rows=expert_rows.detach(), counts=expert_counts, gemm=gemm):
        moe.zero_grad(set_to_none=True)
        moe.experts(rows, counts, gemm).sum().backward()

    layer_calls[name], layer_calls[name + " experts"] = train_step, experts_step

# The four measurements take turns (round robin), so a slow phase of a shared machine hits all of
# them alike instead of one of them.
layer_samples = {name: [] for name in layer_calls}
for fn in layer_calls.values():
    fn()                                                   # warm-up (numba compiles here)
for _ in tqdm(range(REPEATS), desc="whole-layer timing (rounds)"):
    for name, fn in layer_calls.items():
        start = time.perf_counter()
        fn()
        layer_samples[name].append(time.perf_counter() - start)
layer_times = {name: {"median": float(np.median(v)), "min": min(v), "max": max(v),
                      "q25": float(np.percentile(v, 25)), "q75": float(np.percentile(v, 75))}
               for name, v in layer_samples.items()}
numba.set_num_threads(numba_threads)

# %% [markdown]
# The breakdown: each backend's step, its experts alone, and the rest; then what Amdahl's law says.

# %%
parts = {}


def spread(name):
    return f"[{layer_times[name]['min'] * 1e3:.1f}–{layer_times[name]['max'] * 1e3:.1f}]"


print(f"{'ms, median':<11}{'step':>9} {'(fastest–slowest)':<20}{'experts alone':>14} {'(fastest–slowest)':<20}"
      f"{'the rest':>9}")
for name in ("reference", "numba"):
    step, experts = layer_times[name]["median"], layer_times[name + " experts"]["median"]
    parts[name] = {"step": step, "experts": experts, "rest": step - experts}
    print(f"{name:<11}{step * 1e3:>9.1f} {spread(name):<20}{experts * 1e3:>14.1f} {spread(name + ' experts'):<20}"
          f"{(step - experts) * 1e3:>9.1f}")
print("(the rest = step − experts alone: routing, dispatch and their backward)")
ref_step, nb_step = parts["reference"]["step"], parts["numba"]["step"]
layer_speedup = ref_step / nb_step
experts_speedup = parts["reference"]["experts"] / parts["numba"]["experts"]
f_rest = parts["reference"]["rest"] / ref_step                  # the part a faster dispatch can speed up
amdahl_bound = ref_step / parts["reference"]["experts"]        # = 1 / (1 − f_rest)
spread_ms = max(layer_times[n]["max"] - layer_times[n]["min"] for n in layer_times)
separable = min(p_["rest"] for p_ in parts.values()) > 0
ref_x, nb_x = layer_times["reference experts"], layer_times["numba experts"]
# The two backends' experts differ only if the middle halves of their timings do not overlap.
experts_differ = ref_x["q25"] > nb_x["q75"] or nb_x["q25"] > ref_x["q75"]
print(f"T = {LAYER_T}, d_model = {LAYER_D}, d_hidden = {LAYER_H}, E = {LAYER_E}, top-2, forward + backward:")
print(f"  the experts are {parts['reference']['experts'] / ref_step:.0%} of the reference step, the rest "
      f"f = {f_rest:.0%}")
print(f"  whole-layer speed-up, numba vs reference: {layer_speedup:.2f}× (medians)")
print(f"  Amdahl bound if only the rest gets faster (experts unchanged): 1 / (1 − f) = reference step / its "
      f"experts = {amdahl_bound:.2f}×")
if not separable:
    print(f"  too noisy to judge: a 'rest' came out at zero or less, i.e. the step and its experts were timed\n"
          f"  in different conditions (largest spread {spread_ms * 1e3:.1f} ms); rerun the cell on a quieter machine")
elif experts_differ:
    nb_bound = ref_step / parts["numba"]["experts"]
    print(textwrap.fill(
        f"but the experts are not unchanged here: the numba backend's experts ran {experts_speedup:.2f}× "
        "as fast as the reference's (it runs one expert at a time, its products and a fused SwiGLU pass, "
        "where the reference runs each product for all experts, then torch's activation); with numba's own "
        "experts the bound is "
        f"reference step / numba's experts = {nb_bound:.2f}×, and the measured {layer_speedup:.2f}× is "
        + ("below it" if layer_speedup <= nb_bound else "above it: too noisy to judge"),
        width=110, initial_indent="  ", subsequent_indent="    "))
else:
    rest_speedup = parts["reference"]["rest"] / parts["numba"]["rest"]
    predicted = 1 / ((1 - f_rest) + f_rest / rest_speedup)
    print(f"  the experts' timings overlap (middle halves {ref_x['q25'] * 1e3:.1f}–{ref_x['q75'] * 1e3:.1f} ms and "
          f"{nb_x['q25'] * 1e3:.1f}–{nb_x['q75'] * 1e3:.1f} ms): within the noise they cost the same in both "
          f"backends (medians {experts_speedup:.2f}×)")
    print(f"  the rest got "
          f"{rest_speedup:.2f}× faster, so Amdahl's law predicts 1 / ((1 − f) + f / s) = {predicted:.2f}× "
          f"for the layer; measured {layer_speedup:.2f}×"
          + ("" if layer_speedup <= amdahl_bound * 1.05 else
             f" — above the bound {amdahl_bound:.2f}×, so these timings are too noisy to judge"))
print(f"notebook so far: {time.perf_counter() - NOTEBOOK_START:.1f} s")
