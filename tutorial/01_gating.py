# ---
# jupyter:
#   jupytext:
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
# # 01 · Gating: how a router picks experts
#
# A Mixture-of-Experts (MoE) layer replaces one feed-forward network by `E` of them, the
# **experts**, and adds a small **router** that sends every token to only `k` of them. This notebook
# opens the router up:
#
# 1. an interactive explorer: pick a router and its settings and see which token goes where;
# 2. what a router computes, number by number, on real tensors;
# 3. every router of `fastmoe_edu.ROUTERS` on the same tokens;
# 4. loss-free balancing: a bias that steers the sigmoid router towards even load;
# 5. expert specialisation: which experts each synthetic language uses after a short training run.
#
# Every number below is computed by the project's code when the notebook runs.
#
# **Words used here**, one line each (each is explained again where it first matters):
#
# | term | meaning |
# |---|---|
# | token | one position of the input; the router sees its vector of `d_model` numbers |
# | expert | one small feed-forward network of the layer; `E` of them |
# | router (gate) | the small linear layer that scores every expert for every token |
# | logits | the router's raw scores, one per (token, expert) |
# | softmax | turns a token's logits into probabilities that sum to 1 |
# | top-k | keep only the `k` highest-scoring experts of a token |
# | assignment | one (token, expert) pair that was chosen; a token has `k` of them |
# | combine weight | how much a chosen expert's output counts in the token's result |
# | load | how many assignments an expert received |
# | capacity `C` | the most assignments one expert accepts in a batch |
# | capacity factor | sets `C`: `C = ceil(capacity factor · k · T / E)`; `0` here means no limit ("dropless") |
# | dropped | an assignment refused because its expert was already full |
# | balance loss | an extra training loss that is small when the load is even |
# | z-loss | an extra training loss that keeps the logits small (numerically safe) |
# | noise, jitter | random perturbations some routers add while training, so that choices get explored |
# | expert choice | the reverse: each expert picks its tokens, instead of tokens picking experts |
# | bias (loss-free balancing) | per-expert numbers added to the scores to even out the load, without a loss |
# | specialisation | experts that end up serving some kinds of input more than others |
#
# **`QUICK`**: with the environment variable `FASTMOE_EDU_QUICK=1` (the tests set it) the notebook
# uses fewer tokens and steps so that it finishes in well under a minute, and shows no progress bars.

# %%
import dataclasses
import os
import tempfile
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display
from matplotlib.ticker import MaxNLocator
from tqdm.auto import tqdm

import fastmoe_edu
from fastmoe_edu import MoELayer, ROUTERS
from fastmoe_edu.routers import router_z_loss

from _nbhelpers.forced_value import ForcedValue        # the top_k slider a router may force (next to this notebook)

QUICK = os.environ.get("FASTMOE_EDU_QUICK", "0") == "1"
torch.set_num_threads(1)          # small tensors: one thread is fastest and leaves the other core free


def progress(iterable=None, **kwargs):
    """tqdm's notebook progress bar; switched off in QUICK runs, which are short anyway."""
    return tqdm(iterable, disable=QUICK, **kwargs)


print(f"fastmoe_edu {fastmoe_edu.__version__}, torch {torch.__version__}, QUICK={QUICK}")
print("routers:", ", ".join(ROUTERS))

# %% [markdown]
# ## 1. Interactive explorer
#
# The tokens come from 4 clusters (think: 4 kinds of text), so a router has real structure to find
# and load is *not* naturally even. Every control change builds a fresh `MoELayer` (same seed, so
# the same router weights for every router), routes the tokens in training mode (where noise,
# jitter and random routing are active) and draws:
#
# * **token → expert**: one row per token, one column per expert, colour = combine weight
#   (colour bar on the right); a red × marks an assignment the router wanted but that was
#   **dropped** because the expert was full;
# * **tokens per expert** (the load): kept (blue) and dropped (red) assignments, the capacity `C`
#   and the perfectly balanced load `k · T / E`;
# * **the two auxiliary losses**, each on its own axis because their scales differ by an order of
#   magnitude or more (z-loss near 50, balance loss near 1 here):
#   * the router's **balance loss**: for most routers `E · Σ_e f_e · P_e`, with `f_e` the fraction
#     of assignments that went to expert `e` and `P_e` its mean router probability; it is 1 when
#     the load is perfectly even. `noisy_top_k` uses instead the squared coefficient of variation
#     (`(std / mean)²`) of the load, which is 0 when even. `sigmoid` and `expert_choice` have none.
#   * the **z-loss**: the mean over tokens of `(logsumexp of the token's logits)²`, where
#     `logsumexp(l) = log Σ_e exp(l_e)` is a smooth maximum of the logits. Large logits make it
#     large; training keeps them small with it.
#
# Controls: `noise` is the noisy top-k router's extra noise on its scores, `jitter` the Switch
# router's random rescaling of its input (`x · U(1−ε, 1+ε)`). `switch` always uses `top_k = 1` and
# `gshard` `top_k = 2`: the slider then shows that value and is greyed out, and gets your own value
# back when you pick another router. With `expert_choice`
# each expert takes `C = capacity factor · T / E` tokens; at capacity factor 0, `top_k` stands in
# for it.
#
# The next cell (collapsed in JupyterLab: click the ··· to read it) defines `route(...)`, which
# returns the routing decision as plain numbers, and `draw(data)`, which plots it.

# %% jupyter={"source_hidden": true}
NUM_TOKENS, TOKEN_DIM = (64 if QUICK else 128), 16
g = torch.Generator().manual_seed(0)
centres = torch.randn(4, TOKEN_DIM, generator=g) * 1.5                      # 4 clusters of tokens,
TOKEN_CLUSTER = torch.randint(0, 4, (NUM_TOKENS,), generator=g).sort().values  # sorted: blocks in the plot
TOKENS = centres[TOKEN_CLUSTER] + 0.8 * torch.randn(NUM_TOKENS, TOKEN_DIM, generator=g)


def route(router="softmax_top_k", top_k=2, capacity_factor=0.0, noise=0.0, jitter=0.0, num_experts=8, seed=0):
    """Route TOKENS through a fresh MoELayer; return the decision as numpy arrays and numbers."""
    E, T = int(num_experts), len(TOKENS)
    k = ROUTERS[router].required_top_k or min(int(top_k), E)
    options = {"noisy_top_k": {"noise_epsilon": float(noise)}, "switch": {"jitter_epsilon": float(jitter)}}
    torch.manual_seed(seed)                                   # the same router weights for every router
    layer = MoELayer(TOKEN_DIM, 32, E, top_k=k, router=router, capacity_factor=capacity_factor or None,
                     **options.get(router, {}))
    layer.train()                                             # noise, jitter etc. act only in training
    seen = {}                                                 # the router's own output, before capacity pruning
    hook = layer.router.register_forward_hook(lambda module, args, out: seen.update(route=out[0]))
    torch.manual_seed(seed + 1)                               # the router's random draws
    with torch.no_grad():
        layer(TOKENS)
    hook.remove()
    wanted, rec = seen["route"].expert_ids, layer.last_routing   # rec: after pruning, -1 = dropped
    rows = torch.arange(T)[:, None].expand_as(rec.expert_ids)
    kept = rec.expert_ids >= 0
    dropped = (wanted >= 0) & ~kept
    weight = torch.zeros(T, E).index_put_((rows[kept], rec.expert_ids[kept]), rec.weights[kept].float(),
                                          accumulate=True)
    dropped_at = torch.zeros(T, E, dtype=torch.bool)
    dropped_at[rows[dropped], wanted[dropped]] = True
    load = rec.tokens_per_expert
    return {
        "router": router, "top_k": k, "num_experts": E, "capacity": rec.capacity,
        "assignment": weight.numpy(), "dropped_mask": dropped_at.numpy(),
        "tokens_per_expert": load.numpy(), "dropped_per_expert": dropped_at.sum(0).numpy(),
        "dropped": int(rec.num_dropped), "tokens_without_expert": int((~kept).all(dim=1).sum()),
        "balanced_load": float(load.float().mean()) if router == "expert_choice" else k * T / E,
        "max_over_mean_load": float(load.max() / load.float().mean()),
        "balance_loss": float("nan") if router in ("sigmoid", "expert_choice")     # none by design
        else float(layer.router.balance_loss(seen["route"])),
        "z_loss": float(router_z_loss(rec.logits)),
    }


def draw(data):
    """Plot one routing decision: token → expert weights, load per expert, the two auxiliary losses."""
    E, T = data["num_experts"], len(data["assignment"])
    fig = plt.figure(figsize=(14, 4))
    grid = fig.add_gridspec(2, 3, width_ratios=[1.15, 1.2, 0.75], hspace=1.0, wspace=0.3)
    heat, bars = fig.add_subplot(grid[:, 0]), fig.add_subplot(grid[:, 1])
    image = heat.imshow(data["assignment"], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=heat, label="combine weight")
    tokens, experts = np.nonzero(data["dropped_mask"])
    heat.scatter(experts, tokens, marker="x", color="red", s=14, label="dropped")
    heat.set(title=f"{data['router']}, k={data['top_k']}: {data['dropped']} dropped,\n"
                   f"{data['tokens_without_expert']} tokens with no expert at all",
             xlabel="expert", ylabel="token (sorted by cluster)")
    kept, dropped = data["tokens_per_expert"], data["dropped_per_expert"]
    bars.bar(range(E), kept, color="tab:blue", label="kept")
    bars.bar(range(E), dropped, bottom=kept, color="tab:red", label="dropped")
    bars.axhline(data["balanced_load"], color="grey", ls="--", label="balanced")
    if data["capacity"] is not None:
        bars.axhline(data["capacity"], color="black", ls=":", label=f"capacity C={data['capacity']}")
    bars.set(title=f"tokens per expert (max/mean {data['max_over_mean_load']:.2f})", xlabel="expert",
             ylabel="assignments")
    # Room above the tallest bar and line for the legend, in one row, so it covers neither.
    top = max((kept + dropped).max(), data["balanced_load"], data["capacity"] or 0)
    bars.set_ylim(0, 1.35 * top)
    bars.legend(fontsize=8, loc="upper center", ncol=4, frameon=False, handlelength=1.5, columnspacing=1.0)
    for ax in (heat, bars):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # experts are whole numbers
    even = 0.0 if data["router"] == "noisy_top_k" else 1.0      # the balance loss of an even load
    panels = [("balance loss", data["balance_loss"], "tab:purple", even),
              ("z-loss", data["z_loss"], "tab:orange", None)]
    for row, (name, value, colour, reference) in enumerate(panels):
        ax = fig.add_subplot(grid[row, 2])
        ax.set_yticks([])
        if np.isnan(value):
            ax.set_title(f"{name}: none for this router", fontsize=10)
            ax.set_xticks([])
            continue
        ax.barh([0], [value], color=colour)
        if reference is not None:
            ax.axvline(reference, color="grey", ls="--")
        ax.set_xlim(0, 1.25 * max(value, reference or 0, 1e-6))
        ax.set_title(f"{name} = {value:.3f}" + (f" (even load: {reference:g})" if reference is not None else ""),
                     fontsize=10)
    return fig


def show(fig):
    display(fig)
    plt.close(fig)


def redraw(**settings):
    """route(...) then draw: the same function the widgets call; returns the plotted data."""
    data = route(**settings)
    show(draw(data))
    return data


# %%
controls = {
    "router": widgets.Dropdown(options=list(ROUTERS), value="softmax_top_k", description="router"),
    "top_k": widgets.IntSlider(value=2, min=1, max=4, description="top_k", continuous_update=False),
    "capacity_factor": widgets.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="cap. factor",
                                           continuous_update=False),
    "noise": widgets.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.1, description="noise", continuous_update=False),
    "jitter": widgets.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.05, description="jitter",
                                  continuous_update=False),
    "num_experts": widgets.IntSlider(value=8, min=2, max=16, description="experts", continuous_update=False),
}
plot_area = widgets.Output()
shown = {}                       # the data behind the plot on screen, for inspection by code
top_k_widget = ForcedValue(controls["top_k"])   # keeps the student's own top_k while a router forces another


def on_change(change=None):
    forced_k = ROUTERS[controls["router"].value].required_top_k      # 1 for switch, 2 for gshard
    if not top_k_widget.settle(forced_k):          # it changed top_k's value: on_change runs again
        return
    shown["data"] = route(**{name: control.value for name, control in controls.items()})
    with plot_area:
        plot_area.clear_output(wait=True)
        show(draw(shown["data"]))


for control in controls.values():
    control.observe(on_change, names="value")
on_change()
names = list(controls)
display(widgets.VBox([widgets.HBox([widgets.VBox([controls[n] for n in names[:3]]),
                                    widgets.VBox([controls[n] for n in names[3:]])]), plot_area]))

# %% [markdown]
# Things to try: set the capacity factor to 1.0 and watch red crosses appear on the busiest expert;
# raise the number of experts and see the balance loss react; pick `switch` (the `top_k` slider
# jumps to 1) and raise the jitter; pick `expert_choice`: every expert takes exactly `C` tokens, so
# nothing is "dropped", but some tokens get no expert at all.
#
# The same function without the widgets, for one setting that drops assignments:
#
# ✍️ Exercises: write capacity pruning in [ex02_capacity.py](exercises/ex02_capacity.py) and the balance loss in [ex07_balance.py](exercises/ex07_balance.py); check with `python -m tutorial.exercises.check 2 7` ([all exercises](exercises/README.md)).

# %%
example = redraw(router="switch", capacity_factor=1.0, num_experts=8)
print(f"capacity C = {example['capacity']}, dropped assignments = {example['dropped']}, "
      f"tokens per expert = {example['tokens_per_expert'].tolist()}")

# %% [markdown]
# ## 2. What a router computes, number by number
#
# Tokens arrive as a matrix `x[T, d_model]` (batch and sequence flattened). The router holds one
# weight matrix `W[E, d_model]`, one row per expert. For the classic *softmax top-k* router:
#
# | step | formula | shape |
# |---|---|---|
# | logits (raw scores) | `x Wᵀ` | `[T, E]` |
# | probabilities | `p = softmax(logits)` over the experts | `[T, E]` |
# | choice (top-k) | the `k` largest `p` of each token | `[T, k]` expert ids |
# | combine weights | those `p`, rescaled to sum to 1 | `[T, k]` |
#
# The layer's output for a token is the combine-weighted sum of its `k` experts' outputs. Here it
# is by hand for 6 tokens and 4 experts, checked against the router inside `MoELayer`.
#
# ✍️ Exercise: write softmax top-k routing and its gradient by hand in [ex01_routing.py](exercises/ex01_routing.py); check with `python -m tutorial.exercises.check 1`.

# %%
torch.manual_seed(0)
d_model, num_experts, top_k = 8, 4, 2
layer = MoELayer(d_model=d_model, d_hidden=16, num_experts=num_experts, top_k=top_k, router="softmax_top_k")
x = torch.randn(6, d_model)

with torch.no_grad():
    logits = x @ layer.router.weight.t()                       # [T, E]
    probs = torch.softmax(logits, dim=-1)                     # [T, E], each row sums to 1
    top_p, top_ids = probs.topk(top_k, dim=-1)                # [T, k]
    weights = top_p / top_p.sum(dim=-1, keepdim=True)         # rescale over the k chosen experts

torch.set_printoptions(precision=3, sci_mode=False)
print("logits = x Wᵀ\n", logits)
print("p = softmax(logits)\n", probs)
print("chosen experts\n", top_ids)
print("combine weights\n", weights)

# %% [markdown]
# The same numbers from the layer itself: `layer(x)` runs the router, then **dispatch** (copy each
# token to the inputs of its chosen experts), the experts, and **combine** (the weighted sum back
# into token order); `layer.last_routing` keeps the decision for inspection.

# %%
with torch.no_grad():
    y = layer(x)
rec = layer.last_routing
print("layer's expert ids equal ours:", torch.equal(rec.expert_ids, top_ids))
print("layer's weights equal ours:   ", torch.allclose(rec.weights, weights))
print("tokens per expert:", rec.tokens_per_expert.tolist(), "| output shape:", tuple(y.shape))

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
image = axes[0].imshow(probs.numpy(), cmap="Blues", vmin=0, vmax=1)
for t in range(probs.shape[0]):
    for s in range(top_k):
        axes[0].add_patch(plt.Rectangle((top_ids[t, s] - 0.5, t - 0.5), 1, 1, fill=False, ec="crimson", lw=2))
    for e in range(num_experts):
        axes[0].text(e, t, f"{probs[t, e]:.2f}", ha="center", va="center", fontsize=8)
axes[0].set(title="p = softmax(x Wᵀ); red = chosen (top-2)", xlabel="expert", ylabel="token",
            xticks=range(num_experts))
fig.colorbar(image, ax=axes[0], fraction=0.046, label="probability")
combine = torch.zeros_like(probs).scatter(1, top_ids, weights)
image = axes[1].imshow(combine.numpy(), cmap="Oranges", vmin=0, vmax=1)
axes[1].set(title="combine weights (0 = expert not used)", xlabel="expert", xticks=range(num_experts))
fig.colorbar(image, ax=axes[1], fraction=0.046, label="combine weight")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. All routers on the same tokens
#
# Same tokens, same router weights `W` (same seed), 8 experts, `top_k = 2` where the router allows
# it, capacity factor 1.25. Each router turns the same logits into a different decision.

# %%
comparison = {name: route(name, top_k=2, capacity_factor=1.25, num_experts=8)
              for name in progress(ROUTERS, desc="routers")}

fig, axes = plt.subplots(2, len(ROUTERS), figsize=(2.3 * len(ROUTERS), 5.5), sharey="row", layout="constrained")
for col, (name, data) in enumerate(comparison.items()):
    image = axes[0, col].imshow(data["assignment"], aspect="auto", cmap="viridis", vmin=0, vmax=1,
                                interpolation="nearest")
    axes[0, col].set_title(name, fontsize=10)
    E = data["num_experts"]
    axes[1, col].bar(range(E), data["tokens_per_expert"], color="tab:blue")
    axes[1, col].bar(range(E), data["dropped_per_expert"], bottom=data["tokens_per_expert"], color="tab:red")
    if data["capacity"] is not None:
        axes[1, col].axhline(data["capacity"], color="black", ls=":")
    for ax in axes[:, col]:
        ax.set(xlabel="expert", xticks=range(0, E, 2))
axes[0, 0].set_ylabel("token")
axes[1, 0].set_ylabel("assignments (red = dropped)")
fig.colorbar(image, ax=axes[0, :], label="combine weight", fraction=0.02)
plt.show()

print(f"{'router':<14}{'k':>3}{'C':>5}{'max/mean':>10}{'dropped':>9}{'no expert':>11}{'balance':>9}{'z-loss':>9}")
for name, data in comparison.items():
    capacity = "-" if data["capacity"] is None else data["capacity"]
    balance = "n/a" if np.isnan(data["balance_loss"]) else f"{data['balance_loss']:.3f}"
    print(f"{name:<14}{data['top_k']:>3}{capacity:>5}{data['max_over_mean_load']:>10.2f}{data['dropped']:>9}"
          f"{data['tokens_without_expert']:>11}{balance:>9}{data['z_loss']:>9.2f}")

# %% [markdown]
# Reading the table: `expert_choice` is balanced by construction (max/mean = 1), but it can leave
# tokens with no expert at all; capacity-limited routers drop assignments on their busiest experts;
# `xmoe` scores are cosines divided by a temperature, so its logits (and z-loss) live on a different
# scale from the plain dot-product routers. The balance column is not comparable across all rows:
# `noisy_top_k`'s loss is 0 for an even load, the others' 1.

# %% [markdown]
# ## 4. Loss-free balancing: the sigmoid router's bias
#
# DeepSeek-V3's router scores experts with `sigmoid(logits)` and selects by `sigmoid(logits) + b`,
# where the **bias** `b[E]` is *not* learned by gradient descent. After each step the training loop
# calls `layer.update_router_bias()`, which applies `b_e ← b_e + γ · sign(mean_load − load_e)`:
# under-loaded experts become a little more attractive, over-loaded ones a little less. The combine
# weights use `sigmoid(logits)` only, so the bias changes *who* is chosen, never *how much* a chosen
# expert counts. No balance loss is needed, hence "loss-free".
#
# Below the token stream is skewed on purpose (every token leans towards experts 0 and 1), the
# router weights stay fixed, and only the bias moves.

# %%
BIAS_STEPS = 80 if QUICK else 300
torch.manual_seed(0)
sig_layer = MoELayer(TOKEN_DIM, 32, 8, top_k=2, router="sigmoid", bias_update_rate=0.01)
lean = sig_layer.router.weight[:2].detach().sum(0)
lean = 1.5 * lean / lean.norm()                                    # push tokens towards experts 0 and 1

load_ratio, biases, loads = [], [], []
g = torch.Generator().manual_seed(1)
for step in progress(range(BIAS_STEPS), desc="bias steps"):
    batch = torch.randn(256, TOKEN_DIM, generator=g) + lean
    with torch.no_grad():
        sig_layer(batch)
    load = sig_layer.last_routing.tokens_per_expert.float()
    loads.append(load.numpy())
    load_ratio.append(float(load.max() / load.mean()))
    sig_layer.update_router_bias()                                 # b_e += γ · sign(mean − load_e)
    biases.append(sig_layer.router.bias.clone().numpy())
biases, loads = np.array(biases), np.array(loads)

fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
axes[0].plot(load_ratio)
axes[0].axhline(1.0, color="grey", ls="--")
axes[0].set(title="max / mean tokens per expert", xlabel="step", ylim=(0.9, None))
for e in range(biases.shape[1]):
    axes[1].plot(biases[:, e], label=f"expert {e}")
axes[1].set(title="bias b_e", xlabel="step")
axes[1].legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)  # off the lines
image = axes[2].imshow(loads.T, aspect="auto", cmap="magma", interpolation="nearest")
axes[2].set(title="tokens per expert over steps", xlabel="step", ylabel="expert", yticks=range(loads.shape[1]))
fig.colorbar(image, ax=axes[2], label="tokens")
plt.tight_layout()
plt.show()
last = max(1, BIAS_STEPS // 10)
print(f"max/mean load: first step {load_ratio[0]:.2f}, mean of the last {last} steps "
      f"{np.mean(load_ratio[-last:]):.2f}; final bias range [{biases[-1].min():+.3f}, {biases[-1].max():+.3f}]")
busiest_at_start = np.argsort(-loads[0])[:2].tolist()
most_negative_bias = np.argsort(biases[-1])[:2].tolist()
print(f"busiest experts at step 0: {busiest_at_start}; experts with the most negative final bias: "
      f"{most_negative_bias}")

# %% [markdown]
# The load ratio falls towards 1 and then hovers: with a `sign` update the bias never settles
# exactly, it oscillates by about `γ` around the balancing value. The experts that were busiest at
# the start are pushed down (negative bias), the idle ones pulled up; compare the two lists printed
# above.

# %% [markdown]
# ## 5. Expert specialisation on the training data
#
# The project's default dataset, `languages`, mixes four synthetic token languages (counting, copy,
# markov, dyck) and tells us which language every sequence is in. We train a tiny MoE language model
# briefly with the project's `train(config)` and then count, per language, which experts its tokens
# were routed to (`fastmoe_edu.evaluate.expert_usage_by_language`). A bright cell means that language
# relies on that expert: the experts have **specialised**. Each token uses `top_k` *different*
# experts, so one expert can hold at most `1/top_k` of a language's assignments (0.5 here), and
# uniform routing gives `1/E`. After so little training the pattern is partial; `04_training`
# trains longer.
#
# `train(config, stop_at=s)` stops after step `s` and saves a checkpoint, and a `resume=True` run
# continues from it; training in chunks like this only serves to move the progress bar.

# %%
from fastmoe_edu.config import TrainConfig
from fastmoe_edu.evaluate import expert_usage_by_language
from fastmoe_edu.train import build_dataset, train

spec_config = TrainConfig(
    max_steps=30 if QUICK else 200, batch_size=8 if QUICK else 16, seq_len=32, n_layer=2, n_head=2,
    d_model=32, d_hidden=64, num_experts=4, top_k=2, warmup_steps=5 if QUICK else 20,
    eval_interval=0, checkpoint_interval=0, sample_tokens=0, progress=False, num_threads=1,
    out_dir=tempfile.mkdtemp(prefix="fastmoe_edu_01_"),
)
t0 = time.perf_counter()
chunk = max(1, spec_config.max_steps // 10)
with progress(total=spec_config.max_steps, desc="training") as bar:
    for stop in range(chunk, spec_config.max_steps + chunk, chunk):
        result = train(dataclasses.replace(spec_config, resume=stop > chunk), stop_at=min(stop, spec_config.max_steps))
        bar.update(result["steps"] - bar.n)
print(f"trained {result['steps']} steps in {time.perf_counter() - t0:.1f} s: "
      f"loss {result['train_loss'][0]:.3f} → {result['train_loss'][-1]:.3f}")

dataset = build_dataset(spec_config)
usage = expert_usage_by_language(result["model"], dataset, spec_config, num_batches=2 if QUICK else 8)

fig, axes = plt.subplots(1, usage.shape[0], figsize=(4.5 * usage.shape[0], 3.2), squeeze=False)
for li in range(usage.shape[0]):
    ax = axes[0, li]
    image = ax.imshow(usage[li].numpy(), cmap="viridis", vmin=0, vmax=1 / spec_config.top_k)
    for (lang, e), value in np.ndenumerate(usage[li].numpy()):
        ax.text(e, lang, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.3 else "black",
                fontsize=8)
    ax.set(title=f"MoE layer {li}: share of a language's assignments", xlabel="expert",
           xticks=range(usage.shape[2]), yticks=range(len(dataset.language_names)),
           yticklabels=dataset.language_names)
fig.colorbar(image, ax=axes[0, -1], label="share of assignments")
plt.tight_layout()
plt.show()
print(f"largest share of one language on one expert: {usage.max():.2f} "
      f"(uniform routing: {1 / usage.shape[2]:.2f}, the most possible: {1 / spec_config.top_k:.2f})")
for li in range(usage.shape[0]):
    favourite = usage[li].argmax(dim=1).tolist()
    print(f"MoE layer {li}: each language's most used expert: "
          + ", ".join(f"{name} → {e}" for name, e in zip(dataset.language_names, favourite)))
