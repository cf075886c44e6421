"""fastmoe_edu.hf on whole tiny models: every family whose block converts, moefied, against the HF model.

One table (``MODELS``: a tiny config per family) and one helper build each model twice, float64, a few layers of
width 16. The moefied copy must give HF's logits (or last hidden state, for a family whose text model has no LM
head here), loss with HF's balance loss, router logits, the gradient of the input embeddings and of every weight;
then ``to_hf`` copies perturbed layers back into the HF model, which must give the moefied model's logits again.

Switch Transformers, GPT-OSS, DBRX, ERNIE-4.5-MoE, HunYuan-MoE-V1, Aria, JetMoE and Llama-4 have their own
whole-model test in test_hf.py (encoder-decoder, expert layouts of their own); together the two cover every
family in ``SUPPORTED``.

Tolerance. HF's routers compute in float32 (test_hf's docstring): each layer's combine weights carry float32
rounding (~6e-8 relative), which the layers above carry on through attention softmaxes and norms, and a small
gradient that is a difference of large terms (a k_proj in the last layer) loses more of it. Measured: at most
2.8e-6 of a compared quantity's max (FlexOlmo's last k_proj; most families under 1e-6). MODEL_REL = 1e-5 keeps
3.5x headroom and is still five orders of magnitude under any error of the mapping (a wrong weight, k, scale or
expert order changes the outputs by O(1) of their scale).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")

from fastmoe_edu.hf import SUPPORTED, HFMoEBlock, moefy, to_hf  # noqa: E402
from test_hf import D, HIDDEN, NEW_BLOCKS, gradient_pairs  # noqa: E402
from test_hf import close as block_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "transformers_modeling")


@pytest.fixture(scope="module")
def transformers_modeling():
    """transformers' shared modeling code (torch.distributed's tensor code and more, seconds to import) is imported
    once, in this fixture's setup, so that each case's time is its own."""
    importlib.import_module("transformers.modeling_utils")

E, K, VOCAB = 6, 2, 48
MODEL_REL = 1e-5
#: DeepSeek-style routers: 2 groups of 3 experts, the best group only, a scale, 2 shared experts.
GROUPED = dict(n_group=2, topk_group=1, routed_scaling_factor=2.5)
DEEPSEEK = dict(GROUPED, n_shared_experts=2, first_k_dense_replace=0)
#: multi-head latent attention (DeepSeek-V2 and its descendants) of a width that fits d = 16
MLA = dict(kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, head_dim=4,
           num_key_value_heads=2)
#: the sparse attention's indexer (DeepSeek-V3.2 and its descendants), small
INDEXER = dict(index_topk=4, index_head_dim=8, index_n_heads=2)
TWO_SPARSE = dict(mlp_layer_types=["sparse", "sparse"])
FULL_ATTENTION = dict(layer_types=["full_attention", "full_attention"])   # no linear-attention kernels needed

@dataclass(frozen=True)
class Tiny:
    """How to build one family's tiny model: its transformers folder, config and model classes, the config options
    beyond COMMON, and where its block keeps the router weight and the shared MLP (None: none)."""
    folder: str
    config: str
    model: str
    options: dict
    router: str
    shared: str | None


def tiny(folder: str, prefix: str, *, text: bool = False, config: str | None = None, model: str | None = None,
         router: str = "gate.weight", shared: str | None = None, **options) -> Tiny:
    """A row of MODELS: <prefix>Config and <prefix>ForCausalLM, or with ``text`` the text part of a multimodal model,
    <prefix>TextConfig and <prefix>TextModel (no LM head: its last hidden state is compared)."""
    config = config or f"{prefix}{'TextConfig' if text else 'Config'}"
    return Tiny(folder, config, model or f"{prefix}{'TextModel' if text else 'ForCausalLM'}", options, router, shared)


#: HF block class -> its tiny model. Options make every layer an MoE layer where a family has dense ones, use full
#: attention where the default needs linear-attention or Mamba kernels, and shrink what defaults to full size.
MODELS = {
    "MixtralSparseMoeBlock": tiny("mixtral", "Mixtral"),
    "MiniMaxSparseMoeBlock": tiny("minimax", "MiniMax", **FULL_ATTENTION),
    "Qwen3MoeSparseMoeBlock": tiny("qwen3_moe", "Qwen3Moe", norm_topk_prob=False),
    "Qwen3VLMoeTextSparseMoeBlock": tiny("qwen3_vl_moe", "Qwen3VLMoe", text=True),
    "OlmoeSparseMoeBlock": tiny("olmoe", "Olmoe"),
    "FlexOlmoSparseMoeBlock": tiny("flex_olmo", "FlexOlmo"),
    "JambaSparseMoeBlock": tiny("jamba", "Jamba", router="router.weight", attn_layer_period=1, attn_layer_offset=0,
                                expert_layer_period=1, expert_layer_offset=0, use_mamba_kernels=False),
    "GraniteMoeMoE": tiny("granitemoe", "GraniteMoe", router="router.weight"),
    # Granite's shared MLP is the decoder layer's, outside the block: compared by name with the other weights
    "GraniteMoeSharedMoE": tiny("granitemoeshared", "GraniteMoeShared", router="router.weight",
                                shared_intermediate_size=10),
    "GraniteMoeHybridMoE": tiny("granitemoehybrid", "GraniteMoeHybrid", router="router.weight",
                                layer_types=["attention", "attention"], mamba_n_heads=4, shared_intermediate_size=10),
    "Qwen3OmniMoeThinkerTextSparseMoeBlock": tiny("qwen3_omni_moe", "Qwen3OmniMoe", text=True,
                                                  model="Qwen3OmniMoeThinkerTextModel"),
    "Qwen2MoeSparseMoeBlock": tiny("qwen2_moe", "Qwen2Moe", shared="shared_expert", shared_expert_intermediate_size=10),
    "Qwen3NextSparseMoeBlock": tiny("qwen3_next", "Qwen3Next", shared="shared_expert",
                                    shared_expert_intermediate_size=10, **FULL_ATTENTION),
    "Qwen3_5MoeSparseMoeBlock": tiny("qwen3_5_moe", "Qwen3_5Moe", config="Qwen3_5MoeTextConfig",
                                     shared="shared_expert", shared_expert_intermediate_size=10, **FULL_ATTENTION),
    "DeepseekV2Moe": tiny("deepseek_v2", "DeepseekV2", shared="shared_experts", topk_method="group_limited_greedy",
                          **DEEPSEEK, **MLA),
    "DeepseekV3MoE": tiny("deepseek_v3", "DeepseekV3", shared="shared_experts", **DEEPSEEK, **MLA),
    "Glm4MoeMoE": tiny("glm4_moe", "Glm4Moe", shared="shared_experts", **DEEPSEEK),
    "Dots1MoE": tiny("dots1", "Dots1", shared="shared_experts", **DEEPSEEK),
    # its model reads no input_ids (there is no embed_tokens): run() passes the codec embeddings of the ids
    "Qwen3OmniMoeTalkerTextSparseMoeBlock": tiny("qwen3_omni_moe", "Qwen3OmniMoeTalker", text=True,
                                                 model="Qwen3OmniMoeTalkerModel", shared="shared_expert",
                                                 shared_expert_intermediate_size=10),
    "MellumSparseMoeBlock": tiny("mellum", "Mellum"),
    "GraniteMoeSWAMoE": tiny("granitemoe_swa", "GraniteMoeSWA", router="router.weight"),
    "Qwen4ExpTextSparseMoeBlock": tiny("qwen4_exp", "Qwen4Exp", text=True, shared="shared_expert",
                                       shared_expert_intermediate_size=10, indexer_n_heads=2, indexer_kv_heads=1,
                                       indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2,
                                       **FULL_ATTENTION),
    "DeepseekOcr2TextMoe": tiny("deepseek_ocr2", "DeepseekOcr2", text=True, shared="shared_experts",
                                topk_method="group_limited_greedy", **DEEPSEEK, **TWO_SPARSE),
    "UnlimitedOcrTextMoe": tiny("unlimited_ocr", "UnlimitedOcr", text=True, shared="shared_experts",
                                topk_method="group_limited_greedy", **DEEPSEEK),
    "DeepseekV32MoE": tiny("deepseek_v32", "DeepseekV32", shared="shared_experts", **DEEPSEEK, **MLA, **INDEXER),
    "Glm4MoeLiteMoE": tiny("glm4_moe_lite", "Glm4MoeLite", shared="shared_experts", **DEEPSEEK, **MLA),
    "Glm4vMoeTextMoE": tiny("glm4v_moe", "Glm4vMoe", text=True, shared="shared_experts", **DEEPSEEK,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 0]}),
    "GlmMoeDsaMoE": tiny("glm_moe_dsa", "GlmMoeDsa", shared="shared_experts", **DEEPSEEK, **MLA, **INDEXER,
                         **TWO_SPARSE),
    "SolarOpenMoE": tiny("solar_open", "SolarOpen", shared="shared_experts", **DEEPSEEK),
    "KimiLinearMoE": tiny("kimi_linear", "KimiLinear", shared="shared_experts", **DEEPSEEK, **MLA, **TWO_SPARSE,
                          **FULL_ATTENTION),
    "MiniCPM5MoeMoE": tiny("minicpm5_moe", "MiniCPM5Moe", shared="shared_experts", **DEEPSEEK),
    "BailingHybridMoE": tiny("bailing_hybrid", "BailingHybrid", shared="shared_experts", **DEEPSEEK, **MLA,
                             **TWO_SPARSE, **FULL_ATTENTION),
    "Dots3NoteTextMoE": tiny("dots3_note", "Dots3Note", text=True, shared="shared_experts",
                             shared_experts_intermediate_size=5, **DEEPSEEK, **MLA, **INDEXER),
    "ExaoneMoeSparseMoEBlock": tiny("exaone_moe", "ExaoneMoe", shared="shared_experts", num_shared_experts=2,
                                    **GROUPED, **TWO_SPARSE),
    "MiMoV2FlashMoE": tiny("mimo_v2_flash", "MiMoV2Flash", **GROUPED, **TWO_SPARSE),
    "AXK2MoE": tiny("axk2", "AXK2", shared="shared_experts", **{**DEEPSEEK, "n_group": None, "topk_group": None},
                    **MLA, **INDEXER),
    "BeamMoE": tiny("beam", "Beam", **GROUPED, **TWO_SPARSE),
    "MiniMaxM2SparseMoeBlock": tiny("minimax_m2", "MiniMaxM2"),
    "AfmoeSparseMoeBlock": tiny("afmoe", "Afmoe", router="router.gate.weight", shared="shared_experts",
                                num_shared_experts=2, route_scale=2.5, num_dense_layers=0),
    "HYV3MoE": tiny("hy_v3", "HYV3", shared="shared_experts", num_shared_experts=1, router_scaling_factor=2.5,
                    **TWO_SPARSE),
    "LagunaSparseMoeBlock": tiny("laguna", "Laguna", shared="shared_experts", shared_expert_intermediate_size=10,
                                 moe_routed_scaling_factor=2.5, moe_router_logit_softcapping=1.5, **TWO_SPARSE),
    "Step3p7SparseMoeBlock": tiny("step3p7", "Step3p7", text=True, shared="shared_experts", share_expert_dim=10,
                                  moe_router_scaling_factor=2.5, pad_token_id=0, sliding_window=4, **TWO_SPARSE),
    "MiniMaxM3VLSparseMoeBlock": tiny("minimax_m3_vl", "MiniMaxM3VL", text=True, shared="shared_experts",
                                      shared_intermediate_size=10, routed_scaling_factor=2.5, swiglu_limit=1.0),
    "Lfm2MoeSparseMoeBlock": tiny("lfm2_moe", "Lfm2Moe", routed_scaling_factor=2.5, num_dense_layers=0,
                                  **FULL_ATTENTION),
    "FlintSparseMoeBlock": tiny("flint", "Flint", shared="shared_expert", shared_expert_intermediate_size=10,
                                mlp_only_layers=[]),
    "LaraMiniSparseMoeBlock": tiny("lara_mini", "LaraMini", shared="shared_expert",
                                   shared_expert_intermediate_size=10, **FULL_ATTENTION),
    # router_bias=True: a classifier bias the HF router never reads (no gradient; the layer has none either)
    "LongcatFlashMoE": tiny("longcat_flash", "LongcatFlash", router="router.classifier.weight", zero_expert_num=0,
                            routed_scaling_factor=2.5, expert_ffn_hidden_size=HIDDEN, router_bias=True, num_layers=1,
                            **MLA),
    "Mistral4MoE": tiny("mistral4", "Mistral4", shared="shared_experts", **{**DEEPSEEK, "n_group": 1}, **MLA),
    "MistralLarge4TextMoE": tiny("mistral_large4", "MistralLarge4", text=True, shared="shared_experts",
                                 **{**DEEPSEEK, "n_group": 1}, **MLA, **INDEXER),
    # "average" (the default) with a shared expert: y = (routed + shared) / 2
    "Cohere2MoeSparseMoeBlock": tiny("cohere2_moe", "Cohere2Moe", shared="shared_experts", num_shared_experts=1),
    "OpenAIPrivacyFilterMLP": tiny("openai_privacy_filter", "OpenAIPrivacyFilter", model="OpenAIPrivacyFilterModel",
                                   router="router.weight", swiglu_limit=1.0),
    # relu experts without a latent projection; one attention layer, then two MoE layers (no Mamba)
    "NemotronHMoE": tiny("nemotron_h", "NemotronH", shared="shared_experts", mlp_hidden_act="relu",
                         moe_shared_expert_intermediate_size=10, layers_block_type=["full_attention", "moe", "moe"],
                         **GROUPED),
}

#: Config keys every family gets (each config takes the ones it knows): 2 layers of width 16, 6 experts, k = 2.
COMMON = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=HIDDEN, moe_intermediate_size=HIDDEN,
              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=E,
              num_local_experts=E, n_routed_experts=E, num_experts_per_tok=K, hidden_act="silu",
              output_router_logits=True, router_aux_loss_coef=0.05, bos_token_id=None, eos_token_id=None,
              pad_token_id=None, attn_implementation="eager", experts_implementation="eager")


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return block_close(a, b, MODEL_REL)


def tiny_model(cls_name: str):
    """The family's tiny model, float64, with weights large enough that the routing is far from uniform."""
    row = MODELS[cls_name]
    configuration = importlib.import_module(f"transformers.models.{row.folder}.configuration_{row.folder}")
    modeling = importlib.import_module(f"transformers.models.{row.folder}.modeling_{row.folder}")
    config = getattr(configuration, row.config)(**{**COMMON, **row.options})
    torch.manual_seed(0)
    model = getattr(modeling, row.model)(config).double().eval()      # eval: no attention or hidden dropout
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):          # selection-only biases: small
                tensor.normal_(0.0, 0.05)
            elif tensor.is_floating_point() and tensor.dim() >= 2 and "embed" not in name:
                tensor.normal_(0.0, 0.3)
    return model


def moe_gradients(cls_name: str, block, layer):
    """test_hf.gradient_pairs for a family of MODELS."""
    return gradient_pairs(cls_name, block, layer, MODELS[cls_name].router, MODELS[cls_name].shared)


def embed(model, ids):
    """The input embeddings of ``ids`` (passed as inputs_embeds: Qwen3-Omni's talker model reads no input_ids)."""
    return (getattr(model, "codec_embedding", None) or model.get_input_embeddings())(ids)


def output_of(model, ids):
    out = model(inputs_embeds=embed(model, ids))
    return out.logits if hasattr(model, "lm_head") else out.last_hidden_state


def run(model, ids, upstream):
    """(output, loss, the model's output object, the input embeddings' gradient) of one forward and backward pass."""
    embeds = embed(model, ids)
    embeds.retain_grad()
    if hasattr(model, "lm_head"):
        out = model(inputs_embeds=embeds, labels=ids, output_router_logits=True)
        output, loss = out.logits, out.loss
    else:                                                   # a text model: its last hidden state, a fixed upstream
        out = model(inputs_embeds=embeds, output_router_logits=True)
        output = out.last_hidden_state
        loss = (output * upstream).sum()
    loss.backward()
    return output, loss, out, embeds.grad


@pytest.mark.parametrize("cls_name", list(MODELS))
def test_moefied_model_equals_hf_model(cls_name):
    """Output, loss (HF's balance loss included), router logits, input-embedding and every weight gradient; then
    to_hf: perturbed layers copied back into the HF model give the moefied model's output."""
    original, swapped = tiny_model(cls_name), tiny_model(cls_name)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(2, 7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        output_of(swapped, ids[:, :3])                       # HF's recording hooks now installed
    moefy(swapped, backend="reference")
    hf_blocks = [m for m in original.modules() if type(m).__name__ == cls_name]
    ours = [m for m in swapped.modules() if isinstance(m, HFMoEBlock)]
    assert len(ours) == len(hf_blocks) >= 1

    out_hf, loss_hf, full_hf, grad_hf = run(original, ids, upstream)
    out_ours, loss_ours, full_ours, grad_ours = run(swapped, ids, upstream)
    assert close(out_ours, out_hf) and close(loss_ours, loss_hf)
    assert close(grad_ours, grad_hf), "input embeddings"
    aux_hf = getattr(full_hf, "aux_loss", None)
    if aux_hf is not None:
        assert close(full_ours.aux_loss, aux_hf)
    logits_hf = getattr(full_hf, "router_logits", None)
    assert (logits_hf is None) == (getattr(full_ours, "router_logits", None) is None)
    if logits_hf is not None:                                # what HF's balance loss reads, layer by layer
        assert len(full_ours.router_logits) == len(logits_hf) == len(hf_blocks)
        for got, want in zip(full_ours.router_logits, logits_hf):
            assert close(got.to(want.dtype), want)

    hf_params = dict(original.named_parameters())
    for name, param in swapped.named_parameters():
        if ".moe." not in name:                              # attention, norms, embeddings, dense MLPs: same names
            want = hf_params[name].grad
            assert (want is None and param.grad is None) or close(param.grad, want), name
    unused = set(SUPPORTED[cls_name].unused_at)
    for hf_block, block in zip(hf_blocks, ours):
        pairs = moe_gradients(cls_name, hf_block, block.moe)
        for name, got, want in pairs:
            assert close(got, want) if want is not None else torch.count_nonzero(got) == 0, name
        read = [param for name, param in hf_block.named_parameters() if name not in unused and param.requires_grad]
        assert sum(got.numel() for _, got, _ in pairs) == sum(param.numel() for param in read)   # every one compared
        for name, param in hf_block.named_parameters():
            if name in unused:
                assert param.grad is None, name              # never read by HF's forward

    # to_hf: the swapped layers, perturbed, back into the HF model: the two models agree again.
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in ours:
            for param in block.moe.parameters():
                if param.requires_grad:                      # Cohere2's frozen σ(x·0) = 1/2 gate stays 0
                    param.add_(0.1 * torch.randn(param.shape, dtype=param.dtype, generator=generator))
        for hf_block, block in zip(hf_blocks, ours):
            to_hf(block.moe, hf_block)
        again_hf, again_ours = output_of(original, ids), output_of(swapped, ids)
    assert close(again_ours, again_hf) and not close(again_ours, out_ours.detach())


def test_every_converting_family_has_a_whole_model_test():
    assert set(MODELS) | set(NEW_BLOCKS) == set(SUPPORTED)
    assert not set(MODELS) & set(NEW_BLOCKS)
