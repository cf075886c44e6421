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

    plan = parallelize(moefy(model), ParallelLayout(ep=2))   # under mpirun: the swapped layers expert-parallel

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

which is exactly ``MoELayer(router="softmax_top_k", expert="swiglu", renormalize=...)``. Families with more
(and other weight layouts, read by ``Family.experts``):

    Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE, Qwen3-Omni talker:
        y += σ(x · shared_expert_gate) · shared_expert(x)     -> num_shared_experts=1, shared_expert_gate=True
    DeepSeek-V2:  softmax top-k within the topk_group groups of largest max p, w = p · routed_scaling_factor
                                                      -> num_groups, top_k_groups, route_scale, renormalize=False
    DeepSeek-V3, GLM-4-MoE, dots.llm1:  sigmoid scores, correction bias, top-2-sum groups, norm_topk_prob,
                  routed_scaling_factor                       -> router="sigmoid" (bias = e_score_correction_bias)
    DeepSeek-V2/V3, GLM-4-MoE, dots.llm1:  y += shared_experts(x), width n_shared_experts · moe_intermediate_size
                                                              -> num_shared_experts=n_shared_experts
    HunYuan-MoE-V1, Aria, ERNIE-4.5-MoE:  y += shared MLP(x)  -> num_shared_experts (1, or moe_num_shared_experts)
    GPT-OSS:   logits = x Wᵀ + c; w = softmax over the k largest logits;
               expert_e(x) = W2 (g·σ(α·g) ⊙ (u + 1)) + b2, g = min(W1 x + b1, L), u = clamp(W3 x + b3, −L, L)
               (gate and up in alternate columns of gate_up_proj [E, d, 2I])
                                                              -> expert="clamped_swiglu", bias=True, router_bias=True
    DBRX:      w = p_sel / ‖p_sel‖_q, q = moe_normalize_expert_weights     -> renormalize_p=q
    ERNIE-4.5-MoE:  ids = top-k of p + b (b only selects), w = p_sel / max(Σ p_sel, moe_norm_min)
                                                              -> selection_bias=True, renormalize_min=moe_norm_min
    Switch Transformers:  top-1, w = p (not renormalized), ReLU experts, at most expert_capacity tokens per expert
               *in each sequence* (a dropped token's output is 0)
                                                              -> router="switch", expert="relu", expert_capacity,
                                                                 capacity_per="sequence"
    JetMoE:    w = softmax over the k largest logits; input_linear [E, 2I, d] = [gate; up], output_linear
               [E, d, I]; y += b, a learned [d] bias on every token   -> output_bias=True (geglu with "gelu")
    Llama-4:   ids = top-k of the logits, w = σ(l_sel) on the expert's *input*: y = Σ expert_e(w_e · x)
               + shared_expert(x)          -> router="sigmoid", renormalize=False, weights_on="input", 1 shared
    Nemotron-H:  DeepSeek-V3's router; expert_e(x) = down_e · relu(up_e x), no gate matrix (up_proj [E, I, d],
               down_proj [E, d, I]), a shared MLP of the same form     -> expert="relu" (or "gelu"), 1 shared

Families whose
blocks compute something the project's options cannot express are listed too (``UNSUPPORTED``), so the
error says what is missing instead of "unknown class". See docs/hf.md.

The registry is keyed by the HF class *name*, not the class object: importing every family's modeling
file to get its class would cost seconds, and a family that a transformers release renames or drops
must not break the import of this module.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .layer import MoELayer
from .options import LayerOptions
from .routers import router_options as router_defaults

# ----------------------------------------------------------------------------------------------------
# The registry of MoE block families
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One HF MoE block class that maps exactly onto an MoELayer, and where its parts are.

    router_attr: the block's attribute holding the router module.
    renormalize: how the top-k weights are renormalized: "always" / "never" / "norm_topk_prob" (read from the
        router's ``norm_topk_prob``) / "p_norm" (DBRX: divided by their L_p norm, p = the block's
        ``moe_normalize_expert_weights``; None = never).
    routing: "softmax" (softmax top-k), "deepseek_v2" (softmax top-k, ``topk_method`` greedy or
        group_limited_greedy, times ``routed_scaling_factor``), "deepseek_v3" (the "sigmoid" router:
        ``e_score_correction_bias``, ``n_group`` / ``topk_group``, ``routed_scaling_factor``), "ernie" (softmax
        top-k of p + ``e_score_correction_bias``, normalizer clamped at ``moe_norm_min``), "switch" (the
        "switch" router: top-1, not renormalized, ``expert_capacity`` tokens per expert and sequence),
        "llama4" (the "sigmoid" router without a bias, not renormalized, the weight on the expert's input),
        "sigmoid" (s = σ(l), ids = top-k of s (+ the bias at ``bias_at``), w = s_sel (renormalized) · scale, no
        groups), "mistral4" (softmax top-k with DeepSeek-V3's group code, which only one group converts),
        "cohere2" (the top-k *logits*, then a softmax over them or their sigmoid: ``expert_selection_fn``).
    shared: None, or the always-on MLP added to every token: "deepseek" (``shared_experts``, n_shared_experts
        side by side), "qwen2" (``shared_expert`` scaled by σ(``shared_expert_gate``(x))), "hunyuan"
        (``shared_mlp``), "aria" / "ernie" (``shared_experts``, moe_num_shared_experts side by side; ERNIE's is
        None without shared experts), "llama4" / "plain_single" (``shared_expert``), "num_shared"
        (``shared_experts``, num_shared_experts side by side; Cohere2-MoE has none with num_shared_experts=0),
        "plain" (``shared_experts``, one MLP), "fused_dense" (``shared_experts`` with one ``gate_up_proj``
        Linear [2I, d] = [gate; up] and GPT-OSS's clamped activation: MiniMax-M3-VL), "plain_mlp"
        (``shared_experts`` without a gate matrix: up_proj, down_proj, the routed experts' activation: Nemotron-H).
    experts: how the expert weights are stored (E experts, width I, model width d):
        "fused"        gate_up_proj [E, 2I, d] = [gate; up], down_proj [E, d, I]          (most families)
        "fused_in_out" gate_up_proj [E, d, 2I] = [gate | up], down_proj [E, I, d]          (Aria: x @ W)
        "gpt_oss"      gate_up_proj [E, d, 2I], gate and up in *alternate* columns (0::2, 1::2), with
                       biases gate_up_proj_bias [E, 2I], down_proj [E, I, d], down_proj_bias [E, d]
        "dbrx"         mlp.w1 (gate), mlp.v1 (up), mlp.w2 (down, transposed), each [E·I, d]
        "switch"       one module expert_{e} per expert: wi [I, d], wo [d, I] (ReLU, no gate)
        "jetmoe"       the block itself: input_linear.weight [E, 2I, d] = [gate; up], output_linear.weight
                       [E, d, I], and bias [d] added to the output
        "fused_clamped" as "fused", with GPT-OSS's clamped activation (constants experts.swiglu_alpha / _limit)
        "fused_in_out_bias"  gate_up_proj [E, d, 2I] = [gate | up] (halves, x @ W), down_proj [E, I, d], with
                       GPT-OSS's biases and clamped activation (OpenAI privacy filter)
        "plain"        up_proj [E, I, d], down_proj [E, d, I], no gate: expert_e(x) = down_e · act(up_e x)
                       (Nemotron-H; act relu or the exact gelu -> expert "relu" / "gelu")
    weight_at / top_k_at: the path from the block to the router weight W [E, d] and to k, when they are not
        ``<router_attr>.weight`` / ``<router_attr>.top_k``.
    router_bias: the router is a Linear with a bias: logits = x Wᵀ + c (GPT-OSS).
    returns_scores: the block returns (y, router scores), not y (GPT-OSS).
    logits_per_token: the router logits HF records are [T, E] (True) or shaped like the input, [B, S, E] (Switch).
    bias_at: the path from the block to a selection-only bias b (ids = top-k of s + b, the weights from s alone),
        when it is not the "deepseek_v3" router's ``e_score_correction_bias`` (a missing attribute = no bias).
    scale_at: the path to the routed output's multiplier (routed_scaling_factor), when it is not the
        "deepseek_v3" / "deepseek_v2" router's; a multiplier of the routed sum and one of the k weights are the
        same number: route_scale.
    softcap_at: the path to a logit soft-cap (cap · tanh(l / cap); 0 = none): logit_softcap.
    renormalize_eps: ε of w = s / (Σ s + ε) when the family renormalizes (LFM2-MoE: 1e-6): renormalize_eps.
    groups_masked_with_zero: the "deepseek_v3" group limit fills the excluded groups' scores with 0, not −∞
        (A.X-K2): equal to MoELayer's only without groups, so a grouped block is refused.
    unused_at: paths of parameters the block holds (when the config creates them) but its forward never reads:
        LongCat-Flash's ``router.classifier.bias`` (router_bias=True), which its router leaves out of
        F.linear(x, classifier.weight). The layer leaves them out too (no logit bias), from_hf copies nothing
        from them and to_hf leaves them as they are; the block's function does not depend on them.
    """
    name: str
    router_attr: str
    renormalize: str
    routing: str = "softmax"
    shared: str | None = None
    experts: str = "fused"
    weight_at: str | None = None
    top_k_at: str | None = None
    router_bias: bool = False
    returns_scores: bool = False
    logits_per_token: bool = True
    bias_at: str | None = None
    scale_at: str | None = None
    softcap_at: str | None = None
    renormalize_eps: float = 0.0
    groups_masked_with_zero: bool = False
    unused_at: tuple[str, ...] = ()

    @property
    def weight_path(self) -> str:
        return self.weight_at or f"{self.router_attr}.weight"

    @property
    def top_k_path(self) -> str:
        return self.top_k_at or f"{self.router_attr}.top_k"


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
    # Softmax over the top-k logits of x Wᵀ + c (= renormalized top-k of p); clamped SwiGLU experts with biases.
    "GptOssMLP": Family("GPT-OSS", "router", "always", experts="gpt_oss", router_bias=True, returns_scores=True),
    # w = p_sel / ‖p_sel‖_q, q = moe_normalize_expert_weights (1, the default, is the plain sum).
    "DbrxFFN": Family("DBRX", "router", "p_norm", experts="dbrx", weight_at="router.layer.weight", top_k_at="top_k"),
    # top-k of p + b (b only selects), w = p_sel / max(Σ p_sel, moe_norm_min); shared MLP without a gate.
    "Ernie4_5_MoeSparseMoeBlock": Family("ERNIE-4.5-MoE", "gate", "always", routing="ernie", shared="ernie"),
    "HunYuanMoEV1Moe": Family("HunYuan-MoE-V1", "gate", "always", shared="hunyuan", weight_at="gate.wg.weight"),
    "AriaTextMoELayer": Family("Aria", "router", "always", shared="aria", experts="fused_in_out"),
    # Top-1, w = p (not renormalized), expert_capacity tokens per expert *per sequence*, ReLU experts.
    "SwitchTransformersSparseMLP": Family("Switch Transformers", "router", "never", routing="switch",
                                          experts="switch", weight_at="router.classifier.weight",
                                          logits_per_token=False),
    # Softmax over the top-k logits; the block holds its experts ([gate; up] halves) and a bias added to every
    # token's output (output_bias). Its attention's mixture of experts (JetMoeMoA) stays HF's.
    "JetMoeMoE": Family("JetMoE", "router", "always", experts="jetmoe", weight_at="router.layer.weight"),
    # Top-k of the logits, w = σ(l) of each chosen one, applied to the expert's *input*: y = Σ expert_e(w_e · x)
    # + shared(x) (weights_on="input"); HF runs every expert on every token, the others with w = σ(−∞) = 0.
    "Llama4TextMoe": Family("Llama-4", "router", "never", routing="llama4", shared="llama4", experts="fused_in_out",
                            returns_scores=True),
    # The same code as a family above under another name (transformers' modular copies).
    "MellumSparseMoeBlock": Family("Mellum", "gate", "norm_topk_prob"),
    "GraniteMoeSWAMoE": Family("Granite-MoE-SWA", "router", "always"),
    "Qwen4ExpTextSparseMoeBlock": Family("Qwen4-Exp (text)", "gate", "norm_topk_prob", shared="qwen2"),
    "DeepseekOcr2TextMoe": Family("DeepSeek-OCR-2 (text)", "gate", "never", routing="deepseek_v2", shared="deepseek"),
    "UnlimitedOcrTextMoe": Family("Unlimited-OCR (text)", "gate", "never", routing="deepseek_v2", shared="deepseek"),
    # DeepSeek-V3's router (σ scores, e_score_correction_bias, top-2-sum groups, norm_topk_prob, routed_scaling_factor)
    # with DeepSeek's shared MLP (or none).
    "DeepseekV32MoE": Family("DeepSeek-V3.2", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "Glm4MoeLiteMoE": Family("GLM-4-MoE-Lite", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "Glm4vMoeTextMoE": Family("GLM-4V-MoE (text)", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "GlmMoeDsaMoE": Family("GLM-MoE-DSA", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "SolarOpenMoE": Family("Solar-Open", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "KimiLinearMoE": Family("Kimi-Linear", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "MiniCPM5MoeMoE": Family("MiniCPM5-MoE", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "Dots3NoteTextMoE": Family("dots3.note (text)", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    "ExaoneMoeSparseMoEBlock": Family("EXAONE-MoE", "gate", "norm_topk_prob", routing="deepseek_v3",
                                      shared="num_shared"),
    "MiMoV2FlashMoE": Family("MiMo-V2-Flash", "gate", "norm_topk_prob", routing="deepseek_v3"),
    # Converted without swiglu_limits (its experts then are plain SwiGLU); a clamped layer is refused.
    "BailingHybridMoE": Family("Bailing-Hybrid", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek"),
    # Its group limit masks with 0, not −∞: converted without groups (n_group=None), refused with them.
    "AXK2MoE": Family("A.X-K2", "gate", "norm_topk_prob", routing="deepseek_v3", shared="deepseek",
                      groups_masked_with_zero=True),
    # routed_scaling_factor multiplies the routed sum (the block's), which is the same as scaling the k weights.
    "BeamMoE": Family("Beam", "gate", "norm_topk_prob", routing="deepseek_v3", scale_at="routed_scaling_factor"),
    # σ scores, a selection bias, w = s_sel / Σ s_sel (· scale), no groups.
    "MiniMaxM2SparseMoeBlock": Family("MiniMax-M2", "gate", "always", routing="sigmoid", bias_at="e_score_correction_bias"),
    "AfmoeSparseMoeBlock": Family("AfMoE", "router", "always", routing="sigmoid", weight_at="router.gate.weight",
                                  bias_at="expert_bias", scale_at="router.route_scale", shared="num_shared"),
    "HYV3MoE": Family("HY-V3", "gate", "always", routing="sigmoid", bias_at="e_score_correction_bias",
                      scale_at="gate.router_scaling_factor", shared="num_shared"),
    "LagunaSparseMoeBlock": Family("Laguna", "gate", "always", routing="sigmoid", bias_at="gate.e_score_correction_bias",
                                   scale_at="routed_scaling_factor", softcap_at="gate.router_logit_softcapping",
                                   shared="plain"),
    "Step3p7SparseMoeBlock": Family("Step-3.7", "gate", "always", routing="sigmoid",
                                    bias_at="gate.e_score_correction_bias", scale_at="routed_scaling_factor",
                                    shared="plain"),
    "MiniMaxM3VLSparseMoeBlock": Family("MiniMax-M3-VL", "gate", "always", routing="sigmoid",
                                        bias_at="gate.e_score_correction_bias", scale_at="routed_scaling_factor",
                                        experts="fused_clamped", shared="fused_dense"),
    # w = s_sel / (Σ s_sel + 1e-6) · routed_scaling_factor; the selection bias exists with use_expert_bias only.
    "Lfm2MoeSparseMoeBlock": Family("LFM2-MoE", "gate", "norm_topk_prob", routing="sigmoid", bias_at="expert_bias",
                                    scale_at="gate.routed_scaling_factor", renormalize_eps=1e-6),
    # Top-k of σ(l) without a bias; the shared MLP is added without a gate.
    "FlintSparseMoeBlock": Family("Flint", "gate", "norm_topk_prob", routing="sigmoid", shared="plain_single"),
    "LaraMiniSparseMoeBlock": Family("Lara-Mini", "gate", "norm_topk_prob", shared="plain_single"),
    # Softmax over all experts, ids = top-k of p + b, w = p_sel · routed_scaling_factor (no renormalization).
    # With router_bias=True its router holds classifier.bias but computes the logits without it (F.linear with the
    # weight alone): the bias never reaches the output and gets no gradient, so the layer has none either.
    "LongcatFlashMoE": Family("LongCat-Flash", "router", "never", weight_at="router.classifier.weight",
                              bias_at="router.e_score_correction_bias", scale_at="router.routed_scaling_factor",
                              unused_at=("router.classifier.bias",)),
    "Mistral4MoE": Family("Mistral-4", "gate", "norm_topk_prob", routing="mistral4", shared="deepseek"),
    "MistralLarge4TextMoE": Family("Mistral-Large-4 (text)", "gate", "always", routing="mistral4", shared="deepseek"),
    "Cohere2MoeSparseMoeBlock": Family("Cohere2-MoE", "gate", "always", routing="cohere2", shared="num_shared"),
    # GPT-OSS's router (softmax over the k largest logits of x Wᵀ + c, divided by k, the sum multiplied by k again)
    # and its clamped experts with biases, gate and up in halves.
    "OpenAIPrivacyFilterMLP": Family("OpenAI privacy filter", "router", "always", experts="fused_in_out_bias",
                                     router_bias=True, returns_scores=True),
    # DeepSeek-V3's router (σ scores, correction bias, top-2-sum groups masked with −∞); experts and shared MLP
    # without a gate, down · act(up x), with mlp_hidden_act 'relu' (expert="relu") or the exact 'gelu'. Its default
    # 'relu2' (the squared ReLU), moe_latent_size and mlp_bias are refused (_read_plain_experts, _read_shared).
    "NemotronHMoE": Family("Nemotron-H", "gate", "norm_topk_prob", routing="deepseek_v3", shared="plain_mlp",
                           experts="plain"),
}

#: HF MoE block class name -> (family, what MoELayer would need to express it exactly).
UNSUPPORTED: dict[str, tuple[str, str]] = {
    "NllbMoeSparseMLP": ("NLLB-MoE", "a working HF block to match: in transformers 5.24 and 5.25 NllbMoeExperts "
                         "one-hot encodes the router's already one-hot top-1 mask, so for every token it runs expert_1 "
                         "weighted by the first gate and expert_0 weighted by the second, whichever experts were "
                         "chosen. Of its routing, MoELayer has gshard's top-2 capacity (second choices after all "
                         "first choices), batch_prioritized_routing (capacity_priority='probability'), weights "
                         "normalized after dropping (renormalize_after_dropping=True) and moe_token_dropout in "
                         "training (expert_dropout); it would still need NLLB's capacity 2·ceil(T/E) and eval "
                         "capacity ceil(moe_eval_capacity_token_fraction·T), a sampled second expert, and the "
                         "token dropout's eval scaling (outputs × (1 − p); expert_dropout is the identity in eval)"),
    "PhimoeSparseMoeBlock": ("Phi-MoE", "SparseMixer routing: each of its 2 experts is weighted by a softmax over "
                             "only the experts whose logits lie within a relative 2·router_jitter_noise of the best "
                             "one left (the first choice excluded for the second), and in training the experts are "
                             "sampled (Gumbel) with a hand-made router gradient (Heun's third-order method); "
                             "MoELayer's routers weigh by a softmax or sigmoid over all experts or the top k, and "
                             "choose deterministically"),
    "AXK1MoE": ("A.X-K1", "an RMSNorm on the block's output (post_mlp_layernorm, a learned [d] scale): DeepSeek-V3 "
                "routing and shared experts are MoELayer options, a normalization of y is not"),
    "DogeCDMoE": ("Doge-CDMoE", "product-key retrieval experts: ids from the sums of two top-√E key halves, each "
                  "expert a rank-1 pair of embeddings (down_embed, up_embed) through the activation, plus a dense "
                  "MLP; MoELayer's experts are MLPs chosen from one [E, d] router"),
    "ErgoMoE": ("Ergo", "a learned RMSNorm per expert on each expert's output before the weighted sum "
                "(post_expert_norm); MoELayer has no per-expert output normalization"),
    "InklingMoE": ("Inkling", "shared experts weighted by the router: one softmax over the chosen experts' and the "
                   "shared experts' log-sigmoid logits weighs both, times a learned global_scale; MoELayer's shared "
                   "experts are unweighted (or gated by σ(x·g))"),
    "Inkling2SparseMoeBlock": ("Inkling2", "a soft-capped SwiGLU activation (softcap(g)·σ(g)·softcap(u), "
                               "mlp_gate_softcap / mlp_up_softcap); MoELayer's gated experts are silu(g)·u, "
                               "gelu(g)·u and GPT-OSS's clamped form"),
    "Inkling2LoopSparseMoeBlock": ("Inkling2-Loop", "a soft-capped SwiGLU activation (softcap(g)·σ(g)·softcap(u)); "
                                   "MoELayer's gated experts are silu(g)·u, gelu(g)·u and GPT-OSS's clamped form"),
    "Kolibri1SparseMoeBlock": ("Kolibri-1", "selection by the top k of logit + e_score_correction_bias (the bias "
                               "added to the logits, then σ of the chosen logits); MoELayer's sigmoid router ranks "
                               "σ(l) + b, which orders the experts differently for a non-zero bias"),
    "Kolibri1_1SparseMoeBlock": ("Kolibri-1.1", "selection by the top k of logit + e_score_correction_bias (the bias "
                                 "added to the logits); MoELayer's sigmoid router ranks σ(l) + b"),
    "HYV4MoE": ("HY-V4", "a clamped SwiGLU silu(min(g, L)) · clamp(u, ±L) (swiglu_limit); MoELayer's "
                "clamped_swiglu is GPT-OSS's g·σ(α·g) · (u + 1), another function"),
    "HYV4VLMoE": ("HY-V4-VL", "a clamped SwiGLU silu(min(g, L)) · clamp(u, ±L) (swiglu_limit); MoELayer's "
                  "clamped_swiglu is GPT-OSS's g·σ(α·g) · (u + 1)"),
    "Glm5NextTextMoE": ("GLM-5-Next (text)", "a clamped SwiGLU silu(min(g, L)) · clamp(u, ±L) (swiglu_limit); "
                        "MoELayer's clamped_swiglu is GPT-OSS's g·σ(α·g) · (u + 1)"),
    "DeepseekV4SparseMoeBlock": ("DeepSeek-V4", "a clamped SwiGLU silu(min(g, L)) · clamp(u, ±L) (swiglu_limit), "
                                 "scores from scoring_func (default sqrt-softplus, not σ), and hash routing "
                                 "(experts looked up from the token ids) on its hash_moe layers"),
    "MuseSparkMoE": ("Muse-Spark", "a projection and a centered RMSNorm before the experts and a projection after "
                     "them (pre_expert_proj, pre_expert_norm, post_expert_proj), and logits scaled by "
                     "output_multiplier"),
    "ZayaSparseMoeBlock": ("ZAYA", "an MLP router with state carried from the previous layer's router, and a skip "
                           "expert (index E) that computes nothing"),
    "VitPoseBackboneMoeMLP": ("ViTPose (MoE backbone)", "the expert is chosen by a dataset index passed with the "
                              "input, not by a router, and only part of the output features are expert-specific"),
    "Ernie4_5_VLMoeSparseMoeBlock": ("ERNIE-4.5-VL-MoE", "a modality-isolated pair of blocks (text and vision "
                                     "experts) whose outputs and router logits the decoder layer reassembles from "
                                     "flattened tensors; the routing alone is ERNIE-4.5-MoE's, but the swapped block "
                                     "would have to return that flattened pair"),
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
# Reading a block: the MoELayer options that reproduce it, and which tensor becomes which
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockView:
    """A supported block, read and checked.

    options: the MoELayer keyword arguments that reproduce the block (every option to_hf compares).
    tensors: (path in the layer, expert index or None, the HF tensor *as a view in the layer's layout*):
        the layer tensor (or its row ``index``) and the view hold the same numbers, and since the view
        shares the HF parameter's memory, ``copy_`` works in both directions (from_hf and to_hf).
    """
    family: Family
    options: dict
    tensors: tuple
    dtype: torch.dtype
    device: torch.device


#: shared kind -> (the block's attribute for the shared MLP, the config key counting the MLPs side by side)
SHARED_MLPS = {"deepseek": ("shared_experts", "n_shared_experts"), "qwen2": ("shared_expert", None),
               "hunyuan": ("shared_mlp", None), "aria": ("shared_experts", "moe_num_shared_experts"),
               "ernie": ("shared_experts", "moe_num_shared_experts"), "llama4": ("shared_expert", None),
               "num_shared": ("shared_experts", "num_shared_experts"), "plain": ("shared_experts", None),
               "plain_single": ("shared_expert", None), "fused_dense": ("shared_experts", None),
               "plain_mlp": ("shared_experts", None)}


def _read_block(block: nn.Module) -> _BlockView:
    family = family_of(block)
    what = f"{family.name} ({type(block).__name__})"
    layout_note = (f"this transformers version lays out {what} differently from the one fastmoe_edu.hf was "
                   f"written for (transformers >= 5.5; Granite-MoE >= 5.18, Jamba >= 5.22; the families added "
                   f"with GPT-OSS, Switch, JetMoE and Llama-4: 5.24; the others: 5.25)")
    jitter = getattr(block, "jitter_noise", None) or 0.0                  # Mixtral, MiniMax: x ← x · U(1−ε, 1+ε)
    if jitter > 0:
        raise UnsupportedFamilyError(f"{what}: router_jitter_noise={jitter} multiplies the block's "
                                     f"input (router *and* experts) by noise while training; MoELayer has no such "
                                     f"option (Switch's jitter reaches the router only). Set it to 0")
    zero_experts = getattr(block, "zero_expert_num", None) or 0                 # LongCat-Flash
    if zero_experts:
        raise UnsupportedFamilyError(f"{what}: zero_expert_num={zero_experts} adds experts that return their input "
                                     f"(identity experts, chosen by the same router); MoELayer's experts are all "
                                     f"MLPs. Only zero_expert_num=0 converts exactly")
    router_options, router_tensors = _read_router(block, family, what, layout_note)
    expert_options, expert_tensors = _read_experts(block, family, what, layout_note)
    constants = {key: expert_options[key] for key in ("swiglu_alpha", "swiglu_limit")}
    shared_options, shared_tensors = _read_shared(block, family, what, layout_note, expert_options["expert"],
                                                  constants)
    num_experts, d_model = router_tensors[0][2].shape
    if (expert_options["num_experts"], expert_options["d_model"]) != (num_experts, d_model):
        raise UnsupportedFamilyError(f"{what}: the router weight is [{num_experts}, {d_model}] but the experts hold "
                                     f"{expert_options['num_experts']} experts of width {expert_options['d_model']}")
    tensors = (*router_tensors, *expert_tensors, *shared_tensors)
    carried = {tensor.untyped_storage().data_ptr() for _, _, tensor in tensors}
    left = [name for name, param in block.named_parameters()
            if param.untyped_storage().data_ptr() not in carried and name not in family.unused_at]
    if left:                                          # e.g. a norm or projection this family's mapping does not know
        raise UnsupportedFamilyError(f"{what} has parameters {left} that the conversion does not carry: "
                                     f"{layout_note}")
    reference = expert_tensors[0][2]
    return _BlockView(family, {**router_options, **expert_options, **shared_options},
                      tensors, reference.dtype, reference.device)


def _warn_switch_training(block, what: str) -> None:
    """Switch Transformers in training mode does two things MoELayer does not, stated once per conversion."""
    router, expert = block.router, block.experts["expert_0"]
    differences = []
    if (router.jitter_noise or 0) > 0 and router.dtype == expert.wi.weight.dtype:
        differences.append(f"its router multiplies the block's input by the jitter U(1 − {router.jitter_noise}, "
                           f"1 + {router.jitter_noise}) in place (router_dtype {router.dtype} is the model's dtype, "
                           f"so .to() returns the input itself), so HF's experts see the jittered input; MoELayer's "
                           f"jitter_epsilon reaches the router only")
    if expert.dropout.p > 0:
        differences.append(f"its experts apply dropout (dropout_rate={expert.dropout.p}) to their hidden units; "
                           f"MoELayer's experts have no dropout")
    if differences:
        warnings.warn(f"{what} converts exactly in eval mode only: in training mode " + "; and ".join(differences)
                      + ". A converted layer trained from this block computes a different function from HF's "
                      "(set router_jitter_noise=0 / dropout_rate=0, or router_dtype other than the model's, to "
                      "remove a difference)", stacklevel=3)


def _get(obj, path: str, what: str, layout_note: str):
    """obj.<path> for a dotted path; an UnsupportedFamilyError naming the path if the block has none."""
    try:
        return functools.reduce(getattr, path.split("."), obj)
    except AttributeError:
        raise UnsupportedFamilyError(f"{what} has no .{path}: {layout_note}") from None


def _read_router(block, family: Family, what: str, layout_note: str):
    """The router's options (router name, k, renormalization, ...) and tensors (W, and a bias if any)."""
    router = _get(block, family.router_attr, what, layout_note)
    weight = _get(block, family.weight_path, what, layout_note)
    top_k = 1 if family.routing == "switch" else int(_get(block, family.top_k_path, what, layout_note))
    weight_name = family.weight_path.removeprefix(family.router_attr + ".")     # the weight's path in the router
    # Every supported block claims capacity in token order, normalizes before dropping and has no expert output
    # dropout: to_hf refuses a layer that does otherwise.
    options = dict(top_k=top_k, router_bias=family.router_bias, logit_softcap=None, capacity_factor=None,
                   expert_capacity=None, capacity_per="batch", capacity_priority="order",
                   renormalize_after_dropping=False, expert_dropout=0.0, weights_on="output")
    tensors = [("router.weight", None, weight)]                                  # W_g = the router's weight
    expected = {weight_name}
    if family.router_bias:
        expected.add("bias")
        tensors.append(("router.logit_bias", None, router.bias))                 # logits = x Wᵀ + c
    for path in family.unused_at:                         # held by the router, never read by its forward: left out
        held = functools.reduce(lambda obj, name: getattr(obj, name, None), path.split("."), block)
        if held is not None and path.startswith(family.router_attr + "."):
            expected.add(path.removeprefix(family.router_attr + "."))
    if family.routing == "switch":
        return _read_switch_router(router, options, tensors, expected, what)
    if family.routing == "ernie":
        expected.add("moe_statics.e_score_correction_bias")
    bias = _selection_bias(block, family, what, layout_note)
    for path in (family.bias_at, family.routing == "deepseek_v3" and f"{family.router_attr}.e_score_correction_bias"):
        if path and path.startswith(family.router_attr + ".") and isinstance(bias, nn.Parameter):
            expected.add(path.removeprefix(family.router_attr + "."))    # a frozen Parameter (Laguna's), not a buffer
    _expect_parameters(what + " router", router, expected)

    if family.renormalize == "norm_topk_prob":
        if not hasattr(router, "norm_topk_prob"):
            raise UnsupportedFamilyError(f"{what}'s router has no norm_topk_prob: {layout_note}")
        renormalize = bool(router.norm_topk_prob)                   # Qwen3-MoE / OLMoE: a config switch
    elif family.renormalize == "p_norm":
        renormalize = _read_dbrx_norm(block, router, options, what)
    else:
        renormalize = family.renormalize == "always"
    options.update(router="softmax_top_k", renormalize=renormalize, route_scale=1.0, num_groups=None,
                   top_k_groups=None)
    if renormalize and family.renormalize_eps:
        options["renormalize_eps"] = family.renormalize_eps                       # w = s / (Σ s + ε)
    if family.scale_at is not None:                                              # w ← w · routed_scaling_factor
        options["route_scale"] = float(_get(block, family.scale_at, what, layout_note))
    if family.softcap_at is not None:                                            # l ← cap · tanh(l / cap); 0: none
        cap = float(_get(block, family.softcap_at, what, layout_note))
        options["logit_softcap"] = cap if cap > 0 else None
    if family.routing == "ernie":
        # p = softmax(x Wᵀ); ids = top-k of p + b; w = p_sel / max(Σ p_sel, moe_norm_min)
        options.update(selection_bias=True, renormalize_min=float(router.norm_min or 0.0))
        tensors.append(("router.bias", None, router.moe_statics.e_score_correction_bias[0]))   # [1, E] -> [E]
    elif family.routing == "llama4":
        # ids = top-k of l (= of σ(l)), w = σ(l_sel) not renormalized, on the expert's input; no selection bias
        options.update(router="sigmoid", weights_on="input", bias_update_rate=0.0)
    elif family.routing == "cohere2":
        _read_cohere2_router(block, router, options, what)
    elif family.routing == "mistral4":
        # DeepSeek-V3's group code on softmax probabilities: groups scored by their two largest p, the others masked
        # with 0. MoELayer's softmax groups are scored by their largest p (DeepSeek-V2), so one group only.
        if router.num_group is not None and router.num_group > 1:
            raise UnsupportedFamilyError(f"{what}: n_group={router.num_group} scores each group of softmax "
                                         f"probabilities by the sum of its two largest; MoELayer's softmax router "
                                         f"scores a group by its largest p (DeepSeek-V2), so only n_group=1 "
                                         f"converts exactly")
        options["route_scale"] = float(router.routed_scaling_factor)
    elif family.routing in ("deepseek_v2", "deepseek_v3", "sigmoid"):
        if family.routing != "sigmoid" and family.scale_at is None:
            options["route_scale"] = float(router.routed_scaling_factor)              # w ← w · routed_scaling_factor
        num_group = getattr(router, "num_group", None)
        grouped = num_group is not None and num_group > 1                            # one group = no limit
        if family.routing == "deepseek_v2":
            if router.topk_method not in ("greedy", "group_limited_greedy"):
                raise UnsupportedFamilyError(f"{what}: topk_method={router.topk_method!r}; only 'greedy' and "
                                             f"'group_limited_greedy' convert exactly")
            grouped = grouped and router.topk_method == "group_limited_greedy"
        else:
            options["router"] = "sigmoid"                                            # σ scores, selection bias
            if grouped and family.groups_masked_with_zero:
                raise UnsupportedFamilyError(f"{what}: n_group={num_group} fills the excluded groups' scores with "
                                             f"0, not −∞, so an excluded expert can still win where s + b < 0; "
                                             f"MoELayer's group limit excludes them, so only n_group=None or 1 "
                                             f"converts exactly")
        if grouped:
            options.update(num_groups=int(router.num_group), top_k_groups=int(router.topk_group))
    if bias is not None:
        if options["router"] != "sigmoid":
            options["selection_bias"] = True                                         # softmax: top-k of p + b
        tensors.append(("router.bias", None, bias))                                  # selects, never weighs
    elif options["router"] == "sigmoid" and family.routing != "llama4":
        options["bias_update_rate"] = 0.0            # HF has no bias to hold it: keep the layer's at 0 (to_hf checks)
    return options, tensors


def _selection_bias(block, family: Family, what: str, layout_note: str):
    """The family's selection-only bias b [E] (ids = top-k of s + b), or None: the "deepseek_v3" router's
    e_score_correction_bias, or the tensor at ``bias_at`` (None where the block has none: LFM2-MoE without
    use_expert_bias)."""
    if family.bias_at is not None:
        return functools.reduce(lambda obj, name: getattr(obj, name, None), family.bias_at.split("."), block)
    if family.routing == "deepseek_v3":
        return _get(block, f"{family.router_attr}.e_score_correction_bias", what, layout_note)
    return None


def _read_cohere2_router(block, router, options: dict, what: str) -> None:
    """Cohere2-MoE: ids = the top-k logits; w = softmax over them (= the renormalized top-k of p) or their sigmoid
    (renormalized with norm_topk_prob). With shared experts and shared_expert_combination_strategy="average",
    y = (routed + shared) / 2: route_scale=0.5, and the shared expert's gate σ(x·g) with g frozen at 0 (= 1/2)."""
    selection = router.expert_selection_fn
    if selection == "sigmoid":
        options.update(router="sigmoid", renormalize=bool(router.norm_topk_prob))
    elif selection != "softmax":
        raise UnsupportedFamilyError(f"{what}: expert_selection_fn={selection!r}; 'softmax' and 'sigmoid' convert")
    strategy = block.shared_expert_combination_strategy
    if block.num_shared_experts > 0 and strategy == "average":
        options["route_scale"] = 0.5
    elif block.num_shared_experts > 0 and strategy != "sum":
        raise UnsupportedFamilyError(f"{what}: shared_expert_combination_strategy={strategy!r}; 'sum' and "
                                     f"'average' convert")


def _read_dbrx_norm(block, router, options: dict, what: str) -> bool:
    """DBRX: w = p_sel / ‖p_sel‖_q with q = moe_normalize_expert_weights (None: no normalization)."""
    jitter = getattr(router, "moe_jitter_eps", None) or 0.0
    if jitter > 0:
        raise UnsupportedFamilyError(f"{what}: moe_jitter_eps={jitter} multiplies the block's input (router *and* "
                                     f"experts, in place) by noise while training; MoELayer has no such option. "
                                     f"Set it to None")
    norm = block.moe_normalize_expert_weights
    if norm is None:
        return False
    if not (isinstance(norm, (int, float)) and math.isfinite(norm) and norm > 0):
        raise UnsupportedFamilyError(f"{what}: moe_normalize_expert_weights={norm!r}; MoELayer's renormalize_p "
                                     f"takes a finite q > 0 (or None: no normalization)")
    options["renormalize_p"] = float(norm)
    return True


def _read_switch_router(router, options: dict, tensors: list, expected: set, what: str):
    """Switch: p = softmax(x Wᵀ (+ c)), e = argmax p, w = p_e; expert_capacity tokens per expert and sequence."""
    if router.classifier.bias is not None:                                       # config.router_bias
        expected.add("classifier.bias")
        options["router_bias"] = True
        tensors.append(("router.logit_bias", None, router.classifier.bias))
    _expect_parameters(what + " router", router, expected)
    if router.dtype not in (torch.float32, torch.float64):
        raise UnsupportedFamilyError(f"{what}: router_dtype={router.dtype}; MoELayer routes in at least float32, so "
                                     f"only router_dtype 'float32' or 'float64' converts exactly")
    options.update(router="switch", jitter_epsilon=float(router.jitter_noise or 0.0),
                   expert_capacity=int(router.expert_capacity), capacity_per="sequence")
    return options, tensors


def _read_experts(block, family: Family, what: str, layout_note: str):
    """The experts' options (sizes, kind, biases) and tensors, each as a view in the layer's layout."""
    if family.experts == "jetmoe":
        return _read_jetmoe_experts(block, what, layout_note)
    experts = _get(block, "experts", what, layout_note)
    if family.experts == "switch":
        return _read_switch_experts(experts, what, layout_note)
    if family.experts == "plain":
        return _read_plain_experts(block, experts, what, layout_note)
    if family.experts == "dbrx":
        mlp = _get(experts, "mlp", what, layout_note)
        _expect_parameters(what + " experts", experts, {"mlp.w1", "mlp.v1", "mlp.w2"})
        hidden = int(experts.ffn_hidden_size)
        num_experts, d_model = mlp.w1.shape[0] // hidden, mlp.w1.shape[1]
        split = (num_experts, hidden, d_model)                                   # [E·I, d] -> [E, I, d]
        # gate = w1 (through silu), up = v1; down = w2 transposed (DBRX computes y = h @ w2_e)
        gate, up, down = mlp.w1.view(split), mlp.v1.view(split), mlp.w2.view(split).transpose(1, 2)
    else:
        bias = family.experts in ("gpt_oss", "fused_in_out_bias")
        names = {"gate_up_proj", "down_proj"} | ({"gate_up_proj_bias", "down_proj_bias"} if bias else set())
        _expect_parameters(what + " experts", experts, names)
        if family.experts in ("fused", "fused_in_out"):
            _expect_no_clamp(what, experts)
        # The layer's layout, out = W x: gate_up [E, 2I, d], down [E, d, I] ("fused"). Aria and GPT-OSS
        # store the transposes, gate_up [E, d, 2I] and down [E, I, d] (out = x @ W): read through transposed views.
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if family.experts not in ("fused", "fused_clamped"):
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        num_experts, d_model, hidden = _fused_sizes(
            gate_up, down, f"gate_up_proj {tuple(experts.gate_up_proj.shape)}, down_proj "
            f"{tuple(experts.down_proj.shape)}", f"the {family.experts!r} layout", what, layout_note)
        if family.experts != "gpt_oss":   # [gate; up] (Aria: chunk(2) of x @ gate_up): W1 = gate half, W3 = up half
            gate, up = gate_up[:, :hidden], gate_up[:, hidden:]
        else:                   # GPT-OSS: gate = (x @ gate_up + b)[..., 0::2], up = (...)[..., 1::2]: alternate
            gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
    tensors = [("experts.w1", None, gate), ("experts.w3", None, up), ("experts.w2", None, down)]
    if family.experts not in ("gpt_oss", "fused_clamped", "fused_in_out_bias"):
        kind = _gated_kind(what, getattr(experts, "act_fn", None) if family.experts != "dbrx" else mlp.activation_fn)
        return _expert_options(num_experts, d_model, hidden, kind), tensors
    options = _expert_options(num_experts, d_model, hidden, "clamped_swiglu", bias=bias)
    alpha = getattr(experts, "alpha", None) if family.experts != "fused_clamped" else experts.swiglu_alpha
    limit = getattr(experts, "limit", None) if family.experts != "fused_clamped" else experts.swiglu_limit
    options.update(swiglu_alpha=float(alpha), swiglu_limit=float(limit))
    if bias:
        gate_up_bias = experts.gate_up_proj_bias
        gate_bias, up_bias = ((gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]) if family.experts == "gpt_oss"
                              else (gate_up_bias[:, :hidden], gate_up_bias[:, hidden:]))
        tensors += [("experts.b1", None, gate_bias), ("experts.b3", None, up_bias),
                    ("experts.b2", None, experts.down_proj_bias)]
    return options, tensors


def _expect_no_clamp(what: str, module: nn.Module) -> None:
    """Bailing-Hybrid / Step-3.7 clamp act(g) ≤ L and u to ±L where swiglu_limits names a limit for the layer."""
    limit = getattr(module, "limit", None)
    if limit is not None:
        raise UnsupportedFamilyError(f"{what}: swiglu_limits gives this layer the limit {limit}: act(g) clamped to "
                                     f"≤ {limit} and u to ±{limit}; MoELayer's gated experts have no such clamp "
                                     f"(clamped_swiglu is GPT-OSS's g·σ(α·g) · (u + 1)). Only layers without a limit "
                                     f"(0 or no list) convert exactly")


def _read_switch_experts(experts, what: str, layout_note: str):
    """Switch: expert_e(x) = wo_e · act(wi_e · x), one module per expert; act must be ReLU (dense_act_fn)."""
    num_experts = int(experts.num_experts)
    tensors = []
    for index in range(num_experts):
        expert = _get(experts, f"expert_{index}", what, layout_note)
        _expect_parameters(f"{what} expert_{index}", expert, {"wi.weight", "wo.weight"})
        kind = _plain_kind(what, expert.act, "dense_act_fn")
        tensors += [("experts.w1", index, expert.wi.weight), ("experts.w2", index, expert.wo.weight)]
    hidden, d_model = tensors[0][2].shape
    return _expert_options(num_experts, d_model, hidden, kind), tensors


def _read_plain_experts(block, experts, what: str, layout_note: str):
    """Nemotron-H: expert_e(x) = down_e · act(up_e x), up_proj [E, I, d], down_proj [E, d, I], no gate matrix; act is
    mlp_hidden_act, relu or the exact gelu. With moe_latent_size the experts run in a latent width: refused."""
    latent = getattr(block, "fc1_latent_proj", None)
    if latent is not None and not isinstance(latent, nn.Identity):
        raise UnsupportedFamilyError(
            f"{what}: moe_latent_size={latent.out_features} runs the routed experts in a latent width: fc1_latent_proj "
            f"[{latent.out_features}, {latent.in_features}] maps every token down before them and fc2_latent_proj maps "
            f"their weighted sum back up (the router and the shared MLP see the full width). MoELayer's experts read "
            f"and write d_model; folding the projections into the expert matrices would give the same output but "
            f"not the same parameters or gradients, so it would need projections around the routed experts (after "
            f"the router, before the scatter and after the combine). Only moe_latent_size=None converts exactly")
    _expect_parameters(what + " experts", experts, {"up_proj", "down_proj"})
    up, down = experts.up_proj, experts.down_proj                              # [E, I, d], [E, d, I]
    num_experts, hidden, d_model = up.shape
    if tuple(down.shape) != (num_experts, d_model, hidden):
        raise UnsupportedFamilyError(f"{what}: expert shapes up_proj {tuple(up.shape)}, down_proj {tuple(down.shape)} "
                                     f"do not fit [E, I, d], [E, d, I]: {layout_note}")
    kind = _plain_kind(what, getattr(experts, "act_fn", None), "mlp_hidden_act")
    return _expert_options(num_experts, d_model, hidden, kind), [("experts.w1", None, up), ("experts.w2", None, down)]


def _read_jetmoe_experts(block, what: str, layout_note: str):
    """JetMoE: y = Σ_s w_s · output_e(act(g) ⊙ u) + b, [g; u] = input_e x split in halves (chunk(2)), b [d]
    added to every token (MoELayer's output_bias); act is silu (swiglu) or the exact gelu (geglu)."""
    _expect_parameters(what, block, {"bias", "input_linear.weight", "output_linear.weight", "router.layer.weight"})
    gate_up, down = block.input_linear.weight, block.output_linear.weight                 # [E, 2I, d], [E, d, I]
    num_experts, d_model, hidden = _fused_sizes(
        gate_up, down, f"input_linear {tuple(gate_up.shape)}, output_linear {tuple(down.shape)}",
        "[E, 2I, d], [E, d, I]", what, layout_note)
    act = getattr(block, "activation", None)
    kind = "swiglu" if _is_silu(act) else "geglu" if _is_exact_gelu(act) else None
    if kind is None:
        raise UnsupportedFamilyError(f"{what}: experts use activation {type(act).__name__}; MoELayer's gated experts "
                                     f"take silu (swiglu) or the exact gelu (geglu): only activation_function="
                                     f"'silu' or 'gelu' converts exactly")
    tensors = [("experts.w1", None, gate_up[:, :hidden]), ("experts.w3", None, gate_up[:, hidden:]),
               ("experts.w2", None, down), ("output_bias", None, block.bias)]
    return {**_expert_options(num_experts, d_model, hidden, kind), "output_bias": True}, tensors


def _fused_sizes(gate_up: torch.Tensor, down: torch.Tensor, shapes: str, layout: str, what: str,
                 layout_note: str) -> tuple[int, int, int]:
    """(E, d, I) of gate_up [E, 2I, d] and down [E, d, I] (the layer's layout, viewed so already); an error
    quoting the HF tensors' ``shapes`` and the expected ``layout`` if they do not fit."""
    num_experts, two_hidden, d_model = gate_up.shape
    hidden = two_hidden // 2
    if two_hidden % 2 or tuple(down.shape) != (num_experts, d_model, hidden):
        raise UnsupportedFamilyError(f"{what}: expert shapes {shapes} do not fit {layout}: {layout_note}")
    return num_experts, d_model, hidden


def _expert_options(num_experts: int, d_model: int, hidden: int, kind: str, bias: bool = False) -> dict:
    return dict(num_experts=num_experts, d_model=d_model, d_hidden=hidden, expert=kind, bias=bias,
                swiglu_alpha=None, swiglu_limit=None, output_bias=False)


def _read_shared(block, family: Family, what: str, layout_note: str, kind: str, constants: dict):
    """The always-on MLP (gated, of the routed experts' ``kind`` and ``constants``, without biases): its count and
    width, Qwen2's sigmoid gate, its tensors."""
    none = dict(num_shared_experts=0, shared_d_hidden=None, shared_expert_gate=False)
    if family.shared is None:
        return none, []
    attr, count_key = SHARED_MLPS[family.shared]
    mlp = getattr(block, attr, None)
    if mlp is None:
        if family.shared == "ernie" and hasattr(block, attr):    # ERNIE with moe_num_shared_experts=0
            return none, []
        if family.routing == "cohere2" and block.num_shared_experts == 0:   # Cohere2-MoE builds none
            return none, []
        raise UnsupportedFamilyError(f"{what} has no .{attr}: {layout_note}")
    if family.shared == "fused_dense":                # MiniMax-M3-VL: gate_up_proj [2I, d] = [gate; up], clamped
        _expect_parameters(what + " shared expert", mlp, {"gate_up_proj.weight", "down_proj.weight"})
        ours = (float(mlp.swiglu_alpha), float(mlp.swiglu_limit))
        if kind != "clamped_swiglu" or ours != (constants["swiglu_alpha"], constants["swiglu_limit"]):
            raise UnsupportedFamilyError(f"{what}: the shared expert's clamped activation (α, limit) = {ours} differs "
                                         f"from the routed experts' ({kind}, {constants}); MoELayer's shared experts "
                                         f"take the routed experts' kind and constants")
        width = mlp.down_proj.weight.shape[1]
        gate, up = mlp.gate_up_proj.weight[:width], mlp.gate_up_proj.weight[width:]
    elif family.shared == "plain_mlp":                # Nemotron-H: down · act(up x), no gate matrix
        _refuse_shared_biases(what, mlp, ("up_proj", "down_proj"))
        _expect_parameters(what + " shared expert", mlp, {"up_proj.weight", "down_proj.weight"})
        shared_kind = _plain_kind(what + " shared expert", getattr(mlp, "act_fn", None), "mlp_hidden_act")
        if shared_kind != kind:
            raise UnsupportedFamilyError(f"{what}: the shared expert is {shared_kind} but the routed experts are "
                                         f"{kind}; MoELayer's shared experts take the routed experts' kind")
        width = mlp.up_proj.weight.shape[0]
        gate, up = mlp.up_proj.weight, None
    else:
        _refuse_shared_biases(what, mlp, ("gate_proj", "up_proj", "down_proj"))
        _expect_parameters(what + " shared expert", mlp, {"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
        _expect_no_clamp(what + " shared expert", mlp)
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)     # Llama-4's name
        shared_kind = _gated_kind(what + " shared expert", act)
        if shared_kind != kind:
            raise UnsupportedFamilyError(f"{what}: the shared expert is {shared_kind} but the routed experts are "
                                         f"{kind}; MoELayer's shared experts take the routed experts' kind")
        width = mlp.gate_proj.weight.shape[0]
        gate, up = mlp.gate_proj.weight, mlp.up_proj.weight
    # n MLPs of width I side by side are one MLP of width n·I; the count only names the split.
    config = getattr(block, "config", None) or getattr(mlp, "config", None)
    count = (getattr(config, count_key, None) or 1) if count_key else 1
    count = count if width % count == 0 else 1
    options = dict(num_shared_experts=count, shared_d_hidden=width // count, shared_expert_gate=False)
    tensors = [("shared_experts.w1", None, gate),                              # act(gate x)
               *([("shared_experts.w3", None, up)] if up is not None else []),  # ⊙ up x (gated kinds)
               ("shared_experts.w2", None, mlp.down_proj.weight)]
    if family.shared == "qwen2":
        _expect_parameters(what + " shared_expert_gate", block.shared_expert_gate, {"weight"})
        options["shared_expert_gate"] = True
        tensors.append(("shared_experts.gate", None, block.shared_expert_gate.weight[0]))   # σ(x · g), g [d]
    elif _halves_shared(block, family):
        options["shared_expert_gate"] = True      # σ(x · 0) = 1/2 exactly: from_hf freezes g at 0 (no HF tensor)
    return options, tensors


def _refuse_shared_biases(what: str, mlp: nn.Module, names: tuple[str, ...]) -> None:
    """A shared MLP with biases (ERNIE's use_bias, Aria's mlp_bias, Nemotron-H's mlp_bias) beside routed experts
    without: MoELayer's bias=True gives both biases, so it has no layer that holds the one and not the other."""
    with_bias = [name for name in names if getattr(getattr(mlp, name, None), "bias", None) is not None]
    if with_bias:
        raise UnsupportedFamilyError(f"{what}: the shared MLP has biases ({', '.join(with_bias)}) but the routed "
                                     f"experts have none; MoELayer's bias=True gives the routed and the shared experts "
                                     f"biases alike, so only a config without them (use_bias / mlp_bias=False) "
                                     f"converts exactly")


def _halves_shared(block, family: Family) -> bool:
    """Cohere2-MoE's shared_expert_combination_strategy="average" with shared experts: y = (routed + shared) / 2."""
    return (family.routing == "cohere2" and block.num_shared_experts > 0
            and block.shared_expert_combination_strategy == "average")


def _expect_parameters(what: str, module: nn.Module, names: set[str]) -> None:
    found = {name for name, _ in module.named_parameters()}
    if found != names:
        raise UnsupportedFamilyError(f"{what} has parameters {sorted(found)}, expected exactly {sorted(names)} "
                                     f"(e.g. biases, which this family's conversion does not carry)")


def _gated_kind(what: str, act) -> str:
    """The gated expert kind of act(W1 x) ⊙ W3 x: "swiglu" for silu, "geglu" for the exact (erf) gelu."""
    if _is_silu(act):
        return "swiglu"
    if _is_exact_gelu(act):
        return "geglu"
    raise UnsupportedFamilyError(f"{what}: experts use activation {getattr(act, '__name__', type(act).__name__)}; "
                                 f"MoELayer's gated experts are silu(W1 x) ⊙ W3 x (swiglu) and gelu(W1 x) ⊙ W3 x "
                                 f"with the exact gelu (geglu): only hidden_act='silu' or 'gelu' converts exactly "
                                 f"(e.g. 'gelu_pytorch_tanh' is the tanh approximation)")


#: activations the experts of some family may use that MoELayer has no expert kind for, and what they compute
_OTHER_ACTIVATIONS = {"ReLUSquaredActivation": "the squared ReLU relu(x)², which would need an expert kind of its own",
                      **dict.fromkeys(("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"),
                                      "the tanh approximation of GELU")}


def _plain_kind(what: str, act, setting: str) -> str:
    """The plain (ungated) expert kind of W2 · act(W1 x): "relu", or "gelu" for the exact (erf) gelu."""
    if isinstance(act, nn.ReLU) or act is nn.functional.relu:
        return "relu"
    if _is_exact_gelu(act):
        return "gelu"
    name = getattr(act, "__name__", type(act).__name__)
    detail = f" ({_OTHER_ACTIVATIONS[name]})" if name in _OTHER_ACTIVATIONS else ""
    raise UnsupportedFamilyError(f"{what}: experts use activation {name}{detail}; MoELayer's plain (ungated) experts "
                                 f"are relu and the exact (erf) gelu: only {setting}='relu' or 'gelu' converts exactly")


def _is_exact_gelu(act) -> bool:
    """transformers' "gelu" / "gelu_python" (the erf GELU, as MoELayer's), or torch's nn.GELU without approximation."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    if act is nn.functional.gelu:
        return True
    try:
        from transformers.activations import GELUActivation
    except ImportError:
        return False
    return type(act) is GELUActivation


def _is_silu(act) -> bool:
    if isinstance(act, nn.SiLU) or act is nn.functional.silu:             # LFM2-MoE holds the function itself
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:                        # older transformers: ACT2FN["silu"] is nn.SiLU
        return False
    return isinstance(act, SiLUActivation)


def _layer_tensor(layer: MoELayer, path: str, index: int | None) -> torch.Tensor:
    """The layer's tensor at ``path`` (its row ``index``, if not None): where a _BlockView tensor belongs."""
    tensor = functools.reduce(getattr, path.split("."), layer)
    return tensor if index is None else tensor[index]


# ----------------------------------------------------------------------------------------------------
# from_hf / to_hf: weights and options both ways
# ----------------------------------------------------------------------------------------------------


def from_hf(block: nn.Module, backend: str = "reference", balance_loss_weight: float = 0.0) -> MoELayer:
    """A new MoELayer computing exactly what the HF MoE ``block`` computes, with a copy of its weights.

    ``balance_loss_weight`` defaults to 0: inside an HF model the balance loss is HF's own, computed from
    the router logits (``output_router_logits=True``, see :class:`HFMoEBlock`). The layer has the dtype
    and device of the block's experts, and its training mode.
    """
    view = _read_block(block)
    if view.family.routing == "switch":
        _warn_switch_training(block, f"{view.family.name} ({type(block).__name__})")
    layer = MoELayer(backend=backend, balance_loss_weight=balance_loss_weight, **view.options)
    layer.to(device=view.device, dtype=view.dtype)
    layer.train(block.training)                  # e.g. Switch's jitter acts in training mode only, in both
    with torch.no_grad():
        for path, index, tensor in view.tensors:
            _layer_tensor(layer, path, index).copy_(tensor)
    if _halves_shared(block, view.family):       # Cohere2's "average": σ(x · g) = 1/2 with g = 0, never trained
        layer.shared_experts.gate.requires_grad_(False)
    return layer


def to_hf(layer: MoELayer, block: nn.Module) -> nn.Module:
    """Copy ``layer``'s weights into the HF ``block`` (in place, returns it); the options must already agree."""
    view = _read_block(block)
    what = f"{view.family.name} ({type(block).__name__})"
    mine, theirs = layer.options.resolved(), LayerOptions.from_keywords(**view.options).resolved()
    same_router = mine.router == theirs.router
    my_router_options = {**router_defaults(mine.router), **mine.router_options} if same_router else {}
    problems = []
    for key, want in view.options.items():
        if hasattr(theirs, key) and key != "router_options":
            got, want = getattr(mine, key), getattr(theirs, key)
        elif same_router:                                   # a router option: compare it on the same router only
            got = my_router_options.get(key)
        else:
            continue
        if got != want:
            where = "shared experts: " if "shared" in key else ""
            problems.append(f"{where}{key}={got!r} (the block's is {want!r})")
    bias = getattr(layer.router, "bias", None)                 # the sigmoid router's selection bias (a buffer)
    carried = any(path == "router.bias" for path, _, _ in view.tensors)
    if bias is not None and not carried and bool(bias.detach().ne(0).any()):
        problems.append(f"router.bias is non-zero, and {what} has no selection bias to hold it")
    gate = layer.shared_experts.gate if layer.shared_experts is not None else None
    if _halves_shared(block, view.family) and gate is not None and bool(gate.detach().ne(0).any()):
        problems.append(f"shared_experts.gate is non-zero; {what} halves the shared output, σ(x · 0) = 1/2")
    if layer.experts.w1.shape[0] != layer.num_experts:
        problems.append(f"the layer holds {layer.experts.w1.shape[0]} of its {layer.num_experts} experts "
                        f"(expert-parallel); gather them into one process first")
    if problems:
        raise ValueError(f"cannot copy this MoELayer into {what}: " + "; ".join(problems))
    with torch.no_grad():
        for path, index, tensor in view.tensors:
            tensor.copy_(_layer_tensor(layer, path, index))
    return block


# ----------------------------------------------------------------------------------------------------
# moefy: swap the blocks of a loaded model
# ----------------------------------------------------------------------------------------------------


class RouterLogits(nn.Module):
    """The router logits [T, E] (x Wᵀ, + c with a router bias), differentiable in x and the router's
    parameters: what HF's balance loss reads.

    In transformers 5 a block returns only its hidden states; the router logits reach
    ``load_balancing_loss_func`` through a forward hook that records the router module's output while
    ``output_router_logits=True``. This module is that router's stand-in: ``moefy`` hooks it the same
    way. It holds no weight: HFMoEBlock passes it the MoELayer's router. ``per_token=False`` keeps the
    input's leading shape, [B, S, E] (Switch Transformers' loss concatenates them per sequence).
    """

    def __init__(self, per_token: bool = True):
        super().__init__()
        self.per_token = per_token

    def forward(self, hidden_states: torch.Tensor, router: nn.Module) -> torch.Tensor:
        logits = router.logits(hidden_states.reshape(-1, hidden_states.shape[-1]))
        return logits if self.per_token else logits.reshape(*hidden_states.shape[:-1], logits.shape[-1])


class HFMoEBlock(nn.Module):
    """Stands where the HF MoE block stood: the same input [B, S, d] and output [B, S, d], run by MoELayer.

    ``returns_scores``: return (y, the combine weights [T, k]) like GPT-OSS's block, whose decoder layer
    unpacks two values (and discards the second).
    """

    def __init__(self, layer: MoELayer, family: str, returns_scores: bool = False, logits_per_token: bool = True):
        super().__init__()
        self.moe = layer
        self.router_logits = RouterLogits(logits_per_token)
        self.family = family
        self.returns_scores = returns_scores

    def forward(self, hidden_states: torch.Tensor):
        y = self.moe(hidden_states)
        # Recomputed (one [T, d] × [d, E] product) for HF's recording hook, active with output_router_logits=True;
        # the MoELayer keeps only a detached copy of its logits, and HF's balance loss needs their gradient.
        self.router_logits(hidden_states, self.moe.router)
        if self.returns_scores:
            return y, self.moe.last_routing.weights.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"family={self.family!r}"


def moefy(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace, in place, every supported HF MoE block of ``model`` by an :class:`HFMoEBlock`; returns ``model``.

    Every block is checked before any is replaced: an unsupported family raises UnsupportedFamilyError
    naming what is missing, and a model without any known MoE block raises ValueError. To make the swapped
    layers expert-parallel, parallelize the model afterwards and keep the plan: ``plan = parallelize(moefy(model),
    layout)``, then ``allreduce_gradients(model, layout, plan)``. Build the optimizer after these calls: the
    swapped blocks' parameters are new tensors.
    """
    known = set(SUPPORTED) | set(UNSUPPORTED)
    if type(model).__name__ in known:            # setattr(model, "", ...) would hang the swap under the block itself
        raise ValueError(f"moefy(model) replaces the MoE blocks inside a model, but this {type(model).__name__} is a "
                         f"block itself: convert it with from_hf(block) (a new MoELayer), or call moefy on the model "
                         f"that holds it")
    targets = [(name, module) for name, module in model.named_modules() if type(module).__name__ in known]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Hugging Face MoE block fastmoe_edu.hf knows; "
                         f"supported: {_supported_names()}. A dense model can be made MoE with upcycle()")
    for _, block in targets:
        _read_block(block)                       # every block checked before any is replaced
    record_logits = _logits_recorder()
    for name, block in targets:
        family = family_of(block)
        adapter = HFMoEBlock(from_hf(block, backend=backend), family.name, returns_scores=family.returns_scores,
                             logits_per_token=family.logits_per_token)
        if record_logits is not None:
            record_logits(adapter.router_logits, "router_logits", 0)
        _set_submodule(model, name, adapter)
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
    convert = {**dict.fromkeys(SWIGLU_MLPS, _swiglu_experts), **dict.fromkeys(GPT2_MLPS, _gpt2_experts)}
    if type(model).__name__ in convert:
        raise ValueError(f"upcycle(model) replaces the dense MLPs inside a model, but this {type(model).__name__} is "
                         f"the MLP itself (it has no submodule to replace it in): call upcycle on the model that "
                         f"holds it")
    targets = [(name, mlp) for name, mlp in model.named_modules() if type(mlp).__name__ in convert]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no dense MLP upcycle() knows; supported: "
                         f"{', '.join(f'{f} ({c})' for c, f in {**SWIGLU_MLPS, **GPT2_MLPS}.items())}")
    plans = [(name, convert[type(mlp).__name__](mlp), mlp) for name, mlp in targets]  # checks all before changing any
    for name, (expert, hidden, weights, dropout), mlp in plans:
        reference = next(mlp.parameters())
        d_model = weights["w1"].shape[-1]                   # W1 [I, d] (GPT-2's transposed from Conv1D's [d, I])
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
    if not _is_silu(getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)):    # Llama-4's name
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
