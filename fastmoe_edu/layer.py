"""MoELayer: a drop-in Mixture-of-Experts feed-forward layer (FastMoE's data flow, docs/moe_systems.md §2).

    y = Σ_{s=1..k} w[t, s] · expert_{e[t, s]}(x_t)        for every token t
      (+ shared(x_t), or + σ(x_t·g) · shared(x_t), with ``num_shared_experts``: see experts.SharedExperts)

Usage::

    from fastmoe_edu import MoELayer
    layer = MoELayer(d_model=64, d_hidden=128, num_experts=8, top_k=2, router="softmax_top_k")
    y = layer(x)                 # x [..., 64] -> y [..., 64]
    loss = task_loss + layer.aux_loss
    layer.last_routing           # expert ids, weights, tokens per expert, dropped count

The forward pass is the sequence of named steps below; each step is one function of the chosen
backend (``backends/``), so the reference and the numba kernels can be read side by side.

The layer knows nothing about distribution. Two seams let parallelism in from outside
(``fastmoe_edu.distributed.parallelize`` replaces both):

    layer.expert_runner   step 7, "run the experts on the expert-sorted buffer": LocalExperts here;
                          ExpertParallel sends the rows to the ranks that hold their experts and back
    layer.reduce          "sum over every rank's tokens", used by the router's balance loss and bias
                          update: the identity here; a differentiable all-reduce over the data ranks

``router="soft_moe"`` (Soft MoE, soft_moe.py) replaces steps 1-5 and 9 by a dense dispatch of each
sequence's tokens into the experts' slots; step 7 goes through the same ``expert_runner`` (so expert
parallelism works unchanged). It needs no ``reduce``: it has no balance loss and no cross-sequence sum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .backends import check_backend_name, get_backend
from .experts import Experts, SharedExperts, check_expert_options
from .profiling import named_range
from .routers import ROUTERS, build_router, local_sum
from .soft_moe import SOFT_MOE, build_soft_moe_router, soft_moe_forward

#: every ``router=`` MoELayer accepts: the top-k family of routers.py, and Soft MoE (soft_moe.py), which is
#: kept out of ROUTERS because it has no top-k, no capacity and no place in the causal language model.
LAYER_ROUTERS = (*ROUTERS, SOFT_MOE)
DEFAULT_TOP_K = 2


@dataclass
class RoutingRecord:
    """The last routing decision of a layer, detached, for inspection (notebooks, logs)."""
    expert_ids: torch.Tensor          # [T, k] after capacity pruning, -1 = dropped
    weights: torch.Tensor             # [T, k] combine weights, 0 where dropped
    tokens_per_expert: torch.Tensor   # [E] rows each expert processed
    num_dropped: int                  # assignments removed by capacity pruning
    capacity: int | None              # C, or None when dropless
    logits: torch.Tensor              # [T, E] router scores
    probs: torch.Tensor | None        # [T, E] router probabilities (sigmoid scores for "sigmoid")
    random_draws: dict                # noise / jitter / uniforms the router drew, expert_dropout's mask (training)
    # Soft MoE fills the fields above per *slot*: expert_ids [T, E·p] (the expert of each slot),
    # weights [T, E·p] the combine weights C, logits [T, E·p], probs [T, E] = C summed over an expert's
    # slots, tokens_per_expert = slots per expert, nothing dropped; and its dispatch weights here:
    dispatch_weights: torch.Tensor | None = None      # [T, E·p] D (softmax over a group's tokens); else None


class LocalExperts:
    """The default expert runner: every expert of this process on its own segment of the buffer.

    A runner also decides which tokens this process dispatches (``share_tokens``, before step 2) and
    completes the layer's output from them (``collect_tokens``, after step 9): all of them here.
    """

    def share_tokens(self, tokens, expert_ids, weights, counts, backend):
        return tokens, expert_ids, weights, counts

    def __call__(self, experts: Experts, buffer: torch.Tensor, counts: torch.Tensor, backend) -> torch.Tensor:
        return experts(buffer, counts, backend.grouped_matmul)

    def collect_tokens(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def __repr__(self) -> str:
        return "LocalExperts()"


class MoELayer(nn.Module):
    """A Mixture-of-Experts layer: router + dispatch + experts + combine.

    Args:
        d_model: width of the tokens.
        d_hidden: hidden width of each expert's feed-forward network.
        num_experts: E, the number of experts.
        top_k: experts per token (Switch needs 1, GShard 2; for expert choice, the default capacity factor).
            Not used by ``"soft_moe"`` (every token reaches every slot): leave it at its default.
        router: one of ``fastmoe_edu.routers.ROUTERS``, or ``"soft_moe"`` (options ``slots_per_expert``,
            ``normalize``; ``capacity_factor`` must be None; see soft_moe.py).
        expert: a kind of ``fastmoe_edu.experts.EXPERT_KINDS``: ``"swiglu"``, ``"geglu"``, ``"gelu"``, ``"relu"``,
            ``"clamped_swiglu"`` (GPT-OSS).
        capacity_factor: cf; each expert takes at most C = ceil(cf·k·T/E) assignments. None = dropless.
        expert_capacity: C itself, a fixed number of assignments per expert (Switch Transformers'
            ``expert_capacity``), instead of a capacity factor. Set at most one of the two.
        capacity_per: ``"batch"`` (the default): all T tokens of the call compete for an expert's C places;
            ``"sequence"``: the tokens of each sequence (the second-to-last axis of x: x [..., S, d_model])
            compete only among themselves, for C places per sequence, C = ceil(cf·k·S/E) or
            ``expert_capacity`` (Switch Transformers counts its capacity this way). Needs a capacity.
        capacity_priority: which assignments win an expert's C places, always slot-major (every token's first
            choice before any second choice): ``"order"`` (the default) the tokens in order; ``"probability"``
            the tokens in order of decreasing largest router probability max_e p[t, e], ties in token order
            (batch-prioritized routing, Riquelme et al. 2021; NLLB-MoE's batch_prioritized_routing). Needs a
            capacity. A router option (``routers.Router``), so ``router_options`` may carry it too.
        renormalize_after_dropping: False (the default): the combine weights are normalized over the k choices
            *before* capacity drops some (a dropped assignment's weight becomes 0, the others stay); True: a
            token's kept weights are rescaled to the sum its k weights had, w'_s = w_s · Σ_all w / Σ_kept w
            (NLLB-MoE's normalize_router_prob_before_dropping=False). Needs renormalized weights and something
            that drops (a capacity, or GShard's random routing). A router option, like capacity_priority.
        expert_dropout: p; in training mode every element of the routed experts' outputs is zeroed with
            probability p and the rest scaled by 1 / (1 − p), before the combine (NLLB-MoE's moe_token_dropout);
            the identity in eval mode. The mask drawn is ``last_routing.random_draws["expert_dropout"]``
            ([rows, d_model] in the expert-sorted row order). 0 (the default) = off.
        backend: a name of ``fastmoe_edu.backends.BACKEND_NAMES`` (``"reference"``, ``"numba"``, ``"auto"``).
        bias: give the expert linear maps biases (the shared experts' too).
        num_shared_experts: always-on experts every token runs, added to the routed output (DeepSeekMoE,
            DeepSeek-V2/V3: one dense MLP of the ``expert`` kind, of width num_shared_experts · shared_d_hidden).
            0 (the default) = none.
        shared_d_hidden: the hidden width of one shared expert; None = ``d_hidden``.
        shared_expert_gate: scale the shared output by σ(x·g), g a learned [d_model] vector (Qwen2-MoE).
        output_bias: add a learned bias b [d_model] to every token's output, y = Σ_s w_s · expert(x) + b
            (JetMoE; a token whose assignments were all dropped gets b). A replicated parameter, like the router.
        weights_on: where a token's router weight w_s acts: ``"output"`` (the default, every paper's
            y = Σ_s w_s · expert_s(x)) or ``"input"`` (Llama-4: y = Σ_s expert_s(w_s · x), the weight scales the
            expert's input row and the outputs are summed unweighted). Not with ``"soft_moe"``.
        swiglu_alpha, swiglu_limit: the constants α and limit of ``expert="clamped_swiglu"`` (GPT-OSS;
            defaults 1.702 and 7.0); refused for the other kinds.
        **router_options: passed to the router (e.g. ``renormalize``, ``jitter_epsilon``, ``balance_loss_weight``).
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, top_k: int = DEFAULT_TOP_K,
                 router: str = "softmax_top_k", expert: str = "swiglu", capacity_factor: float | None = None,
                 backend: str = "reference", bias: bool = False, num_shared_experts: int = 0,
                 shared_d_hidden: int | None = None, shared_expert_gate: bool = False,
                 swiglu_alpha: float | None = None, swiglu_limit: float | None = None,
                 expert_capacity: int | None = None, capacity_per: str = "batch", capacity_priority: str = "order",
                 renormalize_after_dropping: bool = False, expert_dropout: float = 0.0, output_bias: bool = False,
                 weights_on: str = "output", **router_options):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        soft = router == SOFT_MOE
        if soft and top_k != DEFAULT_TOP_K:
            raise ValueError(f"router='soft_moe' does not use top_k (every token reaches every slot); got "
                             f"top_k={top_k!r}, leave it at its default ({DEFAULT_TOP_K})")
        if not soft and not (isinstance(top_k, int) and not isinstance(top_k, bool) and 1 <= top_k <= num_experts):
            raise ValueError(f"top_k={top_k!r} must be an integer in [1, num_experts={num_experts}]")
        if not soft and capacity_factor is not None and not (isinstance(capacity_factor, (int, float))
                                                             and math.isfinite(capacity_factor)
                                                             and capacity_factor > 0):
            raise ValueError(f"capacity_factor={capacity_factor!r} must be a finite number > 0, or None for dropless")
        if router not in LAYER_ROUTERS:
            raise ValueError(f"router={router!r} is not a known router; allowed: {', '.join(LAYER_ROUTERS)}")
        check_expert_options(expert, swiglu_alpha, swiglu_limit)                  # the kind, then its constants
        check_backend_name(backend)
        _check_shared_options(num_shared_experts, shared_d_hidden, shared_expert_gate)
        _check_capacity_options(router, capacity_factor, expert_capacity, capacity_per)
        _check_dropping_options(router, capacity_priority, renormalize_after_dropping, expert_dropout)
        if not isinstance(output_bias, bool):
            raise ValueError(f"output_bias={output_bias!r} must be True or False")
        if weights_on not in WEIGHTS_ON or (soft and weights_on != "output"):
            raise ValueError(f"weights_on={weights_on!r} is not allowed; allowed: "
                             + ("'output' (Soft MoE weighs the slots' outputs)" if soft else ", ".join(WEIGHTS_ON)))
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.router_name, self.backend_name = router, backend
        self.capacity_per, self.expert_dropout, self.weights_on = capacity_per, float(expert_dropout), weights_on
        if soft:
            self.router = build_soft_moe_router(d_model, num_experts, capacity_factor, **router_options)
        else:
            # Options of every top-k router (checked by build_router; their defaults change nothing).
            router_options.update(expert_capacity=expert_capacity, capacity_priority=capacity_priority,
                                  renormalize_after_dropping=renormalize_after_dropping)
            self.router = build_router(router, d_model, num_experts, top_k, capacity_factor, **router_options)
        expert_constants = dict(swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
        self.experts = Experts(num_experts, d_model, d_hidden, expert, bias, **expert_constants)
        # Replicated parameters, not experts: expert parallelism keeps them whole on every rank.
        self.shared_experts = (SharedExperts(d_model, num_shared_experts * (shared_d_hidden or d_hidden), expert,
                                             bias, gated=shared_expert_gate, **expert_constants)
                               if num_shared_experts else None)
        self.num_shared_experts = num_shared_experts
        self.output_bias = nn.Parameter(torch.zeros(d_model)) if output_bias else None
        self.aux_loss = torch.zeros(())
        self.last_routing: RoutingRecord | None = None
        self.expert_runner = LocalExperts()        # the two seams (module docstring)
        self.reduce = local_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        backend = get_backend(self.backend_name, x.device)
        if self.router_name == SOFT_MOE:          # dense slots instead of steps 1-5 and 9 (soft_moe.py)
            y, record = soft_moe_forward(self.router, self.experts, self.expert_runner, x, backend)
            self.aux_loss = y.new_zeros(())       # no balance loss (and no z-loss): balanced by construction
            self.last_routing = RoutingRecord(**record)
            return self._add_always_on(x.reshape(-1, self.d_model), y.reshape(-1, self.d_model)).reshape(x.shape)
        tokens = all_tokens = x.reshape(-1, self.d_model)                          # [T, d]
        self.router.backend = backend

        # 1. Route: k expert ids and k weights per token; the aux loss of the whole batch (routers.py).
        #    (named_range: a range in the profiler's trace while one records, profiling.py; else nothing)
        with named_range("moe/route"):
            route, self.aux_loss = self.router(tokens, self.reduce)
        # Capacity: the most rows one expert takes; assignments past it are dropped (id -1). Per sequence,
        # each sequence of S tokens (x [..., S, d]) has its own C places per expert. The tokens claim places
        # in order, or by decreasing router probability (capacity_priority="probability").
        capacity, tokens_per_sequence = route.capacity, None
        if self.capacity_per == "sequence" and capacity is not None:
            tokens_per_sequence = x.shape[-2] if x.dim() >= 2 else 1
            capacity = self.router.capacity(tokens_per_sequence)
        with named_range("moe/capacity"):
            priority = self.router.capacity_priority_scores(route)
            if priority is None:
                expert_ids = backend.prune_capacity(route.expert_ids, self.num_experts, capacity, tokens_per_sequence)
            else:
                expert_ids = backend.prune_capacity(route.expert_ids, self.num_experts, capacity,
                                                    tokens_per_sequence, priority)
            # Dropped -> weight 0; the kept ones as routed, or renormalized over what was kept (routers.py).
            weights = self.router.weights_after_dropping(route.weights, expert_ids)
        # 2. Count: tokens per expert (a histogram).
        with named_range("moe/count"):
            counts = backend.count_tokens_per_expert(expert_ids, self.num_experts)
        self.last_routing = self._record(route, expert_ids, weights, counts, capacity)
        # The tokens this process dispatches: all of them, except under DeepSpeed-TED's duplicate
        # token dropping, where the tensor-parallel ranks (which hold the same tokens) take 1/tp each.
        tokens, expert_ids, weights, counts = self.expert_runner.share_tokens(tokens, expert_ids, weights,
                                                                              counts, backend)
        # 4. Positions: segment starts (exclusive prefix sum), then each (token, slot)'s row.
        with named_range("moe/rank"):
            starts = backend.exclusive_prefix_sum(counts)
            rows = backend.stable_positions(expert_ids, starts)
        # 5. Local scatter: copy token rows into expert-contiguous order.
        with named_range("moe/scatter"):
            buffer = backend.scatter_rows(tokens, rows, int(counts.sum()))
        # 5b. Llama-4 weighs the expert's input instead: row r of (t, s) becomes w[t, s] · x[t], combined with 1.
        if self.weights_on == "input":
            buffer = buffer * _row_values(weights, rows, buffer.shape[0]).to(buffer.dtype)[:, None]
            weights = (expert_ids >= 0).to(weights.dtype)
        # 6-8. Experts on their contiguous segments (a grouped GEMM); under expert parallelism the
        #      runner wraps this step in the global scatter / gather all-to-alls.
        with named_range("moe/experts"):
            expert_out = self.expert_runner(self.experts, buffer, counts, backend)
        # 8b. Expert dropout (training only): keep each output element with probability 1 − p, times 1 / (1 − p).
        if self.expert_dropout and self.training:
            keep = torch.empty_like(expert_out).bernoulli_(1 - self.expert_dropout)
            self.last_routing.random_draws["expert_dropout"] = keep
            expert_out = expert_out * (keep / (1 - self.expert_dropout))
        # 9. Local gather + combine: y[t] = Σ_s w[t, s] · expert_out[row(t, s)].
        with named_range("moe/combine"):
            y = backend.gather_combine(expert_out, rows, weights)
        y = self.expert_runner.collect_tokens(y)                                   # TED: the tp shares joined
        # 10. Shared experts (if any) on every token: y += shared(x), or σ(x·g) · shared(x); then y += b.
        return self._add_always_on(all_tokens, y).reshape(x.shape)

    def _add_always_on(self, tokens: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """routed + shared(tokens) (DeepSeek; gated by σ(x·g) under Qwen2-MoE's gate) + b (JetMoE's output bias)."""
        out = routed if self.shared_experts is None else routed + self.shared_experts(tokens)
        return out if self.output_bias is None else out + self.output_bias

    def _check_input(self, x: torch.Tensor) -> None:
        """Refuse, before any work, an input the layer cannot take, and say what it takes instead."""
        dtype = self.experts.w1.dtype                        # (the router may keep float32 weights)
        if x.dim() == 0:
            raise ValueError(f"input is 0-dimensional (a scalar); expected shape [..., d_model={self.d_model}]")
        if not x.is_floating_point():
            raise TypeError(f"input dtype {x.dtype} is not a floating-point dtype; convert it with x.to({dtype})")
        if x.shape[-1] != self.d_model:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, expected d_model={self.d_model}")
        if x.dtype != dtype:
            raise TypeError(f"input dtype {x.dtype} differs from the layer's parameter dtype {dtype}; convert the "
                            f"input with x.to({dtype}) or the layer with layer.to({x.dtype})")

    def update_router_bias(self, load: torch.Tensor | None = None) -> None:
        """After an optimizer step: loss-free bias balancing (sigmoid router); a no-op otherwise.

        ``load`` defaults to the last forward's tokens per expert, summed over all ranks by ``reduce``.
        """
        self.router.update_bias(load, self.reduce)

    @staticmethod
    def _record(route, expert_ids, weights, counts, capacity) -> RoutingRecord:
        kept_before = int((route.expert_ids >= 0).sum())
        return RoutingRecord(
            expert_ids=expert_ids.detach(), weights=weights.detach(), tokens_per_expert=counts.detach(),
            num_dropped=kept_before - int(counts.sum()), capacity=capacity,
            logits=route.logits.detach(), probs=None if route.probs is None else route.probs.detach(),
            random_draws={key: value.detach() for key, value in route.random_draws.items()})

    def extra_repr(self) -> str:
        shared = f", num_shared_experts={self.num_shared_experts}" if self.num_shared_experts else ""
        shared += ", output_bias=True" if self.output_bias is not None else ""
        shared += f", weights_on={self.weights_on!r}" if self.weights_on != "output" else ""
        slots = (f"slots_per_expert={self.router.slots_per_expert}" if self.router_name == SOFT_MOE
                 else f"top_k={self.top_k}")
        return (f"num_experts={self.num_experts}, {slots}{shared}, router={self.router_name!r}, "
                f"backend={self.backend_name!r}, expert_runner={self.expert_runner!r}")


#: Where a token's router weight acts (MoELayer's ``weights_on``): on the expert's output (y = Σ w·expert(x)),
#: or on its input (y = Σ expert(w·x), Llama-4).
WEIGHTS_ON = ("output", "input")


def _row_values(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """out[rows[t, s]] = values[t, s] for every kept (t, s) (row -1: dropped), 0 for a row nobody owns;
    differentiable in ``values``."""
    kept = rows >= 0
    return values.new_zeros(num_rows).index_put((rows[kept],), values[kept])


#: Where the tokens that compete for an expert's capacity come from (MoELayer's ``capacity_per``).
CAPACITY_PER = ("batch", "sequence")


def _check_capacity_options(router, capacity_factor, expert_capacity, capacity_per) -> None:
    """A fixed capacity is a positive integer, exclusive with cf; per-sequence capacity needs one of them."""
    if capacity_per not in CAPACITY_PER:
        raise ValueError(f"capacity_per={capacity_per!r} is not known; allowed: {', '.join(CAPACITY_PER)}")
    if expert_capacity is not None:
        if not (isinstance(expert_capacity, int) and not isinstance(expert_capacity, bool) and expert_capacity >= 1):
            raise ValueError(f"expert_capacity={expert_capacity!r} must be an integer >= 1 (assignments per expert), "
                             f"or None")
        if capacity_factor is not None:
            raise ValueError(f"capacity_factor={capacity_factor!r} and expert_capacity={expert_capacity!r}: set one "
                             f"of them (C = ceil(cf·k·T/E), or C = expert_capacity), not both")
    if router in ("expert_choice", SOFT_MOE) and (expert_capacity is not None or capacity_per != "batch"):
        raise ValueError(f"router={router!r} has no token-choice capacity to prune: expert_capacity="
                         f"{expert_capacity!r} and capacity_per={capacity_per!r} apply to the top-k routers "
                         f"({', '.join(r for r in ROUTERS if r != 'expert_choice')})")
    if capacity_per == "sequence" and capacity_factor is None and expert_capacity is None:
        raise ValueError("capacity_per='sequence' needs a capacity to count per sequence: set capacity_factor or "
                         "expert_capacity (without either the layer is dropless)")


def _check_dropping_options(router, capacity_priority, renormalize_after_dropping, expert_dropout) -> None:
    """expert_dropout is a probability in [0, 1); Soft MoE takes none of the three (it has no top-k dispatch).
    The values of capacity_priority and renormalize_after_dropping are checked by the router (build_router)."""
    if not (isinstance(expert_dropout, (int, float)) and not isinstance(expert_dropout, bool)
            and math.isfinite(expert_dropout) and 0 <= expert_dropout < 1):
        raise ValueError(f"expert_dropout={expert_dropout!r} must be a number in [0, 1) (the probability of zeroing "
                         f"an element of an expert's output while training; 0: off)")
    if router == SOFT_MOE and (capacity_priority != "order" or renormalize_after_dropping is not False
                               or expert_dropout):
        raise ValueError(f"capacity_priority={capacity_priority!r}, renormalize_after_dropping="
                         f"{renormalize_after_dropping!r}, expert_dropout={expert_dropout!r}: router='soft_moe' has "
                         f"no capacity dropping and no expert-sorted rows; these apply to the top-k routers "
                         f"({', '.join(ROUTERS)})")


def _check_shared_options(num_shared_experts, shared_d_hidden, shared_expert_gate) -> None:
    """The shared-expert options of MoELayer: a count >= 0; a width and a gate only with a count > 0."""
    if not (isinstance(num_shared_experts, int) and not isinstance(num_shared_experts, bool)
            and num_shared_experts >= 0):
        raise ValueError(f"num_shared_experts={num_shared_experts!r} must be an integer >= 0 (0: no shared experts)")
    if shared_d_hidden is not None and not (isinstance(shared_d_hidden, int) and not isinstance(shared_d_hidden, bool)
                                            and shared_d_hidden >= 1):
        raise ValueError(f"shared_d_hidden={shared_d_hidden!r} must be an integer >= 1, or None for d_hidden")
    if not isinstance(shared_expert_gate, bool):
        raise ValueError(f"shared_expert_gate={shared_expert_gate!r} must be True or False")
    if num_shared_experts == 0 and (shared_d_hidden is not None or shared_expert_gate):
        raise ValueError(f"shared_d_hidden={shared_d_hidden!r}, shared_expert_gate={shared_expert_gate!r} describe "
                         f"shared experts, but num_shared_experts=0; set num_shared_experts >= 1 or leave them unset")
