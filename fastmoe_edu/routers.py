"""Routers (gates): for each token, which experts and with what weight (docs/moe_systems.md §3).

Every router maps tokens ``x[T, d_model]`` to a :class:`RouterOutput`:

    expert_ids [T, k]   chosen experts, -1 where an assignment is switched off before capacity
    weights    [T, k]   the combine weights (differentiable: the gate learns through them)
    capacity            C, the most (token, slot) pairs one expert may take, or None (dropless)
    logits     [T, E]   raw scores ``x Wᵀ`` (the z-loss and the notebooks use them)

and, separately, to its load-balancing loss ``Router.balance_loss(route, reduce)``. Balance losses
are defined on the *whole* batch, so they are written in terms of sums over tokens, and every such
sum passes through ``reduce``: the identity in one process, a differentiable all-reduce over the
data-parallel ranks when the batch is sharded (``fastmoe_edu.distributed``). A router written this
way is correct under expert parallelism without any change to the parallel code; a router with a
``balance_loss_weight`` but no ``balance_loss`` method fails loudly.

Capacity pruning itself is a dispatch step (``dispatch.prune_capacity``), so the optimized backend can
run it; routers only say what C is: ``C = ceil(cf · k · T / E)`` (Switch: k = 1; GShard: k = 2).

Notation: ``logits = x Wᵀ`` [T, E], ``p = softmax(logits)`` over experts, ``f_e`` = fraction of
assignments sent to expert e, ``P_e`` = mean of p[:, e] over tokens.

A router computes the logits and hands them to its backend's routing function (``routing.py``:
``softmax_top_k_route``, ``sigmoid_top_k_route``; a backend has a fused kernel of the same name and
signature): the backend is an argument, ``router(x, reduce, backend)``, the reference by default. Each
router class checks its own options (``check_options``) before one is built (``build_router``).

This file holds the base class and the softmax top-k router; ``ROUTERS`` finds every router by name,
the six that follow one paper each (noisy top-k, Switch, GShard, expert choice, sigmoid, X-MoE) in
router_zoo.py.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import routing
from .checks import is_finite_number
from .dispatch import count_tokens_per_expert
# Switch Transformer: route in at least float32 (a bfloat16 softmax is too coarse to rank experts).
from .precision import at_least_float32
from .routing import min_score_sum


# ----------------------------------------------------------------------------------------------------
# Losses shared by several routers. ``reduce`` sums over the ranks that hold other tokens (see above).
# ----------------------------------------------------------------------------------------------------
def local_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The reducer of one process: the sum over one rank is the tensor itself."""
    return tensor


def switch_balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, reduce=local_sum) -> torch.Tensor:
    """Switch/Mixtral balance loss  E · Σ_e f_e · P_e  (= 1 when perfectly balanced).

    f_e = fraction of the (token, slot) assignments that chose e (not differentiable),
    P_e = mean router probability of e (differentiable: this is what the gradient pushes down).
    Both are ratios of sums over tokens; one ``reduce`` of [counts, Σ_t p, T] makes them global.
    """
    num_experts = probs.shape[-1]
    counts = count_tokens_per_expert(expert_ids, num_experts).to(probs.dtype)
    totals = reduce(torch.cat([counts, probs.sum(dim=0), probs.new_full((1,), probs.shape[0])]))
    counts, prob_sums, num_tokens = totals[:num_experts], totals[num_experts:-1], totals[-1]
    fraction = counts / counts.sum().clamp(min=1)                                               # f_e
    mean_prob = prob_sums / num_tokens.clamp(min=1)                                             # P_e
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor, reduce=local_sum) -> torch.Tensor:
    """ST-MoE router z-loss: mean_t (logsumexp_e logits[t, e])², keeps the logits small."""
    squares = torch.logsumexp(at_least_float32(logits), dim=-1).square()
    totals = reduce(torch.stack([squares.sum(), squares.new_tensor(float(squares.numel()))]))
    return totals[0] / totals[1].clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# Router base class, and the table of routers by name
# ----------------------------------------------------------------------------------------------------
#: name -> router class, in the order the classes are defined: each registers itself with ``name=`` (the
#: softmax top-k router below; the six single-paper routers of router_zoo.py, which fastmoe_edu/__init__.py
#: imports first, so the table is complete before options.py or a user reads it).
ROUTERS: dict[str, type[Router]] = {}


@dataclass
class RouterOutput:
    expert_ids: torch.Tensor
    weights: torch.Tensor
    capacity: int | None
    logits: torch.Tensor
    probs: torch.Tensor | None = None
    random_draws: dict = field(default_factory=dict)   # noise actually used (the tests' oracle replays it)
    token_sums: dict = field(default_factory=dict)     # per-expert sums over this rank's tokens (balance loss)


class Router(nn.Module):
    """Common part: the router weight W [E, d_model], capacity, loss weights, the bias-update hook.

    Two options every router has, both on the logits before any scoring:

        router_bias=True    logits = x Wᵀ + c, c [E] a learned bias (GPT-OSS's router is a Linear with bias)
        logit_softcap=cap   logits ← cap · tanh(logits / cap)  (Gemma-2 / Grok-style soft capping: |l| < cap)

    They change only the logits handed to the routing functions, so every backend computes them alike.

    Two more say how capacity drops assignments (the layer prunes; the router says how, so that they are
    router options like ``expert_capacity`` and a config's ``router_options`` reaches them):

        capacity_priority="order"          slot-major, tokens in order (the default: GShard, Switch)
        capacity_priority="probability"    slot-major, tokens by decreasing max_e p[t, e], ties in token order
                                           (batch-prioritized routing: Riquelme et al. 2021, V-MoE; NLLB-MoE)
        renormalize_after_dropping=True    after capacity (and GShard's random routing) dropped some of a token's
                                           assignments, its kept weights are rescaled to the sum all k had:
                                           w'_s = w_s · Σ_all w / Σ_kept w  (NLLB-MoE's default; the default
                                           here, False, normalizes before dropping: w'_s = w_s, dropped ones 0)
    """

    #: k the router requires (Switch: 1, GShard: 2), or None if any 1 <= k <= E works.
    required_top_k: int | None = None

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        """``class SwitchRouter(Router, name="switch")`` enters the class in ROUTERS as ``router="switch"``."""
        super().__init_subclass__(**kwargs)
        if name is not None:
            ROUTERS[name] = cls

    def __init__(self, d_model: int, num_experts: int, top_k: int, capacity_factor: float | None,
                 balance_loss_weight: float = 0.01, z_loss_weight: float = 0.0, router_bias: bool = False,
                 logit_softcap: float | None = None, expert_capacity: int | None = None,
                 capacity_priority: str = "order", renormalize_after_dropping: bool = False):
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.capacity_factor, self.expert_capacity = capacity_factor, expert_capacity
        self.capacity_priority, self.renormalize_after_dropping = capacity_priority, renormalize_after_dropping
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.weight = nn.Parameter(torch.randn(num_experts, d_model) * d_model ** -0.5)   # W_g
        # c: a learned logit bias (trained by gradients), not the sigmoid router's selection-only ``bias``.
        self.logit_bias = nn.Parameter(torch.zeros(num_experts)) if router_bias else None
        self.logit_softcap = logit_softcap

    # -- the options' checks (build_router calls check_options before building) ----------------------
    @classmethod
    def check_options(cls, name: str, num_experts: int, top_k: int, capacity_factor: float | None,
                      options: dict) -> None:
        """Refuse an option router ``name`` does not take, or a bad value: every router's options here,
        the subclass's own in ``check_own``, then whether capacity drops anything to reorder or renormalize."""
        check_option_names(name, options)
        if cls.required_top_k is not None and top_k != cls.required_top_k:
            raise ValueError(f"router={name!r} routes each token to exactly {cls.required_top_k} expert(s); "
                             f"got top_k={top_k} (top_k must be {cls.required_top_k})")
        o = {**router_options(name), **options}
        check_number(o, "balance_loss_weight", minimum=0)
        check_number(o, "z_loss_weight", minimum=0)
        if o["logit_softcap"] is not None:
            check_number(o, "logit_softcap", above=0, note=" (logits ← cap·tanh(logits/cap)), or None for no capping")
        check_bool(o, "router_bias")
        capacity = o["expert_capacity"]
        if capacity is not None:
            if not (isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 1):
                raise ValueError(f"expert_capacity={capacity!r} must be an integer >= 1 (assignments per expert), "
                                 f"or None")
            if capacity_factor is not None:
                raise ValueError(f"capacity_factor={capacity_factor!r} and expert_capacity={capacity!r}: set one of "
                                 f"them (C = ceil(cf·k·T/E), or C = expert_capacity), not both")
        if o["capacity_priority"] not in CAPACITY_PRIORITIES:
            raise ValueError(f"capacity_priority={o['capacity_priority']!r} is not known; allowed: "
                             f"{', '.join(CAPACITY_PRIORITIES)}")
        check_bool(o, "renormalize_after_dropping")
        cls.check_own(name, num_experts, top_k, o)
        has_capacity = capacity_factor is not None or capacity is not None
        if o["capacity_priority"] != "order" and not has_capacity:
            raise ValueError(f"capacity_priority={o['capacity_priority']!r} orders the tokens that compete for "
                             f"capacity, but there is none: set capacity_factor or expert_capacity (without either "
                             f"the layer is dropless)")
        if o["renormalize_after_dropping"]:
            shaped = [f"{key}={o[key]!r}" for key, off in _RENORMALIZE_OFF if o.get(key, off) != off]
            if not o.get("renormalize", True) or shaped:
                what = ", ".join(shaped) if o.get("renormalize", True) else "renormalize=False"
                raise ValueError(f"renormalize_after_dropping=True rescales a token's kept weights to the sum of its "
                                 f"k weights, a renormalization only for weights divided by their plain sum; "
                                 f"router={name!r} with {what} has other weights: set renormalize=True (and "
                                 f"renormalize_p=1, renormalize_min=0, renormalize_eps=0), or leave "
                                 f"renormalize_after_dropping=False")
            if not has_capacity and not cls.drops_without_capacity(o):
                raise ValueError(f"renormalize_after_dropping=True renormalizes over the assignments capacity kept, "
                                 f"but router={name!r} without capacity_factor or expert_capacity drops none: set "
                                 f"one of them (or leave renormalize_after_dropping=False)")

    @classmethod
    def check_own(cls, name: str, num_experts: int, top_k: int, options: dict) -> None:
        """The checks of a subclass's own options (``options``: every option, defaults filled in)."""

    @classmethod
    def drops_without_capacity(cls, options: dict) -> bool:
        """Whether the router itself drops assignments (GShard's random routing), with no capacity set."""
        return False

    def keeps_every_assignment(self) -> bool:
        """Whether route() hands every one of its T·k assignments to an expert (switches none off with id -1):
        then, with no capacity, the layer knows the buffer's size from the shape (MoELayer._buffer_rows)."""
        return True

    # -- what a subclass provides ------------------------------------------------------------------
    def route(self, x: torch.Tensor, backend=routing) -> RouterOutput:
        """Route x [T, d_model] with ``backend``'s routing functions (routing.py's by default)."""
        raise NotImplementedError

    def balance_loss(self, out: RouterOutput, reduce=local_sum) -> torch.Tensor:
        """The router's load-balancing loss of the whole batch; every sum over tokens goes through ``reduce``."""
        raise NotImplementedError(f"{type(self).__name__} defines no balance_loss(route, reduce): write one "
                                  f"(its sums over tokens passed through reduce), or return zero for a router "
                                  f"that needs no balancing loss")

    # -- shared ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, reduce=local_sum, backend=routing) -> tuple[RouterOutput, torch.Tensor]:
        """Route x [T, d_model]; returns the routing and the weighted aux loss (balance + z) of the whole batch."""
        # Under mixed precision (autocast, precision.py) routing still runs in float32 with autocast
        # off, like the float32 master weights: ranking experts compares nearly equal scores, which
        # bfloat16 would reorder.
        autocasting = torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            out = self.route(x.float() if autocasting else x, backend)
            # With a weight of 0 (HF models after moefy: HF adds its own) the loss and its reduce are skipped.
            aux_loss = (self.balance_loss_weight * self.balance_loss(out, reduce) if self.balance_loss_weight
                        else out.logits.new_zeros(()))
            if self.z_loss_weight:
                aux_loss = aux_loss + self.z_loss_weight * router_z_loss(out.logits, reduce)
        return out, aux_loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The router's scores [T, E]: ``scores(x)`` (+ c) (soft-capped)."""
        logits = self.scores(x)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias                                      # x Wᵀ + c
        if self.logit_softcap is not None:
            cap = self.logit_softcap
            logits = cap * torch.tanh(logits / cap)                                # cap · tanh(l / cap)
        return logits

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()                                                 # logits = x Wᵀ

    def capacity(self, num_tokens: int) -> int | None:
        """C = ceil(cf · k · T / E); the fixed ``expert_capacity`` if one is set; None when dropless."""
        if self.expert_capacity is not None:
            return self.expert_capacity                                            # Switch: a token count
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * self.top_k * num_tokens / self.num_experts)

    def capacity_priority_scores(self, out: RouterOutput) -> torch.Tensor | None:
        """prune_capacity's ``priority`` [T]: None (token order) for ``capacity_priority="order"``; for
        ``"probability"`` each token's largest router probability max_e p[t, e] (only an order: no gradient)."""
        if self.capacity_priority == "order":
            return None
        return out.probs.detach().amax(dim=-1)

    def weights_after_dropping(self, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """The combine weights [T, k] once ``expert_ids`` (after capacity) has -1 where an assignment was dropped:
        0 there; the others unchanged (normalized before dropping), or, with ``renormalize_after_dropping``,
        rescaled so a token's kept weights sum to what its k weights summed to (1, or route_scale, for the
        routers that allow it): w'_s = w_s · Σ_all w / Σ_kept w, 0 for a token with nothing kept."""
        kept_weights = weights * (expert_ids >= 0)                                 # dropped -> weight 0
        if not self.renormalize_after_dropping:
            return kept_weights
        total = weights.sum(dim=-1, keepdim=True)                                  # Σ_all w
        # Σ_kept w, floored at √(smallest normal float) so that the ratio and its gradient stay finite; 0 / floor
        # = 0 for a token whose assignments were all dropped.
        kept_total = kept_weights.sum(dim=-1, keepdim=True).clamp(min=min_score_sum(weights.dtype))
        return kept_weights / kept_total * total                                   # w'_s = w_s / Σ_kept w · Σ_all w

    def update_bias(self, load: torch.Tensor | None = None, reduce=local_sum) -> None:
        """Loss-free balancing hook (sigmoid router). Other routers have no bias: nothing to do."""


# ----------------------------------------------------------------------------------------------------
# The router of the reading path (docs/moe_systems.md §3; one paper each: router_zoo.py)
# ----------------------------------------------------------------------------------------------------
class SoftmaxTopKRouter(Router, name="softmax_top_k"):
    """Softmax top-k (Mixtral; FastMoE's naive gate): top-k of p, optionally renormalized over the k.

    DeepSeek-V2's options: ``num_groups`` / ``top_k_groups`` limit the choice to the experts of the
    ``top_k_groups`` groups with the largest max p (group-limited greedy); ``route_scale`` multiplies the
    weights (routed_scaling_factor): w = p[ids] (/ Σ p[ids]) · route_scale.

    How the k weights are renormalized (with ``renormalize=True``), written n = the normalizer:

        renormalize_p=1 (the default)   n = Σ_s p_s                     (Mixtral, Qwen, ...)
        renormalize_p=q                 n = ‖p_sel‖_q = (Σ_s p_s^q)^(1/q)   (DBRX: moe_normalize_expert_weights)
        renormalize_min=m               n ← max(n, m)                   (ERNIE-4.5: moe_norm_min)
        renormalize_eps=ε               n ← n + ε                       (an epsilon against n ≈ 0)
        w_s = p_s / n

    ``selection_bias=True`` (ERNIE-4.5-MoE) adds a buffer ``bias`` b [E] that only *selects*: the top k of
    p + b are chosen, the weights use p alone. Like the sigmoid router's bias it gets no gradient; from_hf
    copies ERNIE's e_score_correction_bias into it (nothing here updates it).
    """

    @classmethod
    def check_own(cls, name, num_experts, top_k, options):
        check_bool(options, "renormalize", "selection_bias")
        check_number(options, "route_scale", above=0)
        check_groups(options, num_experts, top_k)
        check_number(options, "renormalize_p", above=0, note=" (the q of the ‖·‖_q the top-k weights are divided "
                                                               "by; 1 = their sum)")
        check_number(options, "renormalize_min", minimum=0, note=" (0: off)")
        check_number(options, "renormalize_eps", minimum=0, note=" (0: off)")
        changed = [f"{key}={options[key]!r}" for key, off in _RENORMALIZE_OFF if options[key] != off]
        if changed and not options["renormalize"]:
            raise ValueError(f"{', '.join(changed)} shape the renormalization, but renormalize=False: set "
                             f"renormalize=True or leave them at their defaults (renormalize_p=1, renormalize_min=0, "
                             f"renormalize_eps=0)")

    def __init__(self, *args, renormalize: bool = True, route_scale: float = 1.0, num_groups: int | None = None,
                 top_k_groups: int | None = None, renormalize_p: float = 1.0, renormalize_min: float = 0.0,
                 renormalize_eps: float = 0.0, selection_bias: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.renormalize, self.route_scale = renormalize, route_scale
        self.num_groups, self.top_k_groups = num_groups, top_k_groups
        self.renormalize_p, self.renormalize_min, self.renormalize_eps = renormalize_p, renormalize_min, renormalize_eps
        self.selection_bias = selection_bias
        if selection_bias:
            self.register_buffer("bias", torch.zeros(self.num_experts))            # b: selects, never weighs
        else:
            self.bias = None

    def route(self, x, backend=routing):
        logits = self.logits(x)
        # The backend's fused function renormalizes by the plain sum; any other normalizer is applied here,
        # on the plain p[ids] it returns (autograd differentiates it the same way for every backend).
        plain_sum = self.renormalize_p == 1.0 and self.renormalize_min == 0.0 and self.renormalize_eps == 0.0
        expert_ids, weights = backend.softmax_top_k_route(logits, self.top_k, self.renormalize and plain_sum,
                                                          self.num_groups, self.top_k_groups, self.bias)
        if self.renormalize and not plain_sum:
            if self.renormalize_p == 1.0:
                norm = weights.sum(dim=-1, keepdim=True)                           # n = Σ_s p_s
            else:
                norm = torch.linalg.vector_norm(weights, ord=self.renormalize_p, dim=-1, keepdim=True)  # ‖p‖_q
            if self.renormalize_min > 0:
                norm = norm.clamp(min=self.renormalize_min)                        # n ← max(n, m)
            weights = weights / (norm + self.renormalize_eps)                      # w = p / (n + ε)
        if self.route_scale != 1.0:
            # Outside the backend's routing function: a product autograd differentiates the same for every backend.
            weights = weights * self.route_scale                                   # w ← w · routed_scaling_factor
        probs = torch.softmax(at_least_float32(logits), dim=-1)
        return RouterOutput(expert_ids, weights, self.capacity(x.shape[0]), logits, probs)

    def balance_loss(self, out, reduce=local_sum):
        return switch_balance_loss(out.probs, out.expert_ids, reduce)


# ----------------------------------------------------------------------------------------------------
# Looking routers up, and the options' checks
# ----------------------------------------------------------------------------------------------------
#: How the tokens competing for an expert's capacity are ordered (the routers' ``capacity_priority``).
CAPACITY_PRIORITIES = ("order", "probability")


def router_options(name: str) -> dict[str, object]:
    """The keyword options a router accepts, with their defaults (for --help and error messages)."""
    options = {}
    for cls in (ROUTERS[name], Router):
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind == param.KEYWORD_ONLY or (cls is Router and param.default is not param.empty):
                options.setdefault(param.name, param.default)
    return options


def build_router(name: str, d_model: int, num_experts: int, top_k: int,
                 capacity_factor: float | None, **options) -> Router:
    """Look a router up by name; its class checks every argument before anything is built."""
    if name not in ROUTERS:
        raise ValueError(f"router={name!r} is not a known router; allowed: {', '.join(ROUTERS)}")
    ROUTERS[name].check_options(name, num_experts, top_k, capacity_factor, options)
    return ROUTERS[name](d_model, num_experts, top_k, capacity_factor, **options)


def check_option_names(name: str, keys, prefix: str = "") -> None:
    """Refuse a key that is not an option of router ``name`` (``prefix``: how the caller spells the key)."""
    allowed = router_options(name)
    for key in keys:
        if key not in allowed:
            raise ValueError(f"unknown option {prefix + key if prefix else repr(key)} for router={name!r}; "
                             f"allowed: {', '.join(sorted(allowed))}")


#: The options that shape SoftmaxTopKRouter's renormalization, each with the value that switches it off.
_RENORMALIZE_OFF = (("renormalize_p", 1.0), ("renormalize_min", 0.0), ("renormalize_eps", 0.0))


def check_number(options: dict, key: str, above: float | None = None, minimum: float | None = None,
                  note: str = "") -> None:
    """options[key] is a real number (not a bool, nan or ±inf) > ``above`` or >= ``minimum``."""
    value = options[key]
    if not (is_finite_number(value) and (value > above if above is not None else value >= minimum)):
        bound = f"> {above:g}" if above is not None else f">= {minimum:g}"
        raise ValueError(f"{key}={value!r} must be a finite number {bound}{note}")


def check_bool(options: dict, *keys: str) -> None:
    for key in keys:
        if not isinstance(options[key], bool):
            raise ValueError(f"{key}={options[key]!r} must be True or False")


def check_groups(options: dict, num_experts: int, top_k: int) -> None:
    """Group-limited routing (DeepSeek-V2/V3): num_groups equal groups, top_k_groups of them searched."""
    groups, top_k_groups = options["num_groups"], options["top_k_groups"]
    if (groups is None) != (top_k_groups is None):
        raise ValueError(f"num_groups={groups!r} and top_k_groups={top_k_groups!r}: set both or neither")
    if groups is None:
        return
    if not (isinstance(groups, int) and groups >= 1 and num_experts % groups == 0):
        raise ValueError(f"num_groups={groups!r} must be a positive divisor of num_experts={num_experts}")
    if not (isinstance(top_k_groups, int) and 1 <= top_k_groups <= groups):
        raise ValueError(f"top_k_groups={top_k_groups!r} must be an integer in [1, num_groups={groups}]")
    if top_k_groups * (num_experts // groups) < top_k:
        raise ValueError(f"top_k_groups={top_k_groups} groups of {num_experts // groups} experts hold fewer "
                         f"than top_k={top_k} experts")
