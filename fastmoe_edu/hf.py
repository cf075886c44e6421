"""Hugging Face models on fastmoe_edu: convert MoE blocks both ways, swap them in place, upcycle dense models.

Usage (``pip install -e ".[hf]"``: transformers >= 5.5, whose MoE blocks hold fused expert tensors)::

    from transformers import AutoModelForCausalLM
    from fastmoe_edu.hf import from_hf, to_hf, moefy, upcycle, moe_aux_loss

    model = AutoModelForCausalLM.from_pretrained("allenai/OLMoE-1B-7B-0924")
    moefy(model)                      # every supported MoE block now runs on a fastmoe_edu MoELayer
    out = model(input_ids, labels=input_ids, output_router_logits=True)
    out.loss.backward()               # the same loss (HF's balance loss included) and gradients as before

    layer = from_hf(hf_block)         # one HF MoE block -> a new MoELayer (weights copied, options read)
    to_hf(layer, hf_block)            # and back: the layer's weights into an HF block of the same family

    moefy(model, layout=ParallelLayout(ep=2))        # under mpirun: the swapped layers expert-parallel

    dense = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2-0.5B")
    upcycle(dense, num_experts=8, top_k=2)  # sparse upcycling: every MLP -> 8 copies of itself + a router
    loss = dense(input_ids, labels=input_ids).loss + moe_aux_loss(dense)

What a supported block computes (transformers 5 layout; the names are theirs)::

    logits = x Wᵀ                        gate.weight [E, d]            -> router.weight
    p = softmax(logits);  w, ids = top-k(p);  w /= Σ w  (if the family renormalizes)
    expert_e(x) = down_e · (silu(gate_e x) ⊙ up_e x)
                                         experts.gate_up_proj [E, 2I, d] = [gate; up] -> w1 = gate, w3 = up
                                         experts.down_proj    [E, d, I]               -> w2
    y = Σ_s w_s · expert_{ids_s}(x)

which is exactly ``MoELayer(router="softmax_top_k", expert="swiglu", renormalize=...)``. Families with more:

    Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE, Qwen3-Omni talker:
        y += σ(x · shared_expert_gate) · shared_expert(x)     -> num_shared_experts=1, shared_expert_gate=True
    DeepSeek-V2:  softmax top-k within the topk_group groups of largest max p, w = p · routed_scaling_factor
                                                              -> num_groups, top_k_groups, route_scale, renormalize=False
    DeepSeek-V3, GLM-4-MoE, dots.llm1:  sigmoid scores, correction bias, top-2-sum groups, norm_topk_prob,
                  routed_scaling_factor                       -> router="sigmoid" (bias = e_score_correction_bias)
    DeepSeek-V2/V3, GLM-4-MoE, dots.llm1:  y += shared_experts(x), width n_shared_experts · moe_intermediate_size
                                                              -> num_shared_experts=n_shared_experts

Families whose
blocks compute something the project's options cannot express are listed too (``UNSUPPORTED``), so the
error says what is missing instead of "unknown class". See docs/hf.md.

The registry is keyed by the HF class *name*, not the class object: importing every family's modeling
file to get its class would cost seconds, and a family that a transformers release renames or drops
must not break the import of this module.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .layer import MoELayer

# ----------------------------------------------------------------------------------------------------
# The registry of MoE block families
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One HF MoE block class that maps exactly onto an MoELayer with expert="swiglu".

    router_attr: the block's attribute holding the router (its ``weight`` is W [E, d]).
    renormalize: "always" / "never" / "norm_topk_prob" (read from the router's ``norm_topk_prob``).
    routing: "softmax" (softmax top-k), "deepseek_v2" (softmax top-k, ``topk_method`` greedy or
        group_limited_greedy, times ``routed_scaling_factor``) or "deepseek_v3" (the "sigmoid" router:
        ``e_score_correction_bias``, ``n_group`` / ``topk_group``, ``routed_scaling_factor``).
    shared: None, "deepseek" (``shared_experts``, an MLP added to every token) or "qwen2" (``shared_expert``
        scaled by σ(``shared_expert_gate``(x))).
    """
    name: str
    router_attr: str
    renormalize: str
    routing: str = "softmax"
    shared: str | None = None


SUPPORTED: dict[str, Family] = {
    "MixtralSparseMoeBlock": Family("Mixtral", "gate", "always"),
    "MiniMaxSparseMoeBlock": Family("MiniMax", "gate", "always"),
    "Qwen3MoeSparseMoeBlock": Family("Qwen3-MoE", "gate", "norm_topk_prob"),
    "Qwen3VLMoeTextSparseMoeBlock": Family("Qwen3-VL-MoE (text)", "gate", "always"),
    "OlmoeSparseMoeBlock": Family("OLMoE", "gate", "norm_topk_prob"),
    "FlexOlmoSparseMoeBlock": Family("FlexOlmo", "gate", "norm_topk_prob"),
    "JambaSparseMoeBlock": Family("Jamba", "router", "never"),
    # softmax over the k largest *logits* = the k largest softmax probabilities renormalized
    "GraniteMoeMoE": Family("Granite-MoE", "router", "always"),
    # Their shared MLP is added by the decoder layer, outside the block: swapping the block keeps it.
    "GraniteMoeSharedMoE": Family("Granite-MoE-Shared", "router", "always"),
    "GraniteMoeHybridMoE": Family("Granite-MoE-Hybrid", "router", "always"),
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": Family("Qwen3-Omni-MoE (thinker text)", "gate", "norm_topk_prob"),
    # A shared expert scaled by a sigmoid gate of the token: shared_expert_gate=True.
    "Qwen2MoeSparseMoeBlock": Family("Qwen2-MoE", "gate", "norm_topk_prob", shared="qwen2"),
    "Qwen3NextSparseMoeBlock": Family("Qwen3-Next", "gate", "norm_topk_prob", shared="qwen2"),
    "Qwen3_5MoeSparseMoeBlock": Family("Qwen3.5-MoE", "gate", "always", shared="qwen2"),
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": Family("Qwen3-Omni-MoE (talker)", "gate", "norm_topk_prob",
                                                   shared="qwen2"),
    # DeepSeek-V2's router ignores norm_topk_prob (transformers 5): never renormalized.
    "DeepseekV2Moe": Family("DeepSeek-V2", "gate", "never", routing="deepseek_v2", shared="deepseek"),
    "DeepseekV3MoE": Family("DeepSeek-V3", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "Glm4MoeMoE": Family("GLM-4-MoE", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "Dots1MoE": Family("dots.llm1", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
}

#: HF MoE block class name -> (family, what MoELayer would need to express it exactly).
UNSUPPORTED: dict[str, tuple[str, str]] = {
    "Ernie4_5_MoeSparseMoeBlock": ("ERNIE-4.5-MoE", "a score-correction bias added to the softmax probabilities "
                                   "before top-k, with a clamped normalizer (moe_norm_min)"),
    "Llama4TextMoe": ("Llama-4", "the top-1 sigmoid score multiplies the expert's *input*, not its output"),
    "SwitchTransformersSparseMLP": ("Switch Transformers", "expert capacity as a fixed number of tokens "
                                    "counted per sequence (config.expert_capacity), not C = ceil(cf·T/E) over the "
                                    "batch"),
    "NllbMoeSparseMLP": ("NLLB-MoE", "top-2 routing with per-sequence capacity and the second expert kept by a "
                         "sampling policy"),
    "GptOssMLP": ("GPT-OSS", "a clamped SwiGLU (gate clamped above, up clamped both ways, "
                  "gate·σ(α·gate)·(up + 1)); its expert biases and router bias exist (bias=True, router_bias=True) "
                  "but are not mapped"),
    "DbrxFFN": ("DBRX", "top-k weights normalized by their p-norm (moe_normalize_expert_weights), not their sum"),
    "PhimoeSparseMoeBlock": ("Phi-MoE", "SparseMixer routing (a masked, jittered softmax per selected expert)"),
    "JetMoeMoE": ("JetMoE", "a bias added to the MoE output and mixture-of-attention (MoA) experts in attention"),
    "HunYuanMoEV1Moe": ("HunYuan-MoE-V1", "its conversion (a shared MLP added to every token, which "
                        "num_shared_experts could express, is not mapped yet)"),
    "AriaTextMoELayer": ("Aria", "its conversion (shared experts, which num_shared_experts could express, "
                         "are not mapped yet)"),
}


class UnsupportedFamilyError(ValueError):
    """A Hugging Face MoE block that MoELayer cannot reproduce exactly with its current options."""


def family_of(block: nn.Module) -> Family:
    """The supported family of ``block``; a clear error for a listed-unsupported or an unknown class."""
    name = type(block).__name__
    if name in SUPPORTED:
        return SUPPORTED[name]
    if name in UNSUPPORTED:
        family, missing = UNSUPPORTED[name]
        raise UnsupportedFamilyError(f"{family} ({name}) is not supported by fastmoe_edu.hf: it needs {missing}. "
                                     f"Supported: {_supported_names()}")
    raise UnsupportedFamilyError(f"{name} is not a known Hugging Face MoE block; supported: {_supported_names()}")


def _supported_names() -> str:
    return ", ".join(f"{family.name} ({cls})" for cls, family in SUPPORTED.items())


# ----------------------------------------------------------------------------------------------------
# from_hf / to_hf: weights and options both ways
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockView:
    """What a supported block holds, checked: W [E, d], gate_up [E, 2I, d], down [E, d, I], k, the router's
    name and options (renormalize, route_scale, num_groups, top_k_groups), the sigmoid router's correction
    bias, and the shared MLP (gate_proj, up_proj, down_proj weights; the sigmoid gate's weight [1, d] or None)."""
    router_weight: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    top_k: int
    router_name: str
    router_options: dict
    correction_bias: torch.Tensor | None = None
    shared: tuple | None = None
    shared_gate: torch.Tensor | None = None
    num_shared: int = 0

    @property
    def renormalize(self) -> bool:
        return self.router_options["renormalize"]


def _read_block(block: nn.Module) -> _BlockView:
    family = family_of(block)
    what = f"{family.name} ({type(block).__name__})"
    router, experts = getattr(block, family.router_attr, None), getattr(block, "experts", None)
    layout_note = (f"this transformers version lays out {what} differently from the one fastmoe_edu.hf was "
                   f"written for (transformers >= 5.5; Granite-MoE >= 5.18, Jamba >= 5.22)")
    if router is None or experts is None or not hasattr(router, "top_k"):
        raise UnsupportedFamilyError(f"{what} has no .{family.router_attr} (with .top_k) / .experts: {layout_note}")
    if family.renormalize == "norm_topk_prob" and not hasattr(router, "norm_topk_prob"):
        raise UnsupportedFamilyError(f"{what}'s router has no norm_topk_prob: {layout_note}")
    _expect_parameters(what + " router", router, {"weight"})
    _expect_parameters(what + " experts", experts, {"gate_up_proj", "down_proj"})
    act = getattr(experts, "act_fn", None)
    if not _is_silu(act):
        raise UnsupportedFamilyError(f"{what}: experts use activation {type(act).__name__}, but MoELayer's SwiGLU "
                                     f"expert is silu(W1 x) ⊙ W3 x; only hidden_act='silu' converts exactly")
    jitter = getattr(block, "jitter_noise", None) or 0.0                  # Mixtral, MiniMax: x ← x · U(1−ε, 1+ε)
    if jitter > 0:
        raise UnsupportedFamilyError(f"{what}: router_jitter_noise={jitter} multiplies the block's "
                                     f"input (router *and* experts) by noise while training; MoELayer has no such "
                                     f"option (Switch's jitter reaches the router only). Set it to 0")
    weight, gate_up, down = router.weight, experts.gate_up_proj, experts.down_proj
    num_experts, d_model = weight.shape
    hidden = down.shape[-1]
    if gate_up.shape != (num_experts, 2 * hidden, d_model) or down.shape != (num_experts, d_model, hidden):
        raise UnsupportedFamilyError(f"{what}: expert shapes gate_up_proj {tuple(gate_up.shape)}, down_proj "
                                     f"{tuple(down.shape)} are not [E, 2I, d], [E, d, I] with E={num_experts}, "
                                     f"d={d_model}")
    if family.renormalize == "norm_topk_prob":
        renormalize = bool(router.norm_topk_prob)                   # Qwen3-MoE / OLMoE: a config switch
    else:
        renormalize = family.renormalize == "always"
    options = dict(renormalize=renormalize, route_scale=1.0, num_groups=None, top_k_groups=None)
    router_name, correction_bias = "softmax_top_k", None
    if family.routing != "softmax":
        options["route_scale"] = float(router.routed_scaling_factor)                  # w ← w · routed_scaling_factor
        grouped = router.num_group is not None and router.num_group > 1              # one group = no limit
        if family.routing == "deepseek_v2":
            if router.topk_method not in ("greedy", "group_limited_greedy"):
                raise UnsupportedFamilyError(f"{what}: topk_method={router.topk_method!r}; only 'greedy' and "
                                             f"'group_limited_greedy' convert exactly")
            grouped = grouped and router.topk_method == "group_limited_greedy"
        else:
            router_name, correction_bias = "sigmoid", router.e_score_correction_bias   # selection-only bias
        if grouped:
            options.update(num_groups=int(router.num_group), top_k_groups=int(router.topk_group))
    shared = shared_gate = None
    num_shared = 0
    if family.shared is not None:
        mlp = block.shared_experts if family.shared == "deepseek" else block.shared_expert
        _expect_parameters(what + " shared expert", mlp, {"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
        if not _is_silu(getattr(mlp, "act_fn", None)):
            raise UnsupportedFamilyError(f"{what}: the shared expert's activation is not silu; only hidden_act='silu' "
                                         f"converts exactly")
        shared = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        width = mlp.gate_proj.weight.shape[0]
        # DeepSeek: n_shared_experts MLPs of moe_intermediate_size, stored side by side as one; Qwen2: one.
        num_shared = getattr(getattr(block, "config", None), "n_shared_experts", None) or 1
        num_shared = num_shared if family.shared == "deepseek" and width % num_shared == 0 else 1
        if family.shared == "qwen2":
            _expect_parameters(what + " shared_expert_gate", block.shared_expert_gate, {"weight"})
            shared_gate = block.shared_expert_gate.weight                               # [1, d]: σ(x · g)
    return _BlockView(weight, gate_up, down, int(router.top_k), router_name, options, correction_bias, shared,
                      shared_gate, num_shared)


def _expect_parameters(what: str, module: nn.Module, names: set[str]) -> None:
    found = {name for name, _ in module.named_parameters()}
    if found != names:
        raise UnsupportedFamilyError(f"{what} has parameters {sorted(found)}, expected exactly {sorted(names)} "
                                     f"(e.g. biases, which this family's conversion does not carry)")


def _is_silu(act) -> bool:
    if isinstance(act, nn.SiLU):
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:                        # older transformers: ACT2FN["silu"] is nn.SiLU
        return False
    return isinstance(act, SiLUActivation)


def from_hf(block: nn.Module, backend: str = "reference", balance_loss_weight: float = 0.0) -> MoELayer:
    """A new MoELayer computing exactly what the HF MoE ``block`` computes, with a copy of its weights.

    ``balance_loss_weight`` defaults to 0: inside an HF model the balance loss is HF's own, computed from
    the router logits (``output_router_logits=True``, see :class:`HFMoEBlock`). The layer has the
    block's dtype and device.
    """
    view = _read_block(block)
    num_experts, d_model = view.router_weight.shape
    hidden = view.down.shape[-1]
    shared = {}
    if view.shared is not None:
        shared = dict(num_shared_experts=view.num_shared, shared_d_hidden=view.shared[0].shape[0] // view.num_shared,
                      shared_expert_gate=view.shared_gate is not None)
    layer = MoELayer(d_model, hidden, num_experts, top_k=view.top_k, router=view.router_name, expert="swiglu",
                     backend=backend, balance_loss_weight=balance_loss_weight, **shared, **view.router_options)
    layer.to(device=view.router_weight.device, dtype=view.router_weight.dtype)
    with torch.no_grad():
        layer.router.weight.copy_(view.router_weight)                           # W_g = gate.weight
        layer.experts.w1.copy_(view.gate_up[:, :hidden])                        # W1 = gate half (through silu)
        layer.experts.w3.copy_(view.gate_up[:, hidden:])                        # W3 = up half
        layer.experts.w2.copy_(view.down)                                       # W2 = down_proj
        if view.correction_bias is not None:
            layer.router.bias.copy_(view.correction_bias)                       # b = e_score_correction_bias
        if view.shared is not None:
            gate_proj, up_proj, down_proj = view.shared
            layer.shared_experts.w1.copy_(gate_proj)                            # silu(gate_proj x)
            layer.shared_experts.w3.copy_(up_proj)                              # ⊙ up_proj x
            layer.shared_experts.w2.copy_(down_proj)
            if view.shared_gate is not None:
                layer.shared_experts.gate.copy_(view.shared_gate[0])            # g = shared_expert_gate.weight[0]
    return layer


def to_hf(layer: MoELayer, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into the HF ``block`` (in place, returns it); the options must already agree."""
    view = _read_block(block)
    what = f"{family_of(block).name} ({type(block).__name__})"
    num_experts, d_model = view.router_weight.shape
    hidden = view.down.shape[-1]
    experts = layer.experts
    problems = []
    if layer.router_name != view.router_name:
        problems.append(f"router={layer.router_name!r} (the block's is {view.router_name!r})")
    else:
        for key, want in view.router_options.items():
            got = getattr(layer.router, key, None)
            if got != want:
                problems.append(f"{key}={got} (the block's is {want})")
    if layer.router_name in ("softmax_top_k", "sigmoid") and (layer.router.logit_bias is not None
                                                              or layer.router.logit_softcap is not None):
        problems.append("router_bias / logit_softcap set (the block's router is x Wᵀ)")
    got_shared = None if layer.shared_experts is None else (
        layer.shared_experts.width, layer.shared_experts.gate is not None, layer.shared_experts.kind,
        layer.shared_experts.b1 is not None)
    want_shared = None if view.shared is None else (view.shared[0].shape[0], view.shared_gate is not None, "swiglu",
                                                     False)
    if got_shared != want_shared:
        problems.append(f"shared experts (width, gated, kind, bias)={got_shared} (the block's are {want_shared})")
    if experts.kind != "swiglu" or experts.b1 is not None:
        problems.append(f"expert={experts.kind!r}, bias={experts.b1 is not None} (the block is a bias-free SwiGLU)")
    if layer.top_k != view.top_k:
        problems.append(f"top_k={layer.top_k} (the block's is {view.top_k})")
    capacity_factor = getattr(layer.router, "capacity_factor", None)
    if capacity_factor is not None:
        problems.append(f"capacity_factor={capacity_factor} (the block is dropless)")
    if (layer.num_experts, layer.d_model, experts.d_hidden) != (num_experts, d_model, hidden):
        problems.append(f"(num_experts, d_model, d_hidden)={(layer.num_experts, layer.d_model, experts.d_hidden)} "
                        f"(the block's are {(num_experts, d_model, hidden)})")
    if experts.w1.shape[0] != layer.num_experts:
        problems.append(f"the layer holds {experts.w1.shape[0]} of its {layer.num_experts} experts (expert-parallel); "
                        f"gather them into one process first")
    if problems:
        raise ValueError(f"cannot copy this MoELayer into {what}: " + "; ".join(problems))
    with torch.no_grad():
        view.router_weight.copy_(layer.router.weight)
        view.gate_up[:, :hidden].copy_(experts.w1)
        view.gate_up[:, hidden:].copy_(experts.w3)
        view.down.copy_(experts.w2)
        if view.correction_bias is not None:
            view.correction_bias.copy_(layer.router.bias)
        if view.shared is not None:
            for target, source in zip(view.shared, (layer.shared_experts.w1, layer.shared_experts.w3,
                                                    layer.shared_experts.w2)):
                target.copy_(source)
            if view.shared_gate is not None:
                view.shared_gate.copy_(layer.shared_experts.gate[None])
    return block


# ----------------------------------------------------------------------------------------------------
# moefy: swap the blocks of a loaded model
# ----------------------------------------------------------------------------------------------------


class RouterLogits(nn.Module):
    """logits = x Wᵀ [T, E], differentiable in x and W: what HF's balance loss reads.

    In transformers 5 a block returns only its hidden states; the router logits reach
    ``load_balancing_loss_func`` through a forward hook that records the router module's output while
    ``output_router_logits=True``. This module is that router's stand-in: ``moefy`` hooks it the same
    way. It holds no weight: HFMoEBlock passes it the MoELayer's router weight.
    """

    def forward(self, hidden_states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return hidden_states.reshape(-1, weight.shape[1]) @ weight.t()


class HFMoEBlock(nn.Module):
    """Stands where the HF MoE block stood: the same input [B, S, d] and output [B, S, d], run by MoELayer."""

    def __init__(self, layer: MoELayer, family: str):
        super().__init__()
        self.moe = layer
        self.router_logits = RouterLogits()
        self.family = family

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y = self.moe(hidden_states)
        # Recomputed (one [T, d] × [d, E] product) for HF's recording hook, active with output_router_logits=True;
        # the MoELayer keeps only a detached copy of its logits, and HF's balance loss needs their gradient.
        self.router_logits(hidden_states, self.moe.router.weight)
        return y

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


def moefy(model: nn.Module, backend: str = "auto", layout=None) -> nn.Module:
    """Replace, in place, every supported HF MoE block of ``model`` by an :class:`HFMoEBlock`; returns ``model``.

    Every block is checked before any is replaced: an unsupported family raises UnsupportedFamilyError
    naming what is missing, and a model without any known MoE block raises ValueError. With ``layout``
    (a ``fastmoe_edu.distributed.ParallelLayout``) each swapped MoELayer is made expert-parallel with
    ``parallelize(layer, layout)``; the rest of the model stays replicated (build it from the same seed
    on every rank, and all-reduce with ``allreduce_gradients(model, layout)``). Build the optimizer
    after this call: the swapped blocks' parameters are new tensors.
    """
    known = set(SUPPORTED) | set(UNSUPPORTED)
    targets = [(name, module) for name, module in model.named_modules() if type(module).__name__ in known]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Hugging Face MoE block fastmoe_edu.hf knows; "
                         f"supported: {_supported_names()}. A dense model can be made MoE with upcycle()")
    for _, block in targets:
        _read_block(block)                       # every block checked before any is replaced
    record_logits = _logits_recorder()
    for name, block in targets:
        adapter = HFMoEBlock(from_hf(block, backend=backend), family_of(block).name)
        if record_logits is not None:
            record_logits(adapter.router_logits, "router_logits", 0)
        _set_submodule(model, name, adapter)
    if layout is not None:
        from .distributed import parallelize
        for _, module in model.named_modules():
            if isinstance(module, HFMoEBlock):
                parallelize(module.moe, layout)
    return model


def _logits_recorder():
    """transformers' hook installer for recorded outputs, or None (with a warning) if this version lacks it."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook   # (sic: their spelling)
    except ImportError:
        warnings.warn("this transformers version has no install_output_capuring_hook: with moefy, "
                      "output_router_logits=True will not see the swapped routers (HF's balance loss is lost)")
        return None
    return install_output_capuring_hook


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Σ over the model's MoELayers of their last aux loss (an upcycled model's balance loss: add it to the loss)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoELayer)]
    return torch.stack(losses).sum() if losses else torch.zeros(())


# ----------------------------------------------------------------------------------------------------
# upcycle: dense MLPs -> MoE layers whose experts all start as the MLP (Komatsuzaki et al. 2022)
# ----------------------------------------------------------------------------------------------------

#: dense MLP class name -> family, for the SwiGLU MLPs (gate_proj, up_proj, down_proj, act_fn).
SWIGLU_MLPS = {"LlamaMLP": "Llama", "MistralMLP": "Mistral", "Qwen2MLP": "Qwen2", "Qwen3MLP": "Qwen3"}
#: GPT-2's MLP: c_fc, act, c_proj (Conv1D, weights stored [in, out]), dropout.
GPT2_MLPS = {"GPT2MLP": "GPT-2"}


class UpcycledMLP(nn.Module):
    """Stands where a dense MLP stood: x [B, S, d] -> [B, S, d], run by an MoELayer (+ the MLP's dropout)."""

    def __init__(self, layer: MoELayer, dropout: nn.Module | None = None):
        super().__init__()
        self.moe = layer
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        y = self.moe(hidden_states)
        return y if self.dropout is None else self.dropout(y)


def upcycle(model: nn.Module, num_experts: int, top_k: int, router: str = "softmax_top_k",
            backend: str = "auto", **router_options) -> nn.Module:
    """Sparse upcycling, in place: every dense MLP becomes an MoELayer whose ``num_experts`` experts all
    start as copies of it; returns ``model``.

    With combine weights that sum to 1 for every token (softmax_top_k with renormalize=True, the
    default; gshard), y = Σ_s w_s · mlp(x) = mlp(x): the upcycled model's logits at initialization
    equal the dense model's. The router starts random, so training makes the copies diverge. The
    layers' balance loss is not part of an HF dense model's loss: add ``moe_aux_loss(model)``.
    """
    targets = [(name, module) for name, module in model.named_modules()
               if type(module).__name__ in SWIGLU_MLPS or type(module).__name__ in GPT2_MLPS]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no dense MLP upcycle() knows; supported: "
                         f"{', '.join(f'{f} ({c})' for c, f in {**SWIGLU_MLPS, **GPT2_MLPS}.items())}")
    converters = [(name, _swiglu_experts if type(mlp).__name__ in SWIGLU_MLPS else _gpt2_experts, mlp)
                  for name, mlp in targets]
    plans = [(name, convert(mlp), mlp) for name, convert, mlp in converters]      # checks all before changing any
    for name, (expert, hidden, weights, dropout), mlp in plans:
        reference = next(mlp.parameters())
        d_model = reference.shape[-1] if expert == "swiglu" else weights["w1"].shape[-1]
        layer = MoELayer(d_model, hidden, num_experts, top_k=top_k, router=router, expert=expert,
                         bias="b1" in weights, backend=backend, **router_options)
        layer.to(device=reference.device, dtype=reference.dtype)
        with torch.no_grad():
            for key, value in weights.items():            # every expert e: W_e = the MLP's W
                getattr(layer.experts, key).copy_(value.unsqueeze(0).expand_as(getattr(layer.experts, key)))
        _set_submodule(model, name, UpcycledMLP(layer, dropout))
    return model


def _swiglu_experts(mlp: nn.Module):
    """Llama-style: down(silu(gate x) ⊙ up x) -> w1 = gate, w3 = up, w2 = down (biases if mlp_bias)."""
    family = SWIGLU_MLPS[type(mlp).__name__]
    if not _is_silu(getattr(mlp, "act_fn", None)):
        raise UnsupportedFamilyError(f"{family} MLP uses activation {type(getattr(mlp, 'act_fn', None)).__name__}; "
                                     f"MoELayer's SwiGLU expert needs hidden_act='silu'")
    weights = {"w1": mlp.gate_proj.weight, "w3": mlp.up_proj.weight, "w2": mlp.down_proj.weight}
    biases = [mlp.gate_proj.bias, mlp.up_proj.bias, mlp.down_proj.bias]
    if any(b is not None for b in biases):
        if any(b is None for b in biases):
            raise UnsupportedFamilyError(f"{family} MLP has biases on some projections only; MoELayer's bias=True "
                                         f"gives all three")
        weights.update(b1=biases[0], b3=biases[1], b2=biases[2])
    return "swiglu", mlp.gate_proj.weight.shape[0], weights, None


def _gpt2_experts(mlp: nn.Module):
    """GPT-2: dropout(c_proj(act(c_fc x))); Conv1D stores weight [in, out], so W1 = c_fc.weightᵀ."""
    act = type(mlp.act).__name__
    if act != "GELUActivation" or getattr(mlp.act, "act", None) is not nn.functional.gelu:
        raise UnsupportedFamilyError(
            f"GPT-2 MLP uses activation {act}; MoELayer's 'gelu' expert is the exact (erf) GELU, so only "
            f"activation_function='gelu' converts exactly (GPT-2's default 'gelu_new' is the tanh approximation)")
    weights = {"w1": mlp.c_fc.weight.t(), "b1": mlp.c_fc.bias, "w2": mlp.c_proj.weight.t(), "b2": mlp.c_proj.bias}
    return "gelu", mlp.c_fc.weight.shape[1], weights, mlp.dropout
