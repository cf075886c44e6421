"""MoE layer forward + backward: reference vs numba vs torch-only vs a per-token Python loop.

    python bench/bench_layer.py                          # both configurations below
    python bench/bench_layer.py --config dispatch --tokens 8192
    python bench/bench_layer.py --config fastmoe --tokens 1024 --repeats 2
    python bench/bench_layer.py --device cuda --dtype bfloat16       # on an NVIDIA GPU

Configurations (k = 2, E = 64, router softmax top-k, float32 unless --dtype, dropless):

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
    experts only       the expert FFNs alone (grouped GEMMs + activation, forward + backward) on an
                       already dispatched buffer: what is left if routing and dispatch took no time.
                       reference ÷ (experts only) is the *ceiling* of reference ÷ numba for any
                       backend that runs the experts with these GEMMs (Amdahl's law).

A step is ``y = layer(x); y.backward(upstream)``; the table shows the *best* of --repeats rounds after
one warm-up round, each round running every implementation once (this machine may be shared: the
minimum is the least disturbed measurement). On a GPU the clock stops after torch.cuda.synchronize().

Ratios printed: every time ÷ the fastest numba variant; reference ÷ numba and its ceiling; and the
expert GEMMs' achieved FLOP rate ÷ the peak that one large torch.mm reaches on the same device and
dtype, measured in the same run (GEMM FLOPs = 3 passes · 2·T·k·d_model·d_hidden · number of weights).
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import torch

from fastmoe_edu import MoELayer
from _device import best_seconds, default_device, describe, device_argument, synchronize
from fastmoe_edu.backends import grouped_gemm_torch, numba_backend, reference

DTYPES = ("float32", "float64", "bfloat16")

CONFIGS = {
    "dispatch": dict(tokens=16384, d_model=256, d_hidden=512, expert="swiglu"),
    "fastmoe": dict(tokens=4096, d_model=1024, d_hidden=4096, expert="gelu"),
}


def torch_grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm where torch implements it for these operands, else one torch.mm per segment."""
    if grouped_gemm_torch.grouped_mm_supports(rows, weight):
        return grouped_gemm_torch.grouped_mm(rows, weight, counts)
    return grouped_gemm_torch.segment_matmul(rows, weight, counts)


def torch_sort_forward(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """The torch-only layer: routing by the layer's own gate, dispatch by a stable argsort."""
    route, _ = layer.router(tokens)
    flat_ids = route.expert_ids.reshape(-1)                                        # [T·k], dropless
    order = torch.argsort(flat_ids, stable=True)                                   # buffer row -> assignment
    counts = torch.bincount(flat_ids, minlength=layer.num_experts)
    token_of_row = order // layer.top_k
    buffer = tokens.index_select(0, token_of_row)
    expert_out = layer.experts(buffer, counts, torch_grouped_matmul)
    weighted = expert_out * route.weights.reshape(-1)[order, None].to(expert_out.dtype)
    return torch.zeros_like(tokens).index_add(0, token_of_row, weighted)


def reference_dispatch_forward(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """MoELayer.forward's steps with the reference's functions, except the grouped GEMM (numba's)."""
    route, _ = layer.router(tokens)
    expert_ids = reference.prune_capacity(route.expert_ids, layer.num_experts, route.capacity)
    weights = route.weights * (expert_ids >= 0)
    counts = reference.count_tokens_per_expert(expert_ids, layer.num_experts)
    rows = reference.stable_positions(expert_ids, reference.exclusive_prefix_sum(counts))
    buffer = reference.scatter_rows(tokens, rows, int(counts.sum()))
    expert_out = layer.experts(buffer, counts, numba_backend.grouped_matmul)
    return reference.gather_combine(expert_out, rows, weights)


def per_token_loop_forward(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """Brute force: every token through its experts one by one, in Python."""
    route, _ = layer.router(tokens)
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


def step_seconds(forward, x, upstream, parameters) -> float:
    """Time of one forward + backward.

    The parameters' gradients are set to None first, as a training loop's
    ``optimizer.zero_grad(set_to_none=True)`` does: otherwise each backward would also add into the
    previous step's weight gradients (2 GiB of extra reads and writes at FastMoE's configuration).
    """
    for parameter in parameters:
        parameter.grad = None
    x_leaf = x.clone().requires_grad_(True)
    synchronize(x.device)
    start = time.perf_counter()
    forward(x_leaf).backward(upstream)
    synchronize(x.device)
    return time.perf_counter() - start


def peak_gemm_flops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of one size × size × size torch.mm (best of 3): this device's practical GEMM peak."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size ** 3 / best_seconds(lambda: torch.mm(a, b), 3, device, warmup=1)


def expert_gemm_flops(config: dict, top_k: int) -> float:
    """FLOPs of the expert GEMMs in one forward + backward (input and weight gradients)."""
    weights = 3 if config["expert"] == "swiglu" else 2
    return 3 * 2 * config["tokens"] * top_k * config["d_model"] * config["d_hidden"] * weights


def best_of_round_robin(steps: dict, repeats: int) -> dict:
    """Best time of each implementation over ``repeats`` rounds, after one warm-up round.

    ``steps`` maps a name to (forward, x, upstream, parameters). Each round runs every implementation
    once, so a slow drift of the machine's load hits all of them alike; the minimum is the least
    disturbed measurement.
    """
    best = {name: float("inf") for name in steps}
    for round_number in range(repeats + 1):
        for name, (forward, x, upstream, parameters) in steps.items():
            elapsed = step_seconds(forward, x, upstream, parameters)
            if round_number > 0:
                best[name] = min(best[name], elapsed)
    return best


def dispatched_buffer(layer: MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert-sorted buffer and per-expert counts that this input is dispatched to."""
    with torch.no_grad():
        route, _ = layer.router(x)
        counts = numba_backend.count_tokens_per_expert(route.expert_ids, layer.num_experts)
        rows = numba_backend.stable_positions(route.expert_ids, numba_backend.exclusive_prefix_sum(counts))
        return numba_backend.scatter_rows(x, rows, int(counts.sum())), counts


def bench_config(name: str, args) -> dict:
    config = dict(CONFIGS[name])
    if args.tokens:
        config["tokens"] = args.tokens
    T, d = config["tokens"], config["d_model"]
    torch.manual_seed(0)
    device, dtype = args.device, getattr(torch, args.dtype)
    layers = {backend: MoELayer(d, config["d_hidden"], args.experts, top_k=args.top_k, router="softmax_top_k",
                                expert=config["expert"], backend=backend).to(device, dtype)
              for backend in ("reference", "numba")}
    layers["numba"].load_state_dict(layers["reference"].state_dict())
    x = torch.randn(T, d, device=device, dtype=dtype)
    upstream = torch.randn(T, d, device=device, dtype=dtype)
    parameters = [p for layer in layers.values() for p in layer.parameters()]
    buffer, counts = dispatched_buffer(layers["numba"], x)

    def numba_with(gemm):
        def forward(v):
            numba_backend.set_grouped_gemm(gemm)
            return layers["numba"](v)
        return forward

    def experts_only(rows_in):
        numba_backend.set_grouped_gemm("grouped_mm")
        return layers["numba"].experts(rows_in, counts, numba_backend.grouped_matmul)

    steps = {
        "reference": (layers["reference"], x, upstream, parameters),
        "numba [segments]": (numba_with("segments"), x, upstream, parameters),
        "numba [grouped_mm]": (numba_with("grouped_mm"), x, upstream, parameters),
        "torch-sort": (lambda v: torch_sort_forward(layers["reference"], v), x, upstream, parameters),
        "ref dispatch+GEMM": (lambda v: reference_dispatch_forward(layers["reference"], v), x, upstream, parameters),
        "experts only": (experts_only, buffer, torch.randn_like(buffer), parameters),
    }
    previous = numba_backend.current_grouped_gemm()
    try:
        results = {"config": name, **config, **best_of_round_robin(steps, args.repeats)}
    finally:
        numba_backend.set_grouped_gemm(*previous)
    loop_tokens = min(args.loop_tokens, T)
    loop_seconds = best_of_round_robin(
        {"loop": (lambda v: per_token_loop_forward(layers["reference"], v), x[:loop_tokens],
                  upstream[:loop_tokens], parameters)}, 1)["loop"]
    results["per-token loop"] = loop_seconds * T / loop_tokens
    results["loop_tokens"] = loop_tokens
    results["gemm_flops"] = expert_gemm_flops(config, args.top_k)
    return results


COLUMNS = ("reference", "numba [segments]", "numba [grouped_mm]", "torch-sort", "ref dispatch+GEMM",
           "per-token loop", "experts only")


def print_table(rows: list[dict], peak_flops: float) -> None:
    print(f"{'config':9s} {'T':>6s} {'d':>5s} {'d_hid':>6s} | " + " ".join(f"{c:>19s}" for c in COLUMNS))
    for row in rows:
        fastest_numba = min(row["numba [segments]"], row["numba [grouped_mm]"])
        times = " ".join(f"{row[c]:18.3f}s" for c in COLUMNS)
        ratios = " ".join(f"{row[c] / fastest_numba:18.2f}x" for c in COLUMNS)
        print(f"{row['config']:9s} {row['tokens']:6d} {row['d_model']:5d} {row['d_hidden']:6d} | {times}")
        print(f"{'':9s} {'':6s} {'':5s} {'':6s} | {ratios}   (time / fastest numba)")
        print(f"{'':9s} per-token loop: measured on {row['loop_tokens']} tokens, scaled to T={row['tokens']}")
        print(f"{'':9s} reference / fastest numba = {row['reference'] / fastest_numba:.2f}x; ceiling with "
              f"zero-time dispatch = reference / experts only = {row['reference'] / row['experts only']:.2f}x; "
              f"experts are {row['experts only'] / fastest_numba:.0%} of the numba step")
        achieved = row["gemm_flops"] / fastest_numba
        print(f"{'':9s} expert GEMMs: {row['gemm_flops'] / 1e9:.1f} GFLOP per step, {achieved / 1e9:.1f} GFLOP/s in "
              f"the fastest numba step = {achieved / peak_flops:.2f} of peak "
              f"({row['gemm_flops'] / row['experts only'] / peak_flops:.2f} in experts only)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", choices=(*CONFIGS, "both"), default="both")
    parser.add_argument("--tokens", type=int, default=None, help="override T of the chosen configuration(s)")
    parser.add_argument("--experts", type=int, default=64, help="E (default 64)")
    parser.add_argument("--top-k", type=int, default=2, help="k (default 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds (one step of each implementation); the best is kept")
    parser.add_argument("--loop-tokens", type=int, default=256, help="tokens the per-token loop really runs")
    parser.add_argument("--device", type=device_argument, default=default_device(),
                        help="cpu or cuda[:N] (default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="parameters and activations (numba's kernels run bfloat16 on a float32 copy)")
    parser.add_argument("--peak-size", type=int, default=4096, help="n of the n×n×n torch.mm that measures the peak")
    args = parser.parse_args(argv)
    device = args.device
    print(f"{describe(device)}; torch {torch.__version__}, numba {numba.__version__} "
          f"({numba.get_num_threads()} threads), {args.dtype}, load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    peak = peak_gemm_flops(device, getattr(torch, args.dtype), args.peak_size)
    print(f"peak: one {args.peak_size}^3 torch.mm reaches {peak / 1e9:.1f} GFLOP/s")
    names = list(CONFIGS) if args.config == "both" else [args.config]
    rows = [bench_config(name, args) for name in names]
    print_table(rows, peak)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
