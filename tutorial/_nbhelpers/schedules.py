"""Helpers of tutorial/06_schedules.py: the layer's tasks as data, and the drawing code of its figures.

The notebook keeps the parts it teaches in its cells (the list-scheduling simulation ``place_pass``, the
gradient pieces' ``fill_idle_time``, the scenarios); what is only bookkeeping or plotting lives here, so
that no cell is a screenful of matplotlib. In the notebook, ``show_source(name)`` prints any of these
functions with syntax highlighting.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import numpy as np
import torch

from fastmoe_edu.distributed import cost_model
from fastmoe_edu.distributed.shadowing import ShadowRates

# --------------------------------------------------------------------------------------------------
# Section 1: one MoE layer's tasks, each α + β·n
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One MoE layer on its busiest rank: every task as (α, β·n) seconds for the whole, unchunked layer."""
    intra: tuple[float, float]          # phase 1 of one exchange (scatter or gather)
    inter: tuple[float, float]          # phase 2 of it
    experts: tuple[float, float]        # the experts' forward on all the rows
    grad_sizes: tuple                   # (name, bytes) of one block's replicated gradients (section 3)
    hw: cost_model.Hardware
    ranks: int

    def chunk(self, task: str, degree: int, factor: float = 1.0) -> float:
        """Seconds of one of ``degree`` chunks of a task: α + factor · β·n / D."""
        alpha, size_part = getattr(self, task)
        return alpha + factor * size_part / degree

    def tasks(self) -> cost_model.LayerTasks:
        """FSMoE's view (cost_model.LayerTasks): the exchange as one task, both phases together."""
        return cost_model.LayerTasks(exchange_alpha=self.intra[0] + self.inter[0],
                                     exchange_seconds=self.intra[1] + self.inter[1],
                                     compute_alpha=self.experts[0], compute_seconds=self.experts[1])


def alpha_and_size_part(seconds_of) -> tuple[float, float]:
    """Split a cost t(n) = α + β·n into (α, β·n) by evaluating it at 0 and at n."""
    alpha = seconds_of(0.0)
    return alpha, seconds_of(1.0) - alpha


def build_layer(shape: cost_model.MoEShape, hw: cost_model.Hardware, ranks: int, expert_call_us: float) -> Layer:
    """The tasks of one MoE layer of ``shape`` on ``ranks`` ranks of ``hw``, priced by the cost model."""
    s = shape
    rows = s.top_k * s.tokens_per_rank * s.load_imbalance              # rows the busiest rank sends and computes
    buffer_bytes = rows * s.d_model * s.bytes_per_element
    intra_only = replace(hw, alpha_inter=0.0, beta_inter=0.0)           # the network free: phase 1 is left
    inter_only = replace(hw, alpha_intra=0.0, beta_intra=0.0)           # NVLink free: phase 2 is left
    intra = alpha_and_size_part(lambda f: cost_model.alltoall_time(f * buffer_bytes, ranks, 1, intra_only, True))
    inter = alpha_and_size_part(lambda f: cost_model.alltoall_time(f * buffer_bytes, ranks, 1, inter_only, True))
    flops = 2 * s.expert_matrices * s.d_model * s.d_hidden * rows
    # One block's replicated weights, the count cost_model.predict_step uses (4·d² + d·E + 4·d), in the
    # order the backward finishes their gradients: router, second norm, attention (out, v, k, q), first norm.
    d, b = s.d_model, s.bytes_per_element
    replicated = (("router", d * s.num_experts), ("norm 2", 2 * d), ("attention out", d * d), ("attention v", d * d),
                  ("attention k", d * d), ("attention q", d * d), ("norm 1", 2 * d))
    return Layer(intra=intra, inter=inter, experts=(expert_call_us * 1e-6, flops / hw.flops_per_second),
                 grad_sizes=tuple((name, count * b) for name, count in replicated), hw=hw, ranks=ranks)


# --------------------------------------------------------------------------------------------------
# Sections 2-4: the timeline
# --------------------------------------------------------------------------------------------------
LANES = ["intra-node link", "inter-node link", "expert compute", "gradient all-reduce"]


@dataclass
class Bar:
    lane: str
    label: str          # "scatter", "gather", "experts", "grad-gather", ... "gradient piece" or "exposed all-reduce"
    chunk: int          # the chunk, or for the gradient all-reduce the piece (0, 1, ...)
    start: float
    end: float


def makespan(bars: list[Bar]) -> float:
    return max(bar.end for bar in bars)


KIND_HATCH = {"scatter": "", "grad-gather": "", "gather": "//", "grad-scatter": "//", "experts": "",
              "gradient piece": "", "exposed all-reduce": "xx"}
# Gradient pieces: purple while hidden behind the backward, red once exposed; the shade alternates from one
# piece to the next in both colours, so a piece keeps its shade when it runs past the backward's end.
PIECE_SHADES = {"gradient piece": ("tab:purple", "plum"), "exposed all-reduce": ("tab:red", "lightsalmon")}


def draw_timeline(ax, bars: list[Bar], degree: int, title: str, t_max: float | None = None, xlabel: bool = True):
    """One pass as a Gantt chart: a row per lane, a bar per task; colour = chunk, hatched = the way home.
    Gradient pieces: purple (hidden) or red and cross-hatched (exposed), alternating shades per piece, each
    piece named once ("piece 1", "piece 2", ...) on its longest bar."""
    colours = plt.cm.viridis(np.linspace(0.05, 0.95, max(degree, 1)))
    groups = {}                                   # one broken_barh per (lane, hatch): fast to draw
    longest = {}                                  # piece -> its longest bar, for the label
    for bar in bars:
        if bar.end - bar.start <= 0:
            continue
        if bar.label in PIECE_SHADES:
            colour = PIECE_SHADES[bar.label][bar.chunk % 2]
            if bar.end - bar.start > longest.get(bar.chunk, (0.0, None))[0]:
                longest[bar.chunk] = (bar.end - bar.start, bar)
        else:
            colour = colours[bar.chunk % len(colours)]
        spans, facecolours = groups.setdefault((bar.lane, KIND_HATCH[bar.label]), ([], []))
        spans.append((bar.start * 1e3, (bar.end - bar.start) * 1e3))
        facecolours.append(colour)
    for (lane, hatch), (spans, facecolours) in groups.items():
        row = LANES.index(lane)
        ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=facecolours, edgecolor="black", linewidth=0.4, hatch=hatch)
    width = (t_max or makespan(bars)) * 1e3 * 1.02
    for piece, (length, bar) in longest.items():
        if len(longest) > 1 and length * 1e3 > 0.04 * width:     # several pieces, and only where the name fits
            ax.text((bar.start + bar.end) / 2 * 1e3, LANES.index(bar.lane), f"piece {piece + 1}", ha="center",
                    va="center", fontsize=8, color="black",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
    ax.set_yticks(range(len(LANES)), LANES)
    ax.set_ylim(len(LANES) - 0.5, -0.5)
    ax.set_xlim(0, width)
    if xlabel:
        ax.set_xlabel("ms")
    ax.set_title(title, fontsize=10)


def draw_schedule(data: dict, degrees: list[int], settings: dict, partition: bool) -> None:
    """Section 4's figure: both passes as timelines (left) and each pass's time against its degree (right)."""
    fwd, bwd, chosen, curves = data["forward_bars"], data["backward_bars"], data["chosen"], data["curves"]
    D_f, D_b = settings["D_f"], settings["D_b"]
    fig = plt.figure(figsize=(14, 6.2))
    grid = fig.add_gridspec(2, 2, width_ratios=[2.2, 1])
    t_max = max(data["forward"], data["backward"] + data["exposed"])
    ax_f, ax_b = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
    draw_timeline(ax_f, fwd, D_f, f"forward, D_f = {D_f}: {data['forward'] * 1e3:.2f} ms", t_max, xlabel=False)
    pieces_text = f"gradient pieces: {data['pieces']}" if partition else "all-reduce after the backward"
    draw_timeline(ax_b, bwd, D_b, f"backward, D_b = {D_b}: {data['backward'] * 1e3:.2f} ms + exposed all-reduce "
                  f"{data['exposed'] * 1e3:.2f} ms ({pieces_text})", t_max)
    for row, (name, degree, best) in enumerate((("forward", D_f, chosen[0]), ("backward", D_b, chosen[1]))):
        ax = fig.add_subplot(grid[row, 1])
        ax.plot(degrees, curves[name]["model"] * 1e3, "-", color="tab:blue", label="cost model (predict_layer)")
        ax.plot(degrees, curves[name]["timeline"] * 1e3, ".", color="tab:orange", label="timeline")
        ax.plot([best], [curves[name]["model"][best - 1] * 1e3], "*", ms=14, color="tab:red",
                label=f"choose_pipeline_degrees: {best}")
        ax.axvline(degree, color="grey", ls=":")
        ax.set(xscale="log", xticks=[1, 2, 4, 8, 16, 32], xticklabels=[1, 2, 4, 8, 16, 32],
               xlabel=f"{name} degree", ylabel="ms")
        ax.set_title(f"{name} pass against its degree", fontsize=10)
        ax.legend(fontsize=7)
    s = settings
    fig.suptitle(f"step of this layer = forward + backward + exposed all-reduce = {data['step'] * 1e3:.2f} ms   "
                 f"({s['ranks_per_node']} ranks per node, {s['tokens']} tokens, d_model {s['d_model']}, "
                 f"α_inter {s['alpha_inter_us']:.0f} µs, {s['inter_GBps']:.3g} GB/s)", fontsize=10)
    fig.subplots_adjust(left=0.115, right=0.98, top=0.9, bottom=0.09, hspace=0.35, wspace=0.18)
    plt.show()


# --------------------------------------------------------------------------------------------------
# Section 5: shadowing
# --------------------------------------------------------------------------------------------------
def zipf_counts(skew: float, ranks: int, experts: int, rows_per_rank: int, seed: int = 0) -> torch.Tensor:
    """counts[w, e]: rows of rank w for expert e, every rank drawing from the same Zipf-like popularity."""
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(experts)               # expert e is the (popularity[e] + 1)-th most popular
    share = 1.0 / (popularity + 1.0) ** skew
    share /= share.sum()
    return torch.tensor(np.stack([rng.multinomial(rows_per_rank, share) for _ in range(ranks)]), dtype=torch.int64)


def modelled_rates(hw: cost_model.Hardware, ranks: int, probe_bytes_per_peer: int) -> ShadowRates:
    """β and γ as shadowing.measure_rates would find them on the modelled cluster: its probe all-to-all
    (probe_bytes_per_peer to every peer) timed by the cost model, per byte sent; γ = 1 / flops per second."""
    seconds = cost_model.alltoall_time(ranks * probe_bytes_per_peer, ranks, 1, hw, hierarchical=True)
    return ShadowRates(seconds_per_byte=seconds / ((ranks - 1) * probe_bytes_per_peer),
                       seconds_per_flop=1 / hw.flops_per_second)


def rows_per_rank(counts: torch.Tensor, shadowed: list[int], num_local: int) -> dict:
    """Rows each rank sends, receives and computes when ``shadowed`` experts are shadowed (for the bars)."""
    P, E = counts.shape
    owner = torch.arange(E) // num_local
    mine = owner[None, :] == torch.arange(P)[:, None]            # [P, E]: rank w owns expert e
    travelling = counts.clone()
    travelling[:, shadowed] = 0                                  # rows of shadowed experts stay home
    sends = (travelling * ~mine).sum(1)                          # to other ranks' experts
    receives = ((travelling.sum(0)[None, :] - travelling) * mine).sum(1)   # from other ranks, for mine
    computes = counts[:, shadowed].sum(1) + (travelling.sum(0)[None, :] * mine).sum(1)
    return {"sends": sends.numpy(), "receives": receives.numpy(), "computes": computes.numpy()}


def draw_shadowing(data: dict, skews, bytes_per_element: int, cost_ratio: float) -> None:
    """Section 5's figure: per-rank link bytes and computed rows without and with shadowing, T against skew."""
    s, sweep = data, data["sweep"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.3, 1.3, 1]})
    ranks = np.arange(len(s["before"]["computes"]))
    width = 0.4
    for offset, key, colour in ((-width / 2, "before", "tab:grey"), (width / 2, "after", "tab:blue")):
        label = "without shadowing" if key == "before" else f"shadowing {s['shadowed'] or 'nothing'}"
        axes[0].bar(ranks + offset, s[key]["link_bytes"] / 1e6, width, color=colour, label=label)
        axes[1].bar(ranks + offset, s[key]["computes"], width, color=colour, label=label)
    shadow_mb = 3 * len(s["shadowed"]) * s["weights"] * bytes_per_element * cost_ratio / 1e6
    axes[0].set(xlabel="rank", ylabel="MB per step", title="bytes on each rank's link, 4·max(sent, received) rows\n"
                f"(+ shadowing {shadow_mb:.0f} MB: weights broadcast, gradients summed)")
    axes[1].set(xlabel="rank", ylabel="rows", title="rows each rank computes")
    for ax, key in ((axes[0], "link_bytes"), (axes[1], "computes")):
        ax.set_xticks(ranks)
        # Headroom above the tallest bar for the legend, so that it covers no bar (an even load fills the axes).
        ax.set_ylim(0, 1.25 * max(s["before"][key].max(), s["after"][key].max()) / (1e6 if key == "link_bytes" else 1))
        ax.legend(fontsize=7, loc="upper center", ncol=2, frameon=False)
    ax = axes[2]
    ax.plot(skews, [x["before"]["T"] * 1e3 for x in sweep], "o-", color="tab:grey", label="without shadowing")
    ax.plot(skews, [x["after"]["T"] * 1e3 for x in sweep], "s-", color="tab:blue", label="choose_shadowed's pick")
    ax.axvline(s["skew"], color="grey", ls=":")
    ax.set(xlabel="skew", ylabel="T (ms per step of the layer)", title="shadowing.predicted_time against skew")
    ax.legend(fontsize=7)
    fig.suptitle(f"skew {s['skew']:.1f}: the hottest expert gets {s['hot_share']:.0%} of the rows; shadowed "
                 f"{s['shadowed'] or 'none'}; T {s['before']['T'] * 1e3:.2f} → {s['after']['T'] * 1e3:.2f} ms "
                 f"({data['speedup']:.2f}×)", fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.8, bottom=0.12, wspace=0.22)
    plt.show()
