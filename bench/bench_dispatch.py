"""Dispatch kernels: time and achieved memory bandwidth, next to a plain memory copy.

    python bench/bench_dispatch.py                        # T=16384, d=256, E=64, k=2, float32
    python bench/bench_dispatch.py --tokens 4096 --d-model 1024
    python bench/bench_dispatch.py --device cuda --tokens 262144 --d-model 1024   # on an NVIDIA GPU

Each step of FastMoE's data flow that moves data (dispatch.py) is timed for three implementations,
side by side in one process:

    reference   fastmoe_edu/dispatch.py (one-hot cumsum ranking, index_copy, einsum)
    numba       backends/numba_backend.py on the tensors' target (numba_cpu for --device cpu,
                numba_cuda for --device cuda)
    torch-sort  the fastest torch-only way we know: a stable argsort of the expert ids gives the
                rows, x[order // k] scatters, index_add_ combines

and its *achieved bandwidth* = (bytes the step must read + write at least) / time, next to

    copy_       ``target.copy_(source)`` moving the same number of bytes (half read, half written)
                into a tensor allocated once: the memory system's ceiling for a streaming kernel
    zeros(out)  ``torch.zeros`` of the step's output size: the floor for any step that returns a
                fresh output. glibc serves large allocations (32 MiB and up) with fresh pages from
                the kernel, whose first touch page-faults; on a virtual machine that can cost ten
                times the copy itself, and it is the same for every implementation

Times are the best of --repeats calls after 2 warm-up calls (the machine may be shared: the
minimum is the least disturbed measurement); on a GPU each call ends with torch.cuda.synchronize().
The last column, numba ÷ copy_, is the fraction of the copy bandwidth the numba kernel achieves.

Bytes counted (s = element size, T tokens, k slots, d width; the index arrays are int64):
    ranking (count + positions)   read ids twice (count, rank), write rows:  3·T·k·8
    scatter forward               read x (T·d·s), write the buffer (T·k·d·s), read rows
    scatter backward              read T·k·d·s gradient rows, write T·d·s, read rows
    combine forward               read T·k·d·s expert rows, write T·d·s, read rows and weights
    combine backward              read grad_y once and the expert rows, write the row grads and weights
"""
from __future__ import annotations

import argparse
import os

import numba
import torch

from _device import best_seconds, default_device, describe, device_argument
from fastmoe_edu.backends import numba_backend, reference


def copy_seconds(num_bytes: int, repeats: int, device: torch.device) -> float:
    """Time of copy_ moving ``num_bytes`` in all (num_bytes/2 read + num_bytes/2 written)."""
    source = torch.empty(max(num_bytes // 2, 1), dtype=torch.uint8, device=device).random_(0, 255)
    target = torch.empty_like(source)
    return best_seconds(lambda: target.copy_(source), repeats, device)


def fresh_output_seconds(num_bytes: int, repeats: int, device: torch.device) -> float:
    """Time of allocating and zeroing a new tensor of ``num_bytes`` bytes."""
    return best_seconds(lambda: torch.zeros(num_bytes, dtype=torch.uint8, device=device), repeats, device)


# ----------------------------------------------------------------------------------------------------
# The torch-only implementation: ranking by a stable argsort
# ----------------------------------------------------------------------------------------------------
def torch_sort_ranking(expert_ids, num_experts):
    """order[i] = the assignment (flat t·k + s) that sits in buffer row i; counts per expert."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


class TorchSortSteps:
    """Scatter / combine given ``order`` (buffer row -> assignment), with torch's gather and index_add_."""

    def __init__(self, order, top_k):
        self.order, self.token_of_row = order, order // top_k

    def scatter(self, x):
        return x.index_select(0, self.token_of_row)

    def combine(self, expert_out, weights, num_tokens):
        scaled = expert_out * weights.reshape(-1)[self.order, None]
        return expert_out.new_zeros(num_tokens, expert_out.shape[1]).index_add_(0, self.token_of_row, scaled)


def run(args) -> list[dict]:
    torch.manual_seed(0)
    dtype, device = getattr(torch, args.dtype), args.device
    T, d, E, k = args.tokens, args.d_model, args.experts, args.top_k
    s = torch.tensor([], dtype=dtype).element_size()
    logits = torch.randn(T, E, device=device)
    expert_ids = torch.topk(logits, k, dim=-1).indices                      # dropless, distinct per token
    weights = torch.rand(T, k, dtype=dtype, device=device)
    x = torch.randn(T, d, dtype=dtype, device=device)
    results = []

    def measure(step, bytes_moved, output_bytes, implementations):
        row = {"step": step, "bytes": bytes_moved}
        for name, fn in implementations.items():
            row[name] = best_seconds(fn, args.repeats, device)
        row["copy_"] = copy_seconds(bytes_moved, args.repeats, device)
        row["zeros(out)"] = fresh_output_seconds(output_bytes, args.repeats, device)
        results.append(row)

    # Ranking: counts, segment starts, stable row of every assignment.
    def ranking(backend):
        def fn():
            counts = backend.count_tokens_per_expert(expert_ids, E)
            return backend.stable_positions(expert_ids, backend.exclusive_prefix_sum(counts))
        return fn
    measure("ranking (count + positions)", 3 * T * k * 8, T * k * 8, {
        "reference": ranking(reference), "numba": ranking(numba_backend),
        "torch-sort": lambda: torch_sort_ranking(expert_ids, E)})

    rows = numba_backend.stable_positions(expert_ids, numba_backend.exclusive_prefix_sum(
        numba_backend.count_tokens_per_expert(expert_ids, E)))
    order, _ = torch_sort_ranking(expert_ids, E)
    sort_steps = TorchSortSteps(order, k)
    index_bytes = T * k * 8

    measure("scatter forward", T * d * s + T * k * d * s + index_bytes, T * k * d * s, {
        "reference": lambda: reference.scatter_rows(x, rows, T * k),
        "numba": lambda: numba_backend.scatter_rows(x, rows, T * k),
        "torch-sort": lambda: sort_steps.scatter(x)})

    buffer_grad = torch.randn(T * k, d, dtype=dtype, device=device)

    def scatter_backward(backend):
        x_leaf = x.clone().requires_grad_(True)
        buffer = backend(x_leaf)
        return lambda: torch.autograd.grad(buffer, x_leaf, buffer_grad, retain_graph=True)
    measure("scatter backward", T * k * d * s + T * d * s + index_bytes, T * d * s, {
        "reference": scatter_backward(lambda v: reference.scatter_rows(v, rows, T * k)),
        "numba": scatter_backward(lambda v: numba_backend.scatter_rows(v, rows, T * k)),
        "torch-sort": scatter_backward(sort_steps.scatter)})

    expert_out = torch.randn(T * k, d, dtype=dtype, device=device)
    measure("combine forward", T * k * d * s + T * d * s + index_bytes + T * k * s, T * d * s, {
        "reference": lambda: reference.gather_combine(expert_out, rows, weights),
        "numba": lambda: numba_backend.gather_combine(expert_out, rows, weights),
        "torch-sort": lambda: sort_steps.combine(expert_out, weights, T)})

    grad_y = torch.randn(T, d, dtype=dtype, device=device)

    def combine_backward(backend):
        out_leaf = expert_out.clone().requires_grad_(True)
        weights_leaf = weights.clone().requires_grad_(True)
        y = backend(out_leaf, weights_leaf)
        return lambda: torch.autograd.grad(y, (out_leaf, weights_leaf), grad_y, retain_graph=True)
    measure("combine backward", T * d * s + 2 * T * k * d * s + index_bytes + 2 * T * k * s,
            T * k * d * s + T * k * s, {
        "reference": combine_backward(lambda o, w: reference.gather_combine(o, rows, w)),
        "numba": combine_backward(lambda o, w: numba_backend.gather_combine(o, rows, w)),
        "torch-sort": combine_backward(lambda o, w: sort_steps.combine(o, w, T))})
    return results


COLUMNS = ("reference", "numba", "torch-sort", "copy_", "zeros(out)")


def print_table(results: list[dict]) -> None:
    header = (f"{'step':28s} {'MB':>6s} | " + " ".join(f"{name:>10s}" for name in COLUMNS)
              + f" | {'ref/numba':>9s} {'sort/numba':>10s} | GB/s: {'numba':>6s} {'copy_':>6s} {'ratio':>6s}")
    print(header)
    print("-" * len(header))
    for row in results:
        gbps = {name: row["bytes"] / row[name] / 1e9 for name in ("numba", "copy_")}
        print(f"{row['step']:28s} {row['bytes'] / 1e6:6.1f} | "
              + " ".join(f"{row[name] * 1e3:8.2f}ms" for name in COLUMNS)
              + f" | {row['reference'] / row['numba']:8.1f}x {row['torch-sort'] / row['numba']:9.1f}x"
              + f" |       {gbps['numba']:6.1f} {gbps['copy_']:6.1f} {gbps['numba'] / gbps['copy_']:6.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tokens", type=int, default=16384, help="T, tokens (default 16384)")
    parser.add_argument("--d-model", type=int, default=256, help="d, token width (default 256)")
    parser.add_argument("--experts", type=int, default=64, help="E (default 64)")
    parser.add_argument("--top-k", type=int, default=2, help="k (default 2)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement; the best is kept")
    parser.add_argument("--device", type=device_argument, default=default_device(),
                        help="cpu or cuda[:N] (default: cuda when torch sees a GPU, else cpu)")
    args = parser.parse_args(argv)
    device = args.device
    print(f"{describe(device)}; T={args.tokens} d={args.d_model} E={args.experts} k={args.top_k} {args.dtype}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} "
          f"({numba.get_num_threads()} threads); best of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print_table(run(args))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
