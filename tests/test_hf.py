"""fastmoe_edu.hf: Hugging Face MoE blocks <-> MoELayer, moefy on whole models, upcycling dense models.

Tiny random configs only (no hub downloads), float64.

Tolerance. The supported HF routers compute the softmax and the top-k weights in float32 even for a
float64 model (``softmax(logits.float())`` / ``softmax(..., dtype=torch.float)``), so HF's combine weights
carry float32 rounding (a few units of 2^-24 ≈ 6e-8, relative) where MoELayer's are float64. Every
output and gradient is a sum of terms weighted by them, so the two agree to ~1e-7 of their scale and no
better: ``close`` asks max|a − b| <= REL · max|b| with REL = 2e-6 (≈ 30 float32 ulps of headroom for
the sums and the layers of a model). Checks that involve no HF router (upcycling, round trips, the
2-rank run) are float64-exact up to summation order: 1e-12.
"""
from __future__ import annotations

import importlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")

from fastmoe_edu import MoELayer  # noqa: E402
from fastmoe_edu.hf import (SUPPORTED, UNSUPPORTED, HFMoEBlock, UnsupportedFamilyError, from_hf,  # noqa: E402
                            moe_aux_loss, moefy, to_hf, upcycle)

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 2e-6
EXACT = 1e-12
SCRIPT = Path(__file__).resolve().parent / "mpi_scripts" / "check_hf_moefy.py"

# HF block class -> its transformers model folder (the config class is found in the folder's configuration file)
FAMILY_MODULES = {"MixtralSparseMoeBlock": "mixtral", "MiniMaxSparseMoeBlock": "minimax",
                  "Qwen3MoeSparseMoeBlock": "qwen3_moe", "Qwen3VLMoeTextSparseMoeBlock": "qwen3_vl_moe",
                  "OlmoeSparseMoeBlock": "olmoe", "FlexOlmoSparseMoeBlock": "flex_olmo",
                  "JambaSparseMoeBlock": "jamba", "GraniteMoeMoE": "granitemoe",
                  "GraniteMoeSharedMoE": "granitemoeshared", "GraniteMoeHybridMoE": "granitemoehybrid",
                  "Qwen3OmniMoeThinkerTextSparseMoeBlock": "qwen3_omni_moe",
                  # shared experts (sigmoid-gated), group-limited softmax, sigmoid routing
                  "Qwen2MoeSparseMoeBlock": "qwen2_moe", "Qwen3NextSparseMoeBlock": "qwen3_next",
                  "Qwen3_5MoeSparseMoeBlock": "qwen3_5_moe", "DeepseekV2Moe": "deepseek_v2",
                  "DeepseekV3MoE": "deepseek_v3", "Glm4MoeMoE": "glm4_moe", "Dots1MoE": "dots1",
                  "Qwen3OmniMoeTalkerTextSparseMoeBlock": "qwen3_omni_moe"}
#: a block whose config class is not its folder's CONFIG_NAMES one
CLASS_CONFIG_NAMES = {"Qwen3OmniMoeTalkerTextSparseMoeBlock": "Qwen3OmniMoeTalkerTextConfig"}
CLASS_CONFIG_EXTRAS = {"Qwen3OmniMoeTalkerTextSparseMoeBlock": {"shared_expert_intermediate_size": 10}}
CONFIG_NAMES = {"qwen3_vl_moe": "Qwen3VLMoeTextConfig", "qwen3_omni_moe": "Qwen3OmniMoeTextConfig",
                "qwen3_5_moe": "Qwen3_5MoeTextConfig"}
# DeepSeek-style families: 2 groups of 3 experts, the best 1 group, a routed_scaling_factor, 2 shared experts.
DEEPSEEK = dict(n_group=2, topk_group=1, routed_scaling_factor=2.5, n_shared_experts=2, n_routed_experts=6)
CONFIG_EXTRAS = {"granitemoehybrid": {"mamba_n_heads": 4},     # its config validates the (unused) mamba sizes
                 "qwen2_moe": {"shared_expert_intermediate_size": 10},
                 "qwen3_next": {"shared_expert_intermediate_size": 10},
                 "qwen3_5_moe": {"shared_expert_intermediate_size": 10},
                 "deepseek_v2": {**DEEPSEEK, "topk_method": "group_limited_greedy", "num_attention_heads": 2},
                 "deepseek_v3": DEEPSEEK, "glm4_moe": DEEPSEEK, "dots1": DEEPSEEK}
D, HIDDEN, E, K = 16, 12, 6, 2


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    scale = float(b.detach().abs().max())
    return float((a - b).detach().abs().max()) <= rel * max(scale, 1e-300)


def tiny_block(cls_name: str, **extra):
    folder = FAMILY_MODULES[cls_name]
    modeling = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    configuration = importlib.import_module(f"transformers.models.{folder}.configuration_{folder}")
    names = [n for n in dir(configuration)
             if n.endswith("Config") and getattr(configuration, n).__module__ == configuration.__name__]
    config_name = (CLASS_CONFIG_NAMES.get(cls_name) or CONFIG_NAMES.get(folder)
                   or next((n for n in names if n.endswith("TextConfig")), names[0]))    # a VL model's text part
    options = dict(hidden_size=D, intermediate_size=HIDDEN, moe_intermediate_size=HIDDEN, num_experts=E,
                   num_local_experts=E, n_routed_experts=E, num_experts_per_tok=K, hidden_act="silu")
    extras = CLASS_CONFIG_EXTRAS.get(cls_name) or CONFIG_EXTRAS.get(folder, {})
    config = getattr(configuration, config_name)(**{**options, **extras, **extra})
    cls = getattr(modeling, cls_name)
    block = (cls(config, 0) if "layer_idx" in cls.__init__.__code__.co_varnames else cls(config)).double()
    torch.manual_seed(0)
    with torch.no_grad():                      # HF builds the blocks with torch.empty: give them values
        for param in block.parameters():
            param.normal_(0.0, 0.5)
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):   # selection-only biases: small
                tensor.normal_(0.0, 0.1)
    return block


def test_registry_lists_the_required_families():
    assert {"MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock"} <= set(SUPPORTED)
    assert {"Qwen2MoeSparseMoeBlock", "DeepseekV2Moe", "DeepseekV3MoE"} <= set(SUPPORTED)
    assert {"GptOssMLP", "DbrxFFN", "Ernie4_5_MoeSparseMoeBlock", "HunYuanMoEV1Moe", "AriaTextMoELayer",
            "SwitchTransformersSparseMLP", "JetMoeMoE", "Llama4TextMoe"} <= set(SUPPORTED)
    assert {"NllbMoeSparseMLP", "PhimoeSparseMoeBlock"} <= set(UNSUPPORTED)
    assert not set(SUPPORTED) & set(UNSUPPORTED)
    assert set(FAMILY_MODULES) | set(NEW_BLOCKS) | set(MORE_BLOCKS) == set(SUPPORTED)   # every one tested below
    assert not set(FAMILY_MODULES) & set(NEW_BLOCKS) and not set(MORE_BLOCKS) & (set(FAMILY_MODULES) | set(NEW_BLOCKS))


@pytest.mark.parametrize("cls_name", list(FAMILY_MODULES))
def test_swapped_block_equals_hf_block(cls_name):
    """Outputs, input gradient, router and expert weight gradients; then to_hf round-trips the weights."""
    block = tiny_block(cls_name)
    layer = from_hf(block)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=generator)
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf, y_ours = block(x_hf), layer(x_ours)
    assert y_ours.shape == y_hf.shape and close(y_ours, y_hf)
    (y_hf * upstream).sum().backward()
    (y_ours * upstream).sum().backward()
    assert close(x_ours.grad, x_hf.grad)
    family = SUPPORTED[cls_name]
    router, experts = getattr(block, family.router_attr), block.experts
    assert close(layer.router.weight.grad, router.weight.grad)
    w1_w3 = torch.cat([layer.experts.w1.grad, layer.experts.w3.grad], dim=1)        # [E, 2I, d] = [gate; up]
    assert close(w1_w3, experts.gate_up_proj.grad)
    assert close(layer.experts.w2.grad, experts.down_proj.grad)
    if family.shared is not None:              # shared MLP [gate; up; down], and Qwen2's sigmoid gate
        mlp = block.shared_experts if family.shared == "deepseek" else block.shared_expert
        shared = layer.shared_experts
        assert close(shared.w1.grad, mlp.gate_proj.weight.grad) and close(shared.w3.grad, mlp.up_proj.weight.grad)
        assert close(shared.w2.grad, mlp.down_proj.weight.grad)
        if family.shared == "qwen2":
            assert close(shared.gate.grad, block.shared_expert_gate.weight.grad[0])

    # to_hf: perturb the layer, copy it into a fresh block of the family, and read it back: the same weights.
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.1)
    other = tiny_block(cls_name)
    to_hf(layer, other)
    again = from_hf(other)
    for (name, a), (_, b) in zip(layer.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(layer.named_buffers(), again.named_buffers()):
        assert torch.equal(a, b), name                # the sigmoid router's correction bias


def test_options_carried_both_ways():
    qwen = tiny_block("Qwen3MoeSparseMoeBlock", norm_topk_prob=True)
    assert from_hf(qwen).router.renormalize is True
    qwen_plain = tiny_block("Qwen3MoeSparseMoeBlock", norm_topk_prob=False)
    assert from_hf(qwen_plain).router.renormalize is False
    assert from_hf(tiny_block("JambaSparseMoeBlock")).router.renormalize is False
    layer = from_hf(qwen)
    with pytest.raises(ValueError, match="renormalize=True"):
        to_hf(layer, qwen_plain)                      # the options must agree, not only the shapes
    with pytest.raises(ValueError, match="top_k=3"):
        to_hf(MoELayer(D, HIDDEN, E, top_k=3).double(), tiny_block("MixtralSparseMoeBlock"))
    with pytest.raises(ValueError, match="expert='gelu'"):
        to_hf(MoELayer(D, HIDDEN, E, top_k=K, expert="gelu").double(), tiny_block("MixtralSparseMoeBlock"))


def test_unsupported_options_and_families_raise_clearly():
    with pytest.raises(UnsupportedFamilyError, match="router_jitter_noise"):
        from_hf(tiny_block("MixtralSparseMoeBlock", router_jitter_noise=0.1))
    with pytest.raises(UnsupportedFamilyError, match="activation GELUTanh.*'gelu_pytorch_tanh' is the tanh"):
        from_hf(tiny_block("MixtralSparseMoeBlock", hidden_act="gelu_pytorch_tanh"))
    nllb = nllb_moe_block()
    with pytest.raises(UnsupportedFamilyError, match="NLLB-MoE .*one-hot"):
        from_hf(nllb)
    with pytest.raises(UnsupportedFamilyError, match="not a known Hugging Face MoE block"):
        from_hf(torch.nn.Linear(2, 2))
    # moefy checks every block before replacing any: the supported Mixtral block is left in place.
    mixed = torch.nn.ModuleDict({"a": tiny_block("MixtralSparseMoeBlock"), "b": nllb})
    with pytest.raises(UnsupportedFamilyError, match="NLLB-MoE"):
        moefy(mixed)
    assert type(mixed["a"]).__name__ == "MixtralSparseMoeBlock"


def nllb_moe_block():
    from transformers import NllbMoeConfig
    from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeSparseMLP
    return NllbMoeSparseMLP(NllbMoeConfig(d_model=D, num_experts=E, encoder_attention_heads=2,
                                          decoder_attention_heads=2), HIDDEN)


@pytest.mark.parametrize("cls_name,expected", [
    ("Qwen2MoeSparseMoeBlock", dict(router="softmax_top_k", num_shared_experts=1, width=10, gated=True)),
    ("DeepseekV2Moe", dict(router="softmax_top_k", renormalize=False, route_scale=2.5, num_groups=2, top_k_groups=1,
                           num_shared_experts=2, width=2 * HIDDEN, gated=False)),
    ("DeepseekV3MoE", dict(router="sigmoid", renormalize=True, route_scale=2.5, num_groups=2, top_k_groups=1,
                           num_shared_experts=2, width=2 * HIDDEN, gated=False)),
])
def test_new_family_options_read_from_the_block(cls_name, expected):
    layer = from_hf(tiny_block(cls_name))
    expected = dict(expected)
    assert layer.router_name == expected.pop("router")
    assert layer.num_shared_experts == expected.pop("num_shared_experts")
    assert layer.shared_experts.width == expected.pop("width")
    assert (layer.shared_experts.gate is not None) == expected.pop("gated")
    for key, value in expected.items():
        assert getattr(layer.router, key) == value, key
    with pytest.raises(ValueError, match="shared experts"):           # to_hf refuses a layer without them
        to_hf(MoELayer(D, HIDDEN, E, top_k=K, router=layer.router_name,
                       **{k: getattr(layer.router, k) for k in ("renormalize", "route_scale", "num_groups",
                                                                "top_k_groups")}).double(), tiny_block(cls_name))


# ----------------------------------------------------------------------------------------------------
# Families with their own layouts: GPT-OSS, DBRX, ERNIE-4.5-MoE, HunYuan-MoE-V1, Aria, Switch Transformers
# ----------------------------------------------------------------------------------------------------
def _config(folder: str, name: str, **options):
    configuration = importlib.import_module(f"transformers.models.{folder}.configuration_{folder}")
    return getattr(configuration, name)(**options)


#: HF block class -> (model folder, config class, config options); a small swiglu_limit so the clamps act.
NEW_BLOCKS = {
    "GptOssMLP": ("gpt_oss", "GptOssConfig", dict(hidden_size=D, intermediate_size=HIDDEN, num_local_experts=E,
                                                  num_experts_per_tok=K, swiglu_limit=1.0)),
    "DbrxFFN": ("dbrx", "DbrxConfig", dict(d_model=D, ffn_config=dict(hidden_size=D, ffn_hidden_size=HIDDEN,
                                                                      moe_num_experts=E, moe_top_k=K,
                                                                      moe_normalize_expert_weights=2.0))),
    "Ernie4_5_MoeSparseMoeBlock": ("ernie4_5_moe", "Ernie4_5_MoeConfig",
                                   dict(hidden_size=D, moe_intermediate_size=HIDDEN, moe_num_experts=E, moe_k=K,
                                        moe_num_shared_experts=2, moe_norm_min=1e-12)),
    "HunYuanMoEV1Moe": ("hunyuan_v1_moe", "HunYuanMoEV1Config", dict(hidden_size=D, intermediate_size=HIDDEN,
                                                                     num_experts=E, moe_topk=K)),
    "AriaTextMoELayer": ("aria", "AriaTextConfig", dict(hidden_size=D, intermediate_size=HIDDEN, moe_num_experts=E,
                                                        moe_topk=K, moe_num_shared_experts=2, num_attention_heads=2)),
    # 2 places per expert and sequence: with 5 tokens per sequence and 6 experts, some tokens are dropped.
    "SwitchTransformersSparseMLP": ("switch_transformers", "SwitchTransformersConfig",
                                    dict(d_model=D, d_ff=HIDDEN, num_experts=E, expert_capacity=2, num_heads=2)),
    "JetMoeMoE": ("jetmoe", "JetMoeConfig", dict(hidden_size=D, intermediate_size=HIDDEN, num_local_experts=E,
                                                 num_experts_per_tok=K)),
    "Llama4TextMoe": ("llama4", "Llama4TextConfig", dict(hidden_size=D, intermediate_size=HIDDEN, num_local_experts=E,
                                                         num_experts_per_tok=K)),
}


def new_block(cls_name: str, ffn_config: dict | None = None, **extra):
    folder, config_name, options = NEW_BLOCKS[cls_name]
    options = {**options, **extra}
    if ffn_config is not None:
        options["ffn_config"] = {**options["ffn_config"], **ffn_config}
    modeling = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    block = getattr(modeling, cls_name)(_config(folder, config_name, **options)).double().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.normal_(0.0, 0.1 if "e_score_correction_bias" in name else 0.5)   # ERNIE's bias: small
    return block


def hf_gradients(cls_name: str, block, layer):
    """(name, the layer's gradient, the HF block's gradient in the layer's layout), for every HF parameter.

    Written out per family from the HF modeling code, independently of fastmoe_edu.hf's own mapping."""
    ours = dict(layer.named_parameters())

    def grad(name):
        return ours[name].grad

    pairs = []
    if cls_name == "GptOssMLP":                         # gate, up in alternate columns of x @ gate_up_proj
        ex = block.experts
        pairs += [("router.weight", grad("router.weight"), block.router.weight.grad),
                  ("router.logit_bias", grad("router.logit_bias"), block.router.bias.grad),
                  ("w1", grad("experts.w1"), ex.gate_up_proj.grad[:, :, 0::2].transpose(1, 2)),
                  ("w3", grad("experts.w3"), ex.gate_up_proj.grad[:, :, 1::2].transpose(1, 2)),
                  ("b1", grad("experts.b1"), ex.gate_up_proj_bias.grad[:, 0::2]),
                  ("b3", grad("experts.b3"), ex.gate_up_proj_bias.grad[:, 1::2]),
                  ("w2", grad("experts.w2"), ex.down_proj.grad.transpose(1, 2)),
                  ("b2", grad("experts.b2"), ex.down_proj_bias.grad)]
    elif cls_name == "DbrxFFN":                         # [E·I, d] each; w2 is used as h @ w2_e
        mlp = block.experts.mlp
        pairs += [("router.weight", grad("router.weight"), block.router.layer.weight.grad),
                  ("w1", grad("experts.w1"), mlp.w1.grad.reshape(E, HIDDEN, D)),
                  ("w3", grad("experts.w3"), mlp.v1.grad.reshape(E, HIDDEN, D)),
                  ("w2", grad("experts.w2"), mlp.w2.grad.reshape(E, HIDDEN, D).transpose(1, 2))]
    elif cls_name == "JetMoeMoE":                       # input_linear [E, 2I, d] = [gate; up] (chunk(2)), bias [d]
        pairs += [("router.weight", grad("router.weight"), block.router.layer.weight.grad),
                  ("w1", grad("experts.w1"), block.input_linear.weight.grad[:, :HIDDEN]),
                  ("w3", grad("experts.w3"), block.input_linear.weight.grad[:, HIDDEN:]),
                  ("w2", grad("experts.w2"), block.output_linear.weight.grad),
                  ("output bias", grad("output_bias"), block.bias.grad)]
    elif cls_name == "SwitchTransformersSparseMLP":     # one Linear pair per expert
        pairs.append(("router.weight", grad("router.weight"), block.router.classifier.weight.grad))
        for e in range(E):
            expert = block.experts[f"expert_{e}"]
            pairs += [(f"w1[{e}]", grad("experts.w1")[e], expert.wi.weight.grad),
                      (f"w2[{e}]", grad("experts.w2")[e], expert.wo.weight.grad)]
    else:
        if cls_name in ("AriaTextMoELayer", "Llama4TextMoe"):
            router = block.router.weight
        elif cls_name == "HunYuanMoEV1Moe":
            router = block.gate.wg.weight
        else:
            router = block.gate.weight
        pairs.append(("router.weight", grad("router.weight"), router.grad))
        gate_up, down = block.experts.gate_up_proj.grad, block.experts.down_proj.grad
        if cls_name in ("AriaTextMoELayer", "Llama4TextMoe"):    # [E, d, 2I] = [gate | up], [E, I, d]: x @ W
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        pairs += [("w1", grad("experts.w1"), gate_up[:, :HIDDEN]), ("w3", grad("experts.w3"), gate_up[:, HIDDEN:]),
                  ("w2", grad("experts.w2"), down)]
        mlp = {"HunYuanMoEV1Moe": "shared_mlp", "Llama4TextMoe": "shared_expert"}.get(cls_name, "shared_experts")
        mlp = getattr(block, mlp)
        if mlp is not None:
            pairs += [("shared w1", grad("shared_experts.w1"), mlp.gate_proj.weight.grad),
                      ("shared w3", grad("shared_experts.w3"), mlp.up_proj.weight.grad),
                      ("shared w2", grad("shared_experts.w2"), mlp.down_proj.weight.grad)]
    return pairs


def check_block_equal(block, layer, cls_name, x):
    """Output, input gradient and every parameter gradient of the HF block and the layer, for input x."""
    generator = torch.Generator().manual_seed(1)
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf, y_ours = block(x_hf), layer(x_ours)
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf            # GPT-OSS returns (y, router scores)
    if cls_name == "Llama4TextMoe":
        y_hf = y_hf.reshape(x.shape)                               # it returns (y [T, d], logits)
    assert y_ours.shape == y_hf.shape and close(y_ours, y_hf)
    (y_hf * upstream).sum().backward()
    (y_ours * upstream).sum().backward()
    assert close(x_ours.grad, x_hf.grad)
    pairs = hf_gradients(cls_name, block, layer)
    assert len(pairs) >= 4
    for name, got, want in pairs:
        assert got is not None, name
        if want is None:                                           # an HF expert no token reached: no gradient
            assert torch.count_nonzero(got) == 0, name
        else:
            assert close(got, want), name
    hf_count = sum(p.numel() for p in block.parameters() if p.requires_grad)
    assert sum(got.numel() for _, got, _ in pairs) == hf_count     # every trained HF parameter is compared


@pytest.mark.parametrize("cls_name", list(NEW_BLOCKS))
def test_new_layout_block_equals_hf_block(cls_name):
    """Forward, input gradient, router / expert / shared-expert gradients; then to_hf round-trips the weights."""
    block = new_block(cls_name)
    layer = from_hf(block)
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_block_equal(block, layer, cls_name, x)
    if cls_name == "SwitchTransformersSparseMLP":
        assert layer.last_routing.num_dropped > 0            # the per-sequence capacity did drop tokens
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.1)
        for buffer in layer.buffers():
            buffer.add_(0.05)                                # ERNIE's selection bias travels too
    other = new_block(cls_name)
    if cls_name == "Llama4TextMoe":                          # a sigmoid router, but no selection bias in HF
        with pytest.raises(ValueError, match="router.bias is non-zero"):
            to_hf(layer, other)
        layer.router.bias.zero_()
    to_hf(layer, other)
    again = from_hf(other)
    for (name, a), (_, b) in zip(layer.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(layer.named_buffers(), again.named_buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cls_name,extra,expected", [
    ("GptOssMLP", {}, dict(expert="clamped_swiglu", router_bias=True, renormalize=True, bias=True,
                           swiglu_alpha=1.702, swiglu_limit=1.0)),
    ("DbrxFFN", {}, dict(renormalize=True, renormalize_p=2.0)),
    ("DbrxFFN", dict(ffn_config=dict(moe_normalize_expert_weights=None)), dict(renormalize=False)),
    ("Ernie4_5_MoeSparseMoeBlock", {}, dict(selection_bias=True, renormalize_min=1e-12, num_shared_experts=2,
                                            shared_d_hidden=HIDDEN)),
    ("HunYuanMoEV1Moe", {}, dict(renormalize=True, num_shared_experts=1, shared_d_hidden=HIDDEN)),
    ("AriaTextMoELayer", {}, dict(renormalize=True, num_shared_experts=2, shared_d_hidden=HIDDEN)),
    ("SwitchTransformersSparseMLP", {}, dict(router="switch", expert="relu", expert_capacity=2,
                                             capacity_per="sequence", jitter_epsilon=0.01)),
    ("JetMoeMoE", {}, dict(expert="swiglu", output_bias=True, renormalize=True)),
    ("JetMoeMoE", dict(activation_function="gelu"), dict(expert="geglu", output_bias=True)),
    ("Llama4TextMoe", {}, dict(router="sigmoid", renormalize=False, weights_on="input", num_shared_experts=1,
                               shared_d_hidden=HIDDEN)),
])
def test_new_family_options(cls_name, extra, expected):
    layer = from_hf(new_block(cls_name, **extra))
    readers = {"router": layer.router_name, "expert": layer.experts.kind, "bias": layer.experts.b1 is not None,
               "router_bias": layer.router.logit_bias is not None, "swiglu_alpha": layer.experts.swiglu_alpha,
               "swiglu_limit": layer.experts.swiglu_limit, "capacity_per": layer.capacity_per,
               "num_shared_experts": layer.num_shared_experts,
               "shared_d_hidden": layer.shared_experts and layer.shared_experts.width // layer.num_shared_experts,
               "output_bias": layer.output_bias is not None, "weights_on": layer.weights_on}
    for key, value in expected.items():
        got = readers[key] if key in readers else getattr(layer.router, key)
        assert got == value, key


def test_ernie_without_shared_experts_and_dbrx_without_normalization():
    """ERNIE with moe_num_shared_experts=0 (shared_experts is None), DBRX with moe_normalize_expert_weights=None."""
    x = torch.randn(2, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ernie = new_block("Ernie4_5_MoeSparseMoeBlock", moe_num_shared_experts=0)
    layer = from_hf(ernie)
    assert layer.shared_experts is None
    check_block_equal(ernie, layer, "Ernie4_5_MoeSparseMoeBlock", x)
    dbrx = new_block("DbrxFFN", ffn_config=dict(moe_normalize_expert_weights=None))
    check_block_equal(dbrx, from_hf(dbrx), "DbrxFFN", x)


def test_switch_capacity_is_counted_per_sequence():
    """The same sequence twice, its first token three times: 2 places per expert *and sequence* keep two copies
    in each sequence (over the batch, the second sequence's copies would all be dropped)."""
    block = new_block("SwitchTransformersSparseMLP")
    layer = from_hf(block)
    tokens = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    row = tokens[[0, 1, 0, 2, 0]][None]                      # token 0 at positions 0, 2, 4: the third is dropped
    x = torch.cat([row, row])
    y = layer(x)
    assert close(y, block(x))
    assert torch.equal(y[0], y[1])                           # each sequence has its own 2 places per expert
    kept = layer.last_routing.expert_ids.reshape(2, 5)
    assert torch.equal(kept[0], kept[1])
    dropped = kept[0] < 0
    assert dropped.tolist() == [False, False, False, False, True]
    assert torch.count_nonzero(y[0][dropped]) == 0           # a dropped token's output is 0 (HF's too)


@pytest.mark.parametrize("cls_name,extra,message", [
    ("DbrxFFN", dict(ffn_config=dict(moe_jitter_eps=0.1)), "moe_jitter_eps=0.1"),
    ("SwitchTransformersSparseMLP", dict(router_dtype="bfloat16"), "router_dtype"),
    ("Ernie4_5_MoeSparseMoeBlock", dict(use_bias=True), "the shared MLP has biases .* routed experts have none"),
    ("AriaTextMoELayer", dict(mlp_bias=True), "the shared MLP has biases .* routed experts have none"),
    ("SwitchTransformersSparseMLP", dict(dense_act_fn="gelu_new"), "dense_act_fn='relu' or 'gelu'"),
    ("JetMoeMoE", dict(activation_function="gelu_new"), "activation_function='silu' or 'gelu'"),
])
def test_new_family_settings_that_do_not_convert(cls_name, extra, message):
    with pytest.raises(UnsupportedFamilyError, match=message):
        from_hf(new_block(cls_name, **extra))


def test_to_hf_compares_the_new_options():
    gpt_oss = new_block("GptOssMLP")
    layer = from_hf(gpt_oss)
    wrong = MoELayer(D, HIDDEN, E, top_k=K, expert="clamped_swiglu", bias=True, router_bias=True,
                     swiglu_limit=7.0).double()
    with pytest.raises(ValueError, match="swiglu_limit=7.0 \\(the block's is 1.0\\)"):
        to_hf(wrong, gpt_oss)
    to_hf(layer, new_block("GptOssMLP"))                    # the layer read from the same config fits
    switch = new_block("SwitchTransformersSparseMLP")
    batch_capacity = MoELayer(D, HIDDEN, E, top_k=1, router="switch", expert="relu", expert_capacity=2,
                              jitter_epsilon=0.01).double()
    with pytest.raises(ValueError, match="capacity_per='batch' \\(the block's is 'sequence'\\)"):
        to_hf(batch_capacity, switch)
    # No supported block prioritizes capacity by probability, renormalizes after dropping or drops expert outputs.
    nllb_like = MoELayer(D, HIDDEN, E, top_k=1, router="switch", expert="relu", expert_capacity=2,
                         capacity_per="sequence", jitter_epsilon=0.01, capacity_priority="probability",
                         expert_dropout=0.1).double()
    with pytest.raises(ValueError, match="capacity_priority='probability' \\(the block's is 'order'\\); "
                                         "expert_dropout=0.1 \\(the block's is 0.0\\)"):
        to_hf(nllb_like, switch)
    after_dropping = MoELayer(D, HIDDEN, E, top_k=K, capacity_factor=1.0, renormalize_after_dropping=True).double()
    with pytest.raises(ValueError, match="renormalize_after_dropping=True \\(the block's is False\\)"):
        to_hf(after_dropping, tiny_block("MixtralSparseMoeBlock"))


# ----------------------------------------------------------------------------------------------------
# The families of transformers 5.25 beyond those above (issue 26): tiny_block builds them, one table
# ----------------------------------------------------------------------------------------------------
GROUPED = dict(n_group=2, topk_group=1, routed_scaling_factor=2.5)     # DeepSeek-V3's router, 2 groups of 3
#: HF block class -> (model folder, config options beyond tiny_block's, path of the router weight, shared MLP
#: attribute or None). Scales of 2.5, soft-caps and clamps small enough to act, 2 shared experts where counted.
MORE_BLOCKS = {
    "MellumSparseMoeBlock": ("mellum", {}, "gate.weight", None),
    "GraniteMoeSWAMoE": ("granitemoe_swa", {}, "router.weight", None),
    "Qwen4ExpTextSparseMoeBlock": ("qwen4_exp", {"shared_expert_intermediate_size": 10}, "gate.weight",
                                   "shared_expert"),
    "DeepseekOcr2TextMoe": ("deepseek_ocr2", {**DEEPSEEK, "topk_method": "group_limited_greedy"}, "gate.weight",
                            "shared_experts"),
    "UnlimitedOcrTextMoe": ("unlimited_ocr", {**DEEPSEEK, "topk_method": "group_limited_greedy"}, "gate.weight",
                            "shared_experts"),
    **{name: (folder, DEEPSEEK, "gate.weight", "shared_experts") for name, folder in [
        ("DeepseekV32MoE", "deepseek_v32"), ("Glm4MoeLiteMoE", "glm4_moe_lite"), ("Glm4vMoeTextMoE", "glm4v_moe"),
        ("GlmMoeDsaMoE", "glm_moe_dsa"), ("SolarOpenMoE", "solar_open"), ("KimiLinearMoE", "kimi_linear"),
        ("MiniCPM5MoeMoE", "minicpm5_moe"), ("BailingHybridMoE", "bailing_hybrid")]},
    "Dots3NoteTextMoE": ("dots3_note", {**DEEPSEEK, "shared_experts_intermediate_size": 5, "num_key_value_heads": 2},
                         "gate.weight", "shared_experts"),
    "ExaoneMoeSparseMoEBlock": ("exaone_moe", {**GROUPED, "num_shared_experts": 2}, "gate.weight", "shared_experts"),
    "MiMoV2FlashMoE": ("mimo_v2_flash", GROUPED, "gate.weight", None),
    "AXK2MoE": ("axk2", {**DEEPSEEK, "n_group": None, "topk_group": None}, "gate.weight", "shared_experts"),
    "BeamMoE": ("beam", GROUPED, "gate.weight", None),
    "MiniMaxM2SparseMoeBlock": ("minimax_m2", {}, "gate.weight", None),
    "AfmoeSparseMoeBlock": ("afmoe", {"num_shared_experts": 2, "route_scale": 2.5}, "router.gate.weight",
                            "shared_experts"),
    "HYV3MoE": ("hy_v3", {"num_shared_experts": 1, "router_scaling_factor": 2.5}, "gate.weight", "shared_experts"),
    "LagunaSparseMoeBlock": ("laguna", {"shared_expert_intermediate_size": 10, "moe_routed_scaling_factor": 2.5,
                                        "moe_router_logit_softcapping": 1.5}, "gate.weight", "shared_experts"),
    "Step3p7SparseMoeBlock": ("step3p7", {"share_expert_dim": 10, "moe_router_scaling_factor": 2.5}, "gate.weight",
                              "shared_experts"),
    "MiniMaxM3VLSparseMoeBlock": ("minimax_m3_vl", {"shared_intermediate_size": 10, "routed_scaling_factor": 2.5,
                                                    "swiglu_limit": 1.0}, "gate.weight", "shared_experts"),
    "Lfm2MoeSparseMoeBlock": ("lfm2_moe", {"routed_scaling_factor": 2.5}, "gate.weight", None),
    "FlintSparseMoeBlock": ("flint", {"shared_expert_intermediate_size": 10}, "gate.weight", "shared_expert"),
    "LaraMiniSparseMoeBlock": ("lara_mini", {"shared_expert_intermediate_size": 10}, "gate.weight", "shared_expert"),
    "LongcatFlashMoE": ("longcat_flash", {"zero_expert_num": 0, "routed_scaling_factor": 2.5,
                                          "expert_ffn_hidden_size": HIDDEN}, "router.classifier.weight", None),
    "Mistral4MoE": ("mistral4", {**DEEPSEEK, "n_group": 1}, "gate.weight", "shared_experts"),
    "MistralLarge4TextMoE": ("mistral_large4", {**DEEPSEEK, "n_group": 1}, "gate.weight", "shared_experts"),
    # "average" (the default) with a shared expert: y = (routed + shared) / 2
    "Cohere2MoeSparseMoeBlock": ("cohere2_moe", {"num_shared_experts": 1}, "gate.weight", "shared_experts"),
    "OpenAIPrivacyFilterMLP": ("openai_privacy_filter", {"swiglu_limit": 1.0}, "router.weight", None),
    # ungated relu experts and shared MLP (up_proj, down_proj), DeepSeek-V3's router; no latent projection
    "NemotronHMoE": ("nemotron_h", {**GROUPED, "mlp_hidden_act": "relu", "moe_shared_expert_intermediate_size": 10,
                                    "layers_block_type": ["moe"]}, "gate.weight", "shared_experts"),
}


def more_block(cls_name: str, **extra):
    folder = MORE_BLOCKS[cls_name][0]
    FAMILY_MODULES[cls_name] = folder                    # tiny_block's lookup; FAMILY_MODULES' own test is unchanged
    try:                                               # 2 attention heads: some configs check hidden_size by them
        return tiny_block(cls_name, **{"num_attention_heads": 2, "num_key_value_heads": 2,
                                       **MORE_BLOCKS[cls_name][1], **extra})
    finally:
        del FAMILY_MODULES[cls_name]


def gradient_pairs(cls_name: str, block, layer, router_path: str, shared_attr: str | None):
    """(name, the layer's gradient, HF's in the layer's layout) for every HF parameter of the block that its forward
    reads (the router at ``router_path``, the shared MLP at ``shared_attr``), written out from the HF modeling
    code (not from fastmoe_edu.hf's mapping)."""
    ours = {name: param.grad for name, param in layer.named_parameters()}
    pairs = [("router.weight", ours["router.weight"], block.get_parameter(router_path).grad)]
    experts = block.experts
    if cls_name == "NemotronHMoE":                      # no gate matrix: up_proj [E, I, d], down_proj [E, d, I]
        pairs += [("w1", ours["experts.w1"], experts.up_proj.grad), ("w2", ours["experts.w2"], experts.down_proj.grad)]
    else:
        gate_up, down = experts.gate_up_proj.grad, experts.down_proj.grad
        if cls_name == "OpenAIPrivacyFilterMLP":      # x @ W: [E, d, 2I] = [gate | up], [E, I, d]; biases; router c
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            bias = experts.gate_up_proj_bias.grad
            pairs += [("router.logit_bias", ours["router.logit_bias"], block.router.bias.grad),
                      ("b1", ours["experts.b1"], bias[:, :HIDDEN]), ("b3", ours["experts.b3"], bias[:, HIDDEN:]),
                      ("b2", ours["experts.b2"], experts.down_proj_bias.grad)]
        pairs += [("w1", ours["experts.w1"], gate_up[:, :HIDDEN]), ("w3", ours["experts.w3"], gate_up[:, HIDDEN:]),
                  ("w2", ours["experts.w2"], down)]
    mlp = getattr(block, shared_attr, None) if shared_attr is not None else None
    if mlp is not None:
        if cls_name == "NemotronHMoE":
            pairs += [("shared w1", ours["shared_experts.w1"], mlp.up_proj.weight.grad)]
        else:
            if cls_name == "MiniMaxM3VLSparseMoeBlock":  # one gate_up_proj Linear [2I, d] = [gate; up]
                width = mlp.down_proj.weight.shape[1]
                gate, up = mlp.gate_up_proj.weight.grad[:width], mlp.gate_up_proj.weight.grad[width:]
            else:
                gate, up = mlp.gate_proj.weight.grad, mlp.up_proj.weight.grad
            pairs += [("shared w1", ours["shared_experts.w1"], gate), ("shared w3", ours["shared_experts.w3"], up)]
        pairs.append(("shared w2", ours["shared_experts.w2"], mlp.down_proj.weight.grad))
    if getattr(block, "shared_expert_gate", None) is not None:      # Qwen2-style σ(x · g) on the shared output
        pairs.append(("shared gate", ours["shared_experts.gate"], block.shared_expert_gate.weight.grad[0]))
    return pairs


def more_gradients(cls_name: str, block, layer):
    """gradient_pairs for a block of MORE_BLOCKS."""
    return gradient_pairs(cls_name, block, layer, *MORE_BLOCKS[cls_name][2:])


def check_fused_block(block, layer, x):
    """check_more_block for the blocks of FAMILY_MODULES (router gate.weight, fused experts, DeepSeek's shared MLP)."""
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf, y_ours = block(x_hf), layer(x_ours)
    assert close(y_ours, y_hf)
    (y_hf * upstream).sum().backward()
    (y_ours * upstream).sum().backward()
    assert close(x_ours.grad, x_hf.grad) and close(layer.router.weight.grad, block.gate.weight.grad)
    assert close(torch.cat([layer.experts.w1.grad, layer.experts.w3.grad], 1), block.experts.gate_up_proj.grad)
    assert close(layer.experts.w2.grad, block.experts.down_proj.grad)
    mlp = getattr(block, "shared_experts", None)
    if mlp is not None:
        assert close(layer.shared_experts.w1.grad, mlp.gate_proj.weight.grad)
        assert close(layer.shared_experts.w3.grad, mlp.up_proj.weight.grad)
        assert close(layer.shared_experts.w2.grad, mlp.down_proj.weight.grad)


def check_more_block(cls_name, block, layer, x):
    """Output, input gradient and the gradient of every trained HF parameter, for input x (tolerance: REL, as
    every HF router here computes its logits or weights in float32)."""
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_hf, x_ours = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_hf, y_ours = block(x_hf), layer(x_ours)
    y_hf = y_hf[0] if isinstance(y_hf, tuple) else y_hf                # the privacy filter returns (y, scores)
    assert y_ours.shape == y_hf.shape and close(y_ours, y_hf)
    (y_hf * upstream).sum().backward()
    (y_ours * upstream).sum().backward()
    assert close(x_ours.grad, x_hf.grad)
    pairs = more_gradients(cls_name, block, layer)
    for name, got, want in pairs:
        assert got is not None, name
        assert close(got, want) if want is not None else torch.count_nonzero(got) == 0, name
    unused = SUPPORTED[cls_name].unused_at                          # held by HF's block, never read by its forward
    assert all(block.get_parameter(path).grad is None for path, _ in block.named_parameters() if path in unused)
    hf_count = sum(p.numel() for path, p in block.named_parameters() if p.requires_grad and path not in unused)
    assert sum(got.numel() for _, got, _ in pairs) == hf_count     # every trained HF parameter is compared


@pytest.mark.parametrize("cls_name", list(MORE_BLOCKS))
def test_more_families_block_equals_hf_block(cls_name):
    """Forward, input and every weight gradient; then to_hf round-trips weights and selection biases."""
    block = more_block(cls_name)
    layer = from_hf(block)
    x = torch.randn(2, 4, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_more_block(cls_name, block, layer, x)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.1 if param.requires_grad else 0.0)      # Cohere2's frozen σ(x·0) = 1/2 gate stays 0
        if getattr(layer.router, "bias", None) is not None and layer.router.bias.ne(0).any():
            layer.router.bias.add_(0.05)                 # a selection bias the block holds travels too
    other = more_block(cls_name)
    to_hf(layer, other)
    again = from_hf(other)
    for (name, a), (_, b) in zip([*layer.named_parameters(), *layer.named_buffers()],
                                 [*again.named_parameters(), *again.named_buffers()]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cls_name,extra,expected", [
    ("MixtralSparseMoeBlock", dict(hidden_act="gelu"), dict(expert="geglu")),             # the exact gelu
    ("Qwen3MoeSparseMoeBlock", dict(hidden_act="gelu", norm_topk_prob=False), dict(expert="geglu", renormalize=False)),
    ("Glm4MoeMoE", dict(norm_topk_prob=False), dict(router="sigmoid", renormalize=False, route_scale=2.5)),
    ("Lfm2MoeSparseMoeBlock", {}, dict(router="sigmoid", renormalize=True, renormalize_eps=1e-6, route_scale=2.5)),
    ("Lfm2MoeSparseMoeBlock", dict(use_expert_bias=False, norm_topk_prob=False), dict(renormalize=False)),
    ("LagunaSparseMoeBlock", {}, dict(router="sigmoid", logit_softcap=1.5, route_scale=2.5)),
    ("Cohere2MoeSparseMoeBlock", {}, dict(router="softmax_top_k", route_scale=0.5, shared_expert_gate=True)),
    ("Cohere2MoeSparseMoeBlock", dict(expert_selection_fn="sigmoid", shared_expert_combination_strategy="sum",
                                      num_shared_experts=2), dict(router="sigmoid", route_scale=1.0, renormalize=True,
                                                                  shared_expert_gate=False)),
    ("Cohere2MoeSparseMoeBlock", dict(expert_selection_fn="sigmoid", norm_topk_prob=False, num_shared_experts=0),
     dict(router="sigmoid", renormalize=False, num_shared_experts=0)),
    ("LongcatFlashMoE", {}, dict(selection_bias=True, renormalize=False, route_scale=2.5)),
    ("SwitchTransformersSparseMLP", dict(dense_act_fn="gelu"), dict(expert="gelu")),
    ("NemotronHMoE", {}, dict(router="sigmoid", expert="relu", renormalize=True, route_scale=2.5, num_groups=2,
                              num_shared_experts=1)),
    ("NemotronHMoE", dict(mlp_hidden_act="gelu", n_group=1, norm_topk_prob=False),
     dict(expert="gelu", renormalize=False, num_groups=None)),
])
def test_family_variants_convert_exactly(cls_name, extra, expected):
    """Settings that used to be refused (gelu experts) or that change the options read: the layer equals the block."""
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    if cls_name in MORE_BLOCKS:
        block = more_block(cls_name, **extra)
        layer = from_hf(block)
        check_more_block(cls_name, block, layer, x)
    elif cls_name in NEW_BLOCKS:
        block = new_block(cls_name, **extra)
        layer = from_hf(block)
        check_block_equal(block, layer, cls_name, x)
    else:
        block = tiny_block(cls_name, **extra)
        layer = from_hf(block)
        check_fused_block(block, layer, x)
    readers = {"router": layer.router_name, "expert": layer.experts.kind, "num_shared_experts": layer.num_shared_experts,
               "shared_expert_gate": layer.shared_experts is not None and layer.shared_experts.gate is not None}
    for key, value in expected.items():
        assert (readers[key] if key in readers else getattr(layer.router, key)) == value, key
    if expected.get("shared_expert_gate") and cls_name == "Cohere2MoeSparseMoeBlock":
        assert not layer.shared_experts.gate.requires_grad and torch.count_nonzero(layer.shared_experts.gate) == 0


@pytest.mark.parametrize("cls_name,extra,message", [
    ("AXK2MoE", dict(n_group=2, topk_group=1), "n_group=2 fills the excluded groups' scores with 0"),
    ("Mistral4MoE", dict(n_group=2), "n_group=2 scores each group .* two largest"),
    ("LongcatFlashMoE", dict(zero_expert_num=2), "zero_expert_num=2 adds experts that return their input"),
    ("BailingHybridMoE", dict(num_hidden_layers=1, swiglu_limits=[7.0]), "swiglu_limits gives this layer the limit 7.0"),
    ("Step3p7SparseMoeBlock", dict(num_hidden_layers=1, swiglu_limits_shared=[5.0]), "shared expert: swiglu_limits .* limit 5.0"),
    ("Cohere2MoeSparseMoeBlock", dict(hidden_act="gelu_pytorch_tanh"), "activation GELUTanh"),
    ("NemotronHMoE", dict(mlp_hidden_act="relu2"), r"ReLUSquaredActivation \(the squared ReLU relu\(x\)², which "
                                                   r"would need an expert kind of its own\).*'relu' or 'gelu'"),
    ("NemotronHMoE", dict(mlp_hidden_act="silu"), "SiLUActivation; MoELayer's plain .*mlp_hidden_act='relu'"),
    ("NemotronHMoE", dict(moe_latent_size=8), "moe_latent_size=8 runs the routed experts in a latent width.*not the "
                                              "same parameters or gradients.*Only moe_latent_size=None"),
    ("NemotronHMoE", dict(mlp_bias=True), r"the shared MLP has biases \(up_proj, down_proj\) but the routed"),
])
def test_more_family_settings_that_do_not_convert(cls_name, extra, message):
    with pytest.raises(UnsupportedFamilyError, match=message):
        from_hf(more_block(cls_name, **extra))


def test_longcat_router_bias_is_held_but_never_read():
    """LongCat-Flash with router_bias=True: its router creates classifier.bias but computes the logits from the weight
    alone, so the bias changes nothing and gets no gradient. The layer converts without it; to_hf leaves it alone."""
    block = more_block("LongcatFlashMoE", router_bias=True)
    layer = from_hf(block)
    assert layer.router.logit_bias is None
    x = torch.randn(2, 5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    check_more_block("LongcatFlashMoE", block, layer, x)             # ... and its bias's gradient is None
    before = block(x).detach()
    with torch.no_grad():
        block.router.classifier.bias.add_(5.0)
    assert torch.equal(block(x), before)                             # HF's output does not depend on it
    held = block.router.classifier.bias.detach().clone()
    to_hf(layer, block)
    assert torch.equal(block.router.classifier.bias, held)


@pytest.mark.parametrize("cls_name", sorted(UNSUPPORTED))
def test_every_unsupported_family_names_what_is_missing(cls_name):
    """A block of each listed class (a stand-in of that name: building some needs their whole model) is refused with
    its family and the reason, before anything is read."""
    block = type(cls_name, (torch.nn.Module,), {})()
    family, missing = UNSUPPORTED[cls_name]
    with pytest.raises(UnsupportedFamilyError, match=f"^{re.escape(f'{family} ({cls_name})')} .*needs "
                                                     f"{re.escape(missing[:40])}"):
        from_hf(block)


def _classes_between(path: Path, start: str, end: str) -> set[str]:
    """The HF block classes (of SUPPORTED or UNSUPPORTED) named in backticks in ``path`` from ``start`` to ``end``."""
    text = path.read_text(encoding="utf-8")
    section = text[text.index(start):text.index(end, text.index(start))]
    return set(re.findall(r"`([A-Za-z0-9_]+)`", section)) & (set(SUPPORTED) | set(UNSUPPORTED))


@pytest.mark.parametrize("doc,converted,refused", [
    ("docs/hf.md", ("## Supported families", "## Layer options added"),
     ("## Unsupported families", "Settings of supported families that are refused")),
    ("README.md", ("## Hugging Face models", "The 18 refused classes"), ("The 18 refused classes", "Details, the")),
])
def test_docs_list_every_family_with_its_status(doc, converted, refused):
    """docs/hf.md and the README name every converting class in their converted tables and every refused one in
    their refused table, and no class in the wrong one; the counts they state are the code's."""
    path = Path(__file__).resolve().parent.parent / doc
    assert _classes_between(path, *converted) == set(SUPPORTED)
    assert _classes_between(path, *refused) == set(UNSUPPORTED)
    assert f"{len(SUPPORTED)} convert" in path.read_text(encoding="utf-8")
    assert f"{len(UNSUPPORTED)} refused" in path.read_text(encoding="utf-8")


def test_switch_warns_where_training_differs():
    """In a float32 model with the default float32 router, HF's jitter multiplies the experts' input in place (the
    output differs from any jitter of the router alone); from_hf says so. A float64 model's router jitters a copy."""
    same_dtype = new_block("SwitchTransformersSparseMLP", router_jitter_noise=0.1, dropout_rate=0.0).float().train()
    with pytest.warns(UserWarning, match="in place .*HF's experts see the jittered input"):
        layer = from_hf(same_dtype)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(7))
    seen = x.clone()
    same_dtype(seen)
    assert not torch.equal(seen, x)                          # HF changed the caller's tensor: its experts saw it
    # Eval mode: exact up to float32 rounding in a different summation order (a few 6e-8 ulps; 1e-5 leaves headroom).
    assert close(layer.eval()(x), same_dtype.eval()(x), 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_hf(new_block("SwitchTransformersSparseMLP", router_jitter_noise=0.1, dropout_rate=0.0))   # float64
    with pytest.warns(UserWarning, match="dropout_rate=0.1"):
        from_hf(new_block("SwitchTransformersSparseMLP", router_jitter_noise=0.0, dropout_rate=0.1))


def test_moefy_and_upcycle_on_a_bare_block_refuse():
    """Issue 29: a bare block (or MLP) is the module to replace, not a model holding one; both refuse and say how."""
    block = tiny_block("MixtralSparseMoeBlock")
    with pytest.raises(ValueError, match=re.escape("convert it with from_hf(block)")):
        moefy(block)
    assert "" not in dict(block.named_children())          # before the fix: the block itself under the name ""
    mlp = tiny_dense("llama").model.layers[0].mlp
    before = sum(p.numel() for p in mlp.parameters())
    with pytest.raises(ValueError, match="the MLP itself"):
        upcycle(mlp, num_experts=2, top_k=1)
    assert sum(p.numel() for p in mlp.parameters()) == before


# ----------------------------------------------------------------------------------------------------
# Whole models: the families with layouts of their own here; every other family in test_hf_models.py
# ----------------------------------------------------------------------------------------------------
def tiny_new_model(cls_name: str, seed: int = 0):
    """A 2-layer model of the family of ``cls_name`` (an encoder-decoder for Switch), float64, random MoE weights."""
    import transformers
    common = dict(vocab_size=48, output_router_logits=True, attn_implementation="eager", experts_implementation="eager")
    decoder = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, **common)
    if cls_name == "GptOssMLP":
        config = transformers.GptOssConfig(intermediate_size=HIDDEN, num_local_experts=E, num_experts_per_tok=K,
                                           head_dim=8, swiglu_limit=1.0, router_aux_loss_coef=0.05, **decoder)
        cls = transformers.GptOssForCausalLM
    elif cls_name == "DbrxFFN":
        config = transformers.DbrxConfig(d_model=D, n_heads=2, n_layers=2, max_seq_len=32,
                                         attn_config=dict(kv_n_heads=1, rope_theta=10000.0, clip_qkv=8.0),
                                         ffn_config=dict(hidden_size=D, ffn_hidden_size=HIDDEN, moe_num_experts=E,
                                                         moe_top_k=K, moe_loss_weight=0.05,
                                                         moe_normalize_expert_weights=2.0),
                                         **common)
        cls = transformers.DbrxForCausalLM
    elif cls_name == "Ernie4_5_MoeSparseMoeBlock":
        config = transformers.Ernie4_5_MoeConfig(intermediate_size=20, moe_intermediate_size=HIDDEN, moe_num_experts=E,
                                                 moe_k=K, moe_layer_start_index=0, moe_num_shared_experts=1,
                                                 router_aux_loss_coef=0.05, **decoder)
        cls = transformers.Ernie4_5_MoeForCausalLM
    elif cls_name == "HunYuanMoEV1Moe":
        config = transformers.HunYuanMoEV1Config(intermediate_size=HIDDEN, num_experts=E, moe_topk=K, head_dim=8,
                                                 **decoder)
        cls = transformers.HunYuanMoEV1ForCausalLM
    elif cls_name == "AriaTextMoELayer":
        config = transformers.AriaTextConfig(intermediate_size=HIDDEN, moe_num_experts=E, moe_topk=K,
                                             moe_num_shared_experts=1, **decoder)
        cls = transformers.AriaTextForCausalLM
    elif cls_name == "Llama4TextMoe":             # every layer MoE; no aux loss (the model returns the logits only)
        config = transformers.Llama4TextConfig(vocab_size=48, hidden_size=D, intermediate_size=HIDDEN,
                                               intermediate_size_mlp=20, num_hidden_layers=2, num_attention_heads=2,
                                               num_key_value_heads=1, head_dim=8, num_local_experts=E,
                                               num_experts_per_tok=K, interleave_moe_layer_step=1,
                                               output_router_logits=True, attn_implementation="eager",
                                               max_position_embeddings=64, attention_chunk_size=64)
        cls = transformers.Llama4ForCausalLM
    elif cls_name == "JetMoeMoE":                 # its attention's own mixture of experts (MoA) stays HF's
        config = transformers.JetMoeConfig(vocab_size=48, hidden_size=D, num_hidden_layers=2, num_key_value_heads=2,
                                           kv_channels=4, intermediate_size=HIDDEN, num_local_experts=E,
                                           num_experts_per_tok=K, output_router_logits=True, aux_loss_coef=0.05,
                                           attn_implementation="eager")
        cls = transformers.JetMoeForCausalLM
    else:
        config = transformers.SwitchTransformersConfig(d_model=D, d_kv=8, d_ff=HIDDEN, num_layers=2,
                                                       num_decoder_layers=2, num_heads=2, num_experts=E, expert_capacity=3,
                                                       decoder_start_token_id=0,     # HF computes its router
                                                       encoder_sparse_step=2, decoder_sparse_step=2,   # losses for >1
                                                       router_z_loss_coef=0.01, router_aux_loss_coef=0.05, **common)
        cls = transformers.SwitchTransformersForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(config).double()
    with torch.no_grad():                      # weights large enough that the routing is far from uniform
        for name, param in model.named_parameters():
            if "e_score_correction_bias" in name:
                param.normal_(0.0, 0.05)
            elif param.dim() >= 2 and "embed" not in name and "shared" != name.split(".")[0]:
                param.normal_(0.0, 0.3)
    return model


def _model_step(model, cls_name, ids):
    if cls_name == "SwitchTransformersSparseMLP":
        return model(input_ids=ids, labels=ids, output_router_logits=True)
    return model(ids, labels=ids, output_router_logits=True)


@pytest.mark.parametrize("cls_name", list(NEW_BLOCKS))
def test_moefy_new_families_keep_logits_loss_aux_loss_and_gradients(cls_name):
    """Whole models: logits, loss (with HF's aux loss, Switch's z-loss), and every parameter gradient. Switch runs
    in eval mode (its dropout and router jitter are random in training); the others have no dropout."""
    original = tiny_new_model(cls_name)
    swapped = tiny_new_model(cls_name)
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(3))
    if cls_name == "SwitchTransformersSparseMLP":
        original.eval()
        swapped.eval()
    _model_step(swapped, cls_name, ids[:, :3].contiguous())     # HF's recording hooks now installed
    moefy(swapped, backend="reference")
    hf_blocks = [m for m in original.modules() if type(m).__name__ == cls_name]
    ours = [m for m in swapped.modules() if isinstance(m, HFMoEBlock)]
    assert len(ours) == len(hf_blocks) >= 2
    out_hf, out_ours = _model_step(original, cls_name, ids), _model_step(swapped, cls_name, ids)
    assert close(out_ours.logits, out_hf.logits)
    assert close(out_ours.loss, out_hf.loss)
    compared = 0
    for key in ("aux_loss", "encoder_aux_loss", "encoder_z_loss", "decoder_aux_loss", "decoder_z_loss"):
        want = getattr(out_hf, key, None)
        if isinstance(want, torch.Tensor):
            assert close(getattr(out_ours, key), want), key
            compared += 1
        else:
            assert getattr(out_ours, key, None) == want, key
    assert compared >= 1 or cls_name in ("HunYuanMoEV1Moe", "AriaTextMoELayer", "Llama4TextMoe")   # no aux loss
    out_hf.loss.backward()
    out_ours.loss.backward()
    hf_params = dict(original.named_parameters())
    for name, param in swapped.named_parameters():
        if ".moe." not in name and param.requires_grad:         # attention, norms, embeddings: same names
            want = hf_params[name].grad
            assert (want is None and param.grad is None) or close(param.grad, want), name
    for hf_block, block in zip(hf_blocks, ours):
        for name, got, want in hf_gradients(cls_name, hf_block, block.moe):
            assert close(got, want) if want is not None else torch.count_nonzero(got) == 0, name


def test_moefy_refuses_models_it_cannot_swap():
    with pytest.raises(ValueError, match="no Hugging Face MoE block"):
        moefy(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ----------------------------------------------------------------------------------------------------
# Upcycling
# ----------------------------------------------------------------------------------------------------
def tiny_dense(family: str, **extra):
    import transformers
    common = dict(vocab_size=48, hidden_size=D, intermediate_size=20, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, attn_implementation="eager")
    configs = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=48, n_embd=D, n_layer=2, n_head=2, n_positions=32,
                                         attn_implementation="eager", **extra)
        return transformers.GPT2LMHeadModel(config).double()
    config_cls, model_cls = configs[family]
    return model_cls(config_cls(**common, **extra)).double()


@pytest.mark.parametrize("family,extra", [("llama", {}), ("llama", {"mlp_bias": True}), ("qwen2", {}),
                                          ("mistral", {}), ("gpt2", {"activation_function": "gelu"})])
def test_upcycled_model_starts_equal_to_the_dense_one(family, extra):
    dense = tiny_dense(family, **extra).eval()
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(4))
    expected = dense(ids).logits
    upcycle(dense, num_experts=4, top_k=2, backend="reference")
    assert sum(isinstance(m, MoELayer) for m in dense.modules()) == 2
    assert close(dense(ids).logits, expected, EXACT)


def test_upcycled_model_trains():
    model = upcycle(tiny_dense("llama"), num_experts=4, top_k=2, backend="reference").train()
    ids = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss + moe_aux_loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    w1 = next(m for m in model.modules() if isinstance(m, MoELayer)).experts.w1
    assert not torch.equal(w1[0], w1[1])                          # the expert copies diverged


def test_upcycle_refuses_gpt2_tanh_gelu():
    with pytest.raises(UnsupportedFamilyError, match="gelu_new|NewGELU|tanh"):
        upcycle(tiny_dense("gpt2"), num_experts=2, top_k=1)


# ----------------------------------------------------------------------------------------------------
# Two ranks
# ----------------------------------------------------------------------------------------------------
@pytest.mark.mpi
def test_moefy_expert_parallel_two_ranks_equal_one_process(tmp_path):
    from launcher import launch
    output = tmp_path / "hf.json"
    done = launch("mpi", 2, [str(SCRIPT), str(output)], timeout=240)
    assert done.returncode == 0, f"mpirun failed:\n{done.stdout}\n{done.stderr}"
    report = json.loads(output.read_text())
    assert report["world_size"] == 2
    for quantity, error in report["errors"].items():
        assert error <= EXACT * max(report["scale"], 1.0), (quantity, error)
    assert report["losses"][-1] < report["losses"][0]
