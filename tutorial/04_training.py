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
# # 04 · Training a small MoE language model
#
# Everything from the first three notebooks, used for real: a GPT-style transformer whose
# feed-forward layers are `MoELayer`s (`fastmoe_edu/model.py`), trained on the default `languages`
# dataset (four synthetic token languages) with the project's `train(config)`.
#
# 1. train while the notebook watches: the loss and each expert's share of the tokens, redrawn
#    during training;
# 2. look at what the experts learned: which language uses which expert, and a generated sample;
# 3. swap the backend in the config (`"reference"` → `"numba"`) and check that the loss curves agree.
#
# **Words used here**, one line each (each is explained again where it first matters):
#
# | term | meaning |
# |---|---|
# | token, vocabulary | the symbols the model reads and predicts; the vocabulary is the set of all `V` of them |
# | language model (LM) | a model that predicts the next token from the ones before it |
# | LM loss | cross-entropy of that prediction, in nats; guessing uniformly costs `ln V` |
# | validation (val) loss | the same loss on held-out data the model never trains on |
# | step, batch | one parameter update, computed from one batch of sequences |
# | warmup, learning rate | the step size of the updates; it ramps up during the first (warmup) steps, then decays |
# | expert, router, top-k | as in `01_gating`: `E` small networks per MoE layer; the router sends each token to `k` |
# | assignment, share | one (token, expert) pair; an expert's share is its fraction of a layer's assignments |
# | load imbalance | `max / mean` assignments per expert; 1 = perfectly even |
# | aux loss | the router's extra losses (balance loss + z-loss) added to the LM loss |
# | checkpoint, resume | the run's state saved to disk, and a later run that continues from it |
# | backend | the code that runs the MoE layer's data movement and expert matmuls: `reference` or `numba` |
# | float32 rounding step | the gap from a float32 number to the next one (its "ulp"): about `5e-7` near 4 |
# | near-tie | a token whose two best experts score almost the same, so rounding can change the choice |
# | throughput | tokens processed per second of training |
#
# **`QUICK`** (`FASTMOE_EDU_QUICK=1`, set by the tests): 40 steps instead of 400, and no progress bars.

# %%
import dataclasses
import os
import tempfile
import textwrap
import time

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from tqdm.auto import tqdm

from fastmoe_edu.config import TrainConfig
from fastmoe_edu.evaluate import expert_usage_by_language
from fastmoe_edu.train import build_dataset, train

QUICK = os.environ.get("FASTMOE_EDU_QUICK", "0") == "1"
STEPS = 40 if QUICK else 400
CHUNK = 10 if QUICK else 50                  # redraw the plots every CHUNK steps

config = TrainConfig(
    dataset="languages", seq_len=32, batch_size=16,
    n_layer=2, n_head=2, d_model=48, d_hidden=96, num_experts=4, top_k=2, router="softmax_top_k",
    backend="reference",
    max_steps=STEPS, warmup_steps=max(5, STEPS // 20), lr=3e-3, min_lr=3e-4,
    eval_interval=CHUNK, eval_iters=4, checkpoint_interval=0,
    sample_tokens=0 if QUICK else 48, progress=False, num_threads=1,
    out_dir=tempfile.mkdtemp(prefix="fastmoe_edu_04_"),
)
defaults = TrainConfig()
print("settings that differ from the defaults (python -m fastmoe_edu.train --help lists all):")
for field in dataclasses.fields(config):
    if getattr(config, field.name) != getattr(defaults, field.name):
        print(f"  {field.name} = {getattr(config, field.name)!r}")


# %% [markdown]
# ## 1. Train and watch
#
# `train(config, stop_at=s)` stops after step `s` as if interrupted and saves a **checkpoint**;
# `train(replace(config, resume=True), stop_at=s2)` **resumes** from it. The data is a pure function
# of the step number, so training in chunks gives exactly the same run as training in one go,
# and between chunks the notebook moves a progress bar and redraws from the returned history:
#
# * the language-model loss per step (and the validation loss);
# * for each MoE layer, every expert's share of the (token, slot) assignments, stacked and smoothed
#   over 5 steps (dotted lines: a perfectly even split);
# * the load imbalance `max/mean` tokens per expert (1 = perfectly even).

# %%
def train_in_chunks(config, chunk, desc, after_chunk=None):
    """train(config) in pieces of ``chunk`` steps, moving a progress bar (off in QUICK runs).

    ``after_chunk(run)`` is called with each piece's result; the last result, returned, holds the
    whole run's history.
    """
    with tqdm(total=config.max_steps, desc=desc, disable=QUICK) as bar:
        for stop in range(chunk, config.max_steps + chunk, chunk):
            run = train(dataclasses.replace(config, resume=stop > chunk), stop_at=min(stop, config.max_steps))
            bar.update(run["steps"] - bar.n)
            if after_chunk is not None:
                after_chunk(run)
    return run


def moving_average(values, window):
    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    return np.array([np.convolve(column, kernel, mode="valid") for column in values.T]).T


def draw_history(axes, history, title=""):
    """Loss, each MoE layer's per-expert share (stacked, smoothed), and the load imbalance."""
    for ax in axes:
        ax.clear()
    steps = np.array([r["step"] for r in history["train"]])
    axes[0].plot(steps, [r["lm_loss"] for r in history["train"]], lw=1, label="train (LM loss)")
    if history["val"]:
        axes[0].plot([v["step"] for v in history["val"]], [v["val_loss"] for v in history["val"]], "o-", label="val")
    axes[0].set(xlabel="step", ylabel="cross-entropy (nats)", title=f"loss {title}")
    axes[0].legend(fontsize=8)
    load = np.array([r["tokens_per_expert"] for r in history["train"]], dtype=float)   # [steps, layers, E]
    share = load / load.sum(axis=2, keepdims=True)
    window = 5
    for layer in range(min(share.shape[1], 2)):
        smooth = moving_average(share[:, layer, :], window)
        ax = axes[1 + layer]
        ax.stackplot(steps[window - 1:] if len(steps) >= window else steps[-1:], smooth.T,
                     labels=[f"expert {e}" for e in range(share.shape[2])], colors=plt.cm.tab10.colors)
        for level in np.arange(1, share.shape[2]) / share.shape[2]:
            ax.axhline(level, color="white", ls=":", lw=0.8)
        # The shares fill 0..1; the legend goes in a band above them, not on them.
        ax.set(xlabel="step", ylim=(0, 1.15), yticks=np.linspace(0, 1, 5),
               title=f"MoE layer {layer}: share of assignments per expert")
        ax.legend(fontsize=7, loc="upper center", ncol=share.shape[2], frameon=False, borderaxespad=0.1)
    axes[3].plot(steps, [r["load_imbalance"] for r in history["train"]], color="tab:red", lw=1)
    axes[3].axhline(1.0, color="grey", ls=":")
    axes[3].set(xlabel="step", title="max / mean tokens per expert (mean over layers)")


fig, axes = plt.subplots(2, 2, figsize=(13, 7))
axes = axes.ravel()
live = display(fig, display_id=True)         # one output that is replaced after every chunk
started = time.perf_counter()


def redraw_live(run):
    history = run["history"]
    draw_history(axes, history, title=f"(step {run['steps']}/{STEPS})")
    fig.tight_layout()
    live.update(fig)
    last = history["train"][-1]
    print(f"step {run['steps']:>4}: LM loss {last['lm_loss']:.3f}, aux {last['aux_loss']:.4f}, "
          f"imbalance {last['load_imbalance']:.2f}, {time.perf_counter() - started:.1f} s")


reference_run = train_in_chunks(config, CHUNK, "reference backend", after_chunk=redraw_live)
history = reference_run["history"]
plt.close(fig)
reference_seconds = time.perf_counter() - started

# %%
first, final = history["train"][0]["lm_loss"], history["train"][-1]["lm_loss"]
uniform = np.log(build_dataset(config).vocab_size)
print(f"LM loss: {first:.3f} at step 1 (guessing uniformly over the vocabulary costs ln V = {uniform:.3f}) "
      f"→ {final:.3f} at step {STEPS}; final val loss {reference_run['final_val_loss']:.3f}")

# %% [markdown]
# ## 2. What the experts learned
#
# Each sequence of the `languages` dataset is in one language, and the dataset says which. Counting
# where each language's tokens are routed gives the specialisation picture (the same measurement as
# in `01_gating`, after a longer run): one expert can hold at most `1/top_k` of a language's
# assignments (each token uses `top_k` different experts), uniform routing gives `1/E`.

# %%
model = reference_run["model"]
dataset = build_dataset(config)
usage = expert_usage_by_language(model, dataset, config, num_batches=2 if QUICK else 8)
usage_fig, axes = plt.subplots(1, usage.shape[0], figsize=(5 * usage.shape[0], 3.2), squeeze=False)
for li in range(usage.shape[0]):
    ax = axes[0, li]
    im = ax.imshow(usage[li].numpy(), cmap="viridis", vmin=0, vmax=1 / config.top_k)
    for (lang, e), value in np.ndenumerate(usage[li].numpy()):
        ax.text(e, lang, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.3 else "black",
                fontsize=8)
    ax.set(title=f"MoE layer {li}", xlabel="expert", xticks=range(config.num_experts),
           yticks=range(len(dataset.language_names)), yticklabels=dataset.language_names)
usage_fig.colorbar(im, ax=axes[0, -1], label="share of the language's assignments")
plt.tight_layout()
plt.show()
spread = (usage.max(dim=2).values - usage.min(dim=2).values).mean()
print(f"mean gap between a language's most and least used expert: {spread:.2f} "
      f"(0 = no specialisation, {1 / config.top_k:.2f} = the most possible)")
if reference_run["sample"]:
    print("generated continuations (prompt | model's tokens):")
    print(reference_run["sample"])

# %% [markdown]
# ## 3. Same training, another backend
#
# The `backend` setting picks who runs the MoE layer's steps: `"reference"` (the plain PyTorch of
# `fastmoe_edu/dispatch.py`) or `"numba"` (the kernels of `backends/numba_backend.py`). Nothing
# else changes: same seed, same data, same model, same chunks. The loss curves should lie on top of
# each other. They need not be bit-identical: the kernels add numbers up in a different order, and
# float32 addition is not associative, so a sum can come out one **float32 rounding step** (the gap
# between neighbouring float32 numbers, about `5e-7` near a loss of 4) higher or lower. The right
# unit for the difference is therefore that step: the right-hand plot shows `|difference|` divided
# by the float32 step at the loss's value, so 0 means bit-identical and 1 means "neighbouring
# float32 numbers".
#
# Routing is a discrete choice, so a rounding difference can, rarely, flip a **near-tie** in some
# token's top-k; after that the runs follow different but equally good trajectories, and the
# difference grows far beyond rounding (the plot's axis turns logarithmic above 10 steps to show it).

# %%
numba_config = dataclasses.replace(config, backend="numba", out_dir=tempfile.mkdtemp(prefix="fastmoe_edu_04n_"),
                                   sample_tokens=0)
started = time.perf_counter()
numba_run = train_in_chunks(numba_config, CHUNK, "numba backend")
numba_seconds = time.perf_counter() - started

ref_loss = np.array([r["lm_loss"] for r in reference_run["history"]["train"]])
nb_loss = np.array([r["lm_loss"] for r in numba_run["history"]["train"]])
steps = np.arange(1, len(ref_loss) + 1)
difference = np.abs(ref_loss - nb_loss)
rounding_step = np.spacing(ref_loss.astype(np.float32)).astype(float)   # float32 gap at each loss value
in_steps = difference / rounding_step                                   # |difference| in rounding steps
# The first step at which the two runs routed differently (tokens per expert differ in some layer).
flips = [r1["step"] for r1, r2 in zip(reference_run["history"]["train"], numba_run["history"]["train"])
         if r1["tokens_per_expert"] != r2["tokens_per_expert"]]
first_flip = flips[0] if flips else None
before_flip = difference[: first_flip - 1] if first_flip else difference

fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
axes[0].plot(steps, ref_loss, label="reference", lw=2)
axes[0].plot(steps, nb_loss, label="numba", lw=1, ls="--")
axes[0].set(xlabel="step", ylabel="LM loss", title="loss: reference vs numba backend")
axes[0].legend()
ax = axes[1]
ax.axhline(1, color="tab:green", ls="--", lw=1, label="1 rounding step")
ax.vlines(steps, 0, in_steps, color="tab:blue", lw=1)
ax.plot(steps, in_steps, "o", ms=3, color="tab:blue", label="|reference − numba| at each step")
ax.plot(steps, np.maximum.accumulate(in_steps), color="black", lw=1, label="largest so far")
if first_flip:
    ax.axvline(first_flip, color="tab:red", ls=":", label=f"first routing difference (step {first_flip})")
ax.set_yscale("symlog", linthresh=10, linscale=2)                       # linear up to 10, then logarithmic
top = max(12, 3 * in_steps.max())
ticks = [0, 1, 2, 5, 10] + [10 ** p for p in range(2, int(np.log10(top)) + 1)]
ax.set_ylim(0, top)
ax.set_yticks(ticks, labels=[f"{t:g}" for t in ticks])
ax.set(xlabel="step", ylabel="float32 rounding steps",
       title=f"|loss difference| in float32 rounding steps (0 = bit-identical;\n"
             f"1 step = {rounding_step.min():.2g} to {rounding_step.max():.2g} at these losses)")
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)   # off the stems
plt.tight_layout()
plt.show()

identical = int((difference == 0).sum())
print(f"{identical} of {len(difference)} steps have bit-identical losses; the largest difference is "
      f"{difference.max():.3g} = {in_steps.max():.0f} float32 rounding steps at step {int(in_steps.argmax()) + 1}")
if first_flip:
    print(textwrap.fill(
        f"until step {first_flip - 1} both runs routed every token identically and the losses differ by at "
        f"most {in_steps[: first_flip - 1].max():.0f} rounding steps ({before_flip.max():.3g}). At step "
        f"{first_flip} a token whose top-k scores were nearly tied went to another expert in one run, and "
        f"from then on the two runs are different (equally valid) trajectories: mean |difference| afterwards "
        f"{difference[first_flip - 1:].mean():.3g}, against a loss that moved by "
        f"{ref_loss.max() - ref_loss.min():.2f}.", width=110))
else:
    print("both runs routed every token identically at every step; the losses differ only by rounding "
          "(the kernels add up in a different order)")
ref_rate = np.mean([r["tokens_per_sec"] for r in reference_run["history"]["train"][1:]])
nb_rate = np.mean([r["tokens_per_sec"] for r in numba_run["history"]["train"][1:]])
print(f"throughput: reference {ref_rate:,.0f} tokens/s, numba {nb_rate:,.0f} tokens/s "
      f"(the first numba step, which compiles the kernels, is left out)")
