"""MoE layer forward + backward: reference vs numba vs torch-only vs a per-token Python loop.

    python bench/bench_layer.py                          # both configurations below
    python bench/bench_layer.py --config dispatch --tokens 8192
    python bench/bench_layer.py --config fastmoe --tokens 1024 --repeats 2

Configurations (k = 2, E = 64, router softmax top-k, float32, dropless):

    dispatch   T=16384, d_model=256,  d_hidden=512,  SwiGLU experts   dispatch-heavy: little GEMM per row
    fastmoe    T=4096,  d_model=1024, d_hidden=4096, GELU experts     FastMoE's benchmark layer

Implementations, all on the same weights and input, in one process:

    reference          MoELayer(backend="reference")
    numba [segments]   MoELayer(backend="numba"), grouped GEMM = one torch.mm per expert segment
    numba [grouped_mm] MoELayer(backend="numba"), grouped GEMM = torch._grouped_mm
    torch-sort         the fastest torch-only layer we know: stable argsort of the expert ids,
                       x[order // k], torch._grouped_mm experts, index_add_ combine
    ref dispatch+GEMM  the reference's dispatch functions with numba's default grouped GEMM: splits
                       the reference's time into its dispatch (this column minus numba) and its
                       grouped GEMM (a Python loop of torch.mm per expert, reference minus this column)
    per-token loop     brute force: for every token, for every slot, y[t] += w · expert_e(x[t])
                       (run on --loop-tokens tokens and scaled to T per token: it is linear in T)

A step is ``y = layer(x); y.backward(upstream)``; the table shows the *best* of --repeats steps after
one warm-up step (this machine may be shared: the minimum is the least disturbed measurement).
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import torch

from fastmoe_edu import MoELayer
from fastmoe_edu.backends import grouped_gemm_torch, numba_backend, reference

CONFIGS = {
    "dispatch": dict(tokens=16384, d_model=256, d_hidden=512, expert="swiglu"),
    "fastmoe": dict(tokens=4096, d_model=1024, d_hidden=4096, expert="gelu"),
}


def torch_sort_forward(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """The torch-only layer: routing by the layer's own gate, dispatch by a stable argsort."""
    route, _ = layer.gate(tokens)
    flat_ids = route.expert_ids.reshape(-1)                                        # [T·k], dropless
    order = torch.argsort(flat_ids, stable=True)                                   # buffer row -> assignment
    counts = torch.bincount(flat_ids, minlength=layer.num_experts)
    token_of_row = order // layer.top_k
    buffer = tokens.index_select(0, token_of_row)
    expert_out = layer.experts(buffer, counts, grouped_gemm_torch.grouped_mm)
    weighted = expert_out * route.weights.reshape(-1)[order, None]
    return torch.zeros_like(tokens).index_add(0, token_of_row, weighted)


def reference_dispatch_forward(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """MoELayer.forward's steps with the reference's functions, except the grouped GEMM (numba's)."""
    route, _ = layer.gate(tokens)
    expert_ids = reference.prune_capacity(route.expert_ids, layer.num_experts, route.capacity)
    weights = route.weights * (expert_ids >= 0)
    counts = reference.count_tokens_per_expert(expert_ids, layer.num_experts)
    rows = reference.stable_positions(expert_ids, reference.exclusive_prefix_sum(counts))
    buffer = reference.scatter_rows(tokens, rows, int(counts.sum()))
    expert_out = layer.experts(buffer, counts, numba_backend.grouped_matmul)
    return reference.gather_combine(expert_out, rows, weights)


def per_token_loop_forward(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """Brute force: every token through its experts one by one, in Python."""
    route, _ = layer.gate(tokens)
    experts = layer.experts
    # unbind once, so each expert's weight is its own autograd leaf-view (no full-size gradient per use)
    w1, w2 = experts.w1.unbind(0), experts.w2.unbind(0)
    w3 = experts.w3.unbind(0) if experts.kind == "swiglu" else None
    outputs = []
    for token in range(tokens.shape[0]):
        y = tokens.new_zeros(tokens.shape[1])
        for slot in range(layer.top_k):
            e = int(route.expert_ids[token, slot])
            hidden = w1[e] @ tokens[token]
            if w3 is not None:
                hidden = torch.nn.functional.silu(hidden) * (w3[e] @ tokens[token])
            else:
                hidden = torch.nn.functional.gelu(hidden)
            y = y + route.weights[token, slot] * (w2[e] @ hidden)
        outputs.append(y)
    return torch.stack(outputs)


def best_step_seconds(forward, x, upstream, repeats: int) -> float:
    """Best time of forward + backward over ``repeats`` steps, after one warm-up step."""
    times = []
    for attempt in range(repeats + 1):
        x_leaf = x.clone().requires_grad_(True)
        start = time.perf_counter()
        forward(x_leaf).backward(upstream)
        elapsed = time.perf_counter() - start
        if attempt > 0:
            times.append(elapsed)
    return min(times)


def bench_config(name: str, args) -> dict:
    config = dict(CONFIGS[name])
    if args.tokens:
        config["tokens"] = args.tokens
    T, d = config["tokens"], config["d_model"]
    torch.manual_seed(0)
    layers = {backend: MoELayer(d, config["d_hidden"], args.experts, top_k=args.top_k, router="softmax_topk",
                                expert=config["expert"], backend=backend) for backend in ("reference", "numba")}
    layers["numba"].load_state_dict(layers["reference"].state_dict())
    x, upstream = torch.randn(T, d), torch.randn(T, d)

    def numba_with(gemm):
        def forward(v):
            numba_backend.set_grouped_gemm(gemm)
            return layers["numba"](v)
        return forward

    results = {"config": name, **config}
    previous = numba_backend.current_grouped_gemm()
    try:
        results["reference"] = best_step_seconds(layers["reference"], x, upstream, args.repeats)
        results["numba [segments]"] = best_step_seconds(numba_with("segments"), x, upstream, args.repeats)
        results["numba [grouped_mm]"] = best_step_seconds(numba_with("grouped_mm"), x, upstream, args.repeats)
    finally:
        numba_backend.set_grouped_gemm(*previous)
    results["torch-sort"] = best_step_seconds(lambda v: torch_sort_forward(layers["reference"], v), x, upstream,
                                              args.repeats)
    results["ref dispatch+GEMM"] = best_step_seconds(lambda v: reference_dispatch_forward(layers["reference"], v),
                                                     x, upstream, args.repeats)
    loop_tokens = min(args.loop_tokens, T)
    loop_seconds = best_step_seconds(lambda v: per_token_loop_forward(layers["reference"], v), x[:loop_tokens],
                                     upstream[:loop_tokens], 1)
    results["per-token loop"] = loop_seconds * T / loop_tokens
    results["loop_tokens"] = loop_tokens
    return results


COLUMNS = ("reference", "numba [segments]", "numba [grouped_mm]", "torch-sort", "ref dispatch+GEMM",
           "per-token loop")


def print_table(rows: list[dict]) -> None:
    print(f"{'config':9s} {'T':>6s} {'d':>5s} {'d_hid':>6s} | " + " ".join(f"{c:>19s}" for c in COLUMNS))
    for row in rows:
        fastest_numba = min(row["numba [segments]"], row["numba [grouped_mm]"])
        times = " ".join(f"{row[c]:18.3f}s" for c in COLUMNS)
        ratios = " ".join(f"{row[c] / fastest_numba:18.2f}x" for c in COLUMNS)
        print(f"{row['config']:9s} {row['tokens']:6d} {row['d_model']:5d} {row['d_hidden']:6d} | {times}")
        print(f"{'':9s} {'':6s} {'':5s} {'':6s} | {ratios}   (time / fastest numba)")
        print(f"{'':9s} per-token loop: measured on {row['loop_tokens']} tokens, scaled to T={row['tokens']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", choices=(*CONFIGS, "both"), default="both")
    parser.add_argument("--tokens", type=int, default=None, help="override T of the chosen configuration(s)")
    parser.add_argument("--experts", type=int, default=64, help="E (default 64)")
    parser.add_argument("--top-k", type=int, default=2, help="k (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per implementation; the best is kept")
    parser.add_argument("--loop-tokens", type=int, default=256, help="tokens the per-token loop really runs")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
          f"({numba.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    names = list(CONFIGS) if args.config == "both" else [args.config]
    rows = [bench_config(name, args) for name in names]
    print_table(rows)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
