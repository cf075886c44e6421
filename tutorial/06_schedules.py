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
# # 06 · Schedules: overlapping the exchange, hiding the gradients, shadowing hot experts
#
# Notebook 03 priced one MoE layer as "compute, then communicate". Real systems overlap the two.
# This notebook draws *when* each piece of work runs, as a timeline, for the schedules of two MoE
# training systems that this project re-implements:
#
# 1. **the tasks** of one MoE layer on its busiest rank, each costing `α + β·n` (a fixed cost plus
#    a cost per byte or per row), computed with the project's cost model
#    (`fastmoe_edu/distributed/cost_model.py`);
# 2. **the pipelined exchange** (FasterMoE's *smart schedule*, FSMoE's *pipeline degree*): the rows cut
#    into `D` chunks so that chunk `c+1` travels while chunk `c` is computed, each chunk's hierarchical
#    exchange split into its intra-node and inter-node phase. A small simulation, written out below,
#    places every task on its lane; the forward and backward passes get their own degrees `D_f`, `D_b`;
# 3. **gradient pieces**: the all-reduce of the replicated gradients cut into pieces that fill the idle
#    time of the inter-node link during the backward, instead of waiting until it ends;
# 4. **an explorer** with sliders for the degrees, the node size, the tokens, the model width and the
#    network, next to the cost model's predicted time against the degree for each pass, with the
#    degrees that `cost_model.choose_pipeline_degrees` (what `pipeline_degree="auto"` uses) picks;
# 5. **shadowing** (FasterMoE): under a skewed load one expert's rank becomes the bottleneck; the
#    project's `shadowing.choose_shadowed` decides which experts to copy to every rank instead, and the
#    bars show what that does to each rank's bytes and compute and to the predicted time;
# 6. **measured**: a real pipelined layer on 2 MPI ranks of this machine, profiled, beside the schedule
#    predicted from its own task times, and why the two differ here.
#
# Sections 1-5 are the cost model's prediction for an assumed GPU cluster, not a measurement (the
# measurements on this machine are in `docs/benchmarks.md`); section 6 measures. `QUICK`
# (`FASTMOE_EDU_QUICK=1`, set by the tests) changes nothing here: the model is fast, and section 6's
# run takes a few seconds either way.
#
# The cells hold what the notebook teaches (the simulation, the plans, the scenarios); bookkeeping and
# plotting code lives next to it in [`_nbhelpers/schedules.py`](_nbhelpers/schedules.py).
# `show_source(f)` displays any function with syntax highlighting, e.g. `show_source(draw_timeline)`.
#
# **Glossary** (each term is explained again where it is first used):
#
# * **rank**: one process of a parallel job (on a cluster: one GPU); `P` ranks in all. **node**: one
#   machine holding `G` of them (**ranks per node**); `N = P / G` nodes.
# * **expert parallelism**: each rank holds `E / P` of the experts and receives the rows routed to them.
# * **all-to-all**: every rank sends a piece of its data to every other rank. In an MoE layer the
#   **scatter** sends each row to its expert's rank, the **gather** brings the results back; the backward
#   pass repeats both with gradients (**grad-gather**: output gradients to the experts,
#   **grad-scatter**: input gradients home).
# * **intra-node link** (NVLink) / **inter-node link** (the network, e.g. InfiniBand): the fast links
#   between the GPUs of a node and the slower ones between nodes.
# * **hierarchical all-to-all** (Tutel's **2DH**): phase 1 exchanges inside each node, phase 2 sends one
#   message per pair of nodes.
# * **α** (latency): the fixed cost of a task; **β**: its cost per byte (1 / bandwidth) or per row.
# * **chunk**: a slice of every expert's rows; **pipeline degree** `D`: the number of chunks. **D_f**,
#   **D_b**: the degrees of the forward and the backward pass, chosen separately (**FSMoE**, Pan et al. 2025).
# * **FasterMoE** (He et al. 2022): an MoE system with a pipelined exchange and expert shadowing.
# * **lane**: one resource that does one thing at a time (a link, the GPU's compute); **timeline**
#   (Gantt chart): every task drawn as a bar on its lane from its start to its end.
# * **list scheduling**: placing tasks one by one, in a fixed order, each as early as its inputs and its
#   lane allow. **makespan**: the time from the first start to the last end.
# * **replicated parameters**: weights every rank holds a copy of (attention, router, norms), whose
#   gradients must be summed over the ranks each step: the **gradient all-reduce** (here a **ring**
#   all-reduce, `2·(n−1)·α + 2·(n−1)/n·bytes·β`).
# * **gradient partitioning**: that all-reduce cut into pieces, each run where the link is idle.
#   **exposed** time: communication that nothing overlaps, which adds to the step.
# * **skew**: how unevenly the tokens choose experts; **Zipf-like load**: the `i`-th most popular expert
#   gets a share proportional to `1 / i^s`.
# * **shadowing**: for one step, broadcasting a popular expert's weights to every rank, which then
#   computes its own rows for it locally; the weight gradients are summed back to the owner. A **greedy**
#   policy decides: it takes the best-looking step (the next most loaded expert) while that helps, and stops.
# * **window** `W`: a stretch of time in which a link is idle and could carry other messages.
# * **FLOP**: one floating-point operation (**TFLOP/s**: 10¹² per second); **bf16**: 2-byte numbers;
#   **SwiGLU**: the experts' feed-forward network, 3 weight matrices of `d_model × d_hidden`.

# %%
import inspect
import os
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Code, display

from fastmoe_edu.distributed import cost_model
from fastmoe_edu.distributed.autotune import MAX_DEGREE
from fastmoe_edu.distributed.shadowing import choose_shadowed
# Bookkeeping and plotting helpers, kept out of the cells (tutorial/_nbhelpers/schedules.py, next to this notebook):
from _nbhelpers import schedules
from _nbhelpers.schedules import (LANES, Bar, Layer, draw_schedule, draw_shadowing, draw_timeline, makespan,
                                  modelled_rates, rows_per_rank, zipf_counts)

QUICK = os.environ.get("FASTMOE_EDU_QUICK", "0") == "1"
NOTEBOOK_START = time.perf_counter()


def show_source(function):
    """Show a function's source with syntax highlighting, e.g. show_source(draw_timeline)."""
    display(Code(inspect.getsource(function), language="python"))


print(f"QUICK={QUICK}; pipeline_degree='auto' searches powers of 2 up to {MAX_DEGREE} (autotune.MAX_DEGREE)")

# %% [markdown]
# ## 1. One MoE layer's tasks, each `α + β·n`
#
# The setting (change it here, or with the explorer's sliders in section 4): 32 GPUs, 8 per node,
# links and compute rate as in `docs/benchmarks.md`'s extrapolation but with a slower network
# (12.5 GB/s per GPU, a 100 Gb/s card); one MoE layer with 2 SwiGLU experts per GPU, top-2 routing,
# 2048 tokens per GPU, `d_model = 2048`, `d_hidden = 2.75 · d_model`, bf16, the busiest rank
# receiving 1.2× the mean rows (the cost model's `load_imbalance`), and 20 µs of fixed cost per expert
# call (kernel launches; an assumption).
#
# What one MoE layer does on a rank, and how the project's cost model prices it
# (`cost_model.alltoall_time`, the docstring of `cost_model.py`):
#
# * **the exchange**, hierarchical: phase 1 inside the node, `α_intra·(G−1) + β_intra·B·(G−1)/G`, then
#   phase 2 between the nodes, `α_inter·(N−1) + β_inter·B·(N−1)/N`, for a buffer of `B` bytes. To get the
#   two phases apart we call the same function twice on a machine whose *other* link costs nothing;
# * **the experts**: `2 · 3 · d_model · d_hidden` FLOPs per row (three matrices, a multiply and an add
#   each), `α_c` per call (kernel launches), the backward twice the forward's FLOPs (input and weight
#   gradients).
#
# Cut into `D` chunks, each task keeps its `α` and gets `1/D` of its `β·n`. That is FSMoE's model, and
# `cost_model.LayerTasks` holds it, with the exchange as one task (the way `autotune.py` measures it).

# %%
CLUSTER = dict(ranks=32, ranks_per_node=8, alpha_intra_us=5.0, intra_GBps=150.0, alpha_inter_us=15.0,
               inter_GBps=12.5, TFLOPS=120.0, expert_call_us=20.0)
MODEL = dict(tokens=2048, d_model=2048, hidden_per_d_model=2.75, experts_per_rank=2, top_k=2,
             load_imbalance=1.2, bytes_per_element=2)


def machine(ranks_per_node=CLUSTER["ranks_per_node"], alpha_inter_us=CLUSTER["alpha_inter_us"],
            inter_GBps=CLUSTER["inter_GBps"]) -> cost_model.Hardware:
    c = CLUSTER
    return cost_model.Hardware(alpha_intra=c["alpha_intra_us"] * 1e-6, beta_intra=1 / (c["intra_GBps"] * 1e9),
                               alpha_inter=alpha_inter_us * 1e-6, beta_inter=1 / (inter_GBps * 1e9),
                               flops_per_second=c["TFLOPS"] * 1e12, ranks_per_node=ranks_per_node)


def moe_shape(tokens=MODEL["tokens"], d_model=MODEL["d_model"], ranks=CLUSTER["ranks"]) -> cost_model.MoEShape:
    m = MODEL
    return cost_model.MoEShape(tokens_per_rank=tokens, d_model=d_model, d_hidden=int(m["hidden_per_d_model"] * d_model),
                               num_experts=m["experts_per_rank"] * ranks, top_k=m["top_k"], n_layer=1,
                               bytes_per_element=m["bytes_per_element"], load_imbalance=m["load_imbalance"])


def build_layer(shape: cost_model.MoEShape, hw: cost_model.Hardware, ranks: int = CLUSTER["ranks"],
                expert_call_us: float = CLUSTER["expert_call_us"]) -> Layer:
    """The layer's tasks as (α, β·n) pairs, from the cost model (show_source(schedules.build_layer) shows how:
    each exchange phase priced by alltoall_time on a machine whose other link is free, the experts by their
    FLOPs, and the list of one block's replicated gradients for section 3)."""
    return schedules.build_layer(shape, hw, ranks, expert_call_us)


layer = build_layer(moe_shape(), machine())
whole = cost_model.alltoall_time(MODEL["top_k"] * MODEL["tokens"] * MODEL["load_imbalance"] * MODEL["d_model"]
                                 * MODEL["bytes_per_element"], CLUSTER["ranks"], 1, layer.hw, hierarchical=True)
print(f"{'task':<34}{'α (µs)':>10}{'β·n, whole (ms)':>18}{'one of 8 chunks (ms)':>22}")
for name, task, factor in (("exchange, phase 1 (intra-node)", "intra", 1),
                           ("exchange, phase 2 (inter-node)", "inter", 1),
                           ("experts, forward", "experts", 1), ("experts, backward", "experts", 2)):
    alpha, size_part = getattr(layer, task)
    print(f"{name:<34}{alpha * 1e6:>10.1f}{factor * size_part * 1e3:>18.3f}{layer.chunk(task, 8, factor) * 1e3:>22.3f}")
print(f"phase 1 + phase 2 = {(sum(layer.intra) + sum(layer.inter)) * 1e3:.3f} ms; "
      f"cost_model.alltoall_time(hierarchical) of the whole buffer = {whole * 1e3:.3f} ms")

# %% [markdown]
# ## 2. The pipelined schedule as a timeline
#
# `fastmoe_edu/distributed/pipeline.py` runs the forward pass like this (the backward mirrors it, with
# grad-gather for scatter, grad-scatter for gather and its own degree `D_b`):
#
# ```
# post scatter(0), scatter(1); advance scatter(0)
# for c in 0 .. D−1:
#     post scatter(c+2); advance scatter(c+1)  ← chunks c+1 and c+2 travel ...
#     wait scatter(c); experts(c)              ← ... while chunk c is computed
#     post gather(c); advance gather(c−1)      ← and chunk c's results travel home during the next compute
# ```
#
# A hierarchical exchange has two phases: *posting* starts its intra-node phase, *advance* waits for that
# and starts its inter-node phase (hierarchical.py). So while the experts compute chunk c, chunk c+1 is on
# the inter-node link and chunk c+2 on the intra-node link: FSMoE's co-scheduling of the two levels with
# the compute.
#
# ✍️ Exercise: write a two-chunk pipelined exchange with the non-blocking `ialltoallv` in [ex10_pipeline.py](exercises/ex10_pipeline.py); `python -m tutorial.exercises.check 10` runs it on 2 ranks and checks that the chunks overlap.
#
# The simulation below turns that into a timeline. Three lanes each do one thing at a time, in the order
# the program posts to them: the **intra-node link**, the **inter-node link** and the **expert compute**
# (a fourth lane, for the gradient pieces, comes in section 3). The rules, one per line of
# `place_pass`:
#
# * a phase is posted in the loop's order: intra-node phases when a chunk is posted, inter-node phases
#   when it is advanced; an inter-node phase starts after its own intra-node phase;
# * a chunk's experts start when its scatter has arrived; its gather starts when its experts are done;
# * a lane runs its tasks one after another, in posting order.
#
# This simulation (with its companion `fill_idle_time` in section 3) is the only model in the notebook
# that is not the project's. `cost_model.overlapped_pass` reduces the same schedule to a closed form,
# `s1 + s2 + s3 + (D−1)·max(s1 + s3, s2)` — the first chunk fills the pipeline, then the slower of "two
# exchanges" and "compute" sets the pace — with the two phases as one task. The timeline keeps the
# phases apart, so one chunk's inter-node phase can overlap the next chunk's intra-node phase; the
# printout compares the two (the explorer in section 4 draws both against the degree: the timeline is
# never slower than the closed form, and equal to it at `D = 1`).

# %%
# LANES, Bar(lane, label, chunk, start, end) and makespan(bars) come from _nbhelpers/schedules.py.
def place_pass(layer: Layer, degree: int, backward: bool = False) -> list[Bar]:
    """List-schedule one pass of the layer in ``degree`` chunks; every task as early as its inputs and lane allow."""
    factor = 2.0 if backward else 1.0                       # the backward computes twice the forward's FLOPs
    there, home = ("grad-gather", "grad-scatter") if backward else ("scatter", "gather")
    # The order pipeline.py posts the tasks in: (task, chunk, phase), phase 1 = intra-node, 2 = inter-node.
    posted = [(there, c, 1) for c in range(min(2, degree))] + [(there, 0, 2)]
    for c in range(degree):
        if c + 2 < degree:
            posted.append((there, c + 2, 1))                # post chunk c+2
        if c + 1 < degree:
            posted.append((there, c + 1, 2))                # advance chunk c+1
        posted += [("experts", c, 0), (home, c, 1)]         # compute chunk c, post its results home
        if c > 0:
            posted.append((home, c - 1, 2))                 # advance the previous results
    posted.append((home, degree - 1, 2))                    # the last one, at the final wait
    lane_free = {lane: 0.0 for lane in LANES}               # when each lane has finished its last task
    finished, bars = {}, []

    def run(lane, label, chunk, seconds, inputs_ready):
        start = max(lane_free[lane], inputs_ready)
        lane_free[lane] = start + seconds
        bars.append(Bar(lane, label, chunk, start, start + seconds))
        return start + seconds

    for label, c, phase in posted:
        if label == "experts":                              # compute after the chunk's rows have arrived
            finished[label, c, 0] = run("expert compute", label, c, layer.chunk("experts", degree, factor),
                                        finished[there, c, 2])
        elif phase == 1:                                    # intra-node: the data must exist
            ready = finished["experts", c, 0] if label == home else 0.0
            finished[label, c, 1] = run("intra-node link", label, c, layer.chunk("intra", degree), ready)
        else:                                               # inter-node: after its own intra-node phase
            finished[label, c, 2] = run("inter-node link", label, c, layer.chunk("inter", degree),
                                        finished[label, c, 1])
    return bars


D_f, D_b = cost_model.choose_pipeline_degrees(layer.tasks(), MAX_DEGREE)
predicted = cost_model.predict_layer(layer.tasks(), D_f, D_b)
forward_bars, backward_bars = place_pass(layer, D_f), place_pass(layer, D_b, backward=True)
print(f"cost_model.choose_pipeline_degrees → D_f = {D_f}, D_b = {D_b}")
for name, bars, degree in (("forward", forward_bars, D_f), ("backward", backward_bars, D_b)):
    unpipelined = makespan(place_pass(layer, 1, backward=name == "backward"))
    print(f"{name:>8} at D = {degree:2d}: timeline {makespan(bars) * 1e3:6.3f} ms, cost model's closed form "
          f"{predicted[name] * 1e3:6.3f} ms, unpipelined (D = 1) {unpipelined * 1e3:6.3f} ms")

# %%
# draw_timeline (tutorial/_nbhelpers/schedules.py; show_source(draw_timeline) to read it) draws a row per lane
# and a bar per task: colour = chunk, hatched = the way home.
fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
t_max = max(makespan(backward_bars), makespan(forward_bars))
draw_timeline(axes[0], forward_bars, D_f, f"forward, D_f = {D_f}: {makespan(forward_bars) * 1e3:.2f} ms "
              "(plain: scatter, hatched: gather; colour: chunk)", t_max, xlabel=False)
draw_timeline(axes[1], backward_bars, D_b, f"backward, D_b = {D_b}: {makespan(backward_bars) * 1e3:.2f} ms "
              "(plain: grad-gather, hatched: grad-scatter)", t_max)
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the timeline lane by lane. In the forward the compute lane is busy almost from the first
# chunk's arrival to the end: the exchange hides behind it, except the first chunk's scatter (the
# pipeline filling) and the last chunk's gather (draining) — the two ends that a larger `D` shortens.
# But every chunk pays its `α` on both links again, so a larger `D` also adds latency; the best `D` is
# where those two balance. The backward computes twice as much per chunk, so it can afford more chunks
# before their `α` dominates: **the best `D_b` is not the best `D_f`** (FSMoE's observation), which is
# why `pipeline.py` lets them differ and `choose_pipeline_degrees` picks each on its own. Section 4's
# explorer shows both curves. Note the **inter-node link's idle time** in the backward: the next
# section puts it to use.

# %% [markdown]
# ## 3. Gradient pieces: the replicated gradients' all-reduce during the backward
#
# Every rank holds the replicated parameters (attention, router, norms), so their gradients are summed
# over all `P` ranks each step by an all-reduce — here one block's, `4·d² + d·E + 4·d` values (the
# count `cost_model.predict_step` uses), priced by `cost_model.allreduce_time`. A plain schedule runs it
# after the whole backward: it is **exposed** in full. Yet the gradients of the blocks the backward has
# already passed are ready long before it ends, and the inter-node link (the all-reduce's bottleneck
# across nodes) sits idle while the experts compute.
#
# FSMoE's **gradient partitioning**, as the project implements it
# (`fastmoe_edu/distributed/gradient_partitioning.py`), cuts those gradients into pieces and posts each
# piece, non-blocking, as soon as its gradients are ready. How large a piece? One piece costs
# `t(B) = a + b·B` (`cost_model.allreduce_piece_cost`: `a = 2·(P−1)·α`, the ring's latency, paid again by
# every piece). During an MoE layer's expert backward the link is idle for a window `W`; the project's
# `cost_model.gradient_piece_bytes` takes the largest piece that window hides, `B_fit = (W − a)/b`, but never
# one so small that `a` is more than half of its time (`B_min = a/b`, the size at which a message reaches
# half the link's bandwidth, Hockney's `n½`); `cost_model.plan_gradient_pieces` then cuts the
# gradients, in the order they become ready, into consecutive pieces of at most that size.
#
# On the timeline, the gradients of the block above this layer are ready when this layer's backward
# starts. `fill_idle_time` below (part of this notebook's simulation, like `place_pass`) runs the pieces
# one after another on the inter-node link, using only the time the exchange leaves idle: a piece that
# meets an exchange pauses and goes on in the next gap, so one piece can show as several bars. That
# gives the exchange priority; on a real network the two share the link and slow each other a little.
# What is still running when the backward ends is exposed.

# %%
def idle_gaps(bars: list[Bar], lane: str, end: float) -> list[tuple[float, float]]:
    """The idle intervals of ``lane`` from time 0 to ``end`` (the last one open-ended if end is inf)."""
    gaps, free_from = [], 0.0
    for bar in sorted((b for b in bars if b.lane == lane and b.end > b.start), key=lambda b: b.start):
        if bar.start > free_from:
            gaps.append((free_from, bar.start))
        free_from = max(free_from, bar.end)
    gaps.append((free_from, end))
    return gaps


def fill_idle_time(gaps, durations: list[float]) -> list[tuple[int, float, float]]:
    """Run tasks of these ``durations`` one after another, each using only the idle ``gaps`` of a lane
    (a task interrupted by a busy stretch continues in the next gap). Returns (task, start, end) segments."""
    segments, gaps = [], list(gaps)
    for task, left in enumerate(durations):
        while left > 1e-15:
            start, end = gaps[0]
            used = min(left, end - start)
            segments.append((task, start, start + used))
            left -= used
            gaps[0] = (start + used, end)
            if start + used >= end:
                gaps.pop(0)
    return segments


# %% [markdown]
# The plan (the project's functions: piece cost, window, piece size, the cut) and the backward with its
# gradient lane:

# %%
def gradient_plan(layer: Layer) -> dict:
    """The project's plan for one block's replicated gradients: piece cost, window, piece size, pieces."""
    a, b = cost_model.allreduce_piece_cost(layer.ranks, layer.ranks, layer.hw)   # a ring over all P ranks
    window = 2 * layer.experts[1]                   # the expert backward: two GEMMs the size of the forward's
    smallest, piece_bytes = cost_model.gradient_piece_bytes(a, b, window)          # B_min, B*
    sizes = [size for _, size in layer.grad_sizes]
    counts = cost_model.plan_gradient_pieces(sizes, piece_bytes, smallest)
    starts = np.cumsum([0] + counts)
    pieces = [sum(sizes[starts[i]:starts[i + 1]]) for i in range(len(counts))]
    return {"a": a, "b": b, "window": window, "smallest_bytes": smallest, "piece_bytes": piece_bytes,
            "pieces": pieces, "total": sum(sizes)}


def backward_with_gradients(layer: Layer, degree: int, partition: bool) -> tuple[list[Bar], dict]:
    """The backward's bars plus the gradient all-reduce: in pieces in the link's idle time, or after the pass."""
    bars = place_pass(layer, degree, backward=True)
    end = makespan(bars)
    plan = gradient_plan(layer)

    def allreduce(nbytes):
        return cost_model.allreduce_time(nbytes, layer.ranks, layer.ranks, layer.hw)

    # The ring's slowest hop: the network when the ranks span nodes, else NVLink (all ranks on one node).
    link = "inter-node link" if layer.ranks > layer.hw.ranks_per_node else "intra-node link"
    if partition:
        segments = fill_idle_time(idle_gaps(bars, link, float("inf")), [allreduce(n) for n in plan["pieces"]])
    else:
        segments = [(0, end, end + allreduce(plan["total"]))]
    for piece, start, stop in segments:
        if start < end:                                 # hidden behind the backward
            bars.append(Bar("gradient all-reduce", "gradient piece", piece, start, min(stop, end)))
        if stop > end:                                  # what runs after it: exposed
            bars.append(Bar("gradient all-reduce", "exposed all-reduce", piece, max(start, end), stop))
    finished = max(stop for _, _, stop in segments)
    return bars, {"backward": end, "exposed": max(0.0, finished - end),
                  "pieces": len(plan["pieces"]) if partition else 1, "whole_allreduce": allreduce(plan["total"]),
                  "plan": plan}


def piece_times(bars: list[Bar]) -> dict[int, dict]:
    """Per gradient piece, from the timeline: seconds hidden behind the backward and seconds after it."""
    out = {}
    for bar in bars:
        if bar.lane == "gradient all-reduce":
            times = out.setdefault(bar.chunk, {"hidden": 0.0, "exposed": 0.0})
            times["hidden" if bar.label == "gradient piece" else "exposed"] += bar.end - bar.start
    return out


# %%
plan = gradient_plan(layer)
share = cost_model.PIECE_LATENCY_SHARE
in_one_go = cost_model.allreduce_time(plan["total"], layer.ranks, layer.ranks, layer.hw)
print(f"one block's replicated gradients: {plan['total'] / 1e6:.1f} MB in {len(layer.grad_sizes)} tensors; "
      f"all-reduced over {layer.ranks} ranks in one go: {in_one_go * 1e3:.2f} ms")
print(f"a piece costs a + b·B with a = {plan['a'] * 1e3:.3f} ms, 1/b = {1e-9 / plan['b']:.2f} GB/s;\nwindow W = "
      f"{plan['window'] * 1e3:.3f} ms → B_fit = {(plan['window'] - plan['a']) / plan['b'] / 1e6:.1f} MB, "
      f"B_min = {plan['a'] * (1 - share) / (share * plan['b']) / 1e6:.1f} MB (a ≤ {share:.0%} of a piece's time) "
      f"→ piece size B* = {plan['piece_bytes'] / 1e6:.1f} MB")
print("pieces (MB):", ", ".join(f"{n / 1e6:.1f}" for n in plan["pieces"]))

fig, axes = plt.subplots(2, 1, figsize=(12, 5), sharex=True)
grad_runs = {}
for partition in (False, True):
    grad_runs[partition] = backward_with_gradients(layer, D_b, partition)
t_max = max(info["backward"] + info["exposed"] for _, info in grad_runs.values())
for ax, partition in zip(axes, (False, True)):
    bars, info = grad_runs[partition]
    draw_timeline(ax, bars, D_b, ("with gradient pieces" if partition else "without partitioning")
                  + f": backward {info['backward'] * 1e3:.2f} ms + exposed all-reduce {info['exposed'] * 1e3:.2f} ms",
                  t_max, xlabel=partition)
plt.tight_layout()
plt.show()
off, on = grad_runs[False][1], grad_runs[True][1]
print(f"without partitioning: the all-reduce runs after the backward, exposed {off['exposed'] * 1e3:.2f} ms")
print(f"with gradient pieces: exposed {on['exposed'] * 1e3:.2f} ms ({1 - on['exposed'] / off['exposed']:.0%} less); "
      f"the backward itself is unchanged: {on['backward'] * 1e3:.2f} ms")
pieces_now = piece_times(grad_runs[True][0])
for piece, times in sorted(pieces_now.items()):
    whole_time = times["hidden"] + times["exposed"]
    where = ("entirely hidden behind the backward" if times["exposed"] == 0 else "entirely after the backward"
             if times["hidden"] == 0 else f"{times['hidden'] / whole_time:.0%} hidden, the other "
             f"{times['exposed'] * 1e3:.2f} ms after the backward")
    print(f"  piece {piece + 1} ({plan['pieces'][piece] / 1e6:.1f} MB, {whole_time * 1e3:.2f} ms on the link): {where}")

# %% [markdown]
# Purple is hidden behind the backward, red (cross-hatched) is exposed; the shade alternates from one
# piece to the next in both colours, and each piece is named on its longest bar. The piece size is a
# trade: every piece pays the ring's latency `a` again, so many small pieces waste the link on
# latency, while in a whole model one huge piece would wait for its last gradient and leave the
# earlier layers' idle time unused. Here the expert backward is long enough for its window to hide a
# piece well above `B_min`, so the window sets the size (`B* = B_fit`) and one block's gradients
# travel as two pieces. The printout says what the timeline made of them: the window `W` is the whole
# expert backward, but the exchange's chunks hold the link for part of it, so the first piece does
# not fit into the gaps that are left; about half of it runs after the backward, and the second
# piece, which starts only when the first is done, runs entirely after it. Still, the exposed time
# is smaller than without pieces.
#
# Try the explorer below: with a higher `α_inter` `B_min` grows and the pieces get fewer and larger;
# with more tokens the backward is longer, the link idles longer and less of the all-reduce is
# exposed. With few tokens the opposite happens, and pieces can cost more than they save (section 4
# works out a case). (With all ranks on one node the ring runs over NVLink, and the pieces fill the
# intra-node link's gaps instead.)


# %% [markdown]
# ## 4. The explorer: degrees, node size, tokens, width, network
#
# Move the sliders; the figure is recomputed from the cost model each time.
#
# * left: the forward (at `D_f`) and the backward (at `D_b`, with the gradient lane) as timelines, and
#   the step time of this layer: forward + backward + exposed gradient all-reduce;
# * right: the time of each pass against its degree: the cost model's closed form
#   (`cost_model.predict_layer`, solid) and the timeline's makespan (dots). ★ marks the degrees
#   `cost_model.choose_pipeline_degrees` picks (powers of 2 up to 16, as `pipeline_degree="auto"` does),
#   the dotted line the slider's degree.
#
# `ranks per node` moves work between the two phases (8 per node: 4 nodes, 3 network messages per
# exchange; 32 per node: one node, no network at all); `α_inter` and `GB/s` are the network's latency
# and bandwidth.

# %%
DEGREES = list(range(1, 33))


def redraw_schedule(D_f=D_f, D_b=D_b, ranks_per_node=CLUSTER["ranks_per_node"], tokens=MODEL["tokens"],
                    d_model=MODEL["d_model"], alpha_inter_us=CLUSTER["alpha_inter_us"],
                    inter_GBps=CLUSTER["inter_GBps"], partition=True, show=True) -> dict:
    """The two passes and the degree curves for these settings, drawn if ``show``; returns what is plotted."""
    lay = build_layer(moe_shape(tokens, d_model), machine(ranks_per_node, alpha_inter_us, inter_GBps))
    chosen = cost_model.choose_pipeline_degrees(lay.tasks(), MAX_DEGREE)
    fwd = place_pass(lay, D_f)
    bwd, grads = backward_with_gradients(lay, D_b, partition)
    step = makespan(fwd) + grads["backward"] + grads["exposed"]
    curves = {}
    for name, backward in (("forward", False), ("backward", True)):
        curves[name] = {"model": np.array([cost_model.predict_layer(lay.tasks(), D, D)[name] for D in DEGREES]),
                        "timeline": np.array([makespan(place_pass(lay, D, backward)) for D in DEGREES])}
    data = {"forward_bars": fwd, "backward_bars": bwd, "forward": makespan(fwd), "backward": grads["backward"],
            "exposed": grads["exposed"], "pieces": grads["pieces"], "step": step, "chosen": chosen, "curves": curves,
            "layer": lay}
    if show:                                      # the figure: show_source(draw_schedule)
        draw_schedule(data, DEGREES, dict(D_f=D_f, D_b=D_b, ranks_per_node=ranks_per_node, tokens=tokens,
                                          d_model=d_model, alpha_inter_us=alpha_inter_us, inter_GBps=inter_GBps),
                      partition)
    return data


explorer = widgets.interactive(
    redraw_schedule,
    D_f=widgets.IntSlider(value=D_f, min=1, max=DEGREES[-1], description="D_f", continuous_update=False),
    D_b=widgets.IntSlider(value=D_b, min=1, max=DEGREES[-1], description="D_b", continuous_update=False),
    ranks_per_node=widgets.SelectionSlider(options=[1, 2, 4, 8, 16, 32], value=CLUSTER["ranks_per_node"],
                                           description="ranks/node", continuous_update=False),
    tokens=widgets.SelectionSlider(options=[256, 512, 1024, 2048, 4096, 8192, 16384], value=MODEL["tokens"],
                                   description="tokens/GPU", continuous_update=False),
    d_model=widgets.SelectionSlider(options=[512, 1024, 2048, 4096, 8192], value=MODEL["d_model"],
                                    description="d_model", continuous_update=False),
    alpha_inter_us=widgets.FloatLogSlider(value=CLUSTER["alpha_inter_us"], base=10, min=0, max=3, step=0.1,
                                          description="α_inter µs", continuous_update=False),
    inter_GBps=widgets.FloatLogSlider(value=CLUSTER["inter_GBps"], base=10, min=0, max=np.log10(CLUSTER["intra_GBps"]),
                                      step=0.1, description="net GB/s", continuous_update=False),
    partition=widgets.Checkbox(value=True, description="gradient pieces"),
    show=widgets.fixed(True),
)
display(explorer)

# %% [markdown]
# What the curves say at the starting point, computed (not written by hand): the best forward and
# backward degrees, whether they differ, and how much pipelining and gradient pieces save against the
# plain schedule (`D_f = D_b = 1`, the all-reduce after the backward).

# %%
start = redraw_schedule(show=False)
plain = redraw_schedule(D_f=1, D_b=1, partition=False, show=False)
best_f, best_b = start["chosen"]
print(f"cost model's choice: D_f = {best_f}, D_b = {best_b}"
      + (" — different degrees for the two passes, as FSMoE found" if best_f != best_b else " — the same here"))
for name in ("forward", "backward"):
    timeline_best = DEGREES[int(np.argmin(start["curves"][name]["timeline"]))]
    print(f"{name}: the timeline's fastest degree is {timeline_best}; at the cost model's choice the timeline takes "
          f"{start['curves'][name]['timeline'][start['chosen'][name == 'backward'] - 1] * 1e3:.3f} ms, "
          f"at its own best {start['curves'][name]['timeline'].min() * 1e3:.3f} ms")
gap = np.concatenate([start["curves"][n]["model"] - start["curves"][n]["timeline"] for n in ("forward", "backward")])
print(f"closed form minus timeline, over all degrees and both passes: {gap.min() * 1e3:+.3f} … {gap.max() * 1e3:+.3f} ms "
      "(the closed form treats both phases of an exchange as one task, so it can overlap less)")
print(f"step of this layer: plain {plain['step'] * 1e3:.2f} ms → pipelined with gradient pieces {start['step'] * 1e3:.2f} ms "
      f"({plain['step'] / start['step']:.2f}× faster)")

# %% [markdown]
# **When gradient pieces make the step slower.** Set `tokens/GPU` to 256 and tick "gradient pieces"
# on and off: with them the step gets *longer*. The cost model says why. A piece costs `a + b·B`, so
# `n` pieces cost `n·a + b·B` against `a + b·B` for the all-reduce in one go: cutting pays only
# if the windows hide more than the `(n − 1)·a` it adds. With 256 tokens the expert backward, the
# window `W`, is shorter than one piece's latency `a` itself. No piece fits (`B_fit = (W − a)/b < 0`),
# so `gradient_piece_bytes` falls back to `B_min`, `plan_gradient_pieces` cuts the gradients into
# pieces of about that size (a tensor larger than `B_min` is a piece alone), almost nothing is hidden,
# and the step pays the extra latencies. Computed:

# %%
few = {partition: redraw_schedule(tokens=256, partition=partition, show=False) for partition in (False, True)}
few_plan = gradient_plan(few[True]["layer"])
few_pieces = piece_times(few[True]["backward_bars"])
few_hidden = sum(times["hidden"] for times in few_pieces.values())
extra_latency = (len(few_plan["pieces"]) - 1) * few_plan["a"]
print(f"256 tokens/GPU: window W = {few_plan['window'] * 1e3:.2f} ms, a piece's latency a = {few_plan['a'] * 1e3:.2f} ms "
      f"(W {'<' if few_plan['window'] < few_plan['a'] else '≥'} a) → piece size B* = B_min = "
      f"{few_plan['piece_bytes'] / 1e6:.1f} MB, {len(few_plan['pieces'])} pieces")
print(f"step without pieces {few[False]['step'] * 1e3:.2f} ms, with them {few[True]['step'] * 1e3:.2f} ms "
      f"(+{(few[True]['step'] - few[False]['step']) * 1e3:.2f} ms) = (pieces − 1)·a = {extra_latency * 1e3:.2f} ms "
      f"of extra latency − {few_hidden * 1e3:.2f} ms hidden behind the backward")
print(f"at {MODEL['tokens']} tokens/GPU (the starting point): W = {plan['window'] * 1e3:.2f} ms > a = "
      f"{plan['a'] * 1e3:.2f} ms, {len(plan['pieces'])} pieces, and the pieces save "
      f"{(redraw_schedule(partition=False, show=False)['step'] - start['step']) * 1e3:.2f} ms")

# %% [markdown]
# A scheduler that knows this would switch the pieces off when `W < a` (nothing can hide). The project
# does not make that choice for you: gradient partitioning is a switch of the training config, and
# `GradientPieces` cuts whenever it is on — which is why the explorer has the box.

# %% [markdown]
# ## 5. Shadowing a hot expert (FasterMoE)
#
# Everything above assumed the busiest rank gets only 1.2× the mean rows. Real routers are skewed: a
# few experts are popular, and the rank that owns them receives rows from everyone, sends their results
# back and computes them all, while the other ranks wait for it. FasterMoE's **shadowing** copies such an
# expert to every rank for one step instead: the owner broadcasts its weights, every rank computes its
# own rows for it, and in the backward the weight gradients are summed back to the owner.
#
# Which experts? The project's `shadowing.choose_shadowed` is FasterMoE's greedy policy on a latency
# model, `shadowing.predicted_time`: with `S` the shadowed experts, `b` the bytes of a row, `W_e` an
# expert's weight count and `B_e` its weight bytes,
#
# $$T(S) = \max_{\text{rank } w}\Big(\underbrace{4 \cdot \max(\text{rows } w \text{ sends}, \text{rows } w \text{ receives}) \cdot b \cdot \beta}_{\text{2 exchanges forward, 2 backward}} + \underbrace{3 \cdot \text{rows } w \text{ computes} \cdot 2 W_e \cdot \gamma}_{\text{forward + backward}}\Big) + \text{cost\_ratio} \cdot 3 \cdot |S| \cdot B_e \cdot \beta$$
#
# (the last term: broadcasting the weights and summing their gradients). Experts are tried most loaded
# first, each kept while it lowers `T`, at most one rank's share of them. In the real layer `β` (seconds
# per byte a rank sends in an all-to-all) and `γ` (seconds per flop of the experts) are measured once
# (`shadowing.measure_rates`); here `β` is what that measurement would find on the modelled cluster —
# the cost model's time for its probe exchange, per byte sent — and `γ` is 1 / the compute rate.
#
# The load: 16 GPUs (2 nodes of 8), 2 experts each, 2048 tokens per GPU, top-2, the same GPUs and
# width as above. Expert popularity is Zipf-like: the `i`-th most popular expert (a fixed random order of
# the experts) gets a share `∝ 1 / i^skew`, and every rank draws its tokens' choices from that. The bars
# show, per rank, what `T` charges it: the bytes on its link (`4 · max(sent, received)` rows) and the
# rows it computes, without and with the experts `choose_shadowed` picks (`rows_per_rank` counts them
# the way `predicted_time` does); the right panel `T` itself.

# %%
from fastmoe_edu.distributed.shadowing import predicted_time

SHADOW = dict(ranks=16, ranks_per_node=8, experts_per_rank=2, tokens=2048, probe_bytes_per_peer=2 ** 18)


# zipf_counts(skew, ranks, experts, rows_per_rank, seed), modelled_rates(hw, ranks, probe_bytes_per_peer) and
# rows_per_rank(counts, shadowed, num_local) come from _nbhelpers/schedules.py (show_source(rows_per_rank)).
def shadow_scenario(skew=1.2, cost_ratio=1.0, d_model=MODEL["d_model"], seed=0) -> dict:
    """The skewed load, the experts choose_shadowed picks, and T without and with them."""
    P, L = SHADOW["ranks"], SHADOW["experts_per_rank"]
    hw = machine(SHADOW["ranks_per_node"])
    rates = modelled_rates(hw, P, SHADOW["probe_bytes_per_peer"])
    b = MODEL["bytes_per_element"]
    row_bytes = d_model * b
    weights = 3 * d_model * int(MODEL["hidden_per_d_model"] * d_model)        # W_e: a SwiGLU expert
    counts = zipf_counts(skew, P, P * L, MODEL["top_k"] * SHADOW["tokens"], seed)
    model_args = (L, row_bytes, weights, weights * b)
    shadowed = choose_shadowed(counts, *model_args, "auto", rates, cost_ratio, L)
    out = {"skew": skew, "counts": counts, "shadowed": shadowed, "rates": rates, "row_bytes": row_bytes,
           "weights": weights, "hot_share": (counts.sum(0).max() / counts.sum()).item()}
    for key, chosen in (("before", []), ("after", shadowed)):
        rows = rows_per_rank(counts, chosen, L)
        out[key] = {**rows, "link_bytes": 4 * np.maximum(rows["sends"], rows["receives"]) * row_bytes,
                    "T": predicted_time(counts, chosen, *model_args, rates, cost_ratio)}
    return out


SKEWS = np.round(np.arange(0.0, 2.01, 0.2), 2)


def redraw_shadowing(skew=1.2, cost_ratio=1.0, show=True) -> dict:
    """Per-rank link bytes and computed rows without and with shadowing, and T against the skew, drawn if
    ``show``; returns what is plotted."""
    s = shadow_scenario(skew, cost_ratio)
    sweep = [shadow_scenario(x, cost_ratio) for x in SKEWS]
    speedup = s["before"]["T"] / s["after"]["T"]
    data = {**s, "sweep": sweep, "speedup": speedup}
    if show:                                      # the figure: show_source(draw_shadowing)
        draw_shadowing(data, SKEWS, MODEL["bytes_per_element"], cost_ratio)
    return data


shadow_explorer = widgets.interactive(
    redraw_shadowing,
    skew=widgets.FloatSlider(value=1.2, min=0.0, max=2.0, step=0.1, description="skew", continuous_update=False),
    cost_ratio=widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="cost_ratio",
                                      continuous_update=False),
    show=widgets.fixed(True),
)
display(shadow_explorer)

# %% [markdown]
# The sweep at the default `cost_ratio = 1`, computed from the same functions:

# %%
sweep = redraw_shadowing(show=False)["sweep"]
for x in sweep:
    before, after = x["before"], x["after"]
    print(f"skew {x['skew']:.1f}: hottest expert {x['hot_share']:5.1%} of the rows, shadowed {str(x['shadowed']):>8}; "
          f"busiest rank computes {before['computes'].max():6d} → {after['computes'].max():6d} rows; "
          f"T {before['T'] * 1e3:6.2f} → {after['T'] * 1e3:6.2f} ms")
first_help = next((x["skew"] for x in sweep if x["after"]["T"] < 0.95 * x["before"]["T"]), None)
print(f"shadowing saves more than 5 % of T from skew {first_help} on" if first_help is not None
      else "shadowing never saves more than 5 % of T in this sweep")
print("with an even load (skew 0) it shadows " + (f"{sweep[0]['shadowed']}" if sweep[0]["shadowed"] else "nothing")
      + f": each expert's {sweep[0]['weights'] * MODEL['bytes_per_element'] / 1e6:.0f} MB of weights cost more to move "
      "than its rows")

# %% [markdown]
# How to read it: with an even load no rank stands out and moving an expert's weights (here tens of
# MB) costs more than it saves, so nothing is shadowed. As the skew grows, the owner of the hottest
# expert receives and computes a growing share of all rows and sets `T` for everyone; shadowing that
# expert spreads its rows' compute over the ranks that hold them and takes them off the owner's link,
# at the price of the broadcast and the gradient sum — which `cost_ratio` weighs up (larger: shadow less).
# Because the greedy policy keeps an expert only when `T` falls, the "with" curve is never above the
# "without" one. The real layer (`parallelize(..., shadow_experts="auto")`) makes the same choice every
# step with measured `β`, `γ`; `bench/bench_shadowing.py` measures it on this machine
# (`docs/benchmarks.md`, "Expert shadowing"). The checks of this notebook live in
# `tests/notebook_checks/06_schedules.py`.

# %% [markdown]
# ## 6. Measured: a real pipelined layer beside the prediction
#
# Everything above is predicted. Here is the real thing, on this machine: the default model trains for
# 2 steps on 2 MPI ranks with `pipeline_degree = 2`, and `--profile_steps=2:2` records the second step
# with `torch.profiler` (README, "Observing a run"). Every part of every chunk is a named range in the
# trace — `pipeline/forward chunk c send` (post the chunk's exchange), `receive` (wait for it),
# `experts`, `send back`, `receive back` — and the ranks' traces are merged into one, a track per rank.
#
# Top: the first MoE layer's forward pass as each rank ran it. Bottom: section 2's `place_pass` fed
# with the task times measured on rank 0 (a chunk's exchange = its send + its receive, the way there and
# back averaged; a chunk's experts), i.e. the same pass *if the exchange travelled while the experts
# compute*. The helpers (a few lines each) are in `tutorial/_measured_schedule.py`.

# %%
from _measured_schedule import forward_pass, profile_a_run, task_seconds
from fastmoe_edu.observe import draw_trace

MEASURED_RANKS, MEASURED_DEGREE = 2, 2
started = time.perf_counter()
trace = profile_a_run(MEASURED_RANKS, MEASURED_DEGREE, steps=2)
passes = {rank: forward_pass(trace, rank, MEASURED_DEGREE) for rank in range(MEASURED_RANKS)}
seconds = task_seconds(passes[0])
measured_layer = Layer(intra=(0.0, MEASURED_DEGREE * seconds["exchange"]), inter=(0.0, 0.0),
                       experts=(0.0, MEASURED_DEGREE * seconds["experts"]), grad_sizes=(), hw=layer.hw,
                       ranks=MEASURED_RANKS)
predicted_bars = place_pass(measured_layer, MEASURED_DEGREE)
measured_s = (passes[0][-1][2] - passes[0][0][1]) / 1e3
one_after_another = MEASURED_DEGREE * (2 * seconds["exchange"] + seconds["experts"])
waiting = sum(end - start for name, start, end in passes[0] if "receive" in name) / 1e3
print(f"mpirun -n {MEASURED_RANKS}: trained, profiled and merged in {time.perf_counter() - started:.1f} s")
print(f"rank 0, per chunk: exchange {seconds['exchange'] * 1e3:.2f} ms, experts {seconds['experts'] * 1e3:.2f} ms")
print(f"measured pass {measured_s * 1e3:.2f} ms ({waiting / measured_s:.0%} of it waiting in receives); "
      f"predicted {makespan(predicted_bars) * 1e3:.2f} ms; every task one after another {one_after_another * 1e3:.2f} ms")

fig, axes = plt.subplots(2, 1, figsize=(12, 5.5))
draw_trace(axes[0], trace, passes[0][0][1], max(p[-1][2] for p in passes.values()), prefixes=("pipeline/forward",))
axes[0].set_title("measured: the ranks' pipeline/forward ranges (red: waiting in a receive, orange: posting a send)",
                  fontsize=10)
draw_timeline(axes[1], predicted_bars, MEASURED_DEGREE, "predicted from rank 0's task times (plain: scatter, "
              "hatched: gather; colour: chunk), on the same scale")
axes[1].set_xlim(0, axes[0].get_xlim()[1] - axes[0].get_xlim()[0])
plt.tight_layout()
plt.show()

# %% [markdown]
# Where they differ, and why. The prediction overlaps: chunk 1's rows travel while chunk 0's experts
# compute, and chunk 0's results go home while chunk 1 computes, so the pass is shorter than its tasks
# one after another. The measurement is not: on each rank the chunks' parts follow one another, so the
# measured pass takes about as long as every task one after another, or longer (both printed above),
# and the time the parts leave is spent waiting in receives (red; its share, printed above, grows when
# the machine is busy). Two causes, both of this machine:
#
# * the `mpich` wheel has no asynchronous progress thread, so a posted message only moves while its rank
#   is *inside* an MPI call. Chunk 1's rows travel during chunk 0's `receive` (that wait covers both
#   chunks, and chunk 1's own `receive` then returns at once), not during chunk 0's `experts`;
# * 2 ranks share 2 busy cores: while one rank computes, no core is free to move its partner's data,
#   and a rank's receive also waits for the other rank to finish the experts that produce its rows.
#
# On a GPU cluster the exchange runs on the network card or NVLink (NCCL's own streams, or an MPI with
# a progress thread) while the GPU computes: the overlap the bottom chart draws. The same limit is why
# pipelining measured slower than not pipelining on this machine (`docs/benchmarks.md`, "auto pipeline
# degrees: predicted vs measured"). To see it in your own runs: `--profile_steps=A:B`, then open
# `out/trace.json` in <https://ui.perfetto.dev>.
