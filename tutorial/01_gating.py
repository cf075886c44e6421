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
# # 01 · Gating: how a router picks experts
#
# A Mixture-of-Experts layer replaces one feed-forward network by `E` of them ("experts") and a
# small **router** (or *gate*) that sends every token to only `k` of them. This notebook opens the
# router up:
#
# 1. what a router computes, number by number, on real tensors;
# 2. an interactive explorer (router, `top_k`, capacity factor, noise, jitter, number of experts)
#    that redraws which token goes where, how many tokens each expert gets, what is dropped, and
#    the balance and z losses;
# 3. every router of `fastmoe_edu.ROUTERS` on the same tokens;
# 4. DeepSeek-V3's loss-free balancing: a bias that steers the sigmoid router towards even load;
# 5. expert specialisation: which experts each synthetic language uses after a short training run.
#
# Every number below is computed by the project's code when the notebook runs.
#
# **`QUICK`**: when the environment variable `FASTMOE_EDU_QUICK=1` is set (the test suite does this)
# the notebook uses fewer tokens and training steps so it finishes in well under a minute.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import ipywidgets as widgets
from IPython.display import display

import fastmoe_edu
from fastmoe_edu import MoELayer, ROUTERS
from fastmoe_edu.routers import router_z_loss

QUICK = os.environ.get("FASTMOE_EDU_QUICK", "0") == "1"
torch.set_num_threads(1)          # small tensors: one thread is fastest and leaves the other core free
NOTEBOOK_START = time.perf_counter()
print(f"fastmoe_edu {fastmoe_edu.__version__}, torch {torch.__version__}, QUICK={QUICK}")
print("routers:", ", ".join(ROUTERS))

# %% [markdown]
# ## 1. What a router computes
#
# Tokens arrive as a matrix `x[T, d_model]` (batch and sequence flattened). The router holds one
# weight matrix `W[E, d_model]`, one row per expert, and for the classic *softmax top-k* router:
#
# | step | formula | shape |
# |---|---|---|
# | logits | `x Wᵀ` | `[T, E]` |
# | probabilities | `p = softmax(logits)` over experts | `[T, E]` |
# | choice | the `k` largest `p` of each token | `[T, k]` ids |
# | weights | those `p`, renormalized to sum to 1 | `[T, k]` |
#
# The layer's output for a token is the weighted sum of its `k` experts' outputs. Let us do this by
# hand for 6 tokens and 4 experts, then check it against the router inside `MoELayer`.

# %%
torch.manual_seed(0)
d_model, num_experts, top_k = 8, 4, 2
layer = MoELayer(d_model=d_model, d_hidden=16, num_experts=num_experts, top_k=top_k, router="softmax_top_k")
x = torch.randn(6, d_model)

with torch.no_grad():
    logits = x @ layer.router.weight.t()                       # [T, E]
    probs = torch.softmax(logits, dim=-1)                     # [T, E], each row sums to 1
    top_p, top_ids = probs.topk(top_k, dim=-1)                # [T, k]
    weights = top_p / top_p.sum(dim=-1, keepdim=True)         # renormalize over the k chosen experts

torch.set_printoptions(precision=3, sci_mode=False)
print("logits = x Wᵀ\n", logits)
print("p = softmax(logits)\n", probs)
print("chosen experts\n", top_ids)
print("weights (renormalized)\n", weights)

# %% [markdown]
# The same numbers from the layer itself: `layer(x)` runs the router, then dispatch, experts and
# combine; `layer.last_routing` keeps the decision for inspection.

# %%
with torch.no_grad():
    y = layer(x)
rec = layer.last_routing
print("layer's expert ids equal ours:", torch.equal(rec.expert_ids, top_ids))
print("layer's weights equal ours:   ", torch.allclose(rec.weights, weights))
print("tokens per expert:", rec.tokens_per_expert.tolist(), "| output shape:", tuple(y.shape))
assert torch.equal(rec.expert_ids, top_ids) and torch.allclose(rec.weights, weights)

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
im = axes[0].imshow(probs.numpy(), cmap="Blues", vmin=0, vmax=1)
for t in range(probs.shape[0]):
    for s in range(top_k):
        axes[0].add_patch(plt.Rectangle((top_ids[t, s] - 0.5, t - 0.5), 1, 1, fill=False, ec="crimson", lw=2))
    for e in range(num_experts):
        axes[0].text(e, t, f"{probs[t, e]:.2f}", ha="center", va="center", fontsize=8)
axes[0].set(title="p = softmax(x Wᵀ); red = chosen (top-2)", xlabel="expert", ylabel="token",
            xticks=range(num_experts))
fig.colorbar(im, ax=axes[0], fraction=0.046)
combine = torch.zeros_like(probs).scatter(1, top_ids, weights)
im = axes[1].imshow(combine.numpy(), cmap="Oranges", vmin=0, vmax=1)
axes[1].set(title="combine weights (0 = expert not used)", xlabel="expert", xticks=range(num_experts))
fig.colorbar(im, ax=axes[1], fraction=0.046)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Interactive explorer
#
# The tokens below come from 4 clusters (think: 4 kinds of text), so a router has real structure to
# find and load is *not* naturally even. `redraw(...)` builds a fresh `MoELayer` with the chosen
# controls (same seed, so the same router weights for every router), routes the tokens in training
# mode (where noise, jitter and random routing are active), and plots:
#
# * **assignment heatmap**: token × expert, colour = combine weight; a red × marks an assignment
#   the router wanted but that was **dropped** because the expert was full;
# * **tokens per expert**: kept (blue) and dropped (red) assignments, the capacity
#   `C = ceil(cf · k · T / E)` and the perfectly balanced load `k · T / E`;
# * **losses**: the router's balance loss (1.0 = balanced for the Switch-style loss) and the
#   ST-MoE z-loss `mean_t (logsumexp_e logits)²`.
#
# Controls: `capacity_factor = 0` means *dropless* (`None`); `noise` is the noisy top-k router's
# `noise_epsilon` (extra noise std on top of its learned `softplus(x W_noise)`); `jitter` is the Switch
# router's multiplicative input jitter `ε` (`x · U(1−ε, 1+ε)`). Switch forces `top_k = 1` and GShard
# `top_k = 2`; for expert choice `top_k` is the default capacity factor (experts pick tokens).
#
# `redraw` returns the plotted data as a dict, so it can be checked by code as well as by eye.

# %%
NUM_TOKENS = 64 if QUICK else 128
TOKEN_DIM = 16


def make_tokens(num_tokens, d_model, num_clusters=4, spread=0.8, seed=0):
    """Tokens drawn around a few random centres, sorted by cluster so the heatmap shows blocks."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, d_model, generator=g) * 1.5
    cluster = torch.randint(0, num_clusters, (num_tokens,), generator=g).sort().values
    return centres[cluster] + spread * torch.randn(num_tokens, d_model, generator=g), cluster


TOKENS, TOKEN_CLUSTER = make_tokens(NUM_TOKENS, TOKEN_DIM)


def route(router="softmax_top_k", top_k=2, capacity_factor=0.0, noise=0.0, jitter=0.0, num_experts=8,
          tokens=None, seed=0):
    """Route ``tokens`` through a fresh MoELayer; return the decision as plain numpy data."""
    tokens = TOKENS if tokens is None else tokens
    num_tokens = tokens.shape[0]
    cls = ROUTERS[router]
    k = cls.required_top_k or int(min(top_k, num_experts))
    options = {}
    if router == "noisy_top_k":
        options["noise_epsilon"] = float(noise)
    if router == "switch":
        options["jitter_epsilon"] = float(jitter)
    cf = float(capacity_factor) if capacity_factor and capacity_factor > 0 else None
    torch.manual_seed(seed)                      # same router weights W for every router
    layer = MoELayer(tokens.shape[1], 32, int(num_experts), top_k=k, router=router, capacity_factor=cf, **options)
    layer.train()                                # noise / jitter / random routing only act in training
    seen = {}
    hook = layer.router.register_forward_hook(lambda module, inputs, output: seen.update(route=output[0]))
    torch.manual_seed(seed + 1)                  # the router's random draws
    with torch.no_grad():
        layer(tokens)
    hook.remove()
    wanted_ids = seen["route"].expert_ids        # what the router chose, before capacity pruning
    rec = layer.last_routing                     # after pruning
    E = int(num_experts)
    assignment = torch.zeros(num_tokens, E)
    kept = rec.expert_ids >= 0
    rows = torch.arange(num_tokens)[:, None].expand_as(rec.expert_ids)
    assignment.index_put_((rows[kept], rec.expert_ids[kept]), rec.weights[kept].float(), accumulate=True)
    dropped = (wanted_ids >= 0) & ~kept
    dropped_mask = torch.zeros(num_tokens, E, dtype=torch.bool)
    dropped_mask[rows[dropped], wanted_ids[dropped]] = True
    balance = layer.router.balance_loss(seen["route"])  # the router's own load-balancing loss (routers.py)
    has_balance_loss = router not in ("sigmoid", "expert_choice")   # these two have none by design
    return {
        "router": router, "top_k": k, "num_experts": E, "capacity": rec.capacity,
        "assignment": assignment.numpy(),
        "dropped_mask": dropped_mask.numpy(),
        "tokens_per_expert": rec.tokens_per_expert.numpy(),
        "dropped_per_expert": dropped_mask.sum(0).numpy(),
        "dropped": int(rec.num_dropped),
        "tokens_without_expert": int((~kept).all(dim=1).sum()),
        "balance_loss": float(balance) if has_balance_loss else float("nan"),
        "z_loss": float(router_z_loss(rec.logits)),
        "max_over_mean_load": float(rec.tokens_per_expert.max() / rec.tokens_per_expert.float().mean()),
        "layer": layer,
    }


def redraw(router="softmax_top_k", top_k=2, capacity_factor=0.0, noise=0.0, jitter=0.0, num_experts=8, show=True):
    """Route the tokens with these controls, draw the three panels, return the plotted data.

    ``show=False`` builds the figure and closes it without displaying it (for the self-checks).
    """
    data = route(router, top_k, capacity_factor, noise, jitter, num_experts)
    E, num_tokens = data["num_experts"], data["assignment"].shape[0]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.1, 1.2, 0.8]})
    ax = axes[0]
    ax.imshow(data["assignment"], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    t_idx, e_idx = np.nonzero(data["dropped_mask"])
    ax.scatter(e_idx, t_idx, marker="x", color="red", s=14, label="dropped")
    ax.set(title=f"{router}: token → expert weight", xlabel="expert", ylabel="token (sorted by cluster)")
    if len(t_idx):
        ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    kept, dropped = data["tokens_per_expert"], data["dropped_per_expert"]
    ax.bar(range(E), kept, color="tab:blue", label="kept")
    ax.bar(range(E), dropped, bottom=kept, color="tab:red", label="dropped")
    ax.axhline(data["top_k"] * num_tokens / E if router != "expert_choice" else kept.mean(),
               color="grey", ls="--", label="balanced")
    if data["capacity"] is not None:
        ax.axhline(data["capacity"], color="black", ls=":", label=f"capacity C={data['capacity']}")
    ax.set(title=f"tokens per expert (max/mean {data['max_over_mean_load']:.2f})", xlabel="expert",
           xticks=range(E))
    ax.legend(fontsize=8)
    ax = axes[2]
    names = ["balance loss", "z-loss"]
    values = [data["balance_loss"], data["z_loss"]]
    ax.barh(names, [0 if np.isnan(v) else v for v in values], color=["tab:purple", "tab:orange"])
    for i, v in enumerate(values):
        ax.text(0, i, "  n/a (none)" if np.isnan(v) else f"  {v:.3f}", va="center")
    ax.set(title=f"dropped {data['dropped']} assignments;\n{data['tokens_without_expert']} tokens got no expert")
    plt.tight_layout()
    plt.show() if show else plt.close(fig)
    return data


# Each control change calls redraw(...) again; its returned dict is kept in explorer.result
# (interactive does not display it: the plot is the output).
explorer = widgets.interactive(
    redraw,
    router=widgets.Dropdown(options=list(ROUTERS), value="softmax_top_k", description="router"),
    top_k=widgets.IntSlider(value=2, min=1, max=4, description="top_k", continuous_update=False),
    capacity_factor=widgets.FloatSlider(value=0.0, min=0.0, max=3.0, step=0.25, description="cap. factor",
                                        continuous_update=False),
    noise=widgets.FloatSlider(value=0.0, min=0.0, max=2.0, step=0.1, description="noise",
                              continuous_update=False),
    jitter=widgets.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.05, description="jitter",
                               continuous_update=False),
    num_experts=widgets.IntSlider(value=8, min=2, max=16, description="experts", continuous_update=False),
)
display(explorer)

# %% [markdown]
# Things to try: set the capacity factor to 1.0 and watch the red crosses appear on the busiest
# expert; raise the number of experts and see the balance loss react; switch to `expert_choice`
# (every expert takes exactly `C` tokens, so nothing is "dropped" but some tokens get no expert).
#
# The same function without the widgets, for one setting that drops tokens:

# %%
example = redraw(router="switch", capacity_factor=1.0, num_experts=8)
print(f"capacity C = {example['capacity']}, dropped assignments = {example['dropped']}, "
      f"tokens per expert = {example['tokens_per_expert'].tolist()}")

# %% [markdown]
# ## 3. All routers on the same tokens
#
# Same tokens, same router weights `W` (same seed), 8 experts, `top_k = 2` where the router allows
# it, capacity factor 1.25. Each router turns the same logits into a different decision.

# %%
comparison = {name: route(name, top_k=2, capacity_factor=1.25, num_experts=8) for name in ROUTERS}

fig, axes = plt.subplots(2, len(ROUTERS), figsize=(2.3 * len(ROUTERS), 5.5), sharey="row")
for col, (name, data) in enumerate(comparison.items()):
    axes[0, col].imshow(data["assignment"], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    axes[0, col].set_title(name, fontsize=10)
    axes[0, col].set_xlabel("expert")
    E = data["num_experts"]
    axes[1, col].bar(range(E), data["tokens_per_expert"], color="tab:blue")
    axes[1, col].bar(range(E), data["dropped_per_expert"], bottom=data["tokens_per_expert"], color="tab:red")
    if data["capacity"] is not None:
        axes[1, col].axhline(data["capacity"], color="black", ls=":")
    axes[1, col].set_xlabel("expert")
axes[0, 0].set_ylabel("token")
axes[1, 0].set_ylabel("assignments (red = dropped)")
plt.tight_layout()
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
# scale from the plain dot-product routers.

# %% [markdown]
# ## 4. Loss-free balancing: the sigmoid router's bias
#
# DeepSeek-V3's router selects experts by `sigmoid(logits) + b`, where the bias `b[E]` is **not**
# learned by gradient descent. After each step the training loop calls `layer.update_router_bias()`,
# which applies `b_e ← b_e + γ · sign(mean_load − load_e)`: under-loaded experts become a little
# more attractive, over-loaded ones a little less. The combine weights use `sigmoid(logits)` only, so
# the bias changes *who* is chosen, never *how much* a chosen expert counts.
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
for step in range(BIAS_STEPS):
    batch = torch.randn(256, TOKEN_DIM, generator=g) + lean
    with torch.no_grad():
        sig_layer(batch)
    load = sig_layer.last_routing.tokens_per_expert.float()
    loads.append(load.numpy())
    load_ratio.append(float(load.max() / load.mean()))
    sig_layer.update_router_bias()                                 # b_e += γ · sign(mean − load_e)
    biases.append(sig_layer.router.bias.clone().numpy())
biases, loads = np.array(biases), np.array(loads)

fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
axes[0].plot(load_ratio)
axes[0].axhline(1.0, color="grey", ls="--")
axes[0].set(title="max / mean tokens per expert", xlabel="step", ylim=(0.9, None))
for e in range(biases.shape[1]):
    axes[1].plot(biases[:, e], label=f"expert {e}")
axes[1].set(title="bias b_e", xlabel="step")
axes[1].legend(fontsize=7, ncol=2)
im = axes[2].imshow(loads.T, aspect="auto", cmap="magma", interpolation="nearest")
axes[2].set(title="tokens per expert over steps", xlabel="step", ylabel="expert")
fig.colorbar(im, ax=axes[2])
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
# were routed to (`fastmoe_edu.train.expert_usage_by_language`). A bright cell means that language
# relies on that expert. Each token uses `top_k` *different* experts, so one expert can hold at most
# `1/top_k` of a language's assignments (0.5 here), and uniform routing gives `1/E`. After so little
# training the pattern is partial; `04_training` trains longer.

# %%
import tempfile

from fastmoe_edu.config import TrainConfig
from fastmoe_edu.train import build_dataset, expert_usage_by_language, train

spec_config = TrainConfig(
    max_steps=30 if QUICK else 200, batch_size=8 if QUICK else 16, seq_len=32, n_layer=2, n_head=2,
    d_model=32, d_hidden=64, num_experts=4, top_k=2, warmup_steps=5 if QUICK else 20,
    eval_interval=0, checkpoint_interval=0, sample_tokens=0, progress=False, num_threads=1,
    out_dir=tempfile.mkdtemp(prefix="fastmoe_edu_01_"),
)
t0 = time.perf_counter()
result = train(spec_config)
print(f"trained {result['steps']} steps in {time.perf_counter() - t0:.1f} s: "
      f"loss {result['train_loss'][0]:.3f} → {result['train_loss'][-1]:.3f}")

dataset = build_dataset(spec_config)
usage = expert_usage_by_language(result["model"], dataset, spec_config, num_batches=2 if QUICK else 8)

fig, axes = plt.subplots(1, usage.shape[0], figsize=(4.5 * usage.shape[0], 3.2), squeeze=False)
for li in range(usage.shape[0]):
    ax = axes[0, li]
    im = ax.imshow(usage[li].numpy(), cmap="viridis", vmin=0, vmax=1 / spec_config.top_k)
    for (lang, e), value in np.ndenumerate(usage[li].numpy()):
        ax.text(e, lang, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.3 else "black",
                fontsize=8)
    ax.set(title=f"MoE layer {li}: share of a language's assignments", xlabel="expert",
           xticks=range(usage.shape[2]), yticks=range(len(dataset.language_names)),
           yticklabels=dataset.language_names)
fig.colorbar(im, ax=axes[0, -1])
plt.tight_layout()
plt.show()
print(f"largest share of one language on one expert: {usage.max():.2f} "
      f"(uniform routing: {1 / usage.shape[2]:.2f}, the most possible: {1 / spec_config.top_k:.2f})")
for li in range(usage.shape[0]):
    favourite = usage[li].argmax(dim=1).tolist()
    print(f"MoE layer {li}: each language's most used expert: "
          + ", ".join(f"{name} → {e}" for name, e in zip(dataset.language_names, favourite)))

# %% [markdown]
# ## 6. Self-check
#
# The explorer's callback must really redraw: call `redraw` with different controls, and also move
# the widgets themselves (which calls the same function through ipywidgets), and check that the
# plotted data changed. The test suite runs this notebook with `FASTMOE_EDU_QUICK=1`.

# %%
plt.close("all")
base = redraw(router="softmax_top_k", top_k=2, capacity_factor=0.0, num_experts=8, show=False)
changes = {
    "top_k": dict(router="softmax_top_k", top_k=1, capacity_factor=0.0, num_experts=8),
    "capacity_factor": dict(router="softmax_top_k", top_k=2, capacity_factor=0.5, num_experts=8),
    "num_experts": dict(router="softmax_top_k", top_k=2, capacity_factor=0.0, num_experts=4),
    "router": dict(router="expert_choice", top_k=2, capacity_factor=0.0, num_experts=8),
}
for what, controls in changes.items():
    other = redraw(**controls, show=False)
    same = (other["assignment"].shape == base["assignment"].shape
            and np.array_equal(other["assignment"], base["assignment"])
            and np.array_equal(other["tokens_per_expert"], base["tokens_per_expert"]))
    assert not same, f"changing {what} did not change the plotted data"
assert base["dropped"] == 0, "dropless routing dropped tokens"
assert redraw(capacity_factor=0.5, show=False)["dropped"] > 0, "a small capacity must drop tokens"
noisy_a = redraw(router="noisy_top_k", noise=0.0, show=False)
noisy_b = redraw(router="noisy_top_k", noise=2.0, show=False)
assert not np.array_equal(noisy_a["assignment"], noisy_b["assignment"]), "noise did not change routing"
jitter_a = redraw(router="switch", top_k=1, jitter=0.0, show=False)
jitter_b = redraw(router="switch", top_k=1, jitter=0.9, show=False)
assert not np.array_equal(jitter_a["assignment"], jitter_b["assignment"]), "jitter did not change routing"

# Drive the widget itself: setting a control's value runs the callback again.
controls = {w.description: w for w in explorer.children if hasattr(w, "value")}
before = explorer.result
controls["experts"].value = 5
assert explorer.result is not before and explorer.result["assignment"].shape == (NUM_TOKENS, 5)
controls["cap. factor"].value = 0.5
assert explorer.result["dropped"] > 0 and explorer.result["capacity"] is not None
controls["router"].value = "gshard"
assert explorer.result["router"] == "gshard" and explorer.result["top_k"] == 2
controls["experts"].value, controls["cap. factor"].value, controls["router"].value = 8, 0.0, "softmax_top_k"
assert np.mean(load_ratio[-last:]) < load_ratio[0], "the bias did not improve the balance"
plt.close("all")
print(f"widget self-check passed ({time.perf_counter() - NOTEBOOK_START:.1f} s since the first cell)")
