"""A cost model of one training step under TED parallelism: predict before you run.

Background: docs/moe_systems.md §4 (the α–β model, 2DH all-to-all, pipelining); TED is Singh et al. 2023,
arXiv 2303.06318; the choice of pipeline degree follows FSMoE (Pan et al. 2025, arXiv 2501.10714).

Inputs: the model's shape and routing load (:class:`MoEShape`), the parallel layout
(:class:`Layout`: tp × ep × dp, token dropping, hierarchical all-to-all, pipeline degree) and the
machine (:class:`Hardware`: latency α and inverse bandwidth β inside and between nodes, the compute
rate, ranks per node). Output: seconds per step on the slowest rank, split into parts.

Placement (layout.py): ``rank = (dp_index · ep + ep_index) · tp + tp_index``, G ranks per node, so a
tp group is G-local when tp ≤ G, an expert group has ``g = max(1, G / tp)`` of its ranks on each node.

Collective costs, one rank's view, ``B`` = bytes of its buffer (ring algorithms, Thakur et al.):

    all-to-all, flat          α·(P−1) + β_intra·B·(g−1)/P + β_inter·B·(P−g)/P       (α = α_inter once P > g)
    all-to-all, hierarchical  α_intra·(g−1) + β_intra·B·(g−1)/g  +  α_inter·(N−1) + β_inter·B·(N−1)/N,  N = P/g
    all-reduce (ring)         2·(n−1)·α + 2·(n−1)/n · B·β
    all-gather (ring)         (n−1)·α + (n−1)/n · B·β                   (B = the gathered size)

Per MoE block and step (T = tokens of one batch shard, d = d_model, h = d_hidden, k = top_k,
m = matrices per expert (3 SwiGLU, 2 GELU), S = seq_len, s = 1/tp with token dropping else 1):

    compute, forward    attention 2·T·4d²/tp + 2·T·S·d/tp  +  gate 2·T·d·E  +  experts 2·m·d·h · k·T·s·imbalance
    compute, backward   2 × forward
    tensor parallel     1 all-reduce of T·d forward (row-parallel output) + 1 backward (before column-parallel)
    all-to-all          scatter + gather forward, the same two backward, each of k·T·s·imbalance rows of d
    token dropping      + 1 all-gather of the k·T rows in the tp group forward, 1 backward
    pipelining (D)      each pass:  s1 + s2 + s3 + (D−1)·max(s1 + s3, s2)  with s1, s3 = one chunk's
                        two exchanges (α paid per chunk, β·B/D) and s2 = one chunk's expert compute
                        (forward: C/D; backward: 2C/D — pipeline.py overlaps both passes, forward in
                        D_f = pipeline_degree chunks, backward in D_b = backward_pipeline_degree).

FSMoE's view of one pipelined layer (:class:`LayerTasks`, :func:`choose_pipeline_degrees`): every task
costs α + β·n per chunk — an exchange chunk α_a + β_a·B/D, an expert chunk α_c + β_c·rows/D — and the
two passes are minimized separately over powers of 2 (autotune.py measures the α's and β's online).

FSMoE's gradient partitioning (:func:`gradient_piece_bytes`, :func:`plan_gradient_pieces`): the
replicated gradients' all-reduce in pieces of B* bytes, each posted as soon as its gradients are ready,
B* = max((W − a)/b, a·(1 − s)/(s·b)) for a piece cost a + b·B and an idle-link window W per MoE layer,
and a piece closed where an MoE layer's expert backward (the window) comes between two gradients. In a
step (``Layout.gradient_partitioning``) block l's pieces hide in block l−1's backward, W = that backward
minus the time its exchanges hold the link; block 0's and the embeddings' gradients stay exposed.

FasterMoE's shadowing in a step (``Layout.shadowed_experts``, :func:`choose_shadowing`): the hot expert's
rows are computed where they are, so the busiest rank carries the mean load (imbalance 1), and per MoE
layer its weights are broadcast (scatter + all-gather) and their gradients all-reduced over the expert group.

Per step: the gradient all-reduces (non-expert over the ep·dp data group, experts over dp — and
over tp too when tokens are dropped) and an overhead per layer, fixed plus per token (Python,
kernel launches, norms, softmaxes: what the matmul flop count leaves out), expressed in equivalent
flops so it slows down with the compute rate when ranks share cores.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class MoEShape:
    tokens_per_rank: int                 # T: tokens of one batch shard (what one (ep, dp) position reads per step)
    d_model: int
    d_hidden: int
    num_experts: int
    top_k: int
    n_layer: int                         # blocks, each attention + MoE feed-forward
    seq_len: int = 1024
    vocab_size: int = 50_257
    expert_matrices: int = 3             # 3 SwiGLU, 2 GELU
    bytes_per_element: int = 2           # activations and gradients on the wire (bf16 = 2, float32 = 4)
    load_imbalance: float = 1.0          # rows of the busiest expert-rank / mean rows (≥ 1, from routing stats)


@dataclass(frozen=True)
class Layout:
    tp: int
    ep: int
    dp: int
    drop_duplicate_tokens: bool = False
    drop_duplicate_at: str = "combined"  # the tp all-gather moves [T, d] ("combined") or [k·T, d] ("expert_rows")
    expert_tensor_parallel: bool = False  # experts' hidden units split over tp (expert_tensor_parallel.py)
    activation_checkpointing: bool = False  # one more forward per step (recompute.py: no extra messages)
    hierarchical: bool = False
    pipeline_degree: int = 1
    backward_pipeline_degree: int | None = None   # None = the same as pipeline_degree (FSMoE: chosen separately)
    gradient_partitioning: bool = False   # FSMoE: replicated gradients all-reduced in pieces during the backward
    shadowed_experts: int = 0             # FasterMoE: hot experts broadcast per MoE layer and step (0 or 1 here)

    @property
    def world(self) -> int:
        return self.tp * self.ep * self.dp


@dataclass(frozen=True)
class Hardware:
    alpha_intra: float                   # seconds per message inside a node
    beta_intra: float                    # seconds per byte inside a node
    alpha_inter: float                   # seconds per message between nodes
    beta_inter: float                    # seconds per byte between nodes
    flops_per_second: float              # sustained compute rate of one rank
    ranks_per_node: int
    overhead_flops_per_layer: float = 0.0   # fixed cost per block and step, in equivalent flops
    overhead_flops_per_token: float = 0.0   # per block and token: the small element-wise work the flop count omits


# ----------------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------------
def allreduce_time(nbytes: float, n: int, span: int, hw: Hardware) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks spread over ``span`` consecutive ranks: a reduce-scatter
    and an all-gather, each (n−1)·α + (n−1)/n·B·β, so 2·(n−1)·α + 2·(n−1)/n·B·β."""
    return 2 * allgather_time(nbytes, n, span, hw)


def allgather_time(nbytes: float, n: int, span: int, hw: Hardware) -> float:
    """Ring all-gather whose result has ``nbytes``."""
    if n == 1:
        return 0.0
    # (α, β): intra-node when the group's ``span`` consecutive ranks fit in a node
    alpha, beta = (hw.alpha_intra, hw.beta_intra) if span <= hw.ranks_per_node else (hw.alpha_inter, hw.beta_inter)
    return (n - 1) * alpha + (n - 1) / n * nbytes * beta


def alltoall_time(nbytes: float, P: int, tp: int, hw: Hardware, hierarchical: bool, chunks: int = 1) -> float:
    """One all-to-all of an expert group of P ranks (tp apart), ``nbytes`` per rank, in ``chunks`` pieces (one piece's time)."""
    if P == 1:
        return 0.0
    g = min(P, max(1, hw.ranks_per_node // tp))          # expert-group ranks per node
    piece = nbytes / chunks
    if g == P:                                            # the whole group on one node
        return hw.alpha_intra * (P - 1) + hw.beta_intra * piece * (P - 1) / P
    if not hierarchical:
        return (hw.alpha_inter * (P - 1) + hw.beta_intra * piece * (g - 1) / P
                + hw.beta_inter * piece * (P - g) / P)
    N = P // g
    return (hw.alpha_intra * (g - 1) + hw.beta_intra * piece * (g - 1) / g
            + hw.alpha_inter * (N - 1) + hw.beta_inter * piece * (N - 1) / N)


# ----------------------------------------------------------------------------------------------------
# A step
# ----------------------------------------------------------------------------------------------------
def predict_step(shape: MoEShape, layout: Layout, hw: Hardware) -> dict[str, float]:
    """Seconds per training step of one rank, by part: compute, tp_allreduce, alltoall, tp_allgather,
    grad_allreduce, overhead, total."""
    s, tp, ep, dp = shape, layout.tp, layout.ep, layout.dp
    T, d, h, E, k, b = s.tokens_per_rank, s.d_model, s.d_hidden, s.num_experts, s.top_k, s.bytes_per_element
    share = 1 / tp if layout.drop_duplicate_tokens else 1.0
    # Shadowing the hot expert (FasterMoE) computes its rows where they are: the busiest rank's extra load
    # (imbalance − 1) no longer arrives there; each shadowed expert's weights travel instead (below).
    imbalance = 1.0 if layout.shadowed_experts else s.load_imbalance
    rows = k * T * share * imbalance                                          # rows this rank sends / computes
    rate = hw.flops_per_second

    attention = 2 * T * 4 * d * d / tp + 2 * T * s.seq_len * d / tp
    gate = 2 * T * d * E
    experts = 2 * s.expert_matrices * d * h * rows
    other_fwd = (attention + gate) / rate
    expert_fwd = experts / rate

    a2a = alltoall_time(rows * d * b, ep, tp, hw, layout.hierarchical)        # one exchange, unchunked
    a2a_alpha = alltoall_time(0.0, ep, tp, hw, layout.hierarchical)          # its latency part (paid per chunk)
    D_f = layout.pipeline_degree
    D_b = layout.backward_pipeline_degree or D_f
    moe_fwd = overlapped_pass(D_f, a2a_alpha, a2a - a2a_alpha, 0.0, expert_fwd)
    moe_bwd = overlapped_pass(D_b, a2a_alpha, a2a - a2a_alpha, 0.0, 2 * expert_fwd)
    alltoall_part = (moe_fwd - expert_fwd) + (moe_bwd - 2 * expert_fwd)       # exposed exchange time

    tp_allreduce = 2 * allreduce_time(T * d * b, tp, tp, hw)
    etp = layout.expert_tensor_parallel and tp > 1
    if etp:     # fwd + bwd: all-reduce the partial outputs (the same rows on every tp rank), or with dropping
        # all-gather the received rows + reduce-scatter the outputs: the same ring cost, 2 all-gathers' worth
        tp_allreduce += 2 * allreduce_time(k * T * d * b * s.load_imbalance, tp, tp, hw)
    gathered_rows = T if layout.drop_duplicate_at == "combined" else k * T                # TED: the combined output
    tp_allgather = 2 * allgather_time(gathered_rows * d * b, tp, tp, hw) if layout.drop_duplicate_tokens else 0.0

    # FasterMoE's shadowing: per shadowed expert, a broadcast of its weights and an all-reduce of their gradients.
    expert_weight_bytes = s.expert_matrices * d * h * b / (tp if etp else 1)
    broadcast = 2 * allgather_time(expert_weight_bytes, ep, ep * tp, hw)     # scatter + all-gather (van de Geijn)
    shadow = layout.shadowed_experts * (broadcast + allreduce_time(expert_weight_bytes, ep, ep * tp, hw))

    forwards = 4 if layout.activation_checkpointing else 3      # forward + backward (2×), + the recomputation
    per_layer = {"compute": forwards * (other_fwd + expert_fwd), "tp_allreduce": tp_allreduce,
                 "alltoall": alltoall_part, "tp_allgather": tp_allgather, "shadowing": shadow}
    out = {key: value * s.n_layer for key, value in per_layer.items()}

    block_params = 4 * d * d / tp + d * E + 4 * d                             # replicated, per block
    embedding_params = (s.vocab_size + s.seq_len) * d
    expert_params = s.n_layer * (E / ep) * s.expert_matrices * d * h / (tp if etp else 1)
    expert_group = dp * (tp if layout.drop_duplicate_tokens and not etp else 1)   # copies of my experts to sum over
    expert_span = layout.world if dp > 1 else tp
    replicated = allreduce_time((s.n_layer * block_params + embedding_params) * b, ep * dp, layout.world, hw)
    if layout.gradient_partitioning:
        # FSMoE: block l's gradients travel in pieces during block l−1's backward, while the data group's link
        # is idle: W = the block's backward (attention + MoE) minus the time its two exchanges hold the link.
        # The first block's and the embeddings' gradients come last, with no backward left to hide them.
        exchanges = 2 * (D_b * a2a_alpha + (a2a - a2a_alpha))                  # α per chunk, the bytes once
        window = max(0.0, 2 * other_fwd + moe_bwd - exchanges)
        a, beta_piece = allreduce_piece_cost(ep * dp, layout.world, hw)
        smallest, piece = gradient_piece_bytes(a, beta_piece, window)
        block_bytes = block_params * b
        if not np.isfinite(smallest):                                        # b = 0: one piece of everything
            blocks, sent = s.n_layer, a + beta_piece * s.n_layer * block_bytes
        elif block_bytes >= smallest:                                        # each block in pieces of ≤ B*
            blocks, sent = 1, np.ceil(block_bytes / piece) * a + beta_piece * block_bytes
        else:                                      # blocks gathered until a piece holds B_min (plan_gradient_pieces)
            blocks = int(min(s.n_layer, np.ceil(smallest / block_bytes)))
            sent = a + beta_piece * blocks * block_bytes
        groups = int(np.ceil(s.n_layer / blocks))                            # pieces (or runs of pieces) per step
        replicated = ((groups - 1) * max(0.0, sent - blocks * window)       # what the windows do not hide
                      + sent + allreduce_time(embedding_params * b, ep * dp, layout.world, hw))   # the last: exposed
    out["grad_allreduce"] = replicated + allreduce_time(expert_params * b, expert_group, expert_span, hw)
    out["overhead"] = s.n_layer * (hw.overhead_flops_per_layer + hw.overhead_flops_per_token * T) / rate
    out["total"] = sum(out.values())
    return out


def choose_pipeline_degree(shape: MoEShape, layout: Layout, hw: Hardware, max_degree: int = 16) -> int:
    """The pipeline degree D in 1..max_degree with the smallest predicted step time (FSMoE picks D this way)."""
    times = {D: predict_step(shape, replace(layout, pipeline_degree=D), hw)["total"] for D in range(1, max_degree + 1)}
    return min(times, key=times.get)


def choose_step_degrees(shape: MoEShape, layout: Layout, hw: Hardware, max_degree: int = 16) -> tuple[int, int]:
    """(D_f, D_b), powers of 2 up to ``max_degree``, each minimizing the predicted step with the other pass
    unpipelined (the passes share no term; the gradient pieces' window depends on D_b, so it is in the search)."""
    candidates = [2 ** i for i in range(max_degree.bit_length()) if 2 ** i <= max_degree]

    def step(forward, backward):
        return predict_step(shape, replace(layout, pipeline_degree=forward, backward_pipeline_degree=backward),
                            hw)["total"]
    return (min(candidates, key=lambda D: step(D, 1)), min(candidates, key=lambda D: step(1, D)))


def choose_shadowing(shape: MoEShape, layout: Layout, hw: Hardware) -> int:
    """FasterMoE's decision in this model: shadow the hot expert (1) when it lowers the predicted step, else 0."""
    return min((0, 1), key=lambda n: predict_step(shape, replace(layout, shadowed_experts=n), hw)["total"])


# ----------------------------------------------------------------------------------------------------
# One pipelined layer, FSMoE's way: every task α + β·n per chunk
# ----------------------------------------------------------------------------------------------------
def overlapped_pass(degree: int, exchange_alpha: float, exchange_seconds: float,
                    compute_alpha: float, compute_seconds: float, inter_alpha: float = 0.0,
                    inter_seconds: float = 0.0) -> float:
    """One pass of the layer in ``degree`` chunks: scatter (s1), experts (s2), gather (s3) per chunk,

        s1 = s3 = α_a + β_a·B / D,   s2 = α_c + β_c·rows / D,   time = s1 + s2 + s3 + (D − 1)·max(s1 + s3, s2)

    (the first chunk fills the pipeline, then the slower of "two exchanges" and "compute" sets the pace).
    ``exchange_seconds`` = β_a·B and ``compute_seconds`` = β_c·rows of the whole, unchunked layer.

    A hierarchical exchange co-scheduled with the compute (pipeline.py, hierarchical.py) has two links:
    ``exchange_*`` is then its intra-node phase and ``inter_*`` its inter-node phase, s_o = α_o + β_o·B / D
    per chunk, each phase on its own lane:

        time = 2·(s1 + s_o) + s2 + (D − 1)·max(2·s1, 2·s_o, s2)

    which is the formula above when s_o = 0 (a flat exchange, or a hierarchical one measured as one task)."""
    s1 = exchange_alpha + exchange_seconds / degree
    s_o = inter_alpha + inter_seconds / degree                     # 0 for a flat exchange
    s2 = compute_alpha + compute_seconds / degree
    return 2 * (s1 + s_o) + s2 + (degree - 1) * max(2 * s1, 2 * s_o, s2)


@dataclass(frozen=True)
class LayerTasks:
    """The measured tasks of one MoE layer on its busiest rank (autotune.py), each α + β·n."""
    exchange_alpha: float                # seconds of one all-to-all, whatever its size: α·(P − 1)
    exchange_seconds: float              # β·B: the size-dependent part of one whole scatter (or gather)
    compute_alpha: float                 # seconds of one expert call, whatever its rows (launches, Python)
    compute_seconds: float               # β_c·rows: the size-dependent part of the experts' whole forward
    inter_alpha: float = 0.0             # hierarchical exchange: its inter-node phase's α (exchange_*: the
    inter_seconds: float = 0.0           # intra-node phase's) and β·B, measured apart


def predict_layer(tasks: LayerTasks, forward_degree: int, backward_degree: int) -> dict[str, float]:
    """Seconds of the layer's exchange + experts: forward (D_f chunks), backward (D_b chunks, twice the
    compute per row: input and weight gradients), total."""
    t = tasks
    forward = overlapped_pass(forward_degree, t.exchange_alpha, t.exchange_seconds, t.compute_alpha, t.compute_seconds,
                              t.inter_alpha, t.inter_seconds)
    backward = overlapped_pass(backward_degree, t.exchange_alpha, t.exchange_seconds, t.compute_alpha,
                               2 * t.compute_seconds, t.inter_alpha, t.inter_seconds)
    return {"forward": forward, "backward": backward, "total": forward + backward}


def choose_pipeline_degrees(tasks: LayerTasks, max_degree: int = 16) -> tuple[int, int]:
    """(D_f, D_b), powers of 2 up to ``max_degree``, with the smallest predicted forward and backward times.

    The two passes do not share a term, so each degree is chosen on its own; ties go to the smaller D."""
    candidates = [2 ** i for i in range(max_degree.bit_length()) if 2 ** i <= max_degree]
    forward = min(candidates, key=lambda D: predict_layer(tasks, D, 1)["forward"])
    backward = min(candidates, key=lambda D: predict_layer(tasks, 1, D)["backward"])
    return forward, backward


# ----------------------------------------------------------------------------------------------------
# Gradient pieces: FSMoE's adaptive gradient partitioning (gradient_partitioning.py)
# ----------------------------------------------------------------------------------------------------
PIECE_LATENCY_SHARE = 0.5        # s: a piece's fixed cost may be at most this share of its time; 1/2 makes
                                 # B_min = a/b, Hockney's n½ (the size that reaches half the bandwidth)


def allreduce_piece_cost(n: int, span: int, hw: Hardware) -> tuple[float, float]:
    """(a, b) of one all-reduce message, ``t(B) = a + b·B``, from the ring formula of :func:`allreduce_time`:
    a = 2(n−1)·α, b = 2(n−1)/n·β. (gradient_partitioning.py measures a and b directly instead.)"""
    a = allreduce_time(0.0, n, span, hw)
    return a, allreduce_time(1.0, n, span, hw) - a


def gradient_piece_bytes(a: float, b: float, window_seconds: float,
                         latency_share: float = PIECE_LATENCY_SHARE) -> tuple[float, float]:
    """(B_min, B*): the smallest worthwhile and the target size of one piece of the replicated gradients'
    all-reduce (FSMoE, Pan et al. 2025).

    A piece of B bytes costs ``t(B) = a + b·B`` (a = its fixed cost per message, b = seconds per byte).
    While an MoE layer's backward runs its expert GEMMs the link is idle for ``W = window_seconds``:

        hidden by one layer:     t(B) ≤ W          ⇔   B ≤ B_fit = (W − a) / b
        latency not dominant:    a ≤ s · t(B)      ⇔   B ≥ B_min = a·(1 − s) / (s·b)   (s = latency_share;
                                                            s = 1/2: B_min = a/b, Hockney's n½)

        B* = max(B_fit, B_min)

    B* is the largest piece that one layer's idle link hides (fewest messages, fewest α), but never one so
    small that α is more than s of its time — when W is shorter than that (B_fit < B_min) no useful piece
    fits and B_min wins. b = 0 (the bandwidth term too small to measure): one piece, B_min = B* = ∞.
    """
    if b <= 0:
        return float("inf"), float("inf")
    fit = (window_seconds - a) / b                             # B_fit: t(B) = a + b·B ≤ W
    smallest = a * (1 - latency_share) / (latency_share * b)   # B_min: a / t(B) ≤ s
    return smallest, max(fit, smallest)


def plan_gradient_pieces(sizes: list[int], piece_bytes: float, smallest_bytes: float = 0.0,
                         window_starts: frozenset[int] | set[int] = frozenset()) -> list[int]:
    """Cut gradients of ``sizes`` bytes (in the order they become ready) into consecutive pieces. Returns how
    many gradients each piece holds: ``[3, 1, 5]`` = the first three, then the fourth alone, then the rest.

    A piece is all-reduced as soon as its last gradient is ready, so it travels while the backward computes
    the rest (gradient_partitioning.py). The current piece is closed before gradient i when

        current + sizes[i] > piece_bytes                      it would not fit in one window (B*); a larger
                                                              gradient is a piece alone
        i ∈ window_starts and current ≥ smallest_bytes        an MoE layer's expert backward (an idle window)
                                                              comes between: send what is ready (if ≥ B_min)
    """
    counts, current, current_bytes = [], 0, 0
    for i, size in enumerate(sizes):
        too_big = current_bytes + size > piece_bytes
        window = i in window_starts and current_bytes >= smallest_bytes
        if current and (too_big or window):
            counts.append(current)
            current, current_bytes = 0, 0
        current += 1
        current_bytes += size
    if current:
        counts.append(current)
    return counts


# ----------------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------------
def fit_alpha_beta(points: list[dict]) -> tuple[float, float]:
    """α, β of ``t = α·(P−1) + β·bytes_per_rank`` by least squares on relative error.

    ``points``: ``{"ranks": P, "bytes_per_rank": bytes, "seconds": t}``. Each equation is divided
    by its t, so small and large messages weigh alike (times span orders of magnitude).
    """
    design = np.array([[p["ranks"] - 1, p["bytes_per_rank"]] for p in points], dtype=float)
    times = np.array([p["seconds"] for p in points], dtype=float)
    (alpha, beta), *_ = np.linalg.lstsq(design / times[:, None], np.ones_like(times), rcond=None)
    return max(float(alpha), 0.0), max(float(beta), 0.0)


def fit_task(points: list[tuple[float, float]]) -> tuple[float, float]:
    """α, β of ``t = α + β·n`` from ``(n, t)`` points, least squares on relative error (as fit_alpha_beta).

    Times are clamped to a nanosecond, so an instant measurement cannot divide by zero. It is
    fit_alpha_beta's fit with P = 2 (one message: α·(P−1) = α) and n in the place of the bytes."""
    return fit_alpha_beta([{"ranks": 2, "bytes_per_rank": n, "seconds": max(t, 1e-9)} for n, t in points])
