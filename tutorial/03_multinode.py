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
#    `bench/bench_alltoall.py` — only where every rank has a CPU core of its own — shows separately
#    what happens when ranks outnumber cores (*oversubscription*), and checks the cost model
#    `t = α·(P−1) + β·bytes` against real expert-parallel MoE layers, saying where it is wrong;
# 4. uses the same model, with cluster numbers, to predict step time from 8 to thousands of GPUs:
#    flat vs hierarchical all-to-all, compute vs communication, with widgets.
#
# **`QUICK`** (`FASTMOE_EDU_QUICK=1`, set by the tests): `mpirun -n 1` and `-n 2` for the MoE layer,
# fewer benchmark repeats, small sizes.
#
# **Glossary** (each term is explained again where it is first used):
#
# * **FastMoE**: an MoE training system for PyTorch (He et al. 2021) whose dispatch and expert parallelism this
#   project re-implements for teaching.
# * **rank**: one process of a parallel job (on a cluster: one GPU); `P` ranks in all. **node**: one machine
#   of a cluster, holding several GPUs (here: 8).
# * **expert parallelism**: each rank keeps `E / P` of the experts and receives the tokens routed to them.
# * **all-to-all**: every rank sends a (possibly different) piece of data to every other rank.
# * **MPI** / **`mpirun`**: the classic message-passing library and its launcher; **`torchrun`**: PyTorch's
#   launcher for `torch.distributed`, which uses **gloo** (CPU) or **NCCL** (NVIDIA GPUs) underneath.
# * **weak scaling**: adding ranks while keeping the work *per rank* fixed.
# * **traffic matrix**: entry `[i, j]` = rows rank `i` sends to rank `j` in one exchange.
# * **α (latency)**: the fixed cost of one message; **β**: the cost per byte (1 / **bandwidth**).
# * **least squares**: choosing α, β so that the squared differences between model and measurement are smallest.
# * **core**: one CPU execution unit; **oversubscription**: more busy processes than cores.
# * **time-slicing**: the operating system running processes in turns of a few milliseconds on a shared core.
# * **busy-polling**: waiting for a message by checking again and again (keeps the core busy); MPI does this.
# * **median** / **spread**: the middle of repeated timings, and the range they cover.
# * **GPU**: graphics processor; **NVLink**: NVIDIA's fast links between the GPUs of one node;
#   **network** (e.g. InfiniBand): the slower links between nodes.
# * **GEMM**: a matrix–matrix product; **FLOPs**: floating-point operations (**TFLOPS**: 10¹² per second).
# * **bf16** (bfloat16): a 2-byte floating-point number format used for training on GPUs.
# * **SwiGLU**: the gated feed-forward network used as expert; **Mixtral-8x7B**: a published MoE language model.
# * **flat all-to-all**: every GPU sends one message to each of the other `P − 1` GPUs.
# * **hierarchical (2D) all-to-all**, called **2DH** by **Tutel** (Microsoft's MoE library, Hwang et al. 2023):
#   first exchange inside each node, then one message per pair of nodes.
# * **tensor parallelism (tp)**: several GPUs share each weight matrix; **data parallelism (dp)**: copies of the
#   model on different data; **TED**: DeepSpeed's combination of tensor, expert and data parallelism.
# * **duplicate token dropping**: in TED, each of the `tp` GPUs that hold the same tokens sends only `1/tp` of them.
# * **pipeline degree D**: the exchange is cut into `D` chunks so that communication overlaps computation
#   (as in **FasterMoE** and **FSMoE**, two MoE training systems).

# %%
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import ipywidgets as widgets
from IPython.display import display
from tqdm.auto import tqdm

from fastmoe_edu.distributed import cost_model, mpirun_command, torchrun_command

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
# (`fastmoe_edu/distributed/layout.py`). Every rank also reads its own slice of the batch (its
# **shard**), routes its own tokens with an identical copy of the router, and sends each token row
# to the rank of the chosen expert. The diagram uses the placement that the real runs below report
# back. (All ranks here are processes on this one machine; on a cluster each would be a GPU.)

# %%
def draw_placement(placement, num_experts, per_row=4):
    """placement: {rank: [global expert ids]} as reported by the ranks themselves; at most
    ``per_row`` ranks per row of boxes so that the labels stay readable for any P."""
    ranks = sorted(placement)
    rows_of_boxes = math.ceil(len(ranks) / per_row)
    most = max(len(v) for v in placement.values())
    box_h = 0.9 + 0.45 * most
    fig, ax = plt.subplots(figsize=(2.6 * min(per_row, len(ranks)) + 0.4, (box_h + 0.7) * rows_of_boxes + 0.6))
    cmap = plt.cm.tab10
    for r in ranks:
        col, row = r % per_row, r // per_row
        x0, y0 = col * 2.6, -row * (box_h + 0.7)
        ax.add_patch(plt.Rectangle((x0, y0), 2.3, box_h, fc="whitesmoke", ec="black"))
        ax.text(x0 + 1.15, y0 + box_h + 0.12, f"rank {r}", ha="center", fontsize=10)
        for i, g in enumerate(placement[r]):
            ax.add_patch(plt.Rectangle((x0 + 0.15, y0 + box_h - 0.5 - i * 0.45), 2.0, 0.38, fc=cmap(g % 10),
                                       alpha=0.8))
            ax.text(x0 + 1.15, y0 + box_h - 0.31 - i * 0.45, f"expert {g}", ha="center", va="center", fontsize=9)
        ax.text(x0 + 1.15, y0 + 0.15, f"tokens of shard {r}", ha="center", fontsize=8, style="italic")
    ax.set_xlim(-0.2, 2.6 * min(per_row, len(ranks)))
    ax.set_ylim(-(rows_of_boxes - 1) * (box_h + 0.7) - 0.2, box_h + 0.5)
    ax.set_aspect("equal")
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
# `E = 2·P`) and a fixed number of tokens per rank. The tokens are drawn around 4 "topics"
# (cluster centres), and 70 % of shard `r`'s tokens come from topic `r % 4`, like data shards with
# some locality. Whether that locality shows in the traffic depends on the *router*: the layer's
# router is freshly initialised (random weights), so it has no reason to send topic `r` to the
# experts that happen to live on rank `r`. To show the difference, each rank also routes its
# tokens once more with a router set by hand so that the experts of rank `r` score topic `r % 4`
# highest (what a router *could* learn if experts specialised by topic and were placed with the
# shards that use them). With more than 4 ranks, two ranks share each topic, so even then only part of
# a topic's tokens can stay on their own rank. Every rank writes its own report (`rank{r}.json`), which the notebook reads:
#
# * the placement (which global experts each rank holds),
# * `send[i][j]`: how many rows rank `i` sent to rank `j` in one routing decision, for the random
#   router (the timed runs) and for the hand-set router,
# * the time of one forward pass (the slowest rank) and the project's communication counters
#   (`layout.stats`: seconds and bytes inside the all-to-all).
#
# ✍️ Exercise: write the expert-parallel exchange (counts, rows out, regroup, rows back) through the project's `Communicator` in [ex08_expert_parallel.py](exercises/ex08_expert_parallel.py); `python -m tutorial.exercises.check 8` runs it on 2 ranks.

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

# The same global batch on every rank (same seed); rank r keeps its slice. 70 % of shard r's tokens
# come from topic r % 4.
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
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(steps):
        layout.world.barrier()
        start = time.perf_counter()
        layer(x)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        times.append(layout.world.allreduce_(elapsed, op="max").item())    # the slowest rank's time
# CPU seconds this rank got per second of the timed loop: about 1 when it had a core of its own (MPI
# busy-polls while it waits), less when other processes took turns on its core.
core_share = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)

def rows_to_each_rank():
    counts = layer.last_routing.tokens_per_expert            # rows this rank has for each global expert
    return counts.reshape(P, experts_per_rank).sum(dim=1).tolist()   # rows to each rank (its L experts)

send = rows_to_each_rank()
stats = layout.stats.as_dict()                # the timed runs' counters, before the extra pass below
# The hand-set router: expert g (on rank g // L) points at its rank's topic, so it scores those tokens highest.
with torch.no_grad():
    owner_topic = (torch.arange(E) // experts_per_rank) % 4
    layer.router.weight.copy_(topics[owner_topic] / topics[owner_topic].norm(dim=1, keepdim=True))
    layer(x)                                  # every rank takes part: the exchange is collective
send_aligned = rows_to_each_rank()

runner = layer.expert_runner                             # the layer's expert-parallel runner
times.sort()
report = {"rank": rank, "send_rows": send, "send_rows_aligned": send_aligned,
          "experts": list(range(runner.first_local_expert, runner.first_local_expert + runner.num_local_experts)),
          "stats": stats, "forward_seconds": times[len(times) // 2], "forward_seconds_all": times,
          "core_share": core_share}
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
            "samples": per_rank[0]["forward_seconds_all"],           # every timed forward (slowest rank's)
            "per_rank": per_rank, "launch_seconds": time.perf_counter() - started}

# %% [markdown]
# The launches: every rank count under mpirun, and two ranks under torchrun.

# %%
P_TORCH = 2
# Section 3 judges the timings against a model, so every size that fits the cores is launched more than
# once: a timing that moves between launches (the machine's other work) must be seen as noise, not as a
# verdict. The later launches only add timings to the first one's.
PROBE_LAUNCHES = 2 if QUICK else 3
probes = {}
launches = ([(P, mpirun_command) for P in RANK_COUNTS] + [(P_TORCH, torchrun_command)]
            + [(P, "repeat") for _ in range(PROBE_LAUNCHES - 1) for P in RANK_COUNTS if P <= CORES])
for P, launcher in tqdm(launches, desc="MoE layer launches"):
    load_before = os.getloadavg()[0]          # processes wanting a core (1-minute average), before the launch
    if launcher is mpirun_command:
        probes[P] = run_probe(P)
        probes[P].update(load_before=load_before, loads=[load_before], launch_samples=[probes[P]["samples"]],
                         launch_reports=[probes[P]["per_rank"]])
        print(f"mpirun -n {P}: E = {probes[P]['num_experts']} experts, one forward "
              f"{probes[P]['forward_seconds'] * 1e3:.1f} ms (slowest rank, median of {PROBE_STEPS}); "
              f"whole launch {probes[P]['launch_seconds']:.1f} s; load average before it {load_before:.1f}"
              + (f"  [{P} ranks on {CORES} cores: oversubscribed]" if P > CORES else ""))
    elif launcher == "repeat":
        again = run_probe(P)
        probes[P]["launch_samples"].append(again["samples"])
        probes[P]["launch_reports"].append(again["per_rank"])
        probes[P]["loads"].append(load_before)
        print(f"mpirun -n {P} again (launch {len(probes[P]['launch_samples'])}): one forward "
              f"{again['forward_seconds'] * 1e3:.1f} ms; load average before it {load_before:.1f}")
    else:
        on_torch = run_probe(P, launcher)

# %% [markdown]
# The same script under torchrun: `ParallelLayout()` now opens torch.distributed (gloo) instead of MPI.
# Routing happens before any communication, so the rows each rank sends, and the bytes the
# communicator counts, must be the same as under mpirun.

# %%
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
by_rank = sorted(show["per_rank"], key=lambda r: r["rank"])
traffic = np.array([r["send_rows"] for r in by_rank])
traffic_aligned = np.array([r["send_rows_aligned"] for r in by_rank])

draw_placement(placement, show["num_experts"])
plt.show()

fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
for ax, matrix, title in ((axes[0], traffic, "random (untrained) router"),
                          (axes[1], traffic_aligned, "router set so rank r's experts prefer topic r % 4")):
    im = ax.imshow(matrix, cmap="Blues", vmin=0)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=9 if P_SHOW <= 4 else 7,
                color="black" if value < matrix.max() * 0.6 else "white")
    ax.set(title=f"{title}\nP = {P_SHOW}: rows rank i → rank j", xlabel="to rank j", ylabel="from rank i",
           xticks=range(P_SHOW), yticks=range(P_SHOW))
    fig.colorbar(im, ax=ax, fraction=0.046)
plt.tight_layout()
plt.show()


def locality_sentence(matrix, label):
    share = np.trace(matrix) / matrix.sum()
    uniform = 1 / P_SHOW
    if share > 1.15 * uniform:
        verdict = "more local than uniform routing"
    elif share < uniform / 1.15:
        verdict = "less local than uniform routing"
    else:
        verdict = "about as local as uniform routing"
    return share, (f"{label}: {matrix.sum()} rows routed, {np.trace(matrix)} stay on their own rank ({share:.0%}); "
                   f"uniform routing would keep {uniform:.0%} → {verdict}")


local_share, text_random = locality_sentence(traffic, "random router")
local_share_aligned, text_aligned = locality_sentence(traffic_aligned, "hand-set router")
print(text_random)
print(text_aligned)
print("So the shards' topics alone do not make traffic local; the router must send a shard's topic to experts "
      "on the same rank. A trained router has no reason to do that unless experts are placed with that in mind.")
row_bytes = D_MODEL * 4                                       # float32 rows
print(f"busiest receiver (random router): rank {traffic.sum(0).argmax()} gets {traffic.sum(0).max()} rows "
      f"({traffic.sum(0).max() / traffic.sum(0).mean():.2f}× the mean): the all-to-all waits for it")
# One forward = two row exchanges: the global scatter sends row i of the matrix (minus the diagonal),
# the global gather sends column i back. Check that against the bytes MPI really moved.
off_diagonal = traffic - np.diag(np.diag(traffic))
expected_bytes = (off_diagonal.sum(1) + off_diagonal.sum(0)) * row_bytes
measured_bytes = np.array([r["stats"].get("expert/alltoallv", {}).get("bytes_sent", 0) / PROBE_STEPS for r in by_rank])
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
# benchmark `bench/bench_alltoall.py` times the exchange for 7 message sizes (8 B to 1 MiB per
# peer) under `mpirun -n P` (its `--worker` mode writes the points as JSON): each point is the
# **median** of several calls after two warm-up calls, with the **spread** of those calls. Its
# `fit_alpha_beta` fits α and β by **least squares** on the *relative* error (times span orders of
# magnitude). On this machine "ranks" are processes on one CPU and the "network" is shared memory,
# so the numbers describe this small setup, not a GPU cluster.
#
# **Which points the fit may use.** The model assumes every rank runs all the time on a processor
# of its own. That holds here only while `P ≤ ` the number of CPU cores (`os.cpu_count()`). So α
# and β are fitted only on such launches. With only `P = 2` available (a 2-core machine), the
# message sizes still determine both numbers (α is the intercept, β the slope), but α·(P−1) cannot
# then be told apart from a fixed cost per call; more cores add larger `P` to the fit. The
# benchmark is launched more than once, and α, β are also fitted per launch, to show how much they
# move between launches.
#
# **Oversubscription.** With more ranks than cores, the operating system **time-slices**: it runs
# the ranks in turns of a few milliseconds per core. An all-to-all finishes only when *every* rank
# has taken part, and a waiting MPI rank **busy-polls** (it keeps its core busy checking for the
# message), so it holds a core that the rank it waits for needs. One exchange can then cost whole
# scheduler time slices — milliseconds instead of microseconds. That is not latency or bandwidth of
# any link, so those points are measured and plotted *separately*, against what the fit predicts
# for them, and never used to fit α and β. On a real cluster each rank has its own GPU and CPU
# cores, so there is no time-slicing; instead α becomes the network's latency (microseconds per
# message), β its per-byte cost, and new effects appear that this machine cannot show: congestion of
# shared switches and links, and nodes that are slower than others.

# %%
spec = importlib.util.spec_from_file_location("bench_alltoall", ROOT / "bench" / "bench_alltoall.py")
bench_alltoall = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_alltoall)

FIT_RANKS = [P for P in RANK_COUNTS if 1 < P <= CORES] or [2]
OVERSUBSCRIBED_RANKS = [P for P in RANK_COUNTS if P > CORES]
if not OVERSUBSCRIBED_RANKS and 2 * CORES <= 8:
    OVERSUBSCRIBED_RANKS = [2 * CORES]        # QUICK: one small oversubscribed launch, to show the effect
FIT_LAUNCHES = 2 if QUICK else 3
BENCH_REPEATS = 5 if QUICK else 20
OVERSUBSCRIBED_REPEATS = 3 if QUICK else 5


def bench_launch(P, repeats, tag):
    out = WORK / f"bench_{P}_{tag}.json"
    cmd = mpirun_command(P, [str(ROOT / "bench" / "bench_alltoall.py"), "--worker", str(out),
                             "--repeats", str(repeats)])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=WORK)
    if done.returncode != 0:
        raise RuntimeError(f"bench mpirun -n {P} failed:\n{done.stderr[-3000:]}")
    return [{**p, "launch": tag} for p in json.loads(out.read_text())]


plan = [(P, BENCH_REPEATS, f"fit{i}") for i in range(FIT_LAUNCHES) for P in FIT_RANKS]
plan += [(P, OVERSUBSCRIBED_REPEATS, "over") for P in OVERSUBSCRIBED_RANKS]
bench_points = []
for P, repeats, tag in tqdm(plan, desc="all-to-all benchmark launches"):
    started = time.perf_counter()
    bench_points += bench_launch(P, repeats, tag)
    print(f"mpirun -n {P} ({'fit' if tag != 'over' else 'oversubscribed'}): {repeats} repeats × 7 sizes "
          f"in {time.perf_counter() - started:.1f} s")
fit_points = [p for p in bench_points if p["launch"] != "over"]
over_points = [p for p in bench_points if p["launch"] == "over"]

alpha, beta = bench_alltoall.fit_alpha_beta(fit_points)
per_launch = [bench_alltoall.fit_alpha_beta([p for p in fit_points if p["launch"] == f"fit{i}"])
              for i in range(FIT_LAUNCHES)]
alphas, betas = np.array([a for a, _ in per_launch]), np.array([b for _, b in per_launch])
print(f"fit over {len(fit_points)} points (P = {FIT_RANKS}, {FIT_LAUNCHES} launches, each point the median of "
      f"{BENCH_REPEATS} calls): α = {alpha * 1e6:.1f} µs per peer, β = {beta * 1e9:.3f} ns/byte "
      f"(1/β = {1 / beta / 1e9 if beta > 0 else float('nan'):.2f} GB/s)")
print(f"fitted per launch: α from {alphas.min() * 1e6:.1f} to {alphas.max() * 1e6:.1f} µs, "
      f"β from {betas.min() * 1e9:.3f} to {betas.max() * 1e9:.3f} ns/byte")

# %% [markdown]
# The fitted line α·(P − 1) + β·bytes against every measured point, and how well it fits.

# %%
def predicted(p):
    return alpha * (p["ranks"] - 1) + beta * p["bytes_per_rank"]


fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
ax = axes[0]
for i in range(FIT_LAUNCHES):
    for P in FIT_RANKS:
        pts = [p for p in fit_points if p["ranks"] == P and p["launch"] == f"fit{i}"]
        b = np.array([p["bytes_per_rank"] for p in pts]) * (1 + 0.06 * i)      # nudged apart to see the bars
        med = np.array([p["seconds"] for p in pts]) * 1e6
        low = med - np.array([p["seconds_q25"] for p in pts]) * 1e6
        high = np.array([p["seconds_q75"] for p in pts]) * 1e6 - med
        ax.errorbar(b, med, yerr=[low, high], fmt="o", ms=4, capsize=2, label=f"P={P}, launch {i + 1}")
for P in FIT_RANKS:
    grid = np.logspace(np.log10(min(p["bytes_per_rank"] for p in fit_points)),
                       np.log10(max(p["bytes_per_rank"] for p in fit_points)), 50)
    ax.plot(grid, (alpha * (P - 1) + beta * grid) * 1e6, "k-", alpha=0.6, lw=1)
ax.set(xscale="log", yscale="log", xlabel="bytes sent per rank", ylabel="all-to-all time (µs)",
       title=f"fit region (P ≤ {CORES} cores): median, bars = middle half of the calls\nline: α·(P−1) + β·bytes")
ax.legend(fontsize=7)
ax = axes[1]
for P in sorted({p["ranks"] for p in bench_points}):
    pts = [p for p in bench_points if p["ranks"] == P]
    ratio = [p["seconds"] / predicted(p) for p in pts]
    over = P > CORES
    ax.plot([p["bytes_per_peer"] for p in pts], ratio, "o--" if over else "o", mfc="none" if over else None,
            label=f"P={P}" + (f" (oversubscribed: {P} ranks on {CORES} cores)" if over else " (fitted)"))
ax.axhline(1, color="grey", ls=":")
ax.set(xscale="log", yscale="log", xlabel="bytes per peer", ylabel="measured / fitted model",
       title="every launch against the fit: oversubscribed points are not used by it")
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

fit_errors = [abs(predicted(p) - p["seconds"]) / p["seconds"] for p in fit_points]
worst_point = fit_points[int(np.argmax(fit_errors))]
print(f"fit quality on the points it was fitted on: median relative error {np.median(fit_errors):.0%}, "
      f"worst {max(fit_errors):.0%} (P = {worst_point['ranks']}, {worst_point['bytes_per_peer']:,} bytes per peer, "
      f"launch {int(worst_point['launch'][3:]) + 1}: measured {worst_point['seconds'] * 1e6:.0f} µs, "
      f"middle half of its calls {worst_point['seconds_q25'] * 1e6:.0f}–{worst_point['seconds_q75'] * 1e6:.0f} µs)")
spreads = [(p["seconds_q75"] - p["seconds_q25"]) / p["seconds"] for p in fit_points]
print(f"spread of the calls behind each point (middle half, relative to the median): median {np.median(spreads):.0%}, "
      f"largest {max(spreads):.0%}")
for P in OVERSUBSCRIBED_RANKS:
    ratios = [p["seconds"] / predicted(p) for p in over_points if p["ranks"] == P]
    print(f"P = {P} on {CORES} cores (oversubscribed, {OVERSUBSCRIBED_REPEATS} repeats): measured is "
          f"{min(ratios):.1f}× to {max(ratios):.1f}× the fitted model's time — time-slicing, not α or β")

# %% [markdown]
# **A harder test: the MoE layer.** The benchmark fits α and β on its own clean exchange (every
# call starts right after a barrier, the same bytes to every peer). Does the model also predict a
# different program, the expert-parallel MoE layer of section 2? From `α`, `β` and the `P = 1` run
# alone it predicts one forward pass at `P` ranks as the compute of one rank (measured at `P = 1`;
# weak scaling keeps tokens and experts per rank fixed) plus two all-to-alls (scatter and gather) of
# the bytes that rank really sent:
#
# $$t_{\text{forward}}(P) \approx t_{\text{forward}}(1) + 2\,[\alpha\,(P-1) + \beta \cdot \text{bytes}(P)]$$
#
# The table says, per row, whether the prediction holds (within 1.5×), and if not, which part
# missed: the time inside the layer's all-to-all (measured by the communicator) or the rest of the
# forward pass. Rows with more ranks than cores are labelled *oversubscribed*: the model does not
# apply there (see above), so they are no test of it. `P = 1` is the model's input, not a test.
#
# **Noise.** On a shared machine a timing moves with whatever else runs (an earlier run of this
# notebook judged `P = 2` "DISAGREE 11.9×" at a load average of 4.5 and "agrees 1.33×" at 2.1). So
# every `P` that fits the cores was launched more than once (section 2), and a verdict uses the
# **spread**: measured/model is computed from the middle half of all timed forwards (25th to 75th
# percentile), against a model made from the middle half of the `P = 1` timings and the α, β of each
# benchmark launch. Only when that whole range lies inside 1.5× does a row "agree", only when it lies
# wholly outside does it "DISAGREE"; a range that crosses the bound is reported as **too noisy to
# judge** (rerun the notebook when the machine is quieter). Each rank also measured the **share of a
# core** it got while it was timed (CPU seconds per second; MPI busy-polls while it waits, so about
# 100 % when the core is its own). A share well below 100 % means other processes took turns on the
# ranks' cores: that, not α or β, is what makes a verdict change with the machine's load, and the
# printout says so when it happened.

# %%
TOLERANCE = 1.5


def quartiles(launch_samples):
    """25th percentile, median, 75th percentile of the timed forwards of all launches together."""
    return tuple(float(q) for q in np.percentile([t for launch in launch_samples for t in launch], [25, 50, 75]))


def alltoall_counters(reports):
    """One launch's all-to-all counters: seconds (the rank that spent longest in it), calls, bytes per call."""
    a2a = [r["stats"].get("expert/alltoallv", {"calls": 0, "seconds": 0.0, "bytes_sent": 0}) for r in reports]
    calls = max(c["calls"] for c in a2a) or 1
    return max(c["seconds"] for c in a2a), calls, max(c["bytes_sent"] for c in a2a) / calls


def mean_forward(run):
    return float(np.mean([t for launch in run["launch_samples"] for t in launch]))

# %% [markdown]
# The model's prediction for each P beside the measurement, from every launch's counters together.

# %%
base_low, base_forward, base_high = quartiles(probes[1]["launch_samples"])
base_mean = mean_forward(probes[1])
rows_pred = []
for P, run in probes.items():
    # Where the time went, from every launch's counters together: all-to-all seconds per call and per
    # forward, as means, against the mean forward of the same launches (so the rest cannot come out negative).
    counters = [alltoall_counters(reports) for reports in run["launch_reports"]]
    a2a_seconds, calls = sum(c[0] for c in counters), sum(c[1] for c in counters)
    bytes_per_call = counters[0][2]                          # routing is the same in every launch
    measured_a2a = a2a_seconds / calls
    forward_mean = mean_forward(run)
    a2a_per_forward = a2a_seconds / sum(len(samples) for samples in run["launch_samples"])
    core_shares = [r["core_share"] for reports in run["launch_reports"] for r in reports]

    def model(alpha_, beta_, base_):
        return base_ + (2 * (alpha_ * (P - 1) + beta_ * bytes_per_call) if P > 1 else 0.0)

    low, measured, high = quartiles(run["launch_samples"])
    predicted_a2a = alpha * (P - 1) + beta * bytes_per_call if P > 1 else 0.0
    predicted_fwd = model(alpha, beta, base_forward)
    ratio = measured / predicted_fwd
    # The range the noise allows: slow measured forwards against the fastest model, fast ones against the slowest.
    fastest = model(min(alpha, alphas.min()), min(beta, betas.min()), base_low)
    slowest = model(max(alpha, alphas.max()), max(beta, betas.max()), base_high)
    ratio_range = (low / slowest, high / fastest)
    if P == 1:
        verdict = "model input"
    elif P > CORES:
        verdict = "oversubscribed"
    elif 1 / TOLERANCE <= ratio_range[0] and ratio_range[1] <= TOLERANCE:
        verdict = "agrees"
    elif ratio_range[1] < 1 / TOLERANCE or ratio_range[0] > TOLERANCE:
        verdict = "DISAGREE"
    else:
        verdict = "too noisy to judge"
    rows_pred.append({"P": P, "bytes": bytes_per_call, "a2a_measured": measured_a2a, "a2a_predicted": predicted_a2a,
                      "forward_measured": measured, "forward_spread": (low, high), "forward_predicted": predicted_fwd,
                      "forward_mean": forward_mean, "rest_measured": forward_mean - a2a_per_forward,
                      "core_share": (min(core_shares), max(core_shares)),
                      "launches": len(run["launch_samples"]), "loads": run["loads"],
                      "launch_medians": [float(np.median(t)) for t in run["launch_samples"]],
                      "ratio": ratio, "ratio_range": ratio_range, "verdict": verdict})

print(f"{'P':>3}{'bytes/call':>12}{'a2a meas.':>11}{'a2a model':>11}{'fwd meas.':>11}{'fwd model':>11}"
      f"{'meas/model':>12}{'(its spread)':>15}{'launches':>10}  verdict")
for r in rows_pred:
    print(f"{r['P']:>3}{r['bytes']:>12,.0f}{r['a2a_measured'] * 1e3:>9.2f}ms{r['a2a_predicted'] * 1e3:>9.2f}ms"
          f"{r['forward_measured'] * 1e3:>9.2f}ms{r['forward_predicted'] * 1e3:>9.2f}ms{r['ratio']:>12.2f}"
          f"{r['ratio_range'][0]:>8.2f}–{r['ratio_range'][1]:<6.2f}{r['launches']:>10}  {r['verdict']}")

# %% [markdown]
# The same numbers as a plot.

# %%
fig, ax = plt.subplots(figsize=(9.5, 3.8))
Ps = [r["P"] for r in rows_pred]
ax.errorbar(Ps, [r["forward_measured"] * 1e3 for r in rows_pred], fmt="o-", capsize=3,
            yerr=np.abs(np.array([[r["forward_spread"][0], r["forward_spread"][1]] for r in rows_pred]).T
                        - [r["forward_measured"] for r in rows_pred]) * 1e3,
            label="measured forward (median; bars: middle half)")
ax.plot(Ps, [r["forward_predicted"] * 1e3 for r in rows_pred], "s--", label="model: t(1) + 2·(α(P−1) + β·bytes)")
if max(Ps) > CORES:
    ax.axvspan(CORES * 1.25, max(Ps) * 1.3, color="tab:red", alpha=0.08, label=f"oversubscribed (> {CORES} cores)")
ax.set(xscale="log", xticks=Ps, xticklabels=Ps, xlabel="ranks P", ylabel="ms per forward",
       title="weak scaling of one expert-parallel MoE layer")
ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)    # beside the data
plt.tight_layout()
plt.show()

# %% [markdown]
# What each row says, in words computed from the numbers (not written by hand), wrapped to the page.

# %%
def say(text):
    print(textwrap.fill(text, width=110, subsequent_indent="    ", break_on_hyphens=False))


for r in rows_pred:
    if r["verdict"] == "model input":
        continue
    if r["verdict"] == "oversubscribed":
        say(f"P={r['P']}: oversubscribed ({r['P']} ranks on {CORES} cores, each rank had {r['core_share'][0]:.0%}–"
            f"{r['core_share'][1]:.0%} of a core) — measured {r['ratio']:.1f}× the model; time-slicing makes ranks "
            "wait for each other, which the model does not describe. Not a test of it.")
        continue
    launches_text = (f"{r['launches']} launches, medians " + ", ".join(f"{m * 1e3:.1f}" for m in r["launch_medians"])
                     + " ms, load averages before them " + ", ".join(f"{x:.1f}" for x in r["loads"])
                     + f"; each rank had {r['core_share'][0]:.0%}–{r['core_share'][1]:.0%} of a core while timed")
    crowded = r["core_share"][0] < 0.9
    crowded_text = (f" The ranks did not have their cores to themselves (as little as {r['core_share'][0]:.0%} of "
                    "one): other processes slowed them, and the all-to-all waits for the slowest rank, so on a "
                    "quieter machine this verdict can change." if crowded else "")
    if r["verdict"] == "agrees":
        say(f"P={r['P']}: the model holds within {TOLERANCE}× (measured/model = {r['ratio']:.2f}, "
            f"{r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f} over the spread; {launches_text}).")
        continue
    if r["verdict"] == "too noisy to judge":
        say(f"P={r['P']}: too noisy to judge — measured/model = {r['ratio']:.2f}, but the spread of the timings "
            f"allows anything from {r['ratio_range'][0]:.2f} to {r['ratio_range'][1]:.2f}, across the "
            f"{TOLERANCE}× bound ({launches_text}; this machine has {CORES} cores). Rerun when it is quieter."
            + crowded_text)
        continue
    word = "slower" if r["ratio"] > 1 else "faster"
    a2a_factor = r["a2a_measured"] / max(r["a2a_predicted"], 1e-12)
    rest_factor = r["rest_measured"] / base_mean
    say(f"P={r['P']}: DISAGREE — measured is {max(r['ratio'], 1 / r['ratio']):.1f}× {word} than the model. "
        f"Where the time went (means over all launches: {r['forward_mean'] * 1e3:.1f} ms per forward): each "
        f"all-to-all inside the layer took {r['a2a_measured'] * 1e3:.2f} ms, {a2a_factor:.1f}× the benchmark's "
        f"prediction (the benchmark starts every call after a barrier; in the layer the ranks arrive at "
        f"different times and the call's time includes waiting for the last one), and the rest of the forward "
        f"pass {r['rest_measured'] * 1e3:.1f} ms, {rest_factor:.1f}× the P = 1 forward. Candidates the model "
        f"leaves out: the layer also exchanges the row counts and re-sorts the received rows by local expert "
        f"and back (distributed/expert_parallel.py), and with {r['P']} ranks on {CORES} cores any other process "
        f"competes with them ({launches_text}; the verdict holds over the whole spread, "
        f"{r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f}).{crowded_text}")

# %% [markdown]
# ## 4. From 8 to thousands of GPUs: a cost model with cluster numbers
#
# The same formula, with the numbers of a GPU cluster instead of this CPU, predicts where the time
# of a training step goes as the cluster grows. A cluster is made of **nodes** (machines) of 8 GPUs;
# the GPUs of a node talk over **NVLink** (fast links inside a node), nodes talk over the
# **network** (slower). Assumptions (all in the cell below, change them):
#
# * **Workload** (sized like Mixtral-8x7B, a published MoE language model): `d_model = 4096`, expert
#   hidden `14336` (SwiGLU), `top_k = 2`, 32 layers, 4096 tokens per GPU per step, stored in **bf16**
#   (bfloat16, 2 bytes per number).
# * **Weak scaling** as in FastMoE: `experts_per_gpu` experts per GPU, so `E = P · experts_per_gpu`
#   grows with the cluster while each GPU's tokens stay the same.
# * **Compute** per GPU: 3 × (forward FLOPs) for forward + backward, at an effective `GPU_TFLOPS`. An
#   expert's matrix product (**GEMM**) gets less efficient when it has few rows
#   (`efficiency = rows / (rows + 128)`, an assumption), which is how `experts_per_gpu` enters.
# * **Communication**: 4 all-to-alls per MoE layer per step (dispatch and combine, forward and
#   backward), each of a buffer of `B = T·k·d·2` bytes per GPU, of which `(P−1)/P` leaves the GPU.
#   Nothing overlaps (an upper bound; FasterMoE and FSMoE, two MoE training systems, overlap some of
#   it). Gradient all-reduce of the dense weights is left out.
# * The all-to-all's price is the project's cost model's, `cost_model.alltoall_time` (the explorer
#   calls it; the cell after the explorer checks the formulas below against it), with `G = 8` GPUs
#   per node and `N = P/G` nodes:
#   * **one node** (`P = 8`): both algorithms are the same, `α_link·(P−1) + β_link·B·(P−1)/P`;
#   * **flat all-to-all**: every GPU sends `P − 1` messages, so
#     `α_net·(P−1) + β_link·B·(G−1)/P + β_net·B·(P−G)/P` — the on-node share over NVLink, the
#     off-node share over the network, one after the other (the model adds them; a GPU that drives
#     both links at once would do better, up to the larger of the two terms);
#   * **hierarchical (2D) all-to-all** — Tutel (Microsoft's MoE library) calls it **2DH**: first an
#     all-to-all inside each node (`α_link·(G−1) + β_link·B·(G−1)/G`, over NVLink), then one message
#     per *node* pair, `α_net·(N−1) + β_net·B·(N−1)/N`. Fewer, bigger messages, but most bytes
#     travel twice: it pays when the latency `α_net·(P−1)` dominates, i.e. at large `P`.
#
# The **network** control switches between typical cluster numbers and the α, β just measured on
# this machine. In "measured here" mode there is only one kind of link (this machine's shared
# memory), so the same α and β price both levels (`α_link = α_net = α`, `β_link = β_net = β`): the
# flat all-to-all pays `α·(P−1) + β·B·(P−1)/P`, and the **net GB/s** slider does not apply — it is
# disabled in that mode. In cluster mode the slider goes up to the NVLink speed (300 GB/s): a network
# faster than NVLink is not a cluster anyone builds. The legend says, from the plotted numbers, at
# which `P` each algorithm is the faster one.

# %%
WORKLOAD = dict(d_model=4096, d_ff=14336, top_k=2, n_layers=32, tokens_per_gpu=4096, seq_len=4096,
                bytes_per_element=2)
CLUSTER = dict(gpus_per_node=8, alpha_net=10e-6, alpha_link=2e-6, link_GBps=300.0, GPU_TFLOPS=400.0,
               rows_half_efficiency=128)
GPU_COUNTS = [8 * 2 ** i for i in range(10)]              # 8 ... 4096


def explorer_hardware(bandwidth_GBps, network="cluster", c=CLUSTER) -> cost_model.Hardware:
    """The machine the explorer prices: cluster numbers, or this machine's measured α, β on both levels."""
    if network == "cluster":
        links = dict(alpha_intra=c["alpha_link"], beta_intra=1 / (c["link_GBps"] * 1e9),
                     alpha_inter=c["alpha_net"], beta_inter=1 / (bandwidth_GBps * 1e9))
    else:                                                    # one shared link: the same α, β inside and between nodes
        links = dict(alpha_intra=alpha, beta_intra=beta, alpha_inter=alpha, beta_inter=beta)
    return cost_model.Hardware(**links, flops_per_second=c["GPU_TFLOPS"] * 1e12, ranks_per_node=c["gpus_per_node"])

# %% [markdown]
# The cost of one step: the experts' compute plus the flat or the hierarchical all-to-all (the same
# formulas as `fastmoe_edu/distributed/cost_model.py`).

# %%
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
    # one all-to-all of a buffer of B bytes per GPU, priced by the project's cost model
    buffer = T * k * d * w["bytes_per_element"]
    hw = explorer_hardware(bandwidth_GBps, network, c)
    flat = cost_model.alltoall_time(buffer, P, 1, hw, hierarchical=False)
    hier = cost_model.alltoall_time(buffer, P, 1, hw, hierarchical=True)
    per_step = 4 * L
    return {"compute": compute, "flat": per_step * flat, "hier": per_step * hier,
            "bytes_per_a2a": buffer * (P - 1) / P}                # the bytes that leave the GPU


def who_is_faster(flat, hier, gpus=GPU_COUNTS):
    """Per P: "flat", "hierarchical" or "equal" (within 0.1 %), and that as text by ranges of P."""
    winners = ["equal" if abs(f - h) <= 1e-3 * max(f, h) else "hierarchical" if h < f else "flat"
               for f, h in zip(flat, hier)]
    runs = []                                                # [winner, first P, last P] of consecutive sizes
    for P, winner in zip(gpus, winners):
        if runs and runs[-1][0] == winner:
            runs[-1][2] = P
        else:
            runs.append([winner, P, P])
    text = "; ".join(("the same" if winner == "equal" else f"{winner} faster")
                     + (f" at P = {first}" if first == last else f" at P = {first}–{last}")
                     for winner, first, last in runs)
    return winners, text

# %% [markdown]
# The explorer's drawing function: one call per change of a control.

# %%
def redraw_cost(gpus=256, bandwidth_GBps=50.0, experts_per_gpu=2, network="cluster", show=True):
    """Plot step time over cluster sizes and the split at ``gpus``; return the plotted numbers."""
    curve = [step_time(P, bandwidth_GBps, experts_per_gpu, network) for P in GPU_COUNTS]
    compute = np.array([c["compute"] for c in curve])
    flat = np.array([c["flat"] for c in curve])
    hier = np.array([c["hier"] for c in curve])
    here = step_time(gpus, bandwidth_GBps, experts_per_gpu, network)
    winners, winners_text = who_is_faster(flat, hier)
    # The crossover: the smallest P from which hierarchical is faster at every larger P on the plot.
    tail = [P for i, P in enumerate(GPU_COUNTS) if all(w == "hierarchical" for w in winners[i:])]
    crossover = tail[0] if tail else None
    if network == "cluster":
        net_text = f"network {bandwidth_GBps:.3g} GB/s per GPU (cluster numbers)"
    else:
        net_text = f"measured here: α = {alpha * 1e6:.1f} µs, 1/β = {1 / beta / 1e9:.2f} GB/s, one shared link"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [1.6, 1]})
    ax = axes[0]
    ax.plot(GPU_COUNTS, (compute + flat) * 1e3, "o-", label="step, flat all-to-all")
    ax.plot(GPU_COUNTS, (compute + hier) * 1e3, "s-", label="step, hierarchical all-to-all")
    ax.plot(GPU_COUNTS, compute * 1e3, "k--", label="compute only")
    ax.axvline(gpus, color="grey", ls=":")
    for i, (P, winner) in enumerate(zip(GPU_COUNTS, winners)):     # shade the sizes where hierarchical is faster
        if winner == "hierarchical":
            ax.axvspan(P / 2 ** 0.5, P * 2 ** 0.5, color="tab:green", alpha=0.1, lw=0,
                       label="hierarchical is faster here" if "hierarchical" not in winners[:i] else None)
    ax.set(xscale="log", yscale="log", xlabel="GPUs P", ylabel="ms per step",
           title=f"{experts_per_gpu} experts/GPU; {net_text}\n{winners_text}")
    ax.set_xticks(GPU_COUNTS, [str(P) for P in GPU_COUNTS])
    ax.set_xlim(GPU_COUNTS[0] / 1.5, GPU_COUNTS[-1] * 1.5)
    ax.legend(fontsize=8)
    ax = axes[1]
    names = ["flat", "hierarchical"]
    comm = [here["flat"], here["hier"]]
    ax.bar(names, [here["compute"] * 1e3] * 2, color="tab:blue", label="compute")
    ax.bar(names, np.array(comm) * 1e3, bottom=here["compute"] * 1e3, color="tab:red", label="all-to-all")
    for i, cm in enumerate(comm):
        share = cm / (cm + here["compute"])
        ax.text(i, (here["compute"] + cm) * 1e3, f"{share:.0%} comm.", ha="center", va="bottom")
    ax.set(ylabel="ms per step", title=f"P = {gpus}: compute vs communication",
           ylim=(0, 1.3 * (here["compute"] + max(comm)) * 1e3))            # room for the labels and the legend
    ax.legend(fontsize=8, loc="upper center", ncol=2, frameon=False)
    plt.tight_layout()
    plt.show() if show else plt.close(fig)
    return {"gpus": GPU_COUNTS, "compute": compute, "flat": flat, "hier": hier, "crossover": crossover,
            "winners": winners, "winners_text": winners_text, "at_gpus": here, "comm_share_flat": here["flat"] / (here["flat"] + here["compute"]),
            "comm_share_hier": here["hier"] / (here["hier"] + here["compute"])}

# %% [markdown]
# The controls.

# %%
bandwidth_slider = widgets.FloatLogSlider(value=50, base=10, min=0.5, max=math.log10(CLUSTER["link_GBps"]), step=0.1,
                                          description="net GB/s", continuous_update=False)
network_menu = widgets.Dropdown(options=["cluster", "measured here"], value="cluster", description="network")


def bandwidth_applies(change):
    """The bandwidth slider only means something with cluster numbers: grey it out otherwise."""
    bandwidth_slider.disabled = change["new"] != "cluster"


network_menu.observe(bandwidth_applies, names="value")
cost_explorer = widgets.interactive(
    redraw_cost,
    gpus=widgets.SelectionSlider(options=GPU_COUNTS, value=256, description="GPUs", continuous_update=False),
    bandwidth_GBps=bandwidth_slider,
    experts_per_gpu=widgets.IntSlider(value=2, min=1, max=16, description="experts/GPU", continuous_update=False),
    network=network_menu,
    show=widgets.fixed(True),
)
for control in cost_explorer.children[:-1]:               # labels wide enough for "experts/GPU"
    control.style.description_width = "90px"
display(cost_explorer)

# %% [markdown]
# What the model says, computed for the default cluster numbers (the widget's starting point), and
# how it compares with what Tutel's authors measured on real clusters:

# %%
default = redraw_cost(show=False)
for P in (8, 64, 512, 4096):
    i = GPU_COUNTS.index(P)
    total_flat, total_hier = default["compute"][i] + default["flat"][i], default["compute"][i] + default["hier"][i]
    print(f"P={P:>5}: compute {default['compute'][i] * 1e3:7.1f} ms | flat: step {total_flat * 1e3:7.1f} ms, "
          f"{default['flat'][i] / total_flat:4.0%} comm | hierarchical: step {total_hier * 1e3:7.1f} ms, "
          f"{default['hier'][i] / total_hier:4.0%} comm")
print(f"who is faster: {default['winners_text']}")
print(f"hierarchical all-to-all beats the flat one from P = {default['crossover']} GPUs on" if default["crossover"]
      else "hierarchical all-to-all does not stay ahead of the flat one up to the largest P plotted")
# Tutel (Hwang et al. 2023, arXiv 2206.03382; docs/moe_systems.md §4.3): 2DH beats the flat all-to-all
# only above a few hundred GPUs.
TUTEL_CROSSOVER = 256
if default["crossover"] is not None and default["crossover"] < TUTEL_CROSSOVER / 2:
    print("DISAGREE with Tutel's measurements (crossover at a few hundred GPUs): this model is too kind to the "
          "hierarchical algorithm. It charges nothing for 2DH's extra local re-layout copies, it charges the "
          "flat all-to-all the full latency α for each of its P−1 messages one after another, where real "
          "libraries keep many messages in flight, and it adds the flat all-to-all's NVLink and network times "
          "where a GPU can drive both links at once.")
elif default["crossover"] is None or default["crossover"] > 2 * TUTEL_CROSSOVER:
    print("DISAGREE with Tutel's measurements (crossover at a few hundred GPUs): this model favours the flat "
          "all-to-all more than real clusters do.")
else:
    print("This agrees with Tutel's report of a crossover at a few hundred GPUs.")
last = GPU_COUNTS[-1]
print(f"at P = {last}: hierarchical is {default['flat'][-1] / default['hier'][-1]:.1f}× faster in communication; "
      f"the flat all-to-all's latency term alone is {CLUSTER['alpha_net'] * (last - 1) * 4 * WORKLOAD['n_layers'] * 1e3:.0f} ms per step")

# %% [markdown]
# The explorer prices the all-to-all with `fastmoe_edu/distributed/cost_model.py`, the project's
# fuller cost model (tensor, expert and data parallelism, token dropping, pipelining, gradient
# all-reduce). The formulas in the text above are written out once more below and compared with it
# for every cluster size, in both network modes (the differences are computed, not assumed):

# %%
def written_out(B, P, hw, hierarchical):
    """One all-to-all as the text above writes it (G GPUs per node, N = P / G nodes)."""
    G = min(hw.ranks_per_node, P)
    N = P // G
    if N == 1:                                               # one node: flat and hierarchical are the same
        return hw.alpha_intra * (P - 1) + hw.beta_intra * B * (P - 1) / P
    if not hierarchical:
        return hw.alpha_inter * (P - 1) + hw.beta_intra * B * (G - 1) / P + hw.beta_inter * B * (P - G) / P
    return (hw.alpha_intra * (G - 1) + hw.beta_intra * B * (G - 1) / G
            + hw.alpha_inter * (N - 1) + hw.beta_inter * B * (N - 1) / N)


hardware = explorer_hardware(50.0)                         # the cluster at the explorer's starting point
buffer_bytes = WORKLOAD["tokens_per_gpu"] * WORKLOAD["top_k"] * WORKLOAD["d_model"] * WORKLOAD["bytes_per_element"]
formula_gap = 0.0
for network in ("cluster", "measured here"):
    hw = explorer_hardware(50.0, network)
    for P in GPU_COUNTS:
        for hierarchical in (False, True):
            ours = written_out(buffer_bytes, P, hw, hierarchical)
            theirs = cost_model.alltoall_time(buffer_bytes, P, 1, hw, hierarchical)
            formula_gap = max(formula_gap, abs(ours / theirs - 1))
print(f"the text's formulas vs cost_model.alltoall_time, P = {GPU_COUNTS[0]}..{GPU_COUNTS[-1]}, flat and "
      f"hierarchical, both networks: largest relative difference {formula_gap:.1e}")
for network in ("cluster", "measured here"):
    at_8 = redraw_cost(gpus=8, network=network, show=False)
    print(f"{network}: P = 8 is one node, flat {at_8['flat'][0] * 1e3:.2f} ms = hierarchical "
          f"{at_8['hier'][0] * 1e3:.2f} ms per step; {at_8['winners_text']}")

# %% [markdown]
# ### Tensor × expert × data parallelism, duplicate token dropping and pipelining
#
# Large MoE models combine three ways of splitting the work, which DeepSpeed calls **TED**:
# **t**ensor parallelism (`tp` GPUs share each weight matrix of the dense layers and so hold the
# same tokens), **e**xpert parallelism (`ep`, as above) and **d**ata parallelism (`dp` copies on
# different data). `cost_model.predict_step` prices a whole training step for such a layout
# (`Layout(tp, ep, dp, drop_duplicate_tokens, hierarchical, pipeline_degree)`), the same switches as
# the training config's `[parallel]` section. Below, the workload of this section (with
# `experts_per_gpu` experts per expert-parallel rank) on the cluster above, for six variants:
#
# * `tp1 flat` / `tp1 hier`: pure expert parallelism, flat or hierarchical all-to-all;
# * `tp4`: groups of 4 GPUs of a node share the non-expert matrices. Without dropping, all 4 send
#   the same rows through their own all-to-alls (and, in this code, compute the same expert rows);
# * `tp4 drop` (**duplicate token dropping**): each tp rank sends its 1/4 of the rows and the group
#   all-gathers after the exchange;
# * `tp4 drop hier`: plus the hierarchical exchange;
# * `tp4 drop best D`: the flat exchange cut into `D` chunks (the **pipeline degree**), so that one
#   chunk's exchange overlaps another chunk's expert compute; `D` is chosen by the model
#   (`choose_pipeline_degree` tries every `D` from 1 to a search bound and keeps the fastest, the
#   way FSMoE picks it). The printout says when the best `D` sits at the search bound (then a
#   larger `D` might be better still).
#
# ✍️ Exercise: write TED's duplicate token dropping (my share, the all-gather, and both backwards) in [ex09_ted.py](exercises/ex09_ted.py); `python -m tutorial.exercises.check 9` runs it on 2 ranks.

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
MAX_DEGREE = 64                                           # the search bound for D
ted_steps = {name: [] for name in [*TED_VARIANTS, "tp4 drop best D"]}
best_degrees = []
for P in GPU_COUNTS:                                      # fast: the cost model only
    for name, make_layout in TED_VARIANTS.items():
        layout = make_layout(P)
        ted_steps[name].append(cost_model.predict_step(ted_shape(layout.ep), layout, hardware)["total"])
    dropping = TED_VARIANTS["tp4 drop"](P)
    best = cost_model.choose_pipeline_degree(ted_shape(dropping.ep), dropping, hardware, max_degree=MAX_DEGREE)
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
DEGREES = list(range(1, 25))
for P in (8, 64, 512):
    layout = TED_VARIANTS["tp4 drop"](P)
    times = [cost_model.predict_step(ted_shape(layout.ep), dataclasses.replace(layout, pipeline_degree=D),
                                     hardware)["total"] * 1e3 for D in DEGREES]
    ax_degree.plot(DEGREES, times, "o-", ms=3, label=f"{P} GPUs (tp4, drop)")
ax_degree.set(xlabel="pipeline degree D (chunks of the all-to-all)", ylabel="predicted ms per step",
              title="Overlapping the exchange: more chunks, more messages")
ax_degree.legend()
plt.tight_layout()
plt.show()

for i, P in enumerate(GPU_COUNTS):
    if P in (8, 64, 512, 4096):
        bound_note = ""
        if best_degrees[i] == MAX_DEGREE:                  # how much is still moving at the bound?
            dropping = TED_VARIANTS["tp4 drop"](P)
            half = cost_model.predict_step(ted_shape(dropping.ep), dataclasses.replace(dropping, pipeline_degree=MAX_DEGREE // 2),
                                           hardware)["total"]
            bound_note = (f" (at the search bound: a larger D may be faster still, but going from D = {MAX_DEGREE // 2} "
                          f"to {MAX_DEGREE} gained only {1 - ted_steps['tp4 drop best D'][i] / half:.2%})")
        print(f"P={P:5d}: tp4 without dropping {ted_steps['tp4'][i] * 1e3:8.0f} ms, with {ted_steps['tp4 drop'][i] * 1e3:8.0f} ms "
              f"({ted_steps['tp4'][i] / ted_steps['tp4 drop'][i]:.2f}×); best D = {best_degrees[i]:2d}{bound_note} → "
              f"{ted_steps['tp4 drop best D'][i] * 1e3:8.0f} ms; hierarchical + drop {ted_steps['tp4 drop hier'][i] * 1e3:8.0f} ms")
at_bound = [P for P, D in zip(GPU_COUNTS, best_degrees) if D == MAX_DEGREE]
print("best D reached the search bound at P = " + ", ".join(map(str, at_bound)) if at_bound
      else f"best D is inside the search range 1..{MAX_DEGREE} for every P")

# %% [markdown]
# What to read from it (the printed numbers are computed above, the reasons are the model's terms):
# duplicate token dropping removes the tp-fold copies of the exchanged rows, so its gain is largest
# where the all-to-all and the expert rows dominate; pipelining hides the exchange behind expert
# compute only while each chunk's extra `(P − 1)·α` is small, so the best `D` falls as the cluster
# grows; the hierarchical exchange replaces the `P − 1` network messages by `N − 1`. That these
# switches keep the results unchanged is tested on up to 8 ranks under both engines, MPI and
# torch.distributed (`tests/test_ted.py`, `tests/test_distributed_training.py`); that dropping sends
# exactly 1/tp of the bytes is counted by the communicators (`docs/parallelism.md` §4).

# %% [markdown]
# How much to trust it: the model knows nothing about congestion, stragglers, load imbalance
# between experts (section 2's busiest receiver sets the pace), or overlap of communication with
# compute. Section 3 showed how it fares on this machine: where every rank has its own core the
# table says whether it holds, and oversubscribed runs are labelled as such — all computed from
# the runs, not written by hand. The widget self-checks of this notebook live in
# `tests/notebook_checks/03_multinode.py`, which the tests run after the notebook.

# %% [markdown]
# ## 5. What each TED technique saves — and what it costs — measured here
#
# The model above *prices* duplicate token dropping; here the project's own TED code runs
# (`bench/bench_ted.py`: 4 MPI ranks = tp 2 × ep 2, a small language model, a few training steps per
# variant) and the communicators *count* what each technique sends, holds and allocates:
#
# * **drop (expert rows)**: each tp rank exchanges 1/tp of the expert-sorted rows, and the group
#   all-gathers the expert output rows `[k·T, d]` before combining them;
# * **drop (combined)**, DeepSpeed-TED's way: each tp rank dispatches 1/tp of the *tokens*, and the
#   group all-gathers the combined outputs `[T, d]`: k times fewer all-gather bytes;
# * **tensor-parallel experts**: every expert's hidden units split over the tp ranks (half the expert
#   weights per rank at tp = 2), with an all-gather and a reduce-scatter of rows around them;
# * **activation checkpointing**: each block recomputed in the backward pass to save memory; the
#   recomputation *replays* the messages it recorded, so it sends nothing more.
#
# Peak memory is what one training step allocates on rank 0 above what existed before it (PyTorch's
# profiler); times are medians of a few steps on ranks that share this machine's cores, so compare
# the bytes and memory columns more than the times. What the four ranks print (the profiler's
# start/stop notices and warnings) is captured and summed up in one line; if the job fails, its
# output is shown instead.
#
# **Dropping can send more than it saves.** Look at the traffic bars: dropping halves the token
# all-to-all, yet the dropping rows send far *more* bytes in all than the baseline. The new kind of
# traffic is **expert gradients summed over tp**. In the baseline both tp ranks run their experts on
# the same tokens, so they compute the same expert gradients and nothing needs summing (and with
# `dp = 1`, as here, there are no data-parallel copies to sum with either). With dropping each tp
# rank runs its experts on *its* half of the tokens, so each holds only part of the expert
# gradients, and the tp group must all-reduce them every step: as many bytes as the experts have
# parameters (a ring all-reduce sends `2·(n−1)/n` of the buffer, here all of it), however few the
# tokens. The all-to-all savings grow with the tokens per step; this gradient sum does not. With
# this small model and 256 tokens per step dropping loses; the cell prints where it would break
# even. In a real TED job `dp > 1`: the expert gradients are all-reduced over the `dp` copies anyway,
# and dropping only widens that group from `dp` to `dp·tp` ranks, adding `2·B·(tp−1)/(dp·tp)` bytes
# for `B` bytes of expert gradients. Tensor-parallel experts avoid the sum altogether (each tp rank
# holds its own slice of every expert and sees all of that expert's rows), at the price of more tp
# activation traffic. `cost_model.predict_step` prices the same thing (its expert gradient group is
# `dp·tp` when tokens are dropped).

# %%
spec = importlib.util.spec_from_file_location("bench_ted", ROOT / "bench" / "bench_ted.py")
bench_ted = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_ted)

print("launching mpirun -n 4 (tp 2 × ep 2): five variants, a few steps each ...", flush=True)
ted = bench_ted.launch(ranks=4, tp=2, ep=2, steps=1 if QUICK else 3, size="small")   # raises, with the output, if it fails
print(f"the 4 ranks finished without error; what they printed: {ted['output_summary']} (all of it: ted['output'])")
ted_results = ted["results"]
names = list(ted_results)
base = ted_results["baseline"]

fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
kinds = sorted({kind for r in ted_results.values() for kind in r["bytes_per_step"]})
bottom = np.zeros(len(names))
for kind in kinds:
    values = np.array([ted_results[n]["bytes_per_step"].get(kind, 0) / 1e3 for n in names])
    axes[0].barh(names, values, left=bottom, label=kind)
    bottom += values
for i, n in enumerate(names):                             # each row's total, against the baseline's
    axes[0].text(bottom[i], i, f" {bottom[i] / bottom[names.index('baseline')]:.1f}×", va="center", fontsize=8)
axes[0].set_xlim(0, bottom.max() * 1.15)
axes[0].set(xlabel="kB sent per step by rank 0", title="traffic by kind (total: × the baseline's)")
axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.45, -0.2), ncol=2, frameon=False)
axes[0].invert_yaxis()
axes[1].barh(names, [ted_results[n]["expert_elements"] / 1e3 for n in names], color="tab:green")
axes[1].set(xlabel="expert weights on rank 0 (thousand elements)", title="expert memory")
axes[1].invert_yaxis()
axes[1].set_yticklabels([])
axes[2].barh(names, [ted_results[n]["peak_step_bytes"] / 2**20 for n in names], color="tab:purple")
axes[2].set(xlabel="peak memory of one step (MiB)", title="activations and temporaries")
axes[2].invert_yaxis()
axes[2].set_yticklabels([])
plt.tight_layout()
plt.show()

alltoall = {n: ted_results[n]["bytes_per_step"].get("token all-to-all", 0) for n in names}
print(f"token all-to-all with dropping: {alltoall['drop (combined)'] / alltoall['baseline']:.2f}× the baseline's "
      f"(1/tp = 0.50 up to the few rows of uneven shares)")
experts_ratio = ted_results["drop + tensor-parallel experts"]["expert_elements"] / base["expert_elements"]
print(f"expert weights with tensor-parallel experts: {experts_ratio:.2f}× (1/tp = 0.50)")
replayed = (ted_results["drop + TP experts + checkpointing"]["bytes_per_step"]
            == ted_results["drop + tensor-parallel experts"]["bytes_per_step"])
print("activation checkpointing sent " + ("exactly the same bytes as without it (its messages were replayed)"
                                         if replayed else "different bytes than without it — unexpected"))

# Why dropping sends more in all here: the expert gradients it must sum over the tp ranks.
total = {n: sum(ted_results[n]["bytes_per_step"].values()) for n in names}
summed = ted_results["drop (combined)"]["bytes_per_step"].get("expert gradients summed over tp", 0)
expert_bytes = base["expert_elements"] * 4                                    # float32 expert gradients of rank 0
TED_TP, TED_DP = ted["tp"], ted["dp"]
print(f"all bytes per step, drop (combined) vs baseline: {total['drop (combined)'] / 1e3:,.0f} kB vs "
      f"{total['baseline'] / 1e3:,.0f} kB ({total['drop (combined)'] / total['baseline']:.2f}×); of them "
      f"{summed / 1e3:,.0f} kB are the expert gradients summed over tp = 2·(tp−1)/tp × {expert_bytes / 1e3:,.0f} kB "
      f"of expert gradients (a ring all-reduce over tp = {TED_TP})")
TOKEN_KINDS = ("token all-to-all", "tp activations (all-reduce, all-gather, reduce-scatter)")   # grow with tokens
token_bytes = {n: sum(ted_results[n]["bytes_per_step"].get(k, 0) for k in TOKEN_KINDS) for n in names}
saved = token_bytes["baseline"] - token_bytes["drop (combined)"]
ted_tokens = bench_ted.SIZES[ted["size"]]["batch_size"] * bench_ted.SIZES[ted["size"]]["seq_len"]
if saved > 0:
    print(f"the bytes that grow with the tokens fall by {saved / 1e3:,.0f} kB per step at {ted_tokens} tokens; "
          f"the gradient sum is fixed, so dropping breaks even at about {ted_tokens * summed / saved:,.0f} tokens "
          f"per step (this layout, dp = {TED_DP})")
else:
    print(f"the bytes that grow with the tokens did not fall ({saved / 1e3:,.0f} kB): dropping saves nothing here")
for dp_ in (1, 2, 8):
    print(f"with dp = {dp_}: expert gradients all-reduced per step, baseline {2 * (dp_ - 1) / dp_ * expert_bytes / 1e3:7,.0f} kB "
          f"→ with dropping {2 * (dp_ * TED_TP - 1) / (dp_ * TED_TP) * expert_bytes / 1e3:7,.0f} kB "
          f"(+{2 * expert_bytes * (TED_TP - 1) / (dp_ * TED_TP) / 1e3:,.0f} kB)")
