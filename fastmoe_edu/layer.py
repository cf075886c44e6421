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
backend (``backends/``), so the reference and the numba kernels can be read side by side. Every option
(``options.LayerOptions``) is applied in one named step: ``_apply_capacity``, ``_apply_weights_on``,
``_apply_expert_dropout``, ``_add_always_on``; the router applies its own.

The layer knows nothing about distribution. Two seams let parallelism in from outside
(``fastmoe_edu.distributed.parallelize`` replaces both):

    layer.expert_runner   step 7, "run the experts on the expert-sorted buffer": LocalExperts here;
                          ExpertParallel sends the rows to the ranks that hold their experts and back
    layer.reduce          "sum over every rank's tokens", used by the router's balance loss and bias
                          update: the identity here; a differentiable all-reduce over the data ranks

Soft MoE (``router="soft_moe"``) is its own layer, soft_moe.SoftMoELayer: the same experts behind the
same ``expert_runner`` seam, with a dense dispatch of each sequence's tokens into the experts' slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backends import get_backend
from .experts import Experts, SharedExperts
from .options import LayerOptions
from .profiling import named_range
from .routers import ROUTERS, local_sum


@dataclass
class RoutingRecord:
    """The last routing decision of a layer, detached, for inspection (notebooks, logs)."""
    expert_ids: torch.Tensor          # [T, k] after capacity pruning, -1 = dropped
    weights: torch.Tensor             # [T, k] combine weights, 0 where dropped
    tokens_per_expert: torch.Tensor   # [E] rows each expert processed
    dropped: torch.Tensor             # [] int64: assignments removed by capacity pruning (num_dropped: an int)
    capacity: int | None              # C, or None when dropless
    logits: torch.Tensor              # [T, E] router scores
    probs: torch.Tensor | None        # [T, E] router probabilities (sigmoid scores for "sigmoid")
    random_draws: dict                # noise / jitter / uniforms the router drew, expert_dropout's mask (training)
    # Soft MoE fills the fields above per *slot*: expert_ids [T, E·p] (the expert of each slot),
    # weights [T, E·p] the combine weights C, logits [T, E·p], probs [T, E] = C summed over an expert's
    # slots, tokens_per_expert = slots per expert, nothing dropped; and its dispatch weights here:
    dispatch_weights: torch.Tensor | None = None      # [T, E·p] D (softmax over a group's tokens); else None

    @property
    def num_dropped(self) -> int:
        """``dropped`` as a Python int. On a GPU this waits for the step: the layer itself never asks."""
        return int(self.dropped)


class LocalExperts:
    """The default expert runner: every expert of this process on its own segment of the buffer.

    A runner also decides which tokens this process dispatches (``share_tokens``, before step 2) and
    completes the layer's output from them (``collect_tokens``, after step 9): all of them here.
    """

    def share_tokens(self, tokens, expert_ids, weights, counts, backend):
        return tokens, expert_ids, weights, counts

    def __call__(self, experts: Experts, buffer: torch.Tensor, counts: torch.Tensor, backend) -> torch.Tensor:
        return experts(buffer, counts, backend)

    def collect_tokens(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def __repr__(self) -> str:
        return "LocalExperts()"


class MoELayer(nn.Module):
    """A Mixture-of-Experts layer: router + dispatch + experts + combine.

    ``MoELayer(d_model, d_hidden, num_experts, **keywords)``, or ``MoELayer(options=LayerOptions(...))``: every
    option, its default and meaning is a field of ``fastmoe_edu.options.LayerOptions``; a keyword that is not
    one is an option of the router (e.g. ``renormalize``, ``jitter_epsilon``, ``balance_loss_weight``).
    ``router="soft_moe"`` builds a SoftMoELayer (soft_moe.py), a subclass with its own forward.
    """

    #: router name -> the subclass that implements it instead of the top-k steps (soft_moe.py registers one)
    layer_for_router: dict[str, type[MoELayer]] = {}

    def __init_subclass__(cls, router: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if router is not None:
            MoELayer.layer_for_router[router] = cls

    def __new__(cls, *args, options: LayerOptions | None = None, **keywords):
        router = options.router if options is not None else keywords.get("router")
        return super().__new__(MoELayer.layer_for_router.get(router, cls) if cls is MoELayer else cls)

    def __init__(self, d_model: int | None = None, d_hidden: int | None = None, num_experts: int | None = None, *,
                 options: LayerOptions | None = None, **keywords):
        super().__init__()
        if options is None:
            options = LayerOptions.from_keywords(d_model=d_model, d_hidden=d_hidden, num_experts=num_experts,
                                                 **keywords)
        self.options = options.check()
        self.d_model, self.num_experts, self.top_k = options.d_model, options.num_experts, options.top_k
        self.router_name, self.backend_name = options.router, options.backend
        self.num_shared_experts, self.capacity_per = options.num_shared_experts, options.capacity_per
        self.expert_dropout, self.weights_on = float(options.expert_dropout), options.weights_on
        self.router = self.build_router(options)
        constants = dict(swiglu_alpha=options.swiglu_alpha, swiglu_limit=options.swiglu_limit)
        self.experts = Experts(options.num_experts, options.d_model, options.d_hidden, options.expert, options.bias,
                               **constants)
        # Replicated parameters, not experts: expert parallelism keeps them whole on every rank.
        shared_width = options.num_shared_experts * (options.shared_d_hidden or options.d_hidden)
        self.shared_experts = (SharedExperts(options.d_model, shared_width, options.expert, options.bias,
                                             gated=options.shared_expert_gate, **constants)
                               if options.num_shared_experts else None)
        self.output_bias = nn.Parameter(torch.zeros(options.d_model)) if options.output_bias else None
        self.aux_loss = torch.zeros(())
        self.last_routing: RoutingRecord | None = None
        self.expert_runner = LocalExperts()        # the two seams (module docstring)
        self.reduce = local_sum

    def build_router(self, options: LayerOptions) -> nn.Module:
        """The top-k router named by ``options.router`` (its options were checked with the layer's)."""
        return ROUTERS[options.router](options.d_model, options.num_experts, options.top_k, options.capacity_factor,
                                       **options.router_keywords())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        backend = get_backend(self.backend_name, x.device)
        tokens = x.reshape(-1, self.d_model)                                       # [T, d]
        # 1. Route: k expert ids and k weights per token; the aux loss of the whole batch (routers.py).
        #    (named_range: a range in the profiler's trace while one records, profiling.py; else nothing)
        with named_range("moe/route"):
            route, self.aux_loss = self.router(tokens, self.reduce, backend)
        # Capacity: assignments past an expert's C places are dropped (id -1) and weigh 0.
        with named_range("moe/capacity"):
            expert_ids, weights, capacity = self._apply_capacity(route, x, backend)
        # 2. Count: tokens per expert (a histogram).
        with named_range("moe/count"):
            counts = backend.count_tokens_per_expert(expert_ids, self.num_experts)
        self.last_routing = self._record(route, expert_ids, weights, counts, capacity)
        # 3. The tokens this process dispatches: all of them (under DeepSpeed-TED's runner, a 1/tp share).
        mine, expert_ids, weights, counts = self.expert_runner.share_tokens(tokens, expert_ids, weights, counts, backend)
        # 4. Positions: segment starts (exclusive prefix sum), then each (token, slot)'s row.
        with named_range("moe/rank"):
            starts = backend.exclusive_prefix_sum(counts)
            rows = backend.stable_positions(expert_ids, starts)
        # 5. Local scatter: copy token rows into expert-contiguous order (Llama-4 weighs them here).
        with named_range("moe/scatter"):
            buffer = backend.scatter_rows(mine, rows, self._buffer_rows(expert_ids, counts, capacity))
        buffer, weights = self._apply_weights_on(buffer, rows, weights, expert_ids)
        # 6-8. Experts on their contiguous segments (a grouped GEMM); under expert parallelism the
        #      runner wraps this step in the global scatter / gather all-to-alls.
        with named_range("moe/experts"):
            expert_out = self._apply_expert_dropout(self.expert_runner(self.experts, buffer, counts, backend))
        # 9. Local gather + combine: y[t] = Σ_s w[t, s] · expert_out[row(t, s)]; TED joins the tp shares.
        with named_range("moe/combine"):
            y = self.expert_runner.collect_tokens(backend.gather_combine(expert_out, rows, weights))
        # 10. Shared experts (if any) on every token: y += shared(x), or σ(x·g) · shared(x); then y += b.
        return self._add_always_on(tokens, y).reshape(x.shape)

    def _apply_capacity(self, route, x: torch.Tensor, backend):
        """(expert ids with -1 past capacity, combine weights, C). Per sequence, each sequence of S tokens
        (x [..., S, d]) has its own C places per expert. The tokens claim places in order, or by decreasing
        router probability (capacity_priority="probability"). Dropped -> weight 0; the kept ones as routed,
        or renormalized over what was kept (renormalize_after_dropping, routers.py)."""
        capacity, tokens_per_sequence = route.capacity, None
        if self.capacity_per == "sequence" and capacity is not None:
            tokens_per_sequence = x.shape[-2] if x.dim() >= 2 else 1
            capacity = self.router.capacity(tokens_per_sequence)
        priority = self.router.capacity_priority_scores(route)
        expert_ids = backend.prune_capacity(route.expert_ids, self.num_experts, capacity, tokens_per_sequence,
                                            priority)
        return expert_ids, self.router.weights_after_dropping(route.weights, expert_ids), capacity

    def _buffer_rows(self, expert_ids: torch.Tensor, counts: torch.Tensor, capacity) -> int:
        """Rows of the expert buffer: Σ counts, the kept assignments. With no capacity and a router that switches
        none off, that is every one of the T·k, read from the shape: the host does not wait for the device
        (``int(counts.sum())`` would), so a GPU step has no synchronization and can be captured in a CUDA graph."""
        if capacity is None and self.router.keeps_every_assignment():
            return expert_ids.numel()
        return int(counts.sum())

    def _apply_weights_on(self, buffer, rows, weights, expert_ids):
        """weights_on="input" (Llama-4, y = Σ_s expert(w_s · x)): row r of (t, s) becomes w[t, s] · x[t], and
        the rows are combined with weight 1. Unchanged for "output" (y = Σ_s w_s · expert(x))."""
        if self.weights_on == "output":
            return buffer, weights
        num_rows = buffer.shape[0]                          # row_weight[rows[t, s]] = w[t, s], differentiable;
        target = torch.where(rows >= 0, rows, num_rows)     # a dropped (t, s) writes a spare last row, cut off
        row_weight = weights.new_zeros(num_rows + 1).index_put((target.reshape(-1),), weights.reshape(-1))[:num_rows]
        return buffer * row_weight.to(buffer.dtype)[:, None], (expert_ids >= 0).to(weights.dtype)

    def _apply_expert_dropout(self, expert_out: torch.Tensor) -> torch.Tensor:
        """expert_dropout=p while training (NLLB-MoE): keep each element with probability 1 − p, times
        1 / (1 − p); the mask is recorded in last_routing.random_draws. Unchanged otherwise."""
        p = self.expert_dropout
        if not (p and self.training):
            return expert_out
        keep = torch.empty_like(expert_out).bernoulli_(1 - p)
        self.last_routing.random_draws["expert_dropout"] = keep
        return expert_out * (keep / (1 - p))

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
        kept_before = (route.expert_ids >= 0).sum()            # tensors: the host never waits for the device
        return RoutingRecord(
            expert_ids=expert_ids.detach(), weights=weights.detach(), tokens_per_expert=counts.detach(),
            dropped=kept_before - counts.sum(), capacity=capacity,
            logits=route.logits.detach(), probs=None if route.probs is None else route.probs.detach(),
            random_draws={key: value.detach() for key, value in route.random_draws.items()})

    def extra_repr(self) -> str:
        shared = f", num_shared_experts={self.num_shared_experts}" if self.num_shared_experts else ""
        shared += ", output_bias=True" if self.output_bias is not None else ""
        shared += f", weights_on={self.weights_on!r}" if self.weights_on != "output" else ""
        return (f"num_experts={self.num_experts}, {self._size_repr()}{shared}, router={self.router_name!r}, "
                f"backend={self.backend_name!r}, expert_runner={self.expert_runner!r}")

    def _size_repr(self) -> str:
        return f"top_k={self.top_k}"
