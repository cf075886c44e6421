"""The numba.cuda dispatch kernels on a real GPU, in one short run (issue 27's device experiment).

    python bench/gpu_kernels.py                              # T 32768, d 2048, E 128, k 8, bfloat16 (Qwen3-like)
    python bench/gpu_kernels.py --tokens 8192 --dtype float32 --json out.json
    NUMBA_ENABLE_CUDASIM=1 python bench/gpu_kernels.py --smoke     # a CPU-only machine (see below)

Five questions, each answered by one section of the output (and of --json):

1. copy kernels: copying a [R, d] tensor row by row, against ``copy_`` (GB/s ÷ copy_'s), three ways of
   mapping threads to a row, each with 4-, 8- and 16-byte words (the tensor viewed as int32, int64 and
   complex128):
       element   one thread per element; (row, column) by a 64-bit division (the kernels before issue 27)
       warp      one warp per row, its 32 threads striding over the columns (the kernels now)
       block     one block of 128 threads per row, striding likewise
2. dispatch kernels: each step of numba_backend (ranking, scatter, combine, their backward passes) at
   the layer's shape, the bytes it must move ÷ its time ÷ copy_'s bandwidth.
3. host µs per launch: launching a kernel with torch tensors (``cuda.as_cuda_array`` at each call, as
   numba_cuda does) against cached device arrays, a torch op's launch, and one whole backend call.
4. CUDA graphs: one forward + backward of the dispatch path (route, count, rank, scatter, grouped GEMMs,
   combine; dropless, so no size comes from the GPU) run once under
   ``torch.cuda.set_sync_debug_mode("error")`` (any host synchronization raises), then captured with
   ``torch.cuda.graph`` and replayed; eager ms vs replay ms. Then the same for a whole ``MoELayer`` step,
   which reports the synchronization that stops it, if one does.
5. re-verifications: the expert-bias gradient (GELU experts with biases) bitwise equal in two runs;
   the cumsum ranking equal to the reference, and its time against torch's stable argsort.

With no GPU, ``--smoke`` says so and exits 0; under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) it
first runs every copy kernel once on a tiny tensor and checks the copy (tests/test_gpu_suite.py runs both).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numba
import torch
from numba import cuda

from fastmoe_edu import MoELayer
from fastmoe_edu.backends import numba_backend, numba_cuda, reference

WORDS = {4: torch.int32, 8: torch.int64, 16: torch.complex128}
WARP = 32
ROWS_PER_BLOCK = 4
BLOCK = 128


# ----------------------------------------------------------------------------------------------------
# 1. Copy kernels
# ----------------------------------------------------------------------------------------------------
@cuda.jit
def copy_element(source, target):
    """One thread per element; its (row, column) by division and remainder."""
    index = cuda.grid(1)
    width = source.shape[1]
    if index < source.shape[0] * width:
        row, col = index // width, index % width
        target[row, col] = source[row, col]


@cuda.jit
def copy_warp(source, target):
    """One warp per row, ROWS_PER_BLOCK rows per block; the lanes stride over the columns."""
    row = cuda.blockIdx.x * ROWS_PER_BLOCK + (cuda.threadIdx.x >> 5)
    if row < source.shape[0]:
        for col in range(cuda.threadIdx.x & 31, source.shape[1], WARP):
            target[row, col] = source[row, col]


@cuda.jit
def copy_block(source, target):
    """One block per row; its BLOCK threads stride over the columns."""
    row = cuda.blockIdx.x
    for col in range(cuda.threadIdx.x, source.shape[1], BLOCK):
        target[row, col] = source[row, col]


def launch_copy(variant: str, source, target) -> None:
    rows, width = source.shape
    stream = numba_cuda.torch_stream()
    if variant == "element":
        copy_element[math.ceil(rows * width / BLOCK), BLOCK, stream](source, target)
    elif variant == "warp":
        copy_warp[math.ceil(rows / ROWS_PER_BLOCK), BLOCK, stream](source, target)
    else:
        copy_block[rows, BLOCK, stream](source, target)


def words(tensor: torch.Tensor, size: int):
    return numba_cuda.array(tensor.view(WORDS[size]))


def check_copy_kernels(device) -> list[str]:
    """Each variant and word size copies a small tensor exactly (also in the simulator)."""
    lines = []
    source = torch.randn(6, 40, device=device)                   # 160-byte rows: every word size divides
    for variant in ("element", "warp", "block"):
        for size in WORDS:
            target = torch.zeros_like(source)
            launch_copy(variant, words(source, size), words(target, size))
            if not torch.equal(target, source):
                raise AssertionError(f"copy kernel {variant} with {size}-byte words copied wrongly")
            lines.append(f"copy {variant:7s} {size:2d}-byte words: exact")
    return lines


def seconds(fn, repeats: int) -> float:
    """Best wall time of ``fn`` over ``repeats`` calls after two warm-up calls, each ended by a synchronize."""
    for _ in range(2):
        fn()
    best = math.inf
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def copy_section(rows: int, width_bytes: int, repeats: int) -> dict:
    source = torch.empty(rows, width_bytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    target = torch.empty_like(source)
    moved = 2 * source.numel()
    base = moved / seconds(lambda: target.copy_(source), repeats)
    result = {"copy_ GB/s": base / 1e9}
    print(f"\n1. copy kernels, {rows} rows × {width_bytes} bytes ({moved / 1e9:.2f} GB moved); copy_ "
          f"{base / 1e9:,.0f} GB/s")
    print("| threads per row | 4-byte words | 8-byte words | 16-byte words |  (GB/s ÷ copy_'s)\n|---|---:|---:|---:|")
    for variant in ("element", "warp", "block"):
        cells = []
        for size in WORDS:
            a, b = words(source, size), words(target, size)
            rate = moved / seconds(lambda: launch_copy(variant, a, b), repeats)
            result[f"{variant} {size}B"] = rate / base
            cells.append(f"{rate / base:.2f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    return result


# ----------------------------------------------------------------------------------------------------
# 2. Dispatch kernels: bytes moved ÷ time ÷ copy_
# ----------------------------------------------------------------------------------------------------
def routing(tokens: int, experts: int, top_k: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    expert_ids = torch.rand(tokens, experts, device="cuda", generator=generator).topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, device="cuda", generator=generator)
    return expert_ids, weights


def dispatch_section(tokens, d_model, experts, top_k, dtype, repeats) -> dict:
    expert_ids, weights = routing(tokens, experts, top_k)
    weights = weights.to(dtype)
    counts = numba_backend.count_tokens_per_expert(expert_ids, experts)
    rows = numba_backend.stable_positions(expert_ids, numba_backend.exclusive_prefix_sum(counts))
    num_rows = tokens * top_k
    x = torch.randn(tokens, d_model, device="cuda", dtype=dtype, requires_grad=True)
    expert_out = torch.randn(num_rows, d_model, device="cuda", dtype=dtype, requires_grad=True)
    weights.requires_grad_(True)
    grad_buffer = torch.randn(num_rows, d_model, device="cuda", dtype=dtype)
    grad_y = torch.randn(tokens, d_model, device="cuda", dtype=dtype)
    buffer = numba_backend.scatter_rows(x, rows, num_rows)
    y = numba_backend.gather_combine(expert_out, rows, weights)
    size, row_bytes, index_bytes = torch.finfo(dtype).bits // 8, d_model * torch.finfo(dtype).bits // 8, 8
    assignments = tokens * top_k
    steps = {   # name -> (function, bytes it must move at least)
        "ranking (count + prefix + positions)": (
            lambda: numba_backend.stable_positions(expert_ids, numba_backend.exclusive_prefix_sum(
                numba_backend.count_tokens_per_expert(expert_ids, experts))), 3 * assignments * index_bytes),
        "scatter forward": (lambda: numba_backend.scatter_rows(x, rows, num_rows),
                            (tokens + assignments) * row_bytes + assignments * index_bytes),
        "scatter backward": (lambda: torch.autograd.grad(buffer, x, grad_buffer, retain_graph=True),
                             (tokens + assignments) * row_bytes + assignments * index_bytes),
        "combine forward": (lambda: numba_backend.gather_combine(expert_out, rows, weights),
                            (tokens + assignments) * row_bytes + assignments * (index_bytes + size)),
        "combine backward": (lambda: torch.autograd.grad(y, (expert_out, weights), grad_y, retain_graph=True),
                             (tokens + 2 * assignments) * row_bytes + assignments * (index_bytes + 2 * size)),
    }
    source = torch.empty(max(b for _, b in steps.values()) // 2, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    print(f"\n2. dispatch kernels, T {tokens}, d {d_model}, E {experts}, k {top_k}, {dtype}")
    print("| step | MB moved | numba | copy_ (same bytes) | numba ÷ copy_ |\n|---|---:|---:|---:|---:|")
    result = {}
    for name, (function, moved) in steps.items():
        half = moved // 2
        copy_time = seconds(lambda: target[:half].copy_(source[:half]), repeats)
        step_time = seconds(function, repeats)
        result[name] = {"ms": step_time * 1e3, "copy_ms": copy_time * 1e3, "of_copy": copy_time / step_time}
        print(f"| {name} | {moved / 1e6:,.1f} | {step_time * 1e3:.3f} ms | {copy_time * 1e3:.3f} ms | "
              f"{copy_time / step_time:.2f} |")
    return result


# ----------------------------------------------------------------------------------------------------
# 3. Host cost of a launch
# ----------------------------------------------------------------------------------------------------
def host_microseconds(fn, calls: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start                       # host time only: the GPU may still be busy
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def launch_section() -> dict:
    source = torch.randn(64, 64, device="cuda")
    target = torch.empty_like(source)
    cached = (numba_cuda.array(source), numba_cuda.array(target))
    expert_ids, _ = routing(256, 8, 2)
    rows = numba_backend.stable_positions(expert_ids, numba_backend.exclusive_prefix_sum(
        numba_backend.count_tokens_per_expert(expert_ids, 8)))
    x = torch.randn(256, 64, device="cuda")
    cases = {
        "numba kernel, torch tensors (as_cuda_array per call)":
            lambda: launch_copy("warp", numba_cuda.array(source), numba_cuda.array(target)),
        "numba kernel, cached device arrays": lambda: launch_copy("warp", *cached),
        "torch op (target.copy_(source))": lambda: target.copy_(source),
        "numba_backend.scatter_rows (a whole backend call)": lambda: numba_backend.scatter_rows(x, rows, 512),
    }
    print("\n3. host time per call (µs, no synchronize inside the timed loop)")
    result = {}
    for name, fn in cases.items():
        result[name] = host_microseconds(fn)
        print(f"  {name}: {result[name]:.1f} µs")
    return result


# ----------------------------------------------------------------------------------------------------
# 4. CUDA graphs and host synchronizations
# ----------------------------------------------------------------------------------------------------
def dispatch_step(layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor) -> None:
    """One dropless forward + backward through the backend's functions, every size known on the host."""
    backend, tokens = numba_backend, x.shape[0]
    logits = layer.router.logits(x)
    expert_ids, weights = backend.softmax_top_k_route(logits, layer.top_k, True)
    counts = backend.count_tokens_per_expert(expert_ids, layer.num_experts)
    rows = backend.stable_positions(expert_ids, backend.exclusive_prefix_sum(counts))
    buffer = backend.scatter_rows(x, rows, tokens * layer.top_k)
    expert_out = layer.experts(buffer, counts, backend)
    y = backend.gather_combine(expert_out, rows, weights)
    y.backward(upstream)


def graph_section(tokens, d_model, d_hidden, experts, top_k, dtype, repeats) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(d_model, d_hidden, experts, top_k=top_k, backend="numba").to("cuda", dtype)
    x = torch.randn(tokens, d_model, device="cuda", dtype=dtype, requires_grad=True)
    upstream = torch.randn(tokens, d_model, device="cuda", dtype=dtype)
    result = {}
    print(f"\n4. CUDA graphs (T {tokens}, d {d_model}, h {d_hidden}, E {experts}, k {top_k}, {dtype})")
    for name, step in (("dispatch path", lambda: dispatch_step(layer, x, upstream)),
                       ("MoELayer step", lambda: (layer(x) * upstream).sum().backward())):
        entry = {}
        try:
            step()                                               # compile, warm up, fill caches
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            entry["host syncs"] = "none"
            entry["eager ms"] = seconds(step, repeats) * 1e3
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                        # warm-up on a side stream, as torch's docs say
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            entry["graph replay ms"] = seconds(graph.replay, repeats) * 1e3
        except Exception as error:                               # report what stopped it, go on
            entry["stopped by"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        result[name] = entry
        print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k}: {v}"
                                          for k, v in entry.items()))
    return result


# ----------------------------------------------------------------------------------------------------
# 5. Re-verifications from the first GPU run
# ----------------------------------------------------------------------------------------------------
def verify_section(tokens, experts, top_k, repeats) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(64, 128, 8, top_k=2, expert="gelu", bias=True, backend="numba").to("cuda")
    x = torch.randn(4096, 64, device="cuda")
    gradients = []
    for _ in range(2):
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        gradients.append(layer.experts.b1.grad.clone())
    bias_ok = torch.equal(*gradients)
    expert_ids, _ = routing(tokens, experts, top_k, seed=1)
    counts = numba_backend.count_tokens_per_expert(expert_ids, experts)
    starts = numba_backend.exclusive_prefix_sum(counts)
    rank_ok = torch.equal(numba_backend.stable_positions(expert_ids, starts),
                          reference.stable_positions(expert_ids, starts))
    rank_ms = seconds(lambda: numba_backend.stable_positions(expert_ids, starts), repeats) * 1e3
    sort_ms = seconds(lambda: torch.argsort(expert_ids.reshape(-1), stable=True), repeats) * 1e3
    print(f"\n5. expert-bias gradient bitwise equal in two runs: {bias_ok}; cumsum ranking equal to the reference: "
          f"{rank_ok}, {rank_ms:.3f} ms (torch's stable argsort {sort_ms:.3f} ms) for T·k = {tokens * top_k}")
    return {"expert bias gradient deterministic": bias_ok, "ranking equal": rank_ok, "ranking ms": rank_ms,
            "stable argsort ms": sort_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--d-hidden", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="on a machine without a GPU: say so, exit 0")
    parser.add_argument("--json", help="write every number to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available() or numba.config.ENABLE_CUDASIM:
        if numba.config.ENABLE_CUDASIM:                          # no timing, but every copy kernel checked
            numba_backend.run_cuda_kernels_on_cpu_tensors(True)
            print("\n".join(check_copy_kernels("cpu")))
        print("no GPU here (torch sees no CUDA device): nothing timed" if args.smoke else
              "gpu_kernels.py needs an NVIDIA GPU (use --smoke on a CPU-only machine)")
        return 0 if args.smoke else 1
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, numba {numba.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("\n".join(check_copy_kernels("cuda")))
    shape = (args.tokens, args.d_model, args.experts, args.top_k)
    report = {"device": torch.cuda.get_device_name(), "args": vars(args),
              "copy": copy_section(args.tokens * args.top_k, args.d_model * 2, args.repeats),
              "dispatch": dispatch_section(*shape, dtype, args.repeats),
              "launch": launch_section(),
              "graphs": graph_section(args.tokens // 4, args.d_model, args.d_hidden, args.experts, args.top_k, dtype,
                                      args.repeats),
              "verify": verify_section(args.tokens, args.experts, args.top_k, args.repeats)}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
