"""What a training run measures besides its training loss (train.py calls these; so do the notebooks).

    routing_stats              the load balance of the last step: tokens per expert and dropped assignments
                               per MoE layer, their imbalance (max/mean) and the dropped fraction
    estimate_val_loss          the LM loss on the same val batches every time, overall and per language
    expert_usage_by_language   which experts each language is routed to: the picture of specialisation
    generate_samples           a continuation of a short val prompt of each language

With several ranks each figure is that of the whole global batch: the ranks' sums are added up
(``rt.sum``) before anything is divided.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .config import TrainConfig
from .data import get_batch
from .model import MoETransformer
from .precision import at_least_float32, autocast
from .runtime import Runtime


def routing_stats(model: MoETransformer, rt: Runtime | None = None) -> dict:
    """Load balance of the last forward: tokens per expert and dropped assignments per MoE layer, imbalance,
    dropped fraction.

    With several ranks the counts of all ranks are added up: the figures describe the whole global batch.
    """
    layers = model.moe_layers()
    if not layers:
        return {"tokens_per_expert": [], "tokens_dropped": [], "load_imbalance": 0.0, "dropped_frac": 0.0}
    tokens = torch.stack([layer.last_routing.tokens_per_expert.cpu() for layer in layers])   # [layers, E]
    dropped_per_layer = torch.tensor([layer.last_routing.num_dropped for layer in layers])
    if rt is not None:
        packed = rt.sum(torch.cat([tokens.reshape(-1), dropped_per_layer]))
        tokens, dropped_per_layer = packed[:tokens.numel()].reshape(tokens.shape), packed[tokens.numel():]
    counts = tokens.float()
    imbalance = counts.amax(dim=1) / counts.mean(dim=1).clamp(min=1e-9)      # per layer; 1.0 = perfectly even
    dropped = int(dropped_per_layer.sum())
    return {"tokens_per_expert": tokens.tolist(), "tokens_dropped": dropped_per_layer.tolist(),
            "load_imbalance": sum(imbalance.tolist()) / len(layers),
            "dropped_frac": dropped / max(int(tokens.sum()) + dropped, 1)}   # of all (token, expert) assignments


@torch.no_grad()
def estimate_val_loss(model: MoETransformer, dataset, cfg: TrainConfig, device,
                      rt: Runtime | None = None) -> tuple[float, dict]:
    """LM loss (no aux loss) on the same ``eval_iters`` val batches every time: (mean, {language: mean}).

    With several ranks every rank evaluates its slice of each val batch and the sums are added up.
    """
    rt = rt or Runtime()
    model.eval()
    total = torch.zeros(len(dataset.language_names))
    count = torch.zeros(len(dataset.language_names))
    for i in range(cfg.eval_iters):
        x, y, lang = rt.shard_batch(get_batch(dataset, cfg, "val", i, device))
        with autocast(cfg.dtype, x.device):
            logits, _ = model(x)
        token_loss = F.cross_entropy(at_least_float32(logits).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        total.index_add_(0, lang.cpu(), token_loss.sum(dim=1).cpu())
        count.index_add_(0, lang.cpu(), torch.full((len(lang),), float(y.shape[1])))
    total, count = rt.sum(total), rt.sum(count)
    model.train()
    per_language = {name: (total[i] / count[i]).item()
                    for i, name in enumerate(dataset.language_names) if count[i] > 0}
    return (total.sum() / count.sum()).item(), per_language


@torch.no_grad()
def expert_usage_by_language(model: MoETransformer, dataset, cfg: TrainConfig, num_batches: int = 4,
                             device="cpu") -> torch.Tensor:
    """Fraction of each language's (token, slot) assignments that go to each expert, from val batches.

    Returns a tensor [num_moe_layers, num_languages, num_experts] whose rows sum to 1: the picture
    of expert specialisation (a language routed mostly to one or two experts shows as a bright cell).
    """
    layers = model.moe_layers()
    usage = torch.zeros(len(layers), len(dataset.language_names), model.cfg.num_experts)
    model.eval()
    for i in range(num_batches):
        x, y, lang = get_batch(dataset, cfg, "val", i, device)
        model(x, y)
        token_lang = lang[:, None].expand_as(x).reshape(-1).cpu()                   # language of each token
        for li, layer in enumerate(layers):
            ids = layer.last_routing.expert_ids.cpu()                               # [T, slots], -1 = none
            langs = token_lang[:, None].expand_as(ids)
            keep = ids >= 0
            usage[li].index_put_((langs[keep], ids[keep]), torch.ones(int(keep.sum())), accumulate=True)
    model.train()
    return usage / usage.sum(dim=-1, keepdim=True).clamp(min=1)


@torch.no_grad()
def generate_samples(model: MoETransformer, dataset, cfg: TrainConfig, device) -> str:
    """Continue a short val prompt of each language; returns printable text, prompt | continuation."""
    x, _, lang = get_batch(dataset, cfg, "val", 0, device)
    prompt_len = max(1, min(16, cfg.seq_len // 4))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    lines = []
    for lang_id, lang_name in enumerate(dataset.language_names):
        rows = (lang == lang_id).nonzero()
        if len(rows) == 0:
            continue
        prompt = x[rows[0, 0]: rows[0, 0] + 1, :prompt_len]
        out = model.generate(prompt, cfg.sample_tokens, temperature=cfg.sample_temperature, generator=generator)
        text = dataset.decode(out[0, :prompt_len]) + " | " + dataset.decode(out[0, prompt_len:])
        lines.append(f"[{lang_name}] {text!r}")
    return "\n".join(lines)
