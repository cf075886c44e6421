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
# # 03 · Multi-node: expert parallelism and what it costs
#
# One GPU cannot hold thousands of experts, so FastMoE spreads them: with `P` workers ("ranks") and
# `E` experts, each rank keeps `E / P` of them. A token whose expert lives elsewhere must travel
# there and back: an **all-to-all** exchange, twice per MoE layer in the forward pass and twice in
# the backward pass. This notebook
#
# 1. shows which rank holds which expert;
# 2. launches real `mpirun -n P` jobs from the notebook (the project's parallel code, on this
#    machine's CPU cores; the same script also runs under `torchrun`) and draws the **traffic
#    matrix** of one routing decision: rows sent from rank `i` to rank `j`;
# 3. measures the all-to-all's latency `α` and inverse bandwidth `β` with the project's benchmark
#    `bench/bench_alltoall.py` and checks the cost model `t = α·(P−1) + β·bytes` against real
#    expert-parallel MoE layers at `P = 1, 2, 4, 8`, saying where it is wrong;
# 4. uses the same model, with cluster numbers, to predict step time from 8 to thousands of GPUs:
#    flat vs hierarchical all-to-all, compute vs communication, with widgets.
#
# **`QUICK`** (`FASTMOE_EDU_QUICK=1`, set by the tests): `mpirun -n 1` and `-n 2` only, small sizes.

# %%
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import ipywidgets as widgets
from IPython.display import display

from fastmoe_edu.distributed import mpirun_command, torchrun_command

QUICK = os.environ.get("FASTMOE_EDU_QUICK", "0") == "1"
NOTEBOOK_START = time.perf_counter()
RANK_COUNTS = [1, 2] if QUICK else [1, 2, 4, 8]
CORES = os.cpu_count()
WORK = Path(tempfile.mkdtemp(prefix="fastmoe_edu_03_"))


def find_repo_root(start: Path) -> Path:
    """The checkout's root (where bench/ lives), searched upwards from the notebook's folder."""
    for folder in (start, *start.parents):
        if (folder / "bench" / "bench_alltoall.py").exists():
            return folder
    raise FileNotFoundError("bench/bench_alltoall.py not found above " + str(start))


ROOT = find_repo_root(Path.cwd())
print(f"QUICK={QUICK}; mpirun sizes {RANK_COUNTS}; this machine has {CORES} CPU cores; repo {ROOT}")
print("launchers:", " ".join(mpirun_command(2, ["script.py"])), "|", " ".join(torchrun_command(2, ["script.py"])))

# %% [markdown]
# ## 1. Who holds which expert
#
# With `E` experts on `P` ranks, `L = E / P` per rank, global expert `g` lives on rank `g // L`
# (`fastmoe_edu/distributed/layout.py`). Every rank also reads its own slice of the batch, routes
# its own tokens with an identical copy of the router, and sends each token row to the rank of
# the chosen expert. The diagram uses the placement that the real runs below report back.

# %%
def draw_placement(placement, num_experts, gpus_per_node=4, ax=None):
    """placement: {rank: [global expert ids]} as reported by the ranks themselves."""
    ranks = sorted(placement)
    ax = ax or plt.subplots(figsize=(2.2 * len(ranks) + 1, 2.6))[1]
    cmap = plt.cm.tab10
    for r in ranks:
        node = r // gpus_per_node
        ax.add_patch(plt.Rectangle((r * 2.2, 0), 2.0, 2.0, fc="whitesmoke", ec="black"))
        ax.text(r * 2.2 + 1.0, 2.15, f"rank {r} (node {node})", ha="center", fontsize=9)
        experts = placement[r]
        for i, g in enumerate(experts):
            ax.add_patch(plt.Rectangle((r * 2.2 + 0.15, 1.55 - i * 0.45), 1.7, 0.38, fc=cmap(g % 10), alpha=0.8))
            ax.text(r * 2.2 + 1.0, 1.74 - i * 0.45, f"expert {g}", ha="center", va="center", fontsize=8)
        ax.text(r * 2.2 + 1.0, 0.15, f"tokens of shard {r}", ha="center", fontsize=8, style="italic")
    ax.set_xlim(-0.2, len(ranks) * 2.2)
    ax.set_ylim(-0.1, 2.5)
    ax.axis("off")
    ax.set_title(f"{num_experts} experts on {len(ranks)} ranks: expert g on rank g // {num_experts // len(ranks)}")
    return ax


# %% [markdown]
# ## 2. Real expert-parallel runs and the traffic matrix
#
# The script below is what every rank runs. It builds an `MoELayer`, makes it expert-parallel
# with the project's `parallelize` (the one call that makes a model, or a single layer, parallel:
# each rank keeps only its experts), and runs forward passes on its own tokens. It names no
# communication library: `ParallelLayout()` opens the engine of whichever launcher started the
# job — MPI under `mpirun -n P`, torch.distributed (gloo on CPU, NCCL on GPUs) under
# `torchrun --nproc-per-node=P` — so the same script runs under both. Below it runs under
# `mpirun` for every `P`, and once under `torchrun` to check that the traffic is the same.
#
# It uses **weak scaling** the way FastMoE grows: `EXPERTS_PER_RANK` experts per rank (so
# `E = 2·P`) and a fixed number of tokens per rank. Each rank's tokens lean towards one "topic"
# (cluster), like data shards with some locality, so the traffic is not uniform. Every rank
# writes its own report (`rank{r}.json`), which the notebook reads after the job:
#
# * the placement (which global experts each rank holds),
# * `send[i][j]`: how many rows rank `i` sent to rank `j` in one routing decision,
# * the time of one forward pass (the slowest rank) and the project's communication counters
#   (`layout.stats`: seconds and bytes inside the all-to-all).

# %%
PROBE = r'''
import json, sys, time
from pathlib import Path
import torch
from fastmoe_edu import MoELayer
from fastmoe_edu.distributed import ParallelLayout, abort_on_exception, parallelize

out_dir, experts_per_rank, tokens_per_rank, d_model, steps = (
    Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
torch.set_num_threads(1)
layout = ParallelLayout()                     # the launcher's engine; every rank is in one expert-parallel group
abort_on_exception(layout.world.engine)       # one rank's error stops the whole job: no hang
P, rank = layout.world_size, layout.rank
E = experts_per_rank * P

# The same global batch on every rank (same seed); rank r keeps its slice. Shard r's tokens lean
# towards topic r % 4.
g = torch.Generator().manual_seed(1)
topics = torch.randn(4, d_model, generator=g) * 1.5
topic = torch.randint(0, 4, (P, tokens_per_rank), generator=g)
topic = torch.where(torch.rand(P, tokens_per_rank, generator=g) < 0.7, torch.arange(P)[:, None] % 4, topic)
tokens = topics[topic] + torch.randn(P, tokens_per_rank, d_model, generator=g)
x = tokens[rank]

torch.manual_seed(0)                          # identical full layer on every rank ...
layer = MoELayer(d_model, 2 * d_model, E, top_k=2, router="softmax_top_k")
parallelize(layer, layout, exchange="alltoallv")   # ... then keep only the local experts
with torch.no_grad():
    layer(x)                                  # warm-up
    layout.stats.reset()
    times = []
    for _ in range(steps):
        layout.world.barrier()
        start = time.perf_counter()
        layer(x)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        times.append(layout.world.allreduce_(elapsed, op="max").item())    # the slowest rank's time

counts = layer.last_routing.tokens_per_expert            # rows this rank has for each global expert
send = counts.reshape(P, experts_per_rank).sum(dim=1)    # rows to each rank (its L experts)
runner = layer.expert_runner                             # the layer's expert-parallel runner
times.sort()
report = {"rank": rank, "send_rows": send.tolist(),
          "experts": list(range(runner.first_local_expert, runner.first_local_expert + runner.num_local_experts)),
          "stats": layout.stats.as_dict(), "forward_seconds": times[len(times) // 2]}
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))   # one file per rank, read after the job
'''
probe_path = WORK / "moe_probe.py"
probe_path.write_text(PROBE)

EXPERTS_PER_RANK, TOKENS_PER_RANK, D_MODEL = 2, (256 if QUICK else 1024), 64
PROBE_STEPS = 5 if QUICK else 20


def run_probe(ranks, launcher=mpirun_command):
    """Run the probe on ``ranks`` ranks (``launcher``: mpirun_command or torchrun_command); read every rank's report."""
    out = Path(tempfile.mkdtemp(dir=WORK, prefix=f"probe_{ranks}_"))
    cmd = launcher(ranks, [str(probe_path), str(out), str(EXPERTS_PER_RANK), str(TOKENS_PER_RANK),
                           str(D_MODEL), str(PROBE_STEPS)])
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=WORK)
    if done.returncode != 0:
        raise RuntimeError(f"{launcher.__name__}({ranks}) failed ({done.returncode}):\n{done.stderr[-3000:]}")
    per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    return {"ranks": ranks, "num_experts": sum(len(r["experts"]) for r in per_rank),
            "forward_seconds": per_rank[0]["forward_seconds"],      # the same on every rank (slowest rank's)
            "per_rank": per_rank, "launch_seconds": time.perf_counter() - started}


probes = {}
for P in RANK_COUNTS:
    probes[P] = run_probe(P)
    print(f"mpirun -n {P}: E = {probes[P]['num_experts']} experts, one forward "
          f"{probes[P]['forward_seconds'] * 1e3:.1f} ms (slowest rank, median of {PROBE_STEPS}); "
          f"whole launch {probes[P]['launch_seconds']:.1f} s")

# The same script under torchrun: ParallelLayout() now opens torch.distributed (gloo) instead of MPI.
# Routing happens before any communication, so the rows each rank sends, and the bytes the
# communicator counts, must be the same as under mpirun.
P_TORCH = 2
on_torch = run_probe(P_TORCH, torchrun_command)
same_rows = [r["send_rows"] for r in on_torch["per_rank"]] == [r["send_rows"] for r in probes[P_TORCH]["per_rank"]]
same_bytes = ([r["stats"]["expert/alltoallv"]["bytes_sent"] for r in on_torch["per_rank"]]
              == [r["stats"]["expert/alltoallv"]["bytes_sent"] for r in probes[P_TORCH]["per_rank"]])
print(f"torchrun --nproc-per-node={P_TORCH}: one forward {on_torch['forward_seconds'] * 1e3:.1f} ms; whole launch "
      f"{on_torch['launch_seconds']:.1f} s; rows sent and bytes counted identical to mpirun's: {same_rows and same_bytes}")
assert same_rows and same_bytes, "the same script under torchrun routed or sent differently"

# %%
P_SHOW = max(RANK_COUNTS)
show = probes[P_SHOW]
placement = {r["rank"]: r["experts"] for r in show["per_rank"]}
traffic = np.array([r["send_rows"] for r in sorted(show["per_rank"], key=lambda r: r["rank"])])

fig = plt.figure(figsize=(12, 4.2))
ax_place = fig.add_subplot(1, 2, 1)
draw_placement(placement, show["num_experts"], ax=ax_place)
ax = fig.add_subplot(1, 2, 2)
im = ax.imshow(traffic, cmap="Blues", vmin=0)
for (i, j), value in np.ndenumerate(traffic):
    ax.text(j, i, str(value), ha="center", va="center", color="black" if value < traffic.max() * 0.6 else "white")
ax.set(title=f"traffic of one routing decision, P = {P_SHOW}: rows rank i → rank j",
       xlabel="to rank j", ylabel="from rank i", xticks=range(P_SHOW), yticks=range(P_SHOW))
fig.colorbar(im, ax=ax, fraction=0.046)
plt.tight_layout()
plt.show()

row_bytes = D_MODEL * 4                                       # float32 rows
local_share = np.trace(traffic) / traffic.sum()
print(f"{traffic.sum()} rows routed, {np.trace(traffic)} stay on their own rank ({local_share:.0%}); "
      f"uniform routing would keep {1 / P_SHOW:.0%}")
print(f"busiest receiver: rank {traffic.sum(0).argmax()} gets {traffic.sum(0).max()} rows "
      f"({traffic.sum(0).max() / traffic.sum(0).mean():.2f}× the mean): the all-to-all waits for it")
# One forward = two row exchanges: the global scatter sends row i of the matrix (minus the diagonal),
# the global gather sends column i back. Check that against the bytes MPI really moved.
off_diagonal = traffic - np.diag(np.diag(traffic))
expected_bytes = (off_diagonal.sum(1) + off_diagonal.sum(0)) * row_bytes
measured_bytes = np.array([r["stats"].get("expert/alltoallv", {}).get("bytes_sent", 0) / PROBE_STEPS
                           for r in sorted(show["per_rank"], key=lambda r: r["rank"])])
print("bytes each rank sends per forward, from the traffic matrix:", expected_bytes.astype(int).tolist())
print("... and as counted inside the MPI calls (layout.stats):     ", measured_bytes.astype(int).tolist())
assert np.array_equal(expected_bytes, measured_bytes), "traffic matrix and MPI byte counters disagree"

# %% [markdown]
# ## 3. Measuring α and β, and testing the cost model on real runs
#
# The α–β model of one all-to-all among `P` ranks, each sending `bytes` to the others
# (`docs/moe_systems.md` §4.2):
#
# $$t_{\text{all-to-all}} = \alpha\,(P-1) + \beta \cdot \text{bytes}$$
#
# `α` is the cost of one message (latency), `β` the cost of one byte (1/bandwidth). The project's
# benchmark `bench/bench_alltoall.py` times the exchange for many message sizes under `mpirun -n P`
# (its `--worker` mode writes the raw points as JSON), and its `fit_alpha_beta` fits α and β by
# least squares on the relative error. On this machine "ranks" are processes on one CPU and the
# "network" is shared memory, so the numbers describe this laptop-sized setup, not a GPU cluster.

# %%
spec = importlib.util.spec_from_file_location("bench_alltoall", ROOT / "bench" / "bench_alltoall.py")
bench_alltoall = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_alltoall)

BENCH_RANKS = [P for P in RANK_COUNTS if P > 1]
BENCH_REPEATS = 5 if QUICK else 20
bench_points = []
for P in BENCH_RANKS:
    out = WORK / f"bench_{P}.json"
    cmd = mpirun_command(P, [str(ROOT / "bench" / "bench_alltoall.py"), "--worker", str(out),
                             "--repeats", str(BENCH_REPEATS)])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=WORK)
    if done.returncode != 0:
        raise RuntimeError(f"bench mpirun -n {P} failed:\n{done.stderr[-3000:]}")
    bench_points += json.loads(out.read_text())
alpha, beta = bench_alltoall.fit_alpha_beta(bench_points)
print(f"fit over {len(bench_points)} points (P = {BENCH_RANKS}): α = {alpha * 1e6:.1f} µs per peer, "
      f"β = {beta * 1e9:.3f} ns/byte (1/β = {1 / beta / 1e9 if beta > 0 else float('nan'):.2f} GB/s)")

fig, ax = plt.subplots(figsize=(7, 4))
for P in BENCH_RANKS:
    pts = [p for p in bench_points if p["ranks"] == P]
    b = np.array([p["bytes_per_rank"] for p in pts])
    ax.loglog(b, [p["seconds"] * 1e6 for p in pts], "o", label=f"measured, P={P}")
    grid = np.logspace(np.log10(b.min()), np.log10(b.max()), 50)
    ax.loglog(grid, (alpha * (P - 1) + beta * grid) * 1e6, "-", color=ax.lines[-1].get_color(), alpha=0.6)
ax.set(xlabel="bytes sent per rank", ylabel="all-to-all time (µs)", title="all-to-all: measured (dots) vs α·(P−1) + β·bytes (lines)")
ax.legend()
plt.show()
relative_errors = [abs(alpha * (p["ranks"] - 1) + beta * p["bytes_per_rank"] - p["seconds"]) / p["seconds"]
                   for p in bench_points]
print(f"fit quality on the benchmark points: median relative error {np.median(relative_errors):.0%}, "
      f"worst {max(relative_errors):.0%}")

# %% [markdown]
# Now the real test: predict the expert-parallel MoE layer runs of section 2 from `α`, `β` and the
# `P = 1` run alone. The model says one forward pass at `P` ranks costs the compute of one rank
# (measured at `P = 1`; weak scaling keeps tokens and experts per rank fixed) plus two all-to-alls
# (scatter and gather) of the bytes that rank really sent:
#
# $$t_{\text{forward}}(P) \approx t_{\text{forward}}(1) + 2\,[\alpha\,(P-1) + \beta \cdot \text{bytes}(P)]$$

# %%
base_forward = probes[1]["forward_seconds"]
rows_pred = []
for P, run in probes.items():
    per_rank = run["per_rank"]
    a2a = [r["stats"].get("expert/alltoallv", {"calls": 0, "seconds": 0.0, "bytes_sent": 0}) for r in per_rank]
    calls = max(c["calls"] for c in a2a) or 1
    bytes_per_call = max(c["bytes_sent"] for c in a2a) / calls
    measured_a2a = max(c["seconds"] for c in a2a) / calls
    predicted_a2a = alpha * (P - 1) + beta * bytes_per_call
    predicted = base_forward + 2 * predicted_a2a
    rows_pred.append({"P": P, "bytes": bytes_per_call, "a2a_measured": measured_a2a, "a2a_predicted": predicted_a2a,
                      "forward_measured": run["forward_seconds"], "forward_predicted": predicted,
                      "ratio": run["forward_seconds"] / predicted})

print(f"{'P':>3}{'bytes/call':>12}{'a2a meas.':>11}{'a2a model':>11}{'fwd meas.':>11}{'fwd model':>11}{'meas/model':>12}")
for r in rows_pred:
    print(f"{r['P']:>3}{r['bytes']:>12,.0f}{r['a2a_measured'] * 1e3:>9.2f}ms{r['a2a_predicted'] * 1e3:>9.2f}ms"
          f"{r['forward_measured'] * 1e3:>9.2f}ms{r['forward_predicted'] * 1e3:>9.2f}ms{r['ratio']:>12.2f}")

fig, ax = plt.subplots(figsize=(6.5, 3.8))
Ps = [r["P"] for r in rows_pred]
ax.plot(Ps, [r["forward_measured"] * 1e3 for r in rows_pred], "o-", label="measured forward")
ax.plot(Ps, [r["forward_predicted"] * 1e3 for r in rows_pred], "s--", label="model: t(1) + 2·(α(P−1) + β·bytes)")
ax.axvline(CORES, color="grey", ls=":", label=f"{CORES} cores")
ax.set(xscale="log", xticks=Ps, xticklabels=Ps, xlabel="ranks P", ylabel="ms per forward",
       title="weak scaling of one expert-parallel MoE layer")
ax.legend(fontsize=8)
plt.show()

# Where the model and the measurement disagree, say so, and why when we can tell.
TOLERANCE = 1.5
for r in rows_pred:
    if 1 / TOLERANCE <= r["ratio"] <= TOLERANCE:
        print(f"P={r['P']}: model within {TOLERANCE}× of the measurement (measured/model = {r['ratio']:.2f}).")
        continue
    reasons = []
    if r["P"] > CORES:
        reasons.append(f"{r['P']} ranks share {CORES} cores, so each rank computes about {r['P'] / CORES:.0f}× "
                       "slower and waits in MPI for the others; the model assumes one processor per rank")
    if r["a2a_measured"] > TOLERANCE * r["a2a_predicted"]:
        reasons.append(f"the MoE layer's all-to-all took {r['a2a_measured'] / max(r['a2a_predicted'], 1e-12):.1f}× "
                       "the benchmark's prediction: the benchmark starts every call after a barrier, while in the "
                       "layer the ranks reach the exchange at different times, and the time inside the call "
                       "includes waiting for the last one to arrive")
    if not reasons:
        reasons.append("timing noise of a shared machine (rerun to check)")
    word = "slower" if r["ratio"] > 1 else "faster"
    print(f"P={r['P']}: DISAGREE — measured is {max(r['ratio'], 1 / r['ratio']):.1f}× {word} than the model: "
          + "; ".join(reasons) + ".")

# %% [markdown]
# ## 4. From 8 to thousands of GPUs: a cost model with cluster numbers
#
# The same formula, with the numbers of a GPU cluster instead of this CPU, predicts where the time
# of a training step goes as the cluster grows. Assumptions (all in the cell below, change them):
#
# * **Workload** (a Mixtral-8x7B-sized MoE block): `d_model = 4096`, expert hidden `14336`
#   (SwiGLU), `top_k = 2`, 32 layers, 4096 tokens per GPU per step, bf16 (2 bytes).
# * **Weak scaling** as in FastMoE: `experts_per_gpu` experts per GPU, so `E = P · experts_per_gpu`
#   grows with the cluster while each GPU's tokens stay the same.
# * **Compute** per GPU: 3 × (forward FLOPs) for forward + backward, at an effective
#   `GPU_TFLOPS`; an expert's GEMM gets less efficient when it has few rows
#   (`efficiency = rows / (rows + 128)`, an assumption), which is how `experts_per_gpu` enters.
# * **Communication**: 4 all-to-alls per MoE layer per step (dispatch and combine, forward and
#   backward), each moving `bytes = T·k·d·2·(P−1)/P` per GPU. Nothing overlaps (an upper bound;
#   FasterMoE and FSMoE overlap some of it). Gradient all-reduce of the dense weights is left out.
# * **Flat all-to-all**: every GPU sends `P − 1` messages: `α_net·(P−1) + β_net·bytes_off_node`
#   (the network is the slow link; the on-node share travels over NVLink at the same time).
# * **Hierarchical (2D) all-to-all** (Tutel's 2DH): first an all-to-all inside each node of `G`
#   GPUs (`α_link·(G−1) + β_link·bytes·(G−1)/G`, over NVLink), then one message per *node* pair:
#   `α_net·(N−1) + β_net·bytes·(N−1)/N` for `N = P/G` nodes. Fewer, bigger messages: it pays when
#   latency `α_net·(P−1)` dominates, i.e. at large `P`.
#
# The **network** control switches between typical cluster numbers and the α, β just measured
# on this machine (then both links use the measured values).

# %%
WORKLOAD = dict(d_model=4096, d_ff=14336, top_k=2, n_layers=32, tokens_per_gpu=4096, seq_len=4096,
                bytes_per_element=2)
CLUSTER = dict(gpus_per_node=8, alpha_net=10e-6, alpha_link=2e-6, link_GBps=300.0, GPU_TFLOPS=400.0,
               rows_half_efficiency=128)
GPU_COUNTS = [8 * 2 ** i for i in range(10)]              # 8 ... 4096


def step_time(P, bandwidth_GBps, experts_per_gpu, network="cluster", w=WORKLOAD, c=CLUSTER):
    """Seconds per training step on P GPUs: compute, and communication with flat / hierarchical all-to-all."""
    d, d_ff, k, T, L = w["d_model"], w["d_ff"], w["top_k"], w["tokens_per_gpu"], w["n_layers"]
    # compute: experts (efficiency depends on rows per expert) + attention/projections
    rows_per_expert = T * k / experts_per_gpu
    efficiency = rows_per_expert / (rows_per_expert + c["rows_half_efficiency"])
    flops = c["GPU_TFLOPS"] * 1e12
    expert_flops = 3 * 2 * T * k * 3 * d * d_ff * L
    dense_flops = 3 * 2 * T * (4 * d * d + 2 * w["seq_len"] * d) * L
    compute = expert_flops / (flops * efficiency) + dense_flops / flops
    # one all-to-all: bytes this GPU sends to others
    nbytes = T * k * d * w["bytes_per_element"] * (P - 1) / P
    if network == "cluster":
        a_net, b_net, a_link, b_link = c["alpha_net"], 1 / (bandwidth_GBps * 1e9), c["alpha_link"], 1 / (c["link_GBps"] * 1e9)
    else:                                                    # this machine's measured α, β for every link
        a_net = a_link = alpha
        b_net = b_link = beta
    G = min(c["gpus_per_node"], P)
    N = P // G
    if N == 1:                                               # one node: both algorithms are the same
        flat = hier = a_link * (P - 1) + b_link * nbytes
    else:
        off_node = nbytes * (P - G) / (P - 1)
        flat = a_net * (P - 1) + max(b_net * off_node, b_link * (nbytes - off_node))
        hier = (a_link * (G - 1) + b_link * nbytes * (G - 1) / G) + (a_net * (N - 1) + b_net * nbytes * (N - 1) / N)
    per_step = 4 * L
    return {"compute": compute, "flat": per_step * flat, "hier": per_step * hier, "bytes_per_a2a": nbytes}


def redraw_cost(gpus=256, bandwidth_GBps=50.0, experts_per_gpu=2, network="cluster", show=True):
    """Plot step time over cluster sizes and the split at ``gpus``; return the plotted numbers."""
    curve = [step_time(P, bandwidth_GBps, experts_per_gpu, network) for P in GPU_COUNTS]
    compute = np.array([c["compute"] for c in curve])
    flat = np.array([c["flat"] for c in curve])
    hier = np.array([c["hier"] for c in curve])
    here = step_time(gpus, bandwidth_GBps, experts_per_gpu, network)
    better = [P for P, f, h in zip(GPU_COUNTS, flat, hier) if h < f]
    crossover = better[0] if better else None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1.6, 1]})
    ax = axes[0]
    ax.plot(GPU_COUNTS, (compute + flat) * 1e3, "o-", label="step, flat all-to-all")
    ax.plot(GPU_COUNTS, (compute + hier) * 1e3, "s-", label="step, hierarchical all-to-all")
    ax.plot(GPU_COUNTS, compute * 1e3, "k--", label="compute only")
    ax.axvline(gpus, color="grey", ls=":")
    if crossover:
        ax.axvline(crossover, color="tab:green", ls="-.", alpha=0.6, label=f"hierarchical wins from P={crossover}")
    ax.set(xscale="log", yscale="log", xlabel="GPUs P", ylabel="ms per step",
           title=f"{experts_per_gpu} experts/GPU, network {bandwidth_GBps:.3g} GB/s per GPU ({network})")
    ax.set_xticks(GPU_COUNTS, [str(P) for P in GPU_COUNTS])
    ax.legend(fontsize=8)
    ax = axes[1]
    names = ["flat", "hierarchical"]
    comm = [here["flat"], here["hier"]]
    ax.bar(names, [here["compute"] * 1e3] * 2, color="tab:blue", label="compute")
    ax.bar(names, np.array(comm) * 1e3, bottom=here["compute"] * 1e3, color="tab:red", label="all-to-all")
    for i, cm in enumerate(comm):
        share = cm / (cm + here["compute"])
        ax.text(i, (here["compute"] + cm) * 1e3, f"{share:.0%} comm.", ha="center", va="bottom")
    ax.set(ylabel="ms per step", title=f"P = {gpus}: compute vs communication")
    ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show() if show else plt.close(fig)
    return {"gpus": GPU_COUNTS, "compute": compute, "flat": flat, "hier": hier, "crossover": crossover,
            "at_gpus": here, "comm_share_flat": here["flat"] / (here["flat"] + here["compute"]),
            "comm_share_hier": here["hier"] / (here["hier"] + here["compute"])}


cost_explorer = widgets.interactive(
    redraw_cost,
    gpus=widgets.SelectionSlider(options=GPU_COUNTS, value=256, description="GPUs", continuous_update=False),
    bandwidth_GBps=widgets.FloatLogSlider(value=50, base=10, min=0.5, max=2.7, step=0.1, description="net GB/s",
                                          continuous_update=False),
    experts_per_gpu=widgets.IntSlider(value=2, min=1, max=16, description="experts/GPU", continuous_update=False),
    network=widgets.Dropdown(options=["cluster", "measured here"], value="cluster", description="network"),
    show=widgets.fixed(True),
)
display(cost_explorer)

# %% [markdown]
# What the model says, computed for the default cluster numbers (the widget's starting point):

# %%
default = redraw_cost(show=False)
for P in (8, 64, 512, 4096):
    i = GPU_COUNTS.index(P)
    total_flat, total_hier = default["compute"][i] + default["flat"][i], default["compute"][i] + default["hier"][i]
    print(f"P={P:>5}: compute {default['compute'][i] * 1e3:7.1f} ms | flat: step {total_flat * 1e3:7.1f} ms, "
          f"{default['flat'][i] / total_flat:4.0%} comm | hierarchical: step {total_hier * 1e3:7.1f} ms, "
          f"{default['hier'][i] / total_hier:4.0%} comm")
print(f"hierarchical all-to-all beats the flat one from P = {default['crossover']} GPUs on")
# Tutel (Hwang et al. 2023, arXiv 2206.03382; docs/moe_systems.md §4.3): 2DH beats the flat all-to-all
# only above a few hundred GPUs.
TUTEL_CROSSOVER = 256
if default["crossover"] is not None and default["crossover"] < TUTEL_CROSSOVER / 2:
    print(f"DISAGREE with Tutel's measurements (crossover at a few hundred GPUs): this model is too kind to the "
          f"hierarchical algorithm. It charges nothing for 2DH's extra local re-layout copies, and it charges the "
          f"flat all-to-all the full latency α for each of its P−1 messages one after another, where real "
          f"libraries keep many messages in flight.")
elif default["crossover"] is None or default["crossover"] > 2 * TUTEL_CROSSOVER:
    print("DISAGREE with Tutel's measurements (crossover at a few hundred GPUs): this model favours the flat "
          "all-to-all more than real clusters do.")
else:
    print("This agrees with Tutel's report of a crossover at a few hundred GPUs.")
last = GPU_COUNTS[-1]
print(f"at P = {last}: hierarchical is {default['flat'][-1] / default['hier'][-1]:.1f}× faster in communication; "
      f"the flat all-to-all's latency term alone is {CLUSTER['alpha_net'] * (last - 1) * 4 * WORKLOAD['n_layers'] * 1e3:.0f} ms per step")

# %% [markdown]
# The project also has a fuller cost model, `fastmoe_edu/distributed/cost_model.py` (tensor, expert
# and data parallelism, token dropping, pipelining, gradient all-reduce). Its all-to-all formula
# should agree with the one written out above; with the same α, β and node size, compare the two
# for every cluster size (the computed differences are printed, not assumed):

# %%
from fastmoe_edu.distributed import cost_model

hardware = cost_model.Hardware(alpha_intra=CLUSTER["alpha_link"], beta_intra=1 / (CLUSTER["link_GBps"] * 1e9),
                               alpha_inter=CLUSTER["alpha_net"], beta_inter=1 / (50.0 * 1e9),
                               flops_per_second=CLUSTER["GPU_TFLOPS"] * 1e12,
                               ranks_per_node=CLUSTER["gpus_per_node"])
buffer_bytes = WORKLOAD["tokens_per_gpu"] * WORKLOAD["top_k"] * WORKLOAD["d_model"] * WORKLOAD["bytes_per_element"]
per_step = 4 * WORKLOAD["n_layers"]
ratios = {"flat": [], "hier": []}
for i, P in enumerate(GPU_COUNTS):
    for kind in ratios:
        theirs = per_step * cost_model.alltoall_time(buffer_bytes, P, 1, hardware, hierarchical=(kind == "hier"))
        ratios[kind].append(default[kind][i] / theirs)
for kind, values in ratios.items():
    worst = max(values, key=lambda r: abs(np.log(r)))
    verdict = "agree within 10%" if abs(np.log(worst)) < np.log(1.1) else "DISAGREE by more than 10% somewhere"
    print(f"{kind:>4} all-to-all: this notebook / cost_model.py between {min(values):.3f} and {max(values):.3f} "
          f"over P = {GPU_COUNTS[0]}..{GPU_COUNTS[-1]} → {verdict}")
if any(abs(np.log(r)) >= np.log(1.1) for values in ratios.values() for r in values):
    print("Where they differ: for the flat all-to-all this notebook lets the on-node bytes (NVLink) travel while "
          "the off-node bytes cross the network and charges the larger of the two; cost_model.py adds both terms.")

# %% [markdown]
# ### Tensor × expert × data parallelism, duplicate token dropping and pipelining
#
# `cost_model.predict_step` prices a whole training step for a DeepSpeed-TED layout
# (`Layout(tp, ep, dp, drop_duplicate_tokens, hierarchical, pipeline_degree)`), the same switches as
# the training config's `[parallel]` section. Below, the workload of this section (with
# `experts_per_gpu` experts per expert-parallel rank) on the cluster above, for six variants:
#
# * `tp1 flat` / `tp1 hier`: pure expert parallelism, flat or hierarchical all-to-all;
# * `tp4`: groups of 4 GPUs of a node share the non-expert matrices. Without dropping, all 4 send
#   the same rows through their own all-to-alls (and, in this code, compute the same expert rows);
# * `tp4 drop`: each tp rank sends its 1/4 of the rows and the group all-gathers after the exchange;
# * `tp4 drop hier`: plus the hierarchical exchange;
# * `tp4 drop best D`: the flat exchange cut into D overlapped chunks, D chosen by the model
#   (`choose_pipeline_degree`, FSMoE's way of picking it).

# %%
def ted_shape(ep: int, experts_per_gpu: int = 2) -> cost_model.MoEShape:
    return cost_model.MoEShape(tokens_per_rank=WORKLOAD["tokens_per_gpu"], d_model=WORKLOAD["d_model"],
                               d_hidden=WORKLOAD["d_ff"], num_experts=experts_per_gpu * ep,
                               top_k=WORKLOAD["top_k"], n_layer=WORKLOAD["n_layers"], seq_len=WORKLOAD["seq_len"],
                               bytes_per_element=WORKLOAD["bytes_per_element"], load_imbalance=1.2)


TED_VARIANTS = {
    "tp1 flat": lambda P: cost_model.Layout(1, P, 1),
    "tp1 hier": lambda P: cost_model.Layout(1, P, 1, hierarchical=True),
    "tp4": lambda P: cost_model.Layout(4, P // 4, 1),
    "tp4 drop": lambda P: cost_model.Layout(4, P // 4, 1, drop_duplicate_tokens=True),
    "tp4 drop hier": lambda P: cost_model.Layout(4, P // 4, 1, drop_duplicate_tokens=True, hierarchical=True),
}
ted_steps = {name: [] for name in [*TED_VARIANTS, "tp4 drop best D"]}
best_degrees = []
for P in GPU_COUNTS:
    for name, make_layout in TED_VARIANTS.items():
        layout = make_layout(P)
        ted_steps[name].append(cost_model.predict_step(ted_shape(layout.ep), layout, hardware)["total"])
    dropping = TED_VARIANTS["tp4 drop"](P)
    best = cost_model.choose_pipeline_degree(ted_shape(dropping.ep), dropping, hardware, max_degree=16)
    best_degrees.append(best)
    piped = dataclasses.replace(dropping, pipeline_degree=best)
    ted_steps["tp4 drop best D"].append(cost_model.predict_step(ted_shape(piped.ep), piped, hardware)["total"])

fig, (ax_steps, ax_degree) = plt.subplots(1, 2, figsize=(12, 4.2))
for name, seconds in ted_steps.items():
    ax_steps.plot(GPU_COUNTS, np.array(seconds) * 1e3, "o-" if "drop" in name else "s--", label=name, ms=4)
ax_steps.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="predicted ms per training step",
             title="TED layouts (cost_model.predict_step)")
ax_steps.set_xticks(GPU_COUNTS, [str(P) for P in GPU_COUNTS], rotation=45)
ax_steps.legend(fontsize=8)
DEGREES = list(range(1, 13))
for P in (64, 512):
    layout = TED_VARIANTS["tp4 drop"](P)
    times = [cost_model.predict_step(ted_shape(layout.ep), dataclasses.replace(layout, pipeline_degree=D),
                                     hardware)["total"] * 1e3 for D in DEGREES]
    ax_degree.plot(DEGREES, times, "o-", label=f"{P} GPUs (tp4, drop)")
ax_degree.set(xlabel="pipeline degree D (chunks of the all-to-all)", ylabel="predicted ms per step",
              title="Overlapping the exchange: more chunks, more messages")
ax_degree.legend()
plt.tight_layout()
plt.show()

for i, P in enumerate(GPU_COUNTS):
    if P in (8, 64, 512, 4096):
        print(f"P={P:5d}: tp4 without dropping {ted_steps['tp4'][i] * 1e3:8.0f} ms, with {ted_steps['tp4 drop'][i] * 1e3:8.0f} ms "
              f"({ted_steps['tp4'][i] / ted_steps['tp4 drop'][i]:.2f}×); best D = {best_degrees[i]:2d} → "
              f"{ted_steps['tp4 drop best D'][i] * 1e3:8.0f} ms; hierarchical + drop {ted_steps['tp4 drop hier'][i] * 1e3:8.0f} ms")

# %% [markdown]
# What to read from it (the printed numbers are computed above, the reasons are the model's terms):
# duplicate token dropping removes the tp-fold copies of the exchanged rows, so its gain is largest
# where the all-to-all and the expert rows dominate; pipelining hides the exchange behind expert
# compute only while each chunk's extra `(P − 1)·α` is small, so the best `D` falls back to 1 as the
# cluster grows; the hierarchical exchange replaces the `P − 1` network messages by `N − 1`. That
# these switches keep the results unchanged is tested on up to 8 ranks under both engines, MPI and
# torch.distributed (`tests/test_ted.py`, `tests/test_distributed_training.py`); that dropping sends exactly 1/tp
# of the bytes is counted by the communicators (`docs/parallelism.md` §4).

# %% [markdown]
# How much to trust it: the model knows nothing about congestion, stragglers, load imbalance
# between experts (section 2's busiest receiver sets the pace), or overlap of communication with
# compute. Section 3 showed how it fares on this machine: the table there and the DISAGREE lines
# are computed from the runs, not written by hand.

# %% [markdown]
# ## 5. Self-check
#
# The cost explorer's callback must react to every control: call `redraw_cost` with different
# values, move the widgets, and check that the plotted numbers changed.

# %%
base = redraw_cost(gpus=256, bandwidth_GBps=50.0, experts_per_gpu=2, show=False)
for what, kwargs in {"bandwidth": dict(bandwidth_GBps=5.0), "experts_per_gpu": dict(experts_per_gpu=16),
                     "network": dict(network="measured here")}.items():
    other = redraw_cost(**{**dict(gpus=256, bandwidth_GBps=50.0, experts_per_gpu=2, show=False), **kwargs})
    changed = not (np.allclose(other["compute"], base["compute"]) and np.allclose(other["flat"], base["flat"])
                   and np.allclose(other["hier"], base["hier"]))
    assert changed, f"changing {what} did not change the plotted data"
moved = redraw_cost(gpus=2048, bandwidth_GBps=50.0, experts_per_gpu=2, show=False)
assert moved["at_gpus"] != base["at_gpus"], "changing the GPU count did not change the bars"
assert all(best >= 1 for best in best_degrees)
assert all(dropped < kept for dropped, kept in zip(ted_steps["tp4 drop"], ted_steps["tp4"])), \
    "the cost model should price dropping duplicate tokens below sending tp copies"

controls = {w.description: w for w in cost_explorer.children if hasattr(w, "value")}
before = cost_explorer.result
controls["GPUs"].value = 4096
assert cost_explorer.result is not before and cost_explorer.result["at_gpus"]["flat"] > before["at_gpus"]["flat"]
controls["net GB/s"].value = 10.0
assert cost_explorer.result["at_gpus"]["hier"] > step_time(4096, 50.0, 2)["hier"]
controls["GPUs"].value, controls["net GB/s"].value = 256, 50.0
assert len(probes) == len(RANK_COUNTS) and all(r["forward_measured"] > 0 for r in rows_pred)
plt.close("all")
print(f"widget self-check passed ({time.perf_counter() - NOTEBOOK_START:.1f} s since the first cell)")
