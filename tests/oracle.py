"""A brute-force MoE oracle: every decision made token by token with Python loops.

It shares nothing with fastmoe_edu's routing or dispatch code except the layer's *parameters* and the
random numbers the layer actually drew (replayed from ``RouterOutput.random_draws``). Slow and obvious
on purpose: the vectorized reference and every backend are checked against it.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def _top(values: list[float], count: int) -> list[int]:
    """Indices of the ``count`` largest values, largest first (Python's sort: ties by index)."""
    return sorted(range(len(values)), key=lambda i: -values[i])[:count]


def _expert(layer, expert: int, row: torch.Tensor) -> torch.Tensor:
    """expert_e(x) for one token row, from the stacked weights."""
    ex = layer.experts

    def linear(w, b):
        out = w[expert] @ row
        return out + b[expert] if b is not None else out

    hidden = linear(ex.w1, ex.b1)
    if ex.kind == "clamped_swiglu":                  # GPT-OSS: min(g, limit)·σ(α·min(g, limit)) · (clamp(u) + 1)
        gate = torch.clamp(hidden, max=ex.swiglu_limit)
        up = torch.clamp(linear(ex.w3, ex.b3), min=-ex.swiglu_limit, max=ex.swiglu_limit)
        hidden = gate * torch.sigmoid(ex.swiglu_alpha * gate) * (up + 1)
    elif ex.kind == "swiglu":
        hidden = F.silu(hidden) * linear(ex.w3, ex.b3)
    elif ex.kind == "geglu":
        hidden = F.gelu(hidden) * linear(ex.w3, ex.b3)
    elif ex.kind == "relu":
        hidden = torch.clamp(hidden, min=0)
    else:
        hidden = F.gelu(hidden)
    out = ex.w2[expert] @ hidden
    return out + ex.b2[expert] if ex.b2 is not None else out


def _shared(layer, row: torch.Tensor) -> torch.Tensor:
    """Σ_i shared_i(x) over the num_shared_experts separate shared MLPs (DeepSeekMoE's sum), each a slice
    of the stored [width, d] matrices; times σ(g · x) with Qwen2-MoE's gate."""
    shared = layer.shared_experts
    size = shared.width // layer.num_shared_experts
    out = torch.zeros_like(row)
    for i in range(layer.num_shared_experts):
        part = slice(i * size, (i + 1) * size)
        hidden = shared.w1[part] @ row + (shared.b1[part] if shared.b1 is not None else 0)
        if shared.kind == "clamped_swiglu":
            up = shared.w3[part] @ row + (shared.b3[part] if shared.b3 is not None else 0)
            gate, up = torch.clamp(hidden, max=shared.swiglu_limit), torch.clamp(up, -shared.swiglu_limit,
                                                                                shared.swiglu_limit)
            hidden = gate * torch.sigmoid(shared.swiglu_alpha * gate) * (up + 1)
        elif shared.kind in ("swiglu", "geglu"):
            up = shared.w3[part] @ row + (shared.b3[part] if shared.b3 is not None else 0)
            hidden = (F.silu(hidden) if shared.kind == "swiglu" else F.gelu(hidden)) * up
        else:
            hidden = torch.clamp(hidden, min=0) if shared.kind == "relu" else F.gelu(hidden)
        out = out + shared.w2[:, part] @ hidden
    if shared.b2 is not None:
        out = out + shared.b2                      # one output bias for the one stored MLP
    if shared.gate is not None:
        out = torch.sigmoid(shared.gate @ row) * out
    return out


def route_token_by_token(layer, x: torch.Tensor, draws: dict):
    """Per-token routing decisions: a list over tokens of [(expert, weight), ...] in slot order,
    with ``None`` for an assignment switched off before capacity; plus the router's probabilities [T, E]
    (softmax of the logits; σ of the logits for the sigmoid router)."""
    router, name = layer.router, layer.router_name
    num_tokens, num_experts, top_k = x.shape[0], layer.num_experts, layer.top_k
    decisions, all_probs = [], []
    for t in range(num_tokens):
        row = x[t]
        if name == "switch" and "jitter" in draws:
            row = row * draws["jitter"][t]
        if name == "xmoe":
            token = F.normalize(router.projection.weight @ row, dim=0)
            logits = torch.stack([token @ F.normalize(router.projection.weight @ router.weight[e], dim=0)
                                  for e in range(num_experts)]) / router.temperature.clamp(min=1e-2)
        else:
            logits = torch.stack([router.weight[e] @ row for e in range(num_experts)])
        if router.logit_bias is not None:
            logits = logits + router.logit_bias
        if router.logit_softcap is not None:
            logits = router.logit_softcap * torch.tanh(logits / router.logit_softcap)
        probs = torch.softmax(logits, dim=0)
        all_probs.append(probs)
        values = probs.tolist()
        if name in ("softmax_top_k", "xmoe"):
            allowed = list(range(num_experts))
            scores = values                                                # what selects: p, or p + b (ERNIE)
            if getattr(router, "bias", None) is not None:
                scores = [values[e] + float(router.bias[e]) for e in range(num_experts)]
            if getattr(router, "num_groups", None) is not None:           # DeepSeek-V2: groups by their max p
                size = num_experts // router.num_groups
                best_groups = _top([max(scores[g * size:(g + 1) * size]) for g in range(router.num_groups)],
                                   router.top_k_groups)
                allowed = [e for e in allowed if e // size in best_groups]
            chosen = sorted(allowed, key=lambda e: -scores[e])[:top_k]
            norm = 1.0
            if router.renormalize:
                power = getattr(router, "renormalize_p", 1.0)
                norm = (probs[chosen] ** power).sum() ** (1.0 / power)    # ‖p_sel‖_q (q = 1: the sum)
                norm = torch.clamp(norm, min=getattr(router, "renormalize_min", 0.0))
                norm = norm + getattr(router, "renormalize_eps", 0.0)
            weights = probs[chosen] / norm
            decisions.append(list(zip(chosen, weights * getattr(router, "route_scale", 1.0))))
        elif name == "switch":
            best = _top(values, 1)[0]
            decisions.append([(best, probs[best])])
        elif name == "gshard":
            first, second = _top(values, 2)
            total = probs[first] + probs[second]
            keep_second = True
            if "uniform" in draws:
                keep_second = 2 * float((probs[second] / total).detach()) > float(draws["uniform"][t])
            decisions.append([(first, probs[first] / total), (second if keep_second else None, probs[second] / total)])
        elif name == "noisy_top_k":
            scores = logits
            if "noise" in draws:
                noise_std = F.softplus(torch.stack([router.noise_weight[e] @ row for e in range(num_experts)]))
                scores = logits + draws["noise"][t] * (noise_std + router.noise_epsilon)
            chosen = _top(scores.tolist(), top_k)
            weights = torch.softmax(scores[chosen], dim=0)
            decisions.append(list(zip(chosen, weights)))
        elif name == "sigmoid":
            sig = torch.sigmoid(logits)
            selection = (sig + router.bias).tolist()
            allowed = list(range(num_experts))
            if router.num_groups is not None:
                size = num_experts // router.num_groups
                group_scores = [sum(sorted(selection[g * size:(g + 1) * size], reverse=True)[:2])
                                for g in range(router.num_groups)]
                best_groups = _top(group_scores, router.top_k_groups)
                allowed = [e for e in allowed if e // size in best_groups]
            chosen = sorted(allowed, key=lambda e: -selection[e])[:top_k]
            weights = sig[chosen] / (sig[chosen].sum() if router.renormalize else 1.0) * router.route_scale
            decisions.append(list(zip(chosen, weights)))
            all_probs[-1] = sig                                            # the sigmoid router's probabilities
        elif name == "expert_choice":
            decisions.append(None)  # filled below: experts choose tokens
        else:
            raise KeyError(name)
    if name == "expert_choice":
        factor = layer.router.capacity_factor or top_k
        per_expert = min(num_tokens, math.ceil(factor * num_tokens / num_experts))
        decisions = [[(None, torch.zeros((), dtype=x.dtype))] * num_experts for _ in range(num_tokens)]
        for e in range(num_experts):
            for t in _top([float(all_probs[t][e].detach()) for t in range(num_tokens)], per_expert):
                decisions[t][e] = (e, all_probs[t][e])
    return decisions, torch.stack(all_probs)


def apply_capacity(decisions, num_experts: int, capacity: int | None, tokens_per_sequence: int | None = None,
                   priority: list[float] | None = None):
    """Slot-major: all first choices in token order, then all second choices, ... each expert takes C.
    With tokens_per_sequence = S, every sequence of S tokens does this on its own, with its own C per expert.
    With a priority per token, "token order" is the order of decreasing priority (ties: token order)."""
    if capacity is None or not decisions:
        return decisions
    size = tokens_per_sequence or len(decisions)
    kept = [list(d) for d in decisions]
    for begin in range(0, len(decisions), size):
        taken = [0] * num_experts
        tokens = list(range(begin, begin + size))
        if priority is not None:
            tokens = sorted(tokens, key=lambda t: -priority[t])            # Python's sort is stable
        for slot in range(len(decisions[0])):
            for t in tokens:
                expert, weight = decisions[t][slot]
                if expert is None:
                    continue
                if taken[expert] < capacity:
                    taken[expert] += 1
                else:
                    kept[t][slot] = (None, weight)
    return kept


def oracle_forward(layer, x: torch.Tensor, draws: dict, tokens_per_sequence: int | None = None) -> torch.Tensor:
    """y[t] = Σ_s w[t, s] · expert_{e[t, s]}(x[t]), every step a Python loop. x is [T, d]; for a layer with
    capacity_per="sequence", ``tokens_per_sequence`` says how its T tokens were cut into sequences."""
    decisions, probs = route_token_by_token(layer, x, draws)
    capacity = None
    per_sequence = getattr(layer, "capacity_per", "batch") == "sequence"
    competing = tokens_per_sequence if per_sequence else x.shape[0]
    if getattr(layer.router, "expert_capacity", None) is not None:
        capacity = layer.router.expert_capacity
    elif layer.router.capacity_factor is not None and layer.router_name != "expert_choice":
        capacity = math.ceil(layer.router.capacity_factor * layer.top_k * competing / layer.num_experts)
    priority = None
    if getattr(layer.router, "capacity_priority", "order") == "probability":    # each token's largest probability
        priority = [float(probs[t].detach().max()) for t in range(x.shape[0])]
    routed = decisions
    decisions = apply_capacity(decisions, layer.num_experts, capacity, tokens_per_sequence if per_sequence else None,
                               priority)
    if getattr(layer.router, "renormalize_after_dropping", False):            # kept weights rescaled to the k's sum
        decisions = [_renormalize_kept(before, after) for before, after in zip(routed, decisions)]
    dropout = draws.get("expert_dropout")
    rows = _rows(decisions) if dropout is not None else {}
    outputs = []
    for t, choices in enumerate(decisions):
        y = torch.zeros_like(x[t])
        for slot, (expert, weight) in enumerate(choices):
            if expert is not None:
                on_input = getattr(layer, "weights_on", "output") == "input"     # Llama-4: expert(w · x)
                out = _expert(layer, expert, weight * x[t] if on_input else x[t])
                if dropout is not None:                   # the mask of this (token, slot)'s row, scaled by 1/(1-p)
                    out = out * dropout[rows[t, slot]] / (1 - layer.expert_dropout)
                y = y + (out if on_input else weight * out)
        if layer.shared_experts is not None:
            y = y + _shared(layer, x[t])
        if getattr(layer, "output_bias", None) is not None:     # JetMoE: b on every token, dropped ones too
            y = y + layer.output_bias
        outputs.append(y)
    return torch.stack(outputs)


def _renormalize_kept(routed, kept):
    """One token: w'_s = w_s · Σ_all w / Σ_kept w for its kept slots (all slots, as routed, in the sum Σ_all)."""
    total = sum(weight for _, weight in routed)
    kept_total = sum(weight for expert, weight in kept if expert is not None)
    return [(expert, weight * total / kept_total if expert is not None else weight) for expert, weight in kept]


def _rows(decisions) -> dict:
    """(token, slot) -> its row in the expert-sorted buffer: by expert, then token, then slot."""
    kept = sorted((expert, t, slot) for t, choices in enumerate(decisions)
                  for slot, (expert, _) in enumerate(choices) if expert is not None)
    return {(t, slot): row for row, (_, t, slot) in enumerate(kept)}
