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
# # 05 · Real models: Hugging Face MoE blocks on fastmoe_edu
#
# The MoE layers of published models (Mixtral, Qwen-MoE, DeepSeek-V3, Switch Transformers, ...) are
# the same router → experts → combine of `01_gating`, each with its own details. Hugging Face
# `transformers` implements them as **MoE blocks**; `fastmoe_edu/hf.py` converts a block into an
# `MoELayer` that computes the same thing (`from_hf`), swaps every block of a whole model
# (`moefy`), and turns a *dense* model into an MoE model (`upcycle`). This notebook:
#
# 1. writes down what each family's block computes, one formula each;
# 2. runs the routers of Mixtral, Qwen2-MoE, DeepSeek-V3 and Switch Transformers side by side on the
#    same tokens, and checks that `from_hf(block)` gives the block's outputs;
# 3. lets you pick the family and `top_k` and see the routing;
# 4. `moefy`s a small Mixtral language model: same logits, same loss, same gradients;
# 5. upcycles a small dense Llama model and trains it next to the dense one, with a live loss plot.
#
# All models here are **tiny and randomly initialised** from a config (nothing is downloaded): the
# point is the arithmetic, which does not depend on the size. Every number below is computed when the
# notebook runs. `docs/hf.md` is the reference for the calls used here.
#
# **Words used here**, one line each (each is explained again where it first matters):
#
# | term | meaning |
# |---|---|
# | Hugging Face `transformers` | the library most open models are published for; a model = a config + weights |
# | config | the sizes and options of a model (`hidden_size`, `num_experts_per_tok`, ...); a random model needs only this |
# | MoE block | `transformers`' module for one MoE layer (e.g. `MixtralSparseMoeBlock`): router + experts |
# | family | a model line whose MoE block computes the same thing (Mixtral, Qwen2-MoE, DeepSeek-V3, ...) |
# | router (gate) | the linear layer `W [E, d]` that scores the `E` experts for each token: logits `x Wᵀ` |
# | top-k | each token uses the `k` best-scoring experts (`num_experts_per_tok` in HF configs) |
# | renormalise (`norm_topk_prob`) | rescale the `k` chosen weights so that they sum to 1 |
# | sigmoid router | scores each expert with `σ(logit)` on its own, instead of a softmax over all experts |
# | correction bias | DeepSeek-V3's per-expert number added to the scores for the *choice* only (load balancing) |
# | expert groups | DeepSeek-V3 first picks the best `topk_group` of `n_group` groups of experts, then experts inside them |
# | routed scaling factor | a constant that multiplies DeepSeek's combine weights |
# | shared expert | an expert that every token uses, besides its `k` routed ones |
# | capacity, dropped token | Switch: an expert takes at most `expert_capacity` tokens of a sequence; the rest get no expert |
# | SwiGLU expert | `down · (silu(gate · x) ⊙ (up · x))`: the feed-forward network of Llama-style models |
# | causal LM | a language model that predicts the next token; `labels=ids` gives its loss (HF shifts them) |
# | aux loss (balance loss) | the router's extra loss that is small when the load is even; HF adds it to the LM loss |
# | `from_hf`, `to_hf` | one HF block → a new `MoELayer` with its weights, and back |
# | `moefy` | every supported MoE block of a model replaced by an `MoELayer`, in place |
# | upcycling | a dense model's MLP copied into `E` identical experts plus a new router: an MoE model that starts equal |
# | max abs difference | `max |a − b|` over all entries: 0 means identical; ~1e-7 is float32 rounding |
#
# **`QUICK`**: with `FASTMOE_EDU_QUICK=1` (the tests set it) the upcycling run is 30 steps instead of
# 300, so that the notebook finishes in well under a minute.

# %%
import copy
import os
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from IPython.display import display
from matplotlib.ticker import MaxNLocator
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

import fastmoe_edu
from fastmoe_edu import MoELayer, hf
from fastmoe_edu.data import batch_rng, get_dataset
from fastmoe_edu.hf import HFMoEBlock, from_hf, moe_aux_loss, moefy, upcycle

from _nbhelpers.forced_value import ForcedValue        # the top_k slider Switch forces to 1 (next to this notebook)

QUICK = os.environ.get("FASTMOE_EDU_QUICK", "0") == "1"
torch.set_num_threads(1)          # tiny tensors: one thread is fastest and leaves the other core free
print(f"fastmoe_edu {fastmoe_edu.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"QUICK={QUICK}")
print(f"fastmoe_edu.hf converts {len(hf.SUPPORTED)} HF MoE block classes and names {len(hf.UNSUPPORTED)} it cannot "
      f"(yet)")

# %% [markdown]
# ## 1. What the MoE blocks compute
#
# A block receives the hidden states `x` of the tokens (`d = hidden_size` numbers each) and returns a
# vector of the same size per token. Every family starts with router logits `l = x Wᵀ` (one number
# per expert) and ends with a weighted sum of a few experts' outputs; they differ in how the logits
# become a choice and weights. With `E_e(x)` expert `e`'s output and `(w_s, i_s)` the `k` chosen
# (weight, expert) pairs of a token:
#
# | family | HF block | choice and weights | output |
# |---|---|---|---|
# | Mixtral | `MixtralSparseMoeBlock` | `p = softmax(l)`; `i = top-k(p)`; `w_s = p_{i_s} / Σ_s p_{i_s}` | `y = Σ_s w_s E_{i_s}(x)` |
# | Qwen2-MoE | `Qwen2MoeSparseMoeBlock` | as Mixtral; renormalised only if `norm_topk_prob` (here: not, so `Σ w < 1`) | `y = Σ_s w_s E_{i_s}(x) + σ(x · g) · S(x)` |
# | DeepSeek-V3 | `DeepseekV3MoE` | `s = σ(l)`; choose by `s + b` inside the best `topk_group` groups; `w_s = r · s_{i_s} / Σ_s s_{i_s}` | `y = Σ_s w_s E_{i_s}(x) + S(x)` |
# | Switch Transformers | `SwitchTransformersSparseMLP` | `p = softmax(l)`; `i = argmax p` (`k = 1`); `w = p_i`; at most `C` tokens per expert and sequence | `y = w E_i(x)`, or `0` for a dropped token |
#
# * The experts of the first three are **SwiGLU** networks, `E_e(x) = down_e · (silu(gate_e · x) ⊙ (up_e · x))`,
#   stored by HF as two fused tensors per block: `gate_up_proj [E, 2I, d]` and `down_proj [E, d, I]`.
#   Switch's experts are ReLU networks, `E_e(x) = wo_e · relu(wi_e · x)`.
# * `S(x)` is a **shared expert**, an ordinary SwiGLU MLP that every token goes through. Qwen2-MoE
#   scales it per token by a learned sigmoid gate `σ(x · g)`; DeepSeek-V3 adds it as it is.
# * DeepSeek-V3's router: `σ` scores every expert on its own (they need not sum to 1). A **correction
#   bias** `b` is added to the scores only to decide *which* experts are chosen; the experts are split
#   into `n_group` groups, each group scored by the sum of its two best `s + b`, and only the experts
#   of the best `topk_group` groups compete. The chosen `s` (without `b`) are renormalised and
#   multiplied by the **routed scaling factor** `r` (2.5 in DeepSeek-V3).
# * Switch: the **capacity** `C` (`expert_capacity`) is counted along each sequence, in token order:
#   the `(C+1)`-th token of a sequence that picks an expert is **dropped**; its MoE output is 0 and
#   only the residual connection carries it on.
#
# `from_hf(block)` reads the family's options into the matching `MoELayer` options (for example
# `router="sigmoid"`, `renormalize`, `route_scale`, `num_groups`, `top_k_groups`, `num_shared_experts`,
# `shared_expert_gate` for DeepSeek-V3 and Qwen2-MoE) and copies the weights (for the SwiGLU families
# `gate_up_proj[:, :I] → w1`, `gate_up_proj[:, I:] → w3`, `down_proj → w2`, the router's `W` →
# `router.weight`). `docs/hf.md` lists every family's mapping, and the families it cannot convert
# (`fastmoe_edu.hf.UNSUPPORTED`) with what each would need.

# %% [markdown]
# ## 2. Four routers on the same tokens
#
# One block per family, built from a tiny config with the same sizes (`d = 32`, 8 experts, `k = 2`
# where the family allows it) and random weights. To make the *rules* the only difference, every
# router gets **the same weight matrix `W`**, so all four see the same logits `x Wᵀ`. DeepSeek-V3's
# 8 experts form 4 groups of 2, of which the best 2 compete, and it gets a small random correction
# bias. Switch gets `expert_capacity = 3` per sequence. The tokens are 2 sequences of 12 random vectors.
#
# The next two cells (collapsed in JupyterLab: click the ··· to read them) define `build_block(family, top_k)`,
# `route(family, top_k)`, which runs HF's router and returns its decision as plain numbers (and
# compares the block with `from_hf(block)`), and `draw(results)`, which plots one or more decisions.

# %% jupyter={"source_hidden": true}
D_MODEL, D_HIDDEN, NUM_EXPERTS = 32, 48, 8
N_GROUP, TOPK_GROUP, ROUTED_SCALING = 4, 2, 2.5          # DeepSeek-V3: 4 groups of 2 experts, the best 2 compete
SWITCH_CAPACITY = 3                                       # Switch: at most 3 tokens per expert and sequence
NUM_SEQUENCES, SEQ_LEN = 2, 12
BLOCKS = {"Mixtral": MixtralSparseMoeBlock, "Qwen2-MoE": Qwen2MoeSparseMoeBlock, "DeepSeek-V3": DeepseekV3MoE,
          "Switch": SwitchTransformersSparseMLP}
FIXED_TOP_K = {"Switch": 1}                               # HF's Switch router is top-1 by construction

g = torch.Generator().manual_seed(0)
ROUTER_W = torch.randn(NUM_EXPERTS, D_MODEL, generator=g) * 2 / D_MODEL ** 0.5   # logits of std ~2
CORRECTION_BIAS = 0.1 * torch.randn(NUM_EXPERTS, generator=g)                     # DeepSeek-V3's b
TOKENS = torch.randn(NUM_SEQUENCES, SEQ_LEN, D_MODEL, generator=g)                 # [B, S, d]


def hf_config(family, top_k):
    """A tiny config of the family: only the sizes and routing options matter for one block."""
    common = dict(hidden_size=D_MODEL, hidden_act="silu", num_experts_per_tok=top_k, experts_implementation="eager")
    if family == "Mixtral":
        return transformers.MixtralConfig(intermediate_size=D_HIDDEN, num_local_experts=NUM_EXPERTS, **common)
    if family == "Qwen2-MoE":
        return transformers.Qwen2MoeConfig(moe_intermediate_size=D_HIDDEN, num_experts=NUM_EXPERTS,
                                           shared_expert_intermediate_size=2 * D_HIDDEN, norm_topk_prob=False,
                                           **common)
    if family == "DeepSeek-V3":
        return transformers.DeepseekV3Config(moe_intermediate_size=D_HIDDEN, n_routed_experts=NUM_EXPERTS,
                                             n_group=N_GROUP, topk_group=TOPK_GROUP, n_shared_experts=1,
                                             routed_scaling_factor=ROUTED_SCALING, norm_topk_prob=True, **common)
    # No jitter and no dropout: both act only in training mode, where MoELayer (no dropout) would differ
    # from the block and from_hf warns so; here the blocks are only evaluated.
    return transformers.SwitchTransformersConfig(d_model=D_MODEL, d_ff=D_HIDDEN, num_experts=NUM_EXPERTS,
                                                 expert_capacity=SWITCH_CAPACITY, router_jitter_noise=0.0,
                                                 dropout_rate=0.0)


def router_weight(block):
    return block.router.classifier.weight if isinstance(block, SwitchTransformersSparseMLP) else block.gate.weight


def build_block(family, top_k=2):
    """The family's HF block with random weights, the shared router weight W, in eval mode."""
    top_k = FIXED_TOP_K.get(family, top_k)
    torch.manual_seed(1)
    block = BLOCKS[family](hf_config(family, top_k)).eval()
    with torch.no_grad():
        for param in block.parameters():        # a block built on its own is left uninitialised (torch.empty)
            param.normal_(0.0, 0.1)
        router_weight(block).copy_(ROUTER_W)
        if family == "DeepSeek-V3":
            block.gate.e_score_correction_bias.copy_(CORRECTION_BIAS)
    return block


def route(family, top_k=2):
    """HF's routing decision for TOKENS as numbers, and the block's output against from_hf(block)'s."""
    block = build_block(family, top_k)
    T = NUM_SEQUENCES * SEQ_LEN
    with torch.no_grad():
        if family == "Switch":
            one_hot, top_prob, logits = block.router(TOKENS)       # capacity is counted along each sequence
            combine = (one_hot * top_prob).reshape(T, NUM_EXPERTS).float()
            wanted = torch.zeros(T, NUM_EXPERTS).scatter(1, logits.reshape(T, -1).argmax(-1, keepdim=True), 1.0)
        else:
            logits, weights, ids = block.gate(TOKENS.reshape(T, D_MODEL))   # [T, E], [T, k], [T, k]
            combine = torch.zeros(T, NUM_EXPERTS).scatter(1, ids, weights.float())
            wanted = (combine > 0).float()
        output = block(TOKENS)
        class_name = type(block).__name__
        if class_name in hf.SUPPORTED:                           # the same block on fastmoe_edu's MoELayer
            difference, reason = float((from_hf(block).eval()(TOKENS) - output).abs().max()), None
        else:
            difference, reason = None, hf.UNSUPPORTED[class_name][1]
    dropped = (wanted > 0) & (combine == 0)                      # wanted, refused by a full expert
    return {"family": family, "class": class_name, "top_k": FIXED_TOP_K.get(family, top_k),
            "combine": combine.numpy(), "dropped_mask": dropped.numpy(),
            "tokens_per_expert": (combine > 0).sum(0).numpy(), "dropped_per_expert": dropped.sum(0).numpy(),
            "weight_sum": combine.sum(1).numpy(), "output_scale": float(output.abs().max()),
            "from_hf_difference": difference, "unsupported_reason": reason}


# %% jupyter={"source_hidden": true}
def draw(results):
    """One column per routing decision: token × expert combine weights (each with its own colour scale,
    from 0 to its largest weight: the families' weights differ in size), load per expert."""
    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1.2, 6.2), squeeze=False, height_ratios=[2.2, 1],
                             layout="constrained")
    for col, r in enumerate(results):
        heat, bars = axes[0, col], axes[1, col]
        image = heat.imshow(r["combine"], aspect="auto", cmap="viridis", vmin=0, vmax=max(float(r["combine"].max()), 1e-9),
                            interpolation="nearest")
        fig.colorbar(image, ax=heat, label="combine weight w", fraction=0.08, pad=0.02)
        tokens, experts = np.nonzero(r["dropped_mask"])
        heat.scatter(experts, tokens, marker="x", color="red", s=25)
        if r["family"] == "DeepSeek-V3":                          # group boundaries
            for edge in np.arange(1, N_GROUP) * NUM_EXPERTS // N_GROUP - 0.5:
                heat.axvline(edge, color="white", lw=1, ls="--")
        heat.axhline(SEQ_LEN - 0.5, color="grey", lw=0.8)           # between the two sequences
        if r["from_hf_difference"] is not None:
            check = f"from_hf: max|Δy| = {r['from_hf_difference']:.1e}"
        else:
            check = "from_hf: not supported"
        heat.set_title(f"{r['family']} (k={r['top_k']})\nΣw per token {r['weight_sum'].min():.2f}–"
                       f"{r['weight_sum'].max():.2f}\n{check}", fontsize=9)
        heat.set(xlabel="expert", ylabel="token" if col == 0 else None)
        bars.bar(range(NUM_EXPERTS), r["tokens_per_expert"], color="tab:blue", label="kept")
        bars.bar(range(NUM_EXPERTS), r["dropped_per_expert"], bottom=r["tokens_per_expert"], color="tab:red",
                 label="dropped")
        bars.set(xlabel="expert", ylabel="tokens" if col == 0 else None,
                 ylim=(0, 1.3 * max(1, (r["tokens_per_expert"] + r["dropped_per_expert"]).max())))  # room for the legend
        for ax in (heat, bars):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1, 0].legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
    return fig


def show(fig):
    display(fig)
    plt.close(fig)


# %% [markdown]
# Rows are tokens (the grey line separates the two sequences), columns are experts, the colour is the
# combine weight `w` (0 = expert not used; each panel has its own colour scale, from 0 to its largest
# weight — read the numbers on its colour bar: DeepSeek-V3's weights sum to 2.5 per token and reach
# above 1, Switch's stay below 1), a red × is a token that
# Switch dropped because its expert was full. Below: how many tokens each expert received. The title
# gives the range of `Σ w` per token and, for the families `fastmoe_edu.hf` supports, the largest
# difference between the HF block's output and `from_hf(block)`'s.

# %%
comparison = [route(family) for family in BLOCKS]
show(draw(comparison))

print(f"{'family':<13}{'HF block':<31}{'k':>2}{'Σw per token':>15}{'dropped':>9}   from_hf(block) vs block")
for r in comparison:
    if r["from_hf_difference"] is not None:
        check = f"max |Δy| = {r['from_hf_difference']:.1e} (outputs up to {r['output_scale']:.2f})"
    else:
        check = f"not supported: needs {r['unsupported_reason']}"
    print(f"{r['family']:<13}{r['class']:<31}{r['top_k']:>2}{r['weight_sum'].min():>8.2f}–{r['weight_sum'].max():<6.2f}"
          f"{int(r['dropped_mask'].sum()):>9}   {check}")

# %% [markdown]
# Reading the four panels, all made from the same logits:
#
# * **Mixtral** and **Qwen2-MoE** choose the same two experts for every token (same softmax, same
#   top-2); Mixtral renormalises the two weights to sum to 1, this Qwen2-MoE config
#   (`norm_topk_prob=False`) keeps the raw probabilities, so its weights are smaller (see its colour
#   bar's numbers) and sum to less than 1.
#   Qwen2-MoE's shared expert (not in the heat map) adds `σ(x · g) · S(x)` to every token.
# * **DeepSeek-V3** chooses differently: sigmoid scores plus the correction bias, and only inside the
#   two best groups (dashed lines), so a token whose two best experts lie in one weak group is sent
#   elsewhere. Its weights sum to the routed scaling factor 2.5, not 1.
# * **Switch** picks one expert per token with weight `p` (not renormalised, so well below 1), and
#   drops the tokens that arrive at an expert after `C = 3` others of the same sequence.
#
# The differences `max|Δy|` are float32 rounding (HF computes the routers' softmax in float32 too):
# the `MoELayer` from `from_hf` computes the same function with the same weights.

# %% [markdown]
# ## 3. Try it: family and top_k
#
# Pick a family and `k`; the block is rebuilt with that `num_experts_per_tok` (same `W`, same tokens)
# and drawn as above. Switch is top-1 by construction: the slider then shows 1 and is greyed out, and
# gets your own value back when you pick another family.
# Things to try: raise `k` for Qwen2-MoE and watch `Σ w` grow towards 1; for DeepSeek-V3, `k = 4`
# uses every expert of the two chosen groups, so the weights are spread over exactly two groups.

# %%
controls = {
    "family": widgets.Dropdown(options=list(BLOCKS), value="Mixtral", description="family"),
    "top_k": widgets.IntSlider(value=2, min=1, max=TOPK_GROUP * NUM_EXPERTS // N_GROUP, description="top_k",
                               continuous_update=False),
}
plot_area = widgets.Output()
shown = {}                       # the data behind the plot on screen, for inspection by code
top_k_widget = ForcedValue(controls["top_k"])   # keeps the student's own top_k while Switch forces 1


def redraw(family="Mixtral", top_k=2):
    """route(...) then draw: the same function the widgets call; returns the plotted data."""
    data = route(family, top_k)
    show(draw([data]))
    return data


def on_change(change=None):
    forced_k = FIXED_TOP_K.get(controls["family"].value)
    if not top_k_widget.settle(forced_k):          # it changed top_k's value: on_change runs again
        return
    with plot_area:
        plot_area.clear_output(wait=True)
        shown["data"] = redraw(**{name: control.value for name, control in controls.items()})


for control in controls.values():
    control.observe(on_change, names="value")
on_change()
display(widgets.VBox([widgets.HBox(list(controls.values())), plot_area]))

# %% [markdown]
# ## 4. `moefy`: a whole model on fastmoe_edu
#
# `moefy(model)` walks the model, and replaces every MoE block it supports by an `HFMoEBlock`: a thin
# wrapper holding `from_hf(block)`, with the same input and output. HF's balance loss is computed
# from the router logits, which HF collects with a hook on the router while `output_router_logits=True`;
# the wrapper recomputes `x Wᵀ` from the `MoELayer`'s router weight in a small module that gets the
# same hook, so the **aux loss** and its gradient are unchanged too.
#
# Below, two copies of the same tiny random Mixtral language model (same seed: identical weights), one
# of them moefied, read the same batch of token ids (from the synthetic `languages` dataset of
# `04_training`, 64 token ids). We compare the logits, HF's aux loss, the loss (`cross-entropy +
# router_aux_loss_coef · aux`) and, after `loss.backward()`, every parameter's gradient.

# %%
DATA = get_dataset("languages")
VOCAB = DATA.vocab_size


def token_batch(step, batch_size, seq_len, split="train", seed=0):
    """Token ids [B, seq_len + 1] of the languages dataset; HF's causal LMs shift labels=ids themselves."""
    x, y, _ = DATA.sample_batch(split, batch_size, seq_len, batch_rng(seed, split, step))
    return torch.cat([x, y[:, -1:]], dim=1)


def tiny_mixtral():
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02,
        attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


original, swapped = tiny_mixtral(), tiny_mixtral()
print("before:", swapped.model.layers[0].mlp.__class__.__name__, "with", swapped.model.layers[0].mlp.gate.weight.shape[0],
      "experts")
moefy(swapped, backend="reference")
print("after: ", swapped.model.layers[0].mlp)

ids = token_batch(0, batch_size=4, seq_len=24)
out_hf = original(ids, labels=ids, output_router_logits=True)
out_ours = swapped(ids, labels=ids, output_router_logits=True)
out_hf.loss.backward()
out_ours.loss.backward()

# every gradient of the original next to the same quantity in the moefied model
hf_params = dict(original.named_parameters())
pairs = [(name, param.grad, hf_params[name].grad) for name, param in swapped.named_parameters() if ".moe." not in name]
for index, layer in enumerate(swapped.model.layers):
    block, moe = original.model.layers[index].mlp, layer.mlp.moe
    pairs += [(f"layer {index} router W", moe.router.weight.grad, block.gate.weight.grad),
              (f"layer {index} experts gate_up", torch.cat([moe.experts.w1.grad, moe.experts.w3.grad], 1),
               block.experts.gate_up_proj.grad),
              (f"layer {index} experts down", moe.experts.w2.grad, block.experts.down_proj.grad)]
moefy_report = {
    "logits": (out_ours.logits, out_hf.logits), "aux loss": (out_ours.aux_loss, out_hf.aux_loss),
    "loss": (out_ours.loss, out_hf.loss),
    f"gradients ({len(pairs)} tensors)": (torch.cat([ours.flatten() for _, ours, _ in pairs]),
                                          torch.cat([theirs.flatten() for _, _, theirs in pairs])),
}
moefy_differences = {}
print(f"\n{'quantity':<24}{'HF (largest |value|)':>22}{'max |HF − moefied|':>20}")
for what, (ours, theirs) in moefy_report.items():
    moefy_differences[what] = float((ours - theirs).detach().abs().max())
    print(f"{what:<24}{float(theirs.detach().abs().max()):>22.4f}{moefy_differences[what]:>20.1e}")
print(f"\nloss = {out_hf.loss.item():.4f} (HF) and {out_ours.loss.item():.4f} (moefied); "
      f"uniform guessing costs ln {VOCAB} = {np.log(VOCAB):.4f}")

# %% [markdown]
# Everything agrees to float32 rounding. From here the moefied model trains like any HF model
# (build the optimizer *after* `moefy`: the swapped blocks' parameters are new tensors), and its MoE
# layers can use what fastmoe_edu adds: another backend (`backend="numba"`), expert parallelism across
# processes (`parallelize(moefy(model), ParallelLayout(ep=...))`, see `docs/hf.md`). `to_hf(layer, block)`
# copies trained weights back into an HF block for saving with `save_pretrained`.

# %% [markdown]
# ## 5. Upcycling a dense model
#
# **Sparse upcycling** (Komatsuzaki et al., 2022) starts an MoE model from a trained dense one: every
# MLP becomes an MoE layer whose `E` experts are all **copies of that MLP**, plus a new, random router.
# With softmax top-k and renormalised weights (`Σ_s w_s = 1`), every token's output is at first
#
# `y = Σ_s w_s · MLP(x) = MLP(x)`,
#
# whatever the router chooses: the upcycled model computes exactly what the dense model computed.
# Training then makes the copies diverge (each sees different tokens), and the model has `E` times
# the MLP parameters while each token runs only `k` of them.
#
# The experiment: a tiny random Llama model is first trained briefly on the `languages` dataset
# (standing in for a pretrained checkpoint); then two copies continue with the same batches, the
# dense one as it is and one upcycled to 4 experts, `k = 2`, each with a fresh AdamW optimizer. The
# upcycled model's loss is the LM loss plus its layers' balance loss (`moe_aux_loss(model)`), which a
# dense HF model knows nothing about.

# %%
PRETRAIN_STEPS = 10 if QUICK else 100
STEPS = 30 if QUICK else 300                       # after upcycling, for both models
CHUNK = 15 if QUICK else 25                        # redraw the plot every CHUNK steps
BATCH_SIZE, TRAIN_SEQ = 16, 32
LR = 2e-3
NUM_UPCYCLED_EXPERTS, UPCYCLED_TOP_K = 4, 2


def lm_loss(model, step, split="train"):
    ids = token_batch(step, BATCH_SIZE, TRAIN_SEQ, split, seed=1)
    return model(ids, labels=ids).loss


def train_step(model, optimizer, step):
    """One AdamW step on batch ``step``; returns the LM loss (the MoE balance loss, if any, is added to it)."""
    loss = lm_loss(model, step)
    optimizer.zero_grad()
    (loss + moe_aux_loss(model)).backward()         # moe_aux_loss of a dense model is 0
    optimizer.step()
    return loss.item()


dense_config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        attn_implementation="eager")
torch.manual_seed(0)
dense = transformers.LlamaForCausalLM(dense_config)
optimizer = torch.optim.AdamW(dense.parameters(), lr=LR)
t0 = time.perf_counter()
pretrain_loss = [train_step(dense, optimizer, step) for step in range(PRETRAIN_STEPS)]
print(f"dense pre-training: {PRETRAIN_STEPS} steps in {time.perf_counter() - t0:.1f} s, "
      f"loss {pretrain_loss[0]:.3f} → {pretrain_loss[-1]:.3f}")

upcycled = upcycle(copy.deepcopy(dense), num_experts=NUM_UPCYCLED_EXPERTS, top_k=UPCYCLED_TOP_K, backend="reference")
print("an upcycled MLP:", upcycled.model.layers[0].mlp)

check_ids = token_batch(0, 4, TRAIN_SEQ, "val", seed=1)
with torch.no_grad():
    dense_logits, upcycled_logits = dense(check_ids).logits, upcycled(check_ids).logits
upcycle_difference = float((upcycled_logits - dense_logits).abs().max())
print(f"logits at initialisation: max |upcycled − dense| = {upcycle_difference:.1e} "
      f"(logits up to {float(dense_logits.abs().max()):.1f}; float32 rounding)")


def count(model, active=False):
    """Parameters; with active=True, those one token uses (k of the E experts of each MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    if active:
        for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
            expert_params = sum(p.numel() for p in layer.experts.parameters())
            total -= expert_params * (1 - layer.top_k / layer.num_experts)
    return int(total)


print(f"parameters: dense {count(dense):,}; upcycled {count(upcycled):,}, of which one token uses "
      f"{count(upcycled, active=True):,}")

# %% [markdown]
# Now both train, step by step on the same batches, while the plot is redrawn every few steps:
#
# * the LM loss of both (thin: every step; thick: a moving average over 10 steps), after the dense
#   pre-training (grey);
# * the difference, upcycled − dense, of the two moving averages: below 0 means the upcycled model is
#   ahead (both see the same batches, so the batch-to-batch noise largely cancels here);
# * how far apart the upcycled experts have moved: for each layer, `mean_e ‖W1_e − W̄1‖ / ‖W̄1‖`, the
#   experts' distance from their mean, relative to it (0 = still identical copies);
# * the upcycled model's first MoE layer: each expert's share of the (token, expert) assignments,
#   smoothed over 10 steps (dotted lines: an even split).

# %%
def moving_average(values, window=10):
    values = np.asarray(values, dtype=float)
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def expert_spread(model):
    """Per MoE layer: mean over experts of ‖W1_e − mean W1‖ / ‖mean W1‖ (0 while the experts are copies)."""
    spreads = []
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        w1 = layer.experts.w1.detach()
        mean = w1.mean(dim=0)
        spreads.append(float((w1 - mean).flatten(1).norm(dim=1).mean() / mean.norm()))
    return spreads


def draw_training(axes, log):
    """The four panels from the training log (steps after upcycling are numbered from PRETRAIN_STEPS + 1)."""
    for ax in axes:
        ax.clear()
    pre = np.arange(1, len(log["pretrain"]) + 1)
    after = PRETRAIN_STEPS + np.arange(1, len(log["dense"]) + 1)
    smooth = {name: moving_average(log[name]) for name in ("dense", "upcycled")}
    smooth_steps = after[len(after) - len(smooth["dense"]):]
    axes[0].plot(pre, log["pretrain"], color="grey", lw=1, label="dense, pre-training")
    for name, colour in (("dense", "tab:blue"), ("upcycled", "tab:orange")):
        axes[0].plot(after, log[name], color=colour, lw=0.6, alpha=0.5)
        axes[0].plot(smooth_steps, smooth[name], color=colour, lw=2, label=name)
    axes[0].axvline(PRETRAIN_STEPS + 0.5, color="black", ls=":", lw=1)
    axes[0].set(xlabel="step", ylabel="LM loss (nats)", title=f"loss (step {PRETRAIN_STEPS + len(log['dense'])})")
    axes[0].legend(fontsize=8)
    axes[1].plot(smooth_steps, smooth["upcycled"] - smooth["dense"], color="tab:purple")
    axes[1].axhline(0, color="grey", ls="--", lw=1)
    axes[1].set(xlabel="step", ylabel="nats", title="upcycled − dense (moving averages; < 0: upcycled ahead)")
    spread = np.array(log["spread"])                                    # [steps + 1, layers]
    for layer in range(spread.shape[1]):
        axes[2].plot(PRETRAIN_STEPS + np.arange(len(spread)), spread[:, layer], label=f"MoE layer {layer}")
    axes[2].set(xlabel="step", title="upcycled experts: distance from their mean")
    axes[2].legend(fontsize=8)
    load = np.array(log["load"], dtype=float)                           # [steps, E] of MoE layer 0
    share = np.array([moving_average(column) for column in (load / load.sum(axis=1, keepdims=True)).T])
    axes[3].stackplot(after[len(after) - share.shape[1]:], share, labels=[f"expert {e}" for e in range(len(share))])
    for level in np.arange(1, len(share)) / len(share):
        axes[3].axhline(level, color="white", ls=":", lw=0.8)
    axes[3].set(xlabel="step", ylim=(0, 1.15), yticks=np.linspace(0, 1, 5),    # the legend above the shares
                title="upcycled MoE layer 0: share of assignments per expert")
    axes[3].legend(fontsize=7, loc="upper center", ncol=4, frameon=False, borderaxespad=0.1)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))             # steps are whole numbers


dense_optimizer = torch.optim.AdamW(dense.parameters(), lr=LR)
upcycled_optimizer = torch.optim.AdamW(upcycled.parameters(), lr=LR)     # after upcycle: new parameters
first_moe = next(m for m in upcycled.modules() if isinstance(m, MoELayer))
log = {"pretrain": pretrain_loss, "dense": [], "upcycled": [], "spread": [expert_spread(upcycled)], "load": []}

fig, axes = plt.subplots(2, 2, figsize=(13, 7))
axes = axes.ravel()
live = display(fig, display_id=True)              # one output that is replaced after every chunk
started = time.perf_counter()
for step in range(PRETRAIN_STEPS, PRETRAIN_STEPS + STEPS):
    log["dense"].append(train_step(dense, dense_optimizer, step))
    log["upcycled"].append(train_step(upcycled, upcycled_optimizer, step))
    log["spread"].append(expert_spread(upcycled))
    log["load"].append(first_moe.last_routing.tokens_per_expert.tolist())
    done = step + 1 - PRETRAIN_STEPS
    if done % CHUNK == 0 or done == STEPS:
        draw_training(axes, log)
        fig.tight_layout()
        live.update(fig)
plt.close(fig)
train_seconds = time.perf_counter() - started
print(f"{STEPS} steps of both models in {train_seconds:.1f} s")

# %%
with torch.no_grad():
    val_batches = 2 if QUICK else 8
    val_loss = {name: float(np.mean([lm_loss(model, step, "val").item() for step in range(val_batches)]))
                for name, model in (("dense", dense), ("upcycled", upcycled))}
print(f"first step after upcycling: LM loss dense {log['dense'][0]:.4f}, upcycled {log['upcycled'][0]:.4f} "
      f"(the same model, the same batch)")
print(f"last step: dense {log['dense'][-1]:.3f}, upcycled {log['upcycled'][-1]:.3f}; "
      f"validation loss ({val_batches} batches): dense {val_loss['dense']:.3f}, upcycled {val_loss['upcycled']:.3f}")
print("upcycled experts' distance from their mean at the end, per layer:",
      ", ".join(f"{s:.3f}" for s in log["spread"][-1]))

# %% [markdown]
# The two curves start at the same point (the first step after upcycling has the same loss for both:
# same model, same batch) and separate as the expert copies drift apart; the second panel shows by how
# much. How much upcycling helps depends on the training budget: here the experts have a few hundred
# steps to specialise, and the upcycled model also pays for its balance loss, so the gap is small and
# can go either way early on. In the paper's setting (a large pretrained checkpoint, an extra budget
# of a fraction of its pre-training) the upcycled model pulls ahead of the dense one trained on for
# the same extra compute.
