"""MoE layer forward + backward: reference vs numba vs torch-only vs a per-token Python loop.

    python bench/bench_layer.py                          # dispatch + fastmoe (the CPU tables)
    python bench/bench_layer.py --config dispatch --tokens 8192
    python bench/bench_layer.py --config fastmoe --tokens 1024 --repeats 2
    python bench/bench_layer.py --device cuda --dtype bfloat16 --config all --json out.json   # on an NVIDIA GPU

Configurations (router softmax top-k, float32 unless --dtype, dropless; --experts / --top-k / --d-model /
--d-hidden override E / k / d / h):

    dispatch   T=16384, d_model=256,  d_hidden=512,  E=64,  k=2, SwiGLU   dispatch-heavy: little GEMM per row
    fastmoe    T=4096,  d_model=1024, d_hidden=4096, E=64,  k=2, GELU     FastMoE's benchmark layer
    qwen3      T=32768, d_model=2048, d_hidden=768,  E=128, k=8, SwiGLU   Qwen3-30B-A3B's expert shape (GPU-sized)

--config both (the default) = dispatch + fastmoe; --config all adds qwen3.

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
    HF Mixtral [impl]  a peer from outside this project: Hugging Face transformers'
                       MixtralSparseMoeBlock (softmax top-k, renormalized: the same routing) with the
                       same router and expert weights copied in, for each experts implementation the
                       installed transformers offers ("eager": a Python loop over the hit experts;
                       transformers 5.x also "grouped_mm"). SwiGLU configurations only (Mixtral's
                       experts are gated); skipped, with the reason printed, where transformers does
                       not import. Its output is checked against the reference before timing.

A step is ``y = layer(x); y.backward(upstream)``; the table shows the *best* of --repeats rounds after
one warm-up round, each round running every implementation once (this machine may be shared: the
minimum is the least disturbed measurement). On a GPU the clock stops after torch.cuda.synchronize().

Printed per configuration, one line per implementation: its time, time ÷ the fastest numba variant,
and the expert GEMMs' FLOP rate in TFLOP/s (GEMM FLOPs = 3 passes · 2·T·k·d_model·d_hidden · number
of weights, divided by the implementation's step time); then reference ÷ numba and its ceiling, the
HF Mixtral peer ÷ numba, and the FLOP rate ÷ the peak that one large torch.mm reaches on the same
device and dtype, measured in the same run. --json FILE also writes every number (after each
configuration, so a run cut short keeps what it finished).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time
import types

import numba
import torch

from fastmoe_edu import MoELayer
from fastmoe_edu.experts import run_experts
from _device import best_seconds, default_device, describe, device_argument, synchronize
from fastmoe_edu.backends import grouped_gemm_torch, numba_backend, reference

DTYPES = ("float32", "float64", "bfloat16")

CONFIGS = {
    "dispatch": dict(tokens=16384, d_model=256, d_hidden=512, expert="swiglu", experts=64, top_k=2),
    "fastmoe": dict(tokens=4096, d_model=1024, d_hidden=4096, expert="gelu", experts=64, top_k=2),
    "qwen3": dict(tokens=32768, d_model=2048, d_hidden=768, expert="swiglu", experts=128, top_k=8),
}
CONFIG_GROUPS = {"both": ("dispatch", "fastmoe"), "all": tuple(CONFIGS)}


def torch_grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm where torch implements it for these operands, else one torch.mm per segment."""
    if grouped_gemm_torch.grouped_mm_supports(rows, weight):
        return grouped_gemm_torch.grouped_mm(rows, weight, counts)
    return grouped_gemm_torch.segment_matmul(rows, weight, counts)


#: What the torch-only layer hands its experts: the reference's experts (torch's activation) on torch's grouped GEMM.
TORCH_EXPERT_OPS = types.SimpleNamespace(
    expert_feed_forward=lambda experts, rows, counts: run_experts(experts, rows, counts, torch_grouped_matmul))


def torch_sort_forward(layer: MoELayer, tokens: torch.Tensor) -> torch.Tensor:
    """The torch-only layer: routing by the layer's own gate, dispatch by a stable argsort."""
    route, _ = layer.router(tokens)
    flat_ids = route.expert_ids.reshape(-1)                                        # [T·k], dropless
    order = torch.argsort(flat_ids, stable=True)                                   # buffer row -> assignment
    counts = torch.bincount(flat_ids, minlength=layer.num_experts)
    token_of_row = order // layer.top_k
    buffer = tokens.index_select(0, token_of_row)
    expert_out = layer.experts(buffer, counts, TORCH_EXPERT_OPS)
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
    expert_out = layer.experts(buffer, counts, numba_backend)
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


# ----------------------------------------------------------------------------------------------------
# The peer from outside: Hugging Face transformers' Mixtral sparse MoE block, with our weights
# ----------------------------------------------------------------------------------------------------
def hf_experts_implementations() -> tuple[list[str], str | None]:
    """The experts implementations of the installed transformers worth timing, or ([], why not)."""
    try:
        importlib.import_module("transformers.models.mixtral.modeling_mixtral")
    except Exception as error:                     # not installed, or an incompatible torch
        return [], f"transformers does not import here ({type(error).__name__}: {error})"
    try:                                           # transformers >= 5: experts_implementation
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"], None                     # 4.x: one loop over nn.Linear experts
    return ["eager"] + [name for name in ("grouped_mm",) if name in ALL_EXPERTS_FUNCTIONS], None


def copy_into(parameter: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(parameter.shape) != tuple(value.shape):
        raise ValueError(f"{name}: transformers stores {tuple(parameter.shape)}, ours gives {tuple(value.shape)}")
    with torch.no_grad():
        parameter.copy_(value)


def hf_mixtral_block(layer: MoELayer, implementation: str) -> torch.nn.Module:
    """transformers' MixtralSparseMoeBlock holding ``layer``'s router and expert weights.

    Ours: router W [E, d]; SwiGLU experts y = W2 (silu(W1 x) * (W3 x)) with w1, w3 [E, h, d], w2 [E, d, h].
    transformers 5.x fuses the experts: ``experts.gate_up_proj`` = [gate; up] = [W1; W3] stacked per expert
    ([E, 2h, d], or [E, d, 2h] where ``is_transposed``; gate and up rows interleaved where not
    ``is_concatenated``) and ``experts.down_proj`` = W2 ([E, d, h], or transposed); the config's
    ``experts_implementation`` picks the forward. transformers 4.x holds one nn.Linear per expert
    (w1 = gate, w3 = up, w2 = down). Either way ``gate.weight`` = W.
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    ours = layer.experts
    E, h, d = ours.w1.shape
    config = MixtralConfig(hidden_size=d, intermediate_size=h, num_local_experts=E, num_experts_per_tok=layer.top_k,
                           hidden_act="silu", router_jitter_noise=0.0, experts_implementation=implementation)
    if implementation != "eager" and getattr(config, "_experts_implementation", None) != implementation:
        raise ValueError(f"this transformers ignores experts_implementation={implementation!r}")
    block = MixtralSparseMoeBlock(config).to(ours.w1.device, ours.w1.dtype)
    copy_into(block.gate.weight, layer.router.weight, "gate.weight")
    theirs = block.experts
    if isinstance(theirs, torch.nn.ModuleList):                                  # transformers 4.x
        for e, mlp in enumerate(theirs):
            for name in ("w1", "w2", "w3"):
                copy_into(getattr(mlp, name).weight, getattr(ours, name)[e], f"experts.{e}.{name}")
        return block
    if getattr(theirs, "is_concatenated", True):
        gate_up = torch.cat([ours.w1, ours.w3], dim=1)                          # [E, 2h, d]: gate rows, then up
    else:
        gate_up = torch.stack([ours.w1, ours.w3], dim=2).reshape(E, 2 * h, d)   # gate0, up0, gate1, up1, ...
    down = ours.w2                                                               # [E, d, h]
    if getattr(theirs, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    copy_into(theirs.gate_up_proj, gate_up, "experts.gate_up_proj")
    copy_into(theirs.down_proj, down, "experts.down_proj")
    return block


def hf_forward(block: torch.nn.Module):
    """[T, d] -> [T, d] through the block (it takes [batch, seq, d]; 4.x also returns the router logits)."""
    def forward(v):
        out = block(v.unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).squeeze(0)
    return forward


def hf_peers(layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor, expert: str) -> tuple[dict, list[str]]:
    """{column: block} of the HF Mixtral peers that built and ran here, and a note on each (or why not).

    Each candidate runs one forward + backward first; its output is compared with ``layer``'s (same
    weights, same routing rule): a large difference means the weights were copied wrongly.
    """
    implementations, why_not = hf_experts_implementations()
    if why_not:
        return {}, [f"HF Mixtral: skipped: {why_not}"]
    if expert != "swiglu":
        return {}, [f"HF Mixtral: skipped: Mixtral's experts are gated (SwiGLU); this configuration uses {expert}"]
    peers, notes = {}, []
    with torch.no_grad():
        expected = layer(x)
    scale = float(expected.abs().max()) or 1.0
    for implementation in implementations:
        column = f"HF Mixtral [{implementation}]"
        try:
            block = hf_mixtral_block(layer, implementation)
            forward = hf_forward(block)
            x_leaf = x.clone().requires_grad_(True)
            y = forward(x_leaf)
            y.backward(upstream)
        except Exception as error:                 # an unsupported dtype/device, an API change, out of memory
            notes.append(f"{column}: skipped: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        difference = float((y.detach() - expected).abs().max()) / scale
        notes.append(f"{column}: output vs reference: max |difference| / max |y| = {difference:.1e}")
        peers[column] = block
    return peers, notes


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


def expert_gemm_flops(config: dict) -> float:
    """FLOPs of the expert GEMMs in one forward + backward (input and weight gradients)."""
    weights = 3 if config["expert"] == "swiglu" else 2
    return 3 * 2 * config["tokens"] * config["top_k"] * config["d_model"] * config["d_hidden"] * weights


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
    for key in ("tokens", "experts", "top_k", "d_model", "d_hidden"):
        if getattr(args, key):
            config[key] = getattr(args, key)
    T, d = config["tokens"], config["d_model"]
    torch.manual_seed(0)
    device, dtype = args.device, getattr(torch, args.dtype)
    layers = {backend: MoELayer(d, config["d_hidden"], config["experts"], top_k=config["top_k"],
                                router="softmax_top_k", expert=config["expert"], backend=backend).to(device, dtype)
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
        return layers["numba"].experts(rows_in, counts, numba_backend)

    steps = {
        "reference": (layers["reference"], x, upstream, parameters),
        "numba [segments]": (numba_with("segments"), x, upstream, parameters),
        "numba [grouped_mm]": (numba_with("grouped_mm"), x, upstream, parameters),
        "torch-sort": (lambda v: torch_sort_forward(layers["reference"], v), x, upstream, parameters),
        "ref dispatch+GEMM": (lambda v: reference_dispatch_forward(layers["reference"], v), x, upstream, parameters),
        "experts only": (experts_only, buffer, torch.randn_like(buffer), parameters),
    }
    peers, notes = hf_peers(layers["reference"], x, upstream, config["expert"]) if args.hf else ({}, [])
    for column, block in peers.items():
        parameters.extend(block.parameters())          # the list every step resets: the blocks' own too
        steps[column] = (hf_forward(block), x, upstream, parameters)
    previous = numba_backend.current_grouped_gemm()
    try:
        results = {"config": name, **config, **best_of_round_robin(steps, args.repeats), "notes": notes}
    finally:
        numba_backend.set_grouped_gemm(*previous)
    loop_tokens = min(args.loop_tokens, T)
    loop_seconds = best_of_round_robin(
        {"loop": (lambda v: per_token_loop_forward(layers["reference"], v), x[:loop_tokens],
                  upstream[:loop_tokens], parameters)}, 1)["loop"]
    results["per-token loop"] = loop_seconds * T / loop_tokens
    results["loop_tokens"] = loop_tokens
    results["gemm_flops"] = expert_gemm_flops(config)
    return results


COLUMNS = ("reference", "numba [segments]", "numba [grouped_mm]", "torch-sort", "ref dispatch+GEMM",
           "per-token loop", "experts only")


def peer_columns(row: dict) -> list[str]:
    """The HF Mixtral columns this row has (none where transformers is missing or the experts are GELU)."""
    return [column for column in row if column.startswith("HF Mixtral [")]


def print_table(row: dict, peak_flops: float) -> None:
    """One configuration: a line per implementation (time, ÷ fastest numba, expert-GEMM TFLOP/s), then ratios."""
    fastest_numba = min(row["numba [segments]"], row["numba [grouped_mm]"])
    flops = row["gemm_flops"]
    print(f"\n{row['config']}: T={row['tokens']} d_model={row['d_model']} d_hidden={row['d_hidden']} "
          f"E={row['experts']} k={row['top_k']} {row['expert']}; expert GEMMs {flops / 1e9:.1f} GFLOP per step")
    print(f"  {'implementation':24s} {'time':>10s} {'(time / fastest numba)':>23s} {'expert-GEMM TFLOP/s':>20s}")
    for column in (*COLUMNS, *peer_columns(row)):
        print(f"  {column:24s} {row[column]:9.4f}s {row[column] / fastest_numba:22.2f}x {flops / row[column] / 1e12:20.3f}")
    print(f"  per-token loop: measured on {row['loop_tokens']} tokens, scaled to T={row['tokens']}")
    print(f"  reference / fastest numba = {row['reference'] / fastest_numba:.2f}x; ceiling with "
          f"zero-time dispatch = reference / experts only = {row['reference'] / row['experts only']:.2f}x; "
          f"experts are {row['experts only'] / fastest_numba:.0%} of the numba step")
    for column in peer_columns(row):
        print(f"  {column} / fastest numba = {row[column] / fastest_numba:.2f}x")
    for note in row["notes"]:
        print(f"  {note}")
    achieved = flops / fastest_numba
    print(f"  expert GEMMs: {achieved / 1e12:.3f} TFLOP/s in the fastest numba step = {achieved / peak_flops:.2f} of peak "
          f"({flops / row['experts only'] / peak_flops:.2f} in experts only)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", choices=(*CONFIGS, *CONFIG_GROUPS), default="both",
                        help="one configuration, both (dispatch + fastmoe, the default) or all")
    parser.add_argument("--tokens", type=int, default=None, help="override T of the chosen configuration(s)")
    parser.add_argument("--experts", type=int, default=None, help="override E (default: the configuration's)")
    parser.add_argument("--top-k", type=int, default=None, help="override k (default: the configuration's)")
    parser.add_argument("--d-model", type=int, default=None, help="override d_model (default: the configuration's)")
    parser.add_argument("--d-hidden", type=int, default=None, help="override d_hidden (default: the configuration's)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds (one step of each implementation); the best is kept")
    parser.add_argument("--loop-tokens", type=int, default=256, help="tokens the per-token loop really runs")
    parser.add_argument("--device", type=device_argument, default=default_device(),
                        help="cpu or cuda[:N] (default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="parameters and activations (numba's kernels run bfloat16 on a float32 copy)")
    parser.add_argument("--peak-size", type=int, default=4096, help="n of the n×n×n torch.mm that measures the peak")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="leave out the HF Mixtral peer")
    parser.add_argument("--json", metavar="FILE", help="also write every number here (after each configuration)")
    args = parser.parse_args(argv)
    device = args.device
    print(f"{describe(device)}; torch {torch.__version__}, numba {numba.__version__} "
          f"({numba.get_num_threads()} threads), {args.dtype}, load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
    peak = peak_gemm_flops(device, getattr(torch, args.dtype), args.peak_size)
    print(f"peak: one {args.peak_size}^3 torch.mm reaches {peak / 1e12:.3f} TFLOP/s")
    report = {"device": describe(device), "dtype": args.dtype, "torch": torch.__version__, "numba": numba.__version__,
              "repeats": args.repeats, "peak_flops": peak, "peak_size": args.peak_size, "rows": []}
    for name in CONFIG_GROUPS.get(args.config, (args.config,)):
        row = bench_config(name, args)
        print_table(row, peak)
        report["rows"].append(row)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(report, out, indent=1)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
