"""FSMoE's adaptive gradient partitioning: the replicated gradients' all-reduce, in pieces, during the backward.

    mpirun -n 8 python -m fastmoe_edu.train --pipeline_degree=auto --backward_pipeline_degree=auto \\
        --ranks_per_node=4 --gradient_partitioning=true --shadow_experts=auto

FSMoE (Pan et al. 2025, "FSMoE: A Flexible and Scalable Training System for Sparse Mixture-of-Experts
Models", arXiv 2501.10714). Without it (gradients.py) the replicated parameters' gradients (embeddings,
attention, norms, gates, shared experts) are all-reduced over the data group *after* ``backward()``
returns: the optimizer waits for the whole all-reduce, every byte of it exposed. Yet during the
backward the link is idle for long stretches — while each MoE layer's experts compute their gradients,
between the layer's two exchanges. Gradients become ready from the top of the model down (the head
and the last block first, the embeddings last), so most of them could travel long before the end:

    backward  | head | block L-1: experts ... attention | block L-2: experts ... attention | ... | embed |
    link      |      |  a2a  idle  a2a                 |  a2a  idle  a2a                  |     |       |
    pieces           [piece 0 ~~~~~~~~~~~~~~~~>]        [piece 1 ~~~~~~~~~~~~~~~~~>]        [last ~~>]
                                                                     waited for at the end: |~~|

1. :meth:`GradientPieces.__init__` (from ``ParallelRuntime.shard_model``): the replicated parameters,
   in the order their gradients become ready (reverse module order), are cut into consecutive
   *pieces* (``cost_model.gradient_piece_bytes``, ``plan_gradient_pieces``):

       t(B)  = a + b·B                       one piece's all-reduce (a, b measured here, once)
       W     = 2 · t_GEMM                    one MoE layer's expert backward: two GEMMs the size of its forward
       B_min = a·(1 − s) / (s·b) = a / b     below it α is more than s = 1/2 of a piece's time (Hockney's n½)
       B*    = max((W − a) / b, B_min)       the largest piece that one layer's idle link hides

   A piece ends where the next gradient would take it past B*, and where an MoE layer's expert
   backward comes between two gradients (the window opens: send what is ready), if it holds B_min.
   a, t_GEMM and the probe's time are the slowest rank's (one all-reduce with max), so every rank cuts
   the same pieces. Rank 0 prints the plan at start-up (``describe``).
2. Each replicated parameter gets a ``register_post_accumulate_grad_hook``. When the last gradient of
   a piece is in, the piece is flattened (``torch.cat``) and its sum posted, non-blocking
   (``Communicator.iallreduce_``), on a communicator of its own (``data_gradients``, a copy of the data
   group): only pieces travel there, always in piece order, so no rank can mix them up with the
   data group's other collectives (the balance loss's sums in the backward). Pieces are posted in
   order — piece i only after pieces 0 .. i−1 — so ranks whose gradients arrive in another order still
   post the same sequence. Each hook also tests the pieces in flight: an MPI library without a
   progress thread moves messages only inside MPI calls.
3. :meth:`GradientPieces.finish` (``reduce_gradients``, after ``backward()``): a parameter with no
   gradient takes part with zeros (as in gradients.py), the pieces not yet posted are posted, every
   piece is waited for in order (``"data_gradients/wait"``: the exposed time), scaled by 1/R and copied
   back. The expert reductions follow as before. Nothing else waits for a piece.

The sums are those of ``allreduce_gradients`` — the same ranks' gradients, scaled by the same 1/R —
up to the order in which the engine adds the ranks' values (it may depend on the message size).
16-bit gradients are summed in float32, as there. A second backward before ``finish`` (gradient
accumulation) is noticed by the hooks; ``finish`` then waits for the stale pieces and all-reduces
the accumulated gradients the ordinary way. Activation checkpointing is unaffected: its
recomputations replay forward collectives only; the hooks run in the backward, outside them.
"""
from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from ..profiling import named_range
from .communicator import PendingAllreduce
from .cost_model import PIECE_LATENCY_SHARE, gradient_piece_bytes, plan_gradient_pieces
from .gradients import _allreduce_in_buckets, _copy_back, _flat_gradients, split_parameters
from .layout import ParallelLayout
from .plan import ParallelPlan
from .stats import wall_clock

REPEATS = 3                          # timed repetitions of each probe (the fastest counts), after one warm-up
LARGEST_PROBE_BYTES = 32 * 2**20     # the bandwidth probe all-reduces at most this much


class GradientPieces:
    """The replicated gradients of ``model`` all-reduced in pieces during the backward (module docstring).

    ``tokens_per_rank``: tokens of one batch shard (sets the experts' rows for the window W).
    ``piece_bytes``: a fixed B* instead of the cost model's (tests use a small one to force many pieces).
    """

    def __init__(self, model: nn.Module, layout: ParallelLayout, plan: ParallelPlan, tokens_per_rank: int,
                 piece_bytes: float | None = None):
        self.params, window_starts = _ready_order(model, plan)
        self.scale = 1.0 / layout.data_size                              # 1/R, R = ep · dp
        self.comm = layout.data.split(color=0, key=layout.data.rank, name="data_gradients")
        sizes = [_bytes(p) for p in self.params]
        self.total_bytes = sum(sizes)
        self.costs, smallest = None, 0.0
        if piece_bytes is None:                                          # the cost model's B_min and B*
            self.costs = _calibrate(plan, self.comm, tokens_per_rank, self.total_bytes, layout)
            smallest, piece_bytes = gradient_piece_bytes(self.costs["a"], self.costs["b"], self.costs["window"])
        self.smallest_bytes, self.piece_bytes = smallest, piece_bytes
        plan = plan_gradient_pieces(sizes, piece_bytes, smallest, window_starts)
        self.posted_during_backward = 0                                  # pieces the hooks posted, last step
        self.pieces = _cut(self.params, plan)
        self.piece_of = {id(p): i for i, piece in enumerate(self.pieces) for p in piece}
        self.hooks = ([p.register_post_accumulate_grad_hook(self._gradient_ready) for p in self.params]
                      if self.comm.size > 1 else [])                # one shard: nothing to send
        self._new_round()

    # -- during the backward ---------------------------------------------------------------------
    def _new_round(self) -> None:
        self.missing = [len(piece) for piece in self.pieces]            # gradients each piece still waits for
        self.seen: set[int] = set()                                      # parameters whose hook fired
        self.posted: list[tuple[torch.Tensor, PendingAllreduce]] = []    # (flat piece, its all-reduce), in order
        self.stale = False                                               # a second backward before finish()

    def _gradient_ready(self, param: nn.Parameter) -> None:
        """Hook: ``param.grad`` is complete for this backward."""
        if self.stale:
            return
        if id(param) in self.seen:                # a second backward adds to the gradients: the posted
            self.stale = True                     # pieces are out of date; finish() does it the old way
            return
        self.seen.add(id(param))
        self.missing[self.piece_of[id(param)]] -= 1
        self._post_complete_pieces()
        for _, pending in self.posted:            # MPI: move the messages in flight along (cheap test)
            pending.test()

    @torch.no_grad()
    def _post_complete_pieces(self) -> None:
        """Post the next pieces whose gradients are all in, in piece order (the same order on every rank)."""
        while len(self.posted) < len(self.pieces) and self.missing[len(self.posted)] == 0:
            with named_range(f"gradients/piece {len(self.posted)} post"):       # (a range in a profiler's trace)
                flat = _flat_gradients(self.pieces[len(self.posted)])    # (16-bit gradients summed in float32)
                self.posted.append((flat, self.comm.iallreduce_(flat, purpose="allreduce_gradients")))

    # -- after the backward ------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> None:
        """Replicated gradients ← (1/R) Σ_ranks gradients: post what is left, wait for every piece, copy back."""
        for p in self.params:
            if p.grad is None:                    # unused on this rank: it takes part with zeros
                p.grad = torch.zeros_like(p)
        if self.comm.size == 1 or self.stale:     # one rank: only the scaling (_allreduce_in_buckets does it)
            for _, pending in self.posted:        # out of date, but every rank posted them: complete them
                pending.wait()
            _allreduce_in_buckets(self.params, self.comm, self.scale, bucket_bytes=self.total_bytes or 1)
        else:
            self.posted_during_backward = len(self.posted)               # (the tests check that it is > 0)
            self.missing = [0] * len(self.pieces)
            self._post_complete_pieces()          # the pieces no hook completed (unused parameters)
            for i, (piece, (flat, pending)) in enumerate(zip(self.pieces, self.posted)):
                with named_range(f"gradients/piece {i} wait"):
                    pending.wait()
                _copy_back(piece, flat, self.scale)                      # (1/R) Σ_r
        self._new_round()

    def remove(self) -> None:
        """Take the hooks off (the model all-reduces the ordinary way again)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    def describe(self) -> str:
        """The start-up line: the plan and, when the cost model chose it, its inputs."""
        if self.comm.size == 1:
            return "gradient partitioning: the data group has 1 rank, nothing to all-reduce"
        sizes = [sum(_bytes(p) for p in piece) for piece in self.pieces]
        shown = ", ".join(_kb(b) for b in sizes[:8]) + (", ..." if len(sizes) > 8 else "")
        line = (f"gradient partitioning: {_kb(self.total_bytes)} of replicated gradients in {len(self.pieces)} "
                f"piece(s) [{shown}], posted during the backward on {self.comm.name!r} ({self.comm.size} ranks)")
        if self.costs is None:
            return line + f"; piece size fixed at {_kb(self.piece_bytes)}"
        c = self.costs
        bandwidth = f"{1e-9 / c['b']:.3g} GB/s" if c["b"] > 0 else "bandwidth unmeasurable"
        return (line + f" | cost model: piece all-reduce a = {c['a'] * 1e6:.1f} µs + B / ({bandwidth}), "
                f"expert backward W = {c['window'] * 1e3:.3f} ms per MoE layer -> B* = max((W - a)/b, "
                f"a(1-s)/(s b)) = {_kb(self.piece_bytes)}, cut at each MoE layer once >= B_min = "
                f"{_kb(self.smallest_bytes)} (s = {PIECE_LATENCY_SHARE:g})")


def _ready_order(model: nn.Module, plan: ParallelPlan) -> tuple[list[nn.Parameter], set[int]]:
    """The replicated parameters in reverse module order (the order the backward completes their
    gradients: the head first, the embeddings last) and where an MoE layer's expert backward — an idle
    window of the link — comes between two of them (the indices of the gradients right after one)."""
    expert_ids = {id(p) for p in split_parameters(model, plan)[1]}
    ready, window_starts, experts_since = [], set(), False
    for p in reversed(list(model.parameters())):
        if id(p) in expert_ids:
            experts_since = True
        elif p.requires_grad:
            if experts_since and ready:
                window_starts.add(len(ready))
            ready.append(p)
            experts_since = False
    return ready, window_starts


# ----------------------------------------------------------------------------------------------------
# The cost model's inputs, measured once at start-up
# ----------------------------------------------------------------------------------------------------
def _calibrate(plan: ParallelPlan, comm, tokens_per_rank: int, total_bytes: int, layout: ParallelLayout) -> dict:
    """a, b of one piece's all-reduce on ``comm`` and the window W, the slowest rank's (the same everywhere)."""
    probe_bytes = max(4, min(total_bytes, LARGEST_PROBE_BYTES)) // 4 * 4
    small = _fastest(lambda: comm.allreduce_(torch.zeros(1), purpose="allreduce_gradient_probe"))     # ≈ a
    big = _fastest(lambda: comm.allreduce_(torch.zeros(probe_bytes // 4), purpose="allreduce_gradient_probe"))
    window = 2 * _expert_forward_seconds(plan, tokens_per_rank, layout)   # backward: input + weight gradients
    small, big, window = comm.allreduce_(torch.tensor([small, big, window], dtype=torch.float64), op="max",
                                         purpose="allreduce_gradient_probe").tolist()
    b = max(big - small, 0.0) / max(probe_bytes - 4, 1)                    # t(B) = a + b·B through both points
    return {"a": small, "b": b, "window": window}


def _expert_forward_seconds(plan: ParallelPlan, tokens_per_rank: int, layout: ParallelLayout) -> float:
    """One GEMM as large as one MoE layer's expert forward on this rank: rows × d_model × (w_e / d_model)
    multiply-adds, rows = top_k · T (÷ tp with duplicate token dropping), w_e = one expert's weights."""
    if not plan.layers:
        return 0.0
    layer, settings = plan.layers[0].layer, plan.layers[0].expert
    share = layout.tp_size if settings.drop_duplicate_tokens else 1
    rows = max(1, layer.top_k * tokens_per_rank // share)
    weights = sum(p[0].numel() for p in layer.experts.parameters())        # w_e: one local expert
    first = next(layer.experts.parameters())
    x = torch.randn(rows, layer.d_model, dtype=first.dtype, device=first.device)
    w = torch.randn(layer.d_model, max(1, weights // layer.d_model), dtype=first.dtype, device=first.device)
    return _fastest(lambda: x @ w, device=first.device)


def _fastest(call, device="cpu") -> float:
    """The fastest of REPEATS timed calls, after one warm-up."""
    times = []
    for repeat in range(REPEATS + 1):
        start = wall_clock(device)
        call()
        elapsed = wall_clock(device) - start                   # (both after the GPU's queued work)
        if repeat:
            times.append(elapsed)
    return min(times)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------
def _bytes(p: nn.Parameter) -> int:
    """Bytes of ``p``'s gradient on the wire (16-bit gradients travel as float32)."""
    return p.numel() * max(p.element_size(), 4 if p.dtype in (torch.float16, torch.bfloat16) else 0)


def _cut(params: list[nn.Parameter], counts: list[int]) -> list[list[nn.Parameter]]:
    """Consecutive pieces of ``counts[i]`` parameters; one flat buffer per piece, so a piece whose gradients
    differ in dtype or device is cut again where they change."""
    starts = set(accumulate(counts[:-1]))                      # where pieces 1, 2, ... begin
    pieces = []
    for i, p in enumerate(params):
        if not pieces or i in starts or (p.dtype, p.device) != (pieces[-1][0].dtype, pieces[-1][0].device):
            pieces.append([])
        pieces[-1].append(p)
    return pieces


def _kb(nbytes: float) -> str:
    return "unbounded" if nbytes == float("inf") else f"{nbytes / 1e3:,.1f} kB"
