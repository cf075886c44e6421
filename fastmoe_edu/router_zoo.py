"""The single-paper routers: each class is one paper's gate, registered in ``routers.ROUTERS`` by its name.

    noisy_top_k     NoisyTopKRouter      Shazeer et al. 2017: noisy top-k gating, cv² balance loss
    switch          SwitchRouter         Fedus et al. 2021 (Switch Transformer): top-1, input jitter
    gshard          GShardRouter         Lepikhin et al. 2020 (GShard): top-2, random routing of the second
    expert_choice   ExpertChoiceRouter   Zhou et al. 2022: each expert picks its top-C tokens
    sigmoid         SigmoidRouter        DeepSeek-V3: sigmoid scores, auxiliary-loss-free bias balancing
    xmoe            XMoERouter           Chi et al. 2022 (X-MoE): cosine routing in a small space

Each builds on ``routers.Router`` (the weight, logits, capacity, the shared checks) exactly like the softmax
top-k router of routers.py: ``route`` (through the backend's routing functions where it has one),
``balance_loss``, and ``check_own`` for its own options. ``MoELayer(router="switch")`` finds it by name in
``ROUTERS``; ``fastmoe_edu/__init__.py`` imports this file, so the table is complete before anything reads it.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from . import routing
from .dispatch import count_tokens_per_expert
from .precision import at_least_float32
from .routers import Router, RouterOutput, check_bool, check_groups, check_number, local_sum, switch_balance_loss


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation var/mean² (population variance), Shazeer et al. 2017."""
    return values.var(unbiased=False) / (values.mean().square() + 1e-10)


class NoisyTopKRouter(Router, name="noisy_top_k"):
    """Noisy top-k gating (Shazeer et al. 2017).

        h = x W_gᵀ + ε · softplus(x W_noiseᵀ),  ε ~ N(0, 1) while training
        G = softmax(keep_top_k(h))              (the rest set to −∞)
        loss = cv(importance)² + cv(load)²      importance_e = Σ_t G[t, e]
        load_e = Σ_t Φ((clean[t, e] − threshold[t, e]) / noise_std[t, e])   (a smooth count)
    where threshold is the k-th largest noisy score of the *other* experts: the (k+1)-th largest of h
    if e is among the top k, the k-th largest otherwise.
    """

    @classmethod
    def check_own(cls, name, num_experts, top_k, options):
        check_number(options, "noise_epsilon", minimum=0)

    def __init__(self, *args, noise_epsilon: float = 1e-2, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_epsilon = noise_epsilon
        self.noise_weight = nn.Parameter(torch.zeros(self.num_experts, self.d_model))   # W_noise

    def route(self, x, backend=routing):
        clean = at_least_float32(self.logits(x))
        draws = {}
        if self.training:
            noise_std = F.softplus(at_least_float32(x @ self.noise_weight.t())) + self.noise_epsilon
            noise = torch.randn_like(clean)
            draws["noise"] = noise
            scores = clean + noise * noise_std                                     # h = clean + ε·softplus(.)
        else:
            scores = clean
        top_scores, expert_ids = scores.topk(self.top_k, dim=-1)
        weights = torch.softmax(top_scores, dim=-1)                                # softmax over the kept k
        gates = torch.zeros_like(scores).scatter(1, expert_ids, weights)           # G[t, e]
        if self.training and self.top_k < self.num_experts:
            load = self._smooth_load(clean, scores, noise_std)
        else:
            load = (gates > 0).to(gates.dtype).sum(dim=0)
        sums = {"importance": gates.sum(dim=0), "load": load}                     # importance_e = Σ_t G[t, e]
        return RouterOutput(expert_ids, weights, self.capacity(x.shape[0]), clean,
                            torch.softmax(clean, dim=-1), draws, sums)

    def balance_loss(self, out, reduce=local_sum):
        totals = reduce(torch.stack([out.token_sums["importance"], out.token_sums["load"]]))
        return cv_squared(totals[0]) + cv_squared(totals[1])

    def _smooth_load(self, clean, noisy, noise_std):
        top_values = noisy.topk(self.top_k + 1, dim=-1).values                    # [T, k+1]
        threshold_if_in = top_values[:, self.top_k:self.top_k + 1]                 # (k+1)-th largest
        threshold_if_out = top_values[:, self.top_k - 1:self.top_k]                # k-th largest
        is_in = noisy >= threshold_if_out
        normal = torch.distributions.Normal(torch.zeros((), dtype=clean.dtype, device=clean.device), 1.0)
        prob_if_in = normal.cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out).sum(dim=0)


class SwitchRouter(Router, name="switch"):
    """Switch Transformer top-1 (Fedus et al. 2021).

    Optional input jitter x ← x · U(1−ε, 1+ε) while training; softmax in float32; argmax;
    weight = p[argmax] (not renormalized); C = ceil(cf · T / E); loss E · Σ_e f_e · P_e.
    """
    required_top_k = 1

    @classmethod
    def check_own(cls, name, num_experts, top_k, options):
        check_number(options, "jitter_epsilon", minimum=0)
        if options["jitter_epsilon"] >= 1:
            raise ValueError(f"jitter_epsilon={options['jitter_epsilon']!r} must be in [0, 1)")
        if options["renormalize_after_dropping"]:
            raise ValueError("renormalize_after_dropping=True: router='switch' weighs its one expert by w = p, not a "
                             "renormalized weight, and a token with k = 1 keeps all or nothing: nothing to renormalize")

    def __init__(self, *args, jitter_epsilon: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.jitter_epsilon = jitter_epsilon

    def route(self, x, backend=routing):
        draws = {}
        if self.training and self.jitter_epsilon > 0:
            jitter = torch.empty_like(x).uniform_(1 - self.jitter_epsilon, 1 + self.jitter_epsilon)
            draws["jitter"] = jitter
            x = x * jitter
        logits = self.logits(x)
        expert_ids, weights = backend.softmax_top_k_route(logits, 1, False)
        probs = torch.softmax(at_least_float32(logits), dim=-1)
        return RouterOutput(expert_ids, weights, self.capacity(x.shape[0]), logits, probs, draws)

    def balance_loss(self, out, reduce=local_sum):
        return switch_balance_loss(out.probs, out.expert_ids, reduce)


class GShardRouter(Router, name="gshard"):
    """GShard top-2 (Lepikhin et al. 2020).

    e1 = argmax p, e2 = argmax of p without e1; g1, g2 ← g1/(g1+g2), g2/(g1+g2).
    Random routing (training only): the second assignment is kept only if 2·g2 > u, u ~ U(0, 1).
    C = ceil(cf · 2 · T / E); first choices claim capacity before second choices.
    Loss E · Σ_e m_e · c_e, m_e = mean p[:, e], c_e = fraction of tokens whose *first* choice is e.
    """
    required_top_k = 2

    @classmethod
    def drops_without_capacity(cls, options):
        return options["random_routing"]                                           # the second choice, at random

    def __init__(self, *args, random_routing: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.random_routing = random_routing

    def keeps_every_assignment(self) -> bool:
        return not (self.training and self.random_routing)                        # the second choice, at random

    def route(self, x, backend=routing):
        logits = self.logits(x)
        expert_ids, weights = backend.softmax_top_k_route(logits, 2, True)          # (e1, e2), (g1, g2)
        draws = {}
        if self.training and self.random_routing:
            uniform = torch.rand(x.shape[0], device=x.device, dtype=weights.dtype)
            draws["uniform"] = uniform
            keep_second = 2 * weights[:, 1].detach() > uniform
            expert_ids = torch.stack([expert_ids[:, 0], torch.where(keep_second, expert_ids[:, 1], -1)], dim=1)
        probs = torch.softmax(at_least_float32(logits), dim=-1)
        return RouterOutput(expert_ids, weights, self.capacity(x.shape[0]), logits, probs, draws)

    def balance_loss(self, out, reduce=local_sum):
        """E · Σ_e m_e · c_e: Switch's loss with the fraction counted over first choices only."""
        return switch_balance_loss(out.probs, out.expert_ids[:, :1], reduce)


class ExpertChoiceRouter(Router, name="expert_choice"):
    """Expert choice (Zhou et al. 2022): each *expert* picks its top-C tokens by p along the tokens.

    C = ceil(cf · T / E), cf defaulting to k. A token may be picked by 0..E experts, so the output has
    one slot per expert: expert_ids[t, e] = e if expert e picked token t, else -1; weight = p[t, e].
    Balanced by construction: no balance loss, no further capacity pruning.
    """

    @classmethod
    def check_own(cls, name, num_experts, top_k, options):
        token_choice = [f"{key}={options[key]!r}" for key, off in (("expert_capacity", None),
                        ("capacity_priority", "order"), ("renormalize_after_dropping", False)) if options[key] != off]
        if token_choice:
            raise ValueError(f"{', '.join(token_choice)}: router='expert_choice' has no token-choice capacity to "
                             f"prune (each expert picks its ceil(cf·T/E) tokens itself); it takes capacity_factor only")

    def route(self, x, backend=routing):
        logits = self.logits(x)
        probs = torch.softmax(at_least_float32(logits), dim=-1)                   # p over experts
        num_tokens = x.shape[0]
        factor = self.capacity_factor if self.capacity_factor is not None else self.top_k
        per_expert = min(num_tokens, math.ceil(factor * num_tokens / self.num_experts))
        picked_tokens = probs.topk(per_expert, dim=0).indices                      # [C, E]
        picked = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, picked_tokens, True)
        all_experts = torch.arange(self.num_experts, device=x.device).expand(num_tokens, -1)
        expert_ids = torch.where(picked, all_experts, -1)
        weights = probs * picked
        return RouterOutput(expert_ids, weights, None, logits, probs)

    def balance_loss(self, out, reduce=local_sum):
        return out.logits.new_zeros(())                                            # balanced by construction

    def keeps_every_assignment(self) -> bool:
        return False                                                               # slots of unpicked tokens: -1


class SigmoidRouter(Router, name="sigmoid"):
    """Sigmoid scores with auxiliary-loss-free balancing (DeepSeek-V3).

    Selection uses s + b, weights use s alone (normalized, times ``route_scale``). After every
    optimizer step the training loop calls ``update_bias``:  b_e ← b_e + γ · sign(mean_load − load_e).
    ``renormalize_eps=ε`` (as the softmax router's) normalizes by Σ s + ε instead of Σ s (LFM2-MoE: 1e-6).
    """

    @classmethod
    def check_own(cls, name, num_experts, top_k, options):
        check_bool(options, "renormalize")
        check_number(options, "bias_update_rate", minimum=0)
        check_number(options, "route_scale", above=0)
        check_number(options, "renormalize_eps", minimum=0, note=" (0: off)")
        check_groups(options, num_experts, top_k)

    def __init__(self, *args, bias_update_rate: float = 1e-3, route_scale: float = 1.0,
                 num_groups: int | None = None, top_k_groups: int | None = None, renormalize: bool = True,
                 renormalize_eps: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_update_rate, self.route_scale, self.renormalize = bias_update_rate, route_scale, renormalize
        self.renormalize_eps = renormalize_eps
        self.num_groups, self.top_k_groups = num_groups, top_k_groups
        self.register_buffer("bias", torch.zeros(self.num_experts))                # b: not a Parameter
        self.last_load: torch.Tensor | None = None

    def route(self, x, backend=routing):
        logits = self.logits(x)
        route = backend.sigmoid_top_k_route
        if self.renormalize and not self.renormalize_eps:
            expert_ids, weights = route(logits, self.bias, self.top_k, self.route_scale,
                                        self.num_groups, self.top_k_groups)
        else:
            expert_ids, weights = route(logits, self.bias, self.top_k, 1.0 if self.renormalize else self.route_scale,
                                        self.num_groups, self.top_k_groups, False)
            if self.renormalize:               # renormalize_eps=ε (LFM2-MoE): w = s / (Σ s + ε) · scale, here in torch
                weights = weights / (weights.sum(dim=-1, keepdim=True) + self.renormalize_eps) * self.route_scale
        self.last_load = count_tokens_per_expert(expert_ids, self.num_experts)
        return RouterOutput(expert_ids, weights, self.capacity(x.shape[0]), logits,
                            torch.sigmoid(at_least_float32(logits)))

    def balance_loss(self, out, reduce=local_sum):
        return out.logits.new_zeros(())                           # auxiliary-loss-free: the bias balances

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None, reduce=local_sum) -> None:
        """b_e ← b_e + γ · sign(mean_load − load_e): raise the bias of under-loaded experts.

        ``load`` defaults to the last forward's, summed over the ranks by ``reduce`` (every rank's bias
        must move the same way, or the replicated biases drift apart).
        """
        if load is None:
            if self.last_load is None:
                return
            load = reduce(self.last_load.clone())
        load = load.to(self.bias.dtype)
        self.bias += self.bias_update_rate * torch.sign(load.mean() - load)


class XMoERouter(Router, name="xmoe"):
    """X-MoE cosine routing (Chi et al. 2022): route in a small space on the unit sphere.

        score[t, e] = cos(P x_t, P w_e) / τ,  p = softmax(score),  top-k
    P [routing_dim, d_model] projects to a low dimension, τ is a learnable temperature. The expert
    embeddings are stored in model space (``weight`` [E, d_model], the common router contract) and share
    the projection P; any low-dimensional embedding the paper learns is reachable this way.
    """

    @classmethod
    def check_own(cls, name, num_experts, top_k, options):
        check_bool(options, "renormalize")
        check_number(options, "temperature", above=0)
        if not (isinstance(options["routing_dim"], int) and options["routing_dim"] >= 1):
            raise ValueError(f"routing_dim={options['routing_dim']!r} must be an integer >= 1")

    def __init__(self, *args, routing_dim: int = 16, temperature: float = 0.07, renormalize: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.projection = nn.Linear(self.d_model, routing_dim, bias=False)          # P
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))           # τ (learnable)
        self.renormalize = renormalize

    def scores(self, x):
        tokens = F.normalize(self.projection(x), dim=-1)                           # P x / ‖P x‖
        experts = F.normalize(self.projection(self.weight), dim=-1)                # P w / ‖P w‖
        return tokens @ experts.t() / self.temperature.clamp(min=1e-2)              # cos / τ

    def route(self, x, backend=routing):
        logits = self.logits(x)
        expert_ids, weights = backend.softmax_top_k_route(logits, self.top_k, self.renormalize)
        probs = torch.softmax(at_least_float32(logits), dim=-1)
        return RouterOutput(expert_ids, weights, self.capacity(x.shape[0]), logits, probs)

    def balance_loss(self, out, reduce=local_sum):
        return switch_balance_loss(out.probs, out.expert_ids, reduce)
