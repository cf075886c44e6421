"""Hugging Face's Mixtral block against the same block after ``moefy``: forward + backward, and training.

    python bench/bench_hf.py                        # Mixtral-shaped layer and the default model's size
    python bench/bench_hf.py --tokens 256 --repeats 1 --train-steps 2     # a quick look
    python bench/bench_hf.py --device cuda
    python bench/bench_hf.py --cpu-time --layers default    # one thread, CPU time: a loaded shared machine

In one process, with the same weights: transformers' ``MixtralSparseMoeBlock`` in each
``experts_implementation`` the installed transformers offers, against the ``MoELayer`` that
``fastmoe_edu.hf.from_hf`` makes of it (what ``moefy`` swaps in) with each backend. Layers:

    mixtral   T 8192 tokens, d 512, h 1024, E 8, k 2       (a Mixtral-shaped layer at laptop scale)
    default   T 2048 tokens, d 64, h 128, E 8, k 2          (fastmoe_edu's default model's MoE layer)

Printed per layer: each implementation's median forward + backward time (the implementations run in turns,
one step each per round), ÷ HF's fastest, and the
expert-GEMM FLOP rate ÷ the rate one large ``torch.mm`` reaches here (the GEMM peak); a row of the numba
layer with the reference's experts (torch's SwiGLU, all experts' products before the activation) instead of
its fused ones (what that fusion saves); last, the same
expert products timed alone (torch.mm, each expert's row count as routed): no layer that runs its
experts on torch's GEMMs can beat HF's fastest by more than HF's time ÷ that. Then the training
tokens/s of a small HF Mixtral language model (2 layers, d 64) before and after ``moefy``.

The HF blocks are initialized as Mixtral initializes them (normal, std 0.02): a block built on its own
is not, and timing uninitialized weights (garbage such as 1e36 and denormals) measures the garbage.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

LAYERS = {"mixtral": dict(tokens=8192, d=512, h=1024, experts=8, top_k=2),
          "default": dict(tokens=2048, d=64, h=128, experts=8, top_k=2)}


def implementations() -> list[str]:
    """The experts implementations this transformers offers for Mixtral (eager always)."""
    from transformers import MixtralConfig
    found = ["eager"]
    # (transformers' "batched_mm" gathers every token's expert weights, T·k·d·h elements: 34 GB at the
    # Mixtral-shaped layer; it is left out.)
    for name in ("grouped_mm",):
        try:
            if getattr(MixtralConfig(experts_implementation=name), "_experts_implementation", None) == name:
                found.append(name)
        except (TypeError, ValueError):
            pass
    return found


def hf_block(d: int, h: int, experts: int, top_k: int, implementation: str, device: str):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=experts, num_experts_per_tok=top_k,
                           router_jitter_noise=0.0, experts_implementation=implementation)
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(config)
    # A block built on its own is not initialized (transformers initializes whole models in post_init):
    # its weights would be whatever was in memory, and garbage such as denormals or 1e36 changes the
    # speed of every product. Mixtral's own initialization: normal, std = initializer_range.
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, config.initializer_range)
    return block.to(device)


#: The clock of every measurement: wall time, or with --cpu-time the CPU time of this thread (run with one
#: thread: on a loaded machine it leaves out the time other processes hold the core).
CLOCK = time.perf_counter


def timed(step) -> float:
    """Time (CLOCK) of one call of ``step``; on a GPU until the device has finished its work, not when it was queued."""
    wait = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    start = CLOCK()
    step()
    wait()
    return CLOCK() - start


def wall_times(step, repeats: int) -> list[float]:
    """Time of each of ``repeats`` calls of ``step`` after one warm-up call (numba compiles there)."""
    timed(step)
    return [timed(step) for _ in range(repeats)]


def median_seconds(step, repeats: int) -> float:
    return statistics.median(wall_times(step, repeats))


def interleaved_medians(steps: dict, repeats: int) -> dict:
    """{name: median seconds} of ``steps`` run in turns (one call of each, ``repeats`` rounds, after a warm-up
    round): on a shared machine a slow spell then slows every implementation alike instead of one of them."""
    for step in steps.values():
        timed(step)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(values) for name, values in times.items()}


def gemm_peak(device: str, size: int = 2048, repeats: int = 10) -> float:
    """The GEMM peak: the best FLOP rate of ``repeats`` size³ torch.mm calls (the best, not the median:
    a peak is what the machine can do, and on a shared 2-core machine the median moves by 20 %)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return 2 * size ** 3 / min(wall_times(lambda: torch.mm(a, b), repeats))


def layer_table(name: str, shape: dict, tokens: int, repeats: int, device: str, peak: float) -> list[str]:
    from fastmoe_edu.hf import from_hf
    T, d, h, E, k = tokens, shape["d"], shape["h"], shape["experts"], shape["top_k"]
    x = torch.randn(T, d, device=device, requires_grad=True)
    upstream = torch.randn(T, d, device=device)
    flops = 3 * 2 * 3 * T * k * d * h                              # 3 expert matmuls, forward + 2× backward
    steps = {}
    for implementation in implementations():
        block = hf_block(d, h, E, k, implementation, device)

        def step(block=block):
            out = block(x[None])
            out = out[0] if isinstance(out, tuple) else out
            (out.reshape(T, d) * upstream).sum().backward()
        steps[f"HF [{implementation}]"] = step
    source = hf_block(d, h, E, k, "eager", device)
    for backend in ("reference", "numba"):
        layer = from_hf(source, backend=backend).to(device)

        def step(layer=layer):
            (layer(x) * upstream).sum().backward()
        steps[f"moefy [{backend}]"] = step
    steps["moefy [numba], experts unfused"] = lambda step=step: with_unfused_experts(step)
    rows = interleaved_medians(steps, repeats)
    fastest_hf = min(v for key, v in rows.items() if key.startswith("HF"))
    floor = expert_gemms_alone(layer.last_routing.tokens_per_expert.tolist(), d, h, repeats, device)
    lines = [f"{name}: T={T} d={d} h={h} E={E} k={k} SwiGLU, forward + backward",
             "| implementation | time (ms) | HF's fastest ÷ this | expert-GEMM rate ÷ GEMM peak |", "|---|---:|---:|---:|"]
    for key, seconds in rows.items():
        lines.append(f"| {key} | {seconds * 1e3:,.1f} | {fastest_hf / seconds:.2f}× | {flops / seconds / peak:.2f} |")
    lines.append(f"| the expert GEMMs alone (torch.mm, same shapes) | {floor * 1e3:,.1f} | {fastest_hf / floor:.2f}× | "
                 f"{flops / floor / peak:.2f} |")
    lines.append(f"(no layer whose experts run on torch's GEMMs can beat HF's fastest by more than "
                 f"{fastest_hf / floor:.2f}× here: that is the GEMMs with nothing else)")
    return lines


def with_unfused_experts(step) -> None:
    """``step()`` with the numba backend's fused experts (backends/numba_backend.py ``SwiGLUExperts``) replaced by
    the reference's experts on the same grouped GEMM (torch's SwiGLU operations): what the fusion saves inside
    the layer."""
    from fastmoe_edu.backends import numba_backend
    fused = numba_backend.expert_feed_forward
    numba_backend.expert_feed_forward = numba_backend.unfused_expert_feed_forward
    try:
        step()
    finally:
        numba_backend.expert_feed_forward = fused


def expert_gemms_alone(counts: list[int], d: int, h: int, repeats: int, device: str) -> float:
    """Seconds of the nine matrix products of a SwiGLU expert layer, forward + backward, with each
    expert's row count ``counts[e]`` and nothing else: x·W1ᵀ, x·W3ᵀ, h·W2ᵀ; then g·W2, gᵀ·h (W2's
    gradient) and g·W, gᵀ·x for W1 and W3. A floor for any layer that runs its experts on torch.mm."""
    products = []
    for n in counts:
        if n == 0:
            continue
        x, hidden = torch.randn(n, d, device=device), torch.randn(n, h, device=device)
        grad_out, grad_hidden = torch.randn(n, d, device=device), torch.randn(n, h, device=device)
        w_in, w_out = torch.randn(h, d, device=device), torch.randn(d, h, device=device)
        products += [(x, w_in.t()), (x, w_in.t()), (hidden, w_out.t()),             # forward
                     (grad_out, w_out), (grad_out.t(), hidden),                     # W2: grad h, grad W2
                     (grad_hidden, w_in), (grad_hidden.t(), x)] + [(grad_hidden, w_in), (grad_hidden.t(), x)]

    def run():
        for a, b in products:
            torch.mm(a, b)
    return median_seconds(run, repeats)


def training_step(moefied: bool, device: str):
    """One optimizer step of a small HF Mixtral language model, as HF built it or after ``moefy`` (backend auto);
    returns (step, tokens per step)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from fastmoe_edu.hf import moefy
    config = MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           router_jitter_noise=0.0, max_position_embeddings=64)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(device)
    if moefied:
        moefy(model, backend="auto")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 64, (32, 64), device=device)

    def step():
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step, batch.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=None, help="override every layer's T (a quick look)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"which layers (default {','.join(LAYERS)})")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, CPU time of this thread instead of wall time (for a loaded machine)")
    args = parser.parse_args()
    global CLOCK
    if args.cpu_time:
        from fastmoe_edu.backends import set_cpu_threads
        set_cpu_threads(1, "numba")
        CLOCK = time.thread_time
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench_hf.py needs transformers: pip install -e '.[hf]'")
    torch.set_num_threads(torch.get_num_threads())
    peak = gemm_peak(args.device)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, device {args.device}, {time.strftime('%Y-%m-%d')}; "
          f"GEMM peak (best 2048³ torch.mm) {peak / 1e9:.1f} GFLOP/s; "
          f"{'CPU time of one thread' if args.cpu_time else 'wall time'}, load average {os.getloadavg()[0]:.1f}")
    for name in args.layers.split(","):
        shape = LAYERS[name]
        print()
        print("\n".join(layer_table(name, shape, args.tokens or shape["tokens"], args.repeats, args.device, peak)))
    (before_step, tokens), (after_step, _) = training_step(False, args.device), training_step(True, args.device)
    seconds = interleaved_medians({"before": before_step, "after": after_step}, args.train_steps)   # in turns
    before, after = tokens / seconds["before"], tokens / seconds["after"]
    print(f"\ntraining a small HF Mixtral (2 layers, d 64, 8 experts, batch 32 × 64): {before:,.0f} tokens/s as HF "
          f"built it, {after:,.0f} after moefy (backend auto): {after / before:.2f}×")


if __name__ == "__main__":
    main()
