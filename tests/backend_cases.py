"""The backend checks, shared by test_backends.py (in-process: numba CPU, real GPU) and
cudasim_check.py (a subprocess that runs them through the numba.cuda kernels in numba's simulator).

Every ``check_*`` function builds its inputs from a seed, runs the reference and the numba backend
on them, and raises AssertionError (with the difference) when they disagree. Integer outputs must be
*equal*; float outputs must be close within TOLERANCES; the numba backend run twice must give
bitwise-identical floats.
"""
from __future__ import annotations

import itertools

import torch

from fastmoe_edu import ROUTERS, MoELayer
from fastmoe_edu.backends import numba_backend, reference
from fastmoe_edu.experts import CLAMPED_SWIGLU_DEFAULTS, EXPERT_KINDS

# Tolerances, numba vs reference (torch.testing.assert_close: |got − want| ≤ atol + rtol·|want|).
# The two backends do the same arithmetic except for summation order and a few elementwise
# functions: the softmax/sigmoid routers (numba sums the partition function in float64, sequentially,
# with its own exp; torch sums vectorized in the tensor's dtype) and the combine (the reference's
# einsum may add the k terms in another order). The grouped GEMMs (torch._grouped_mm, the per-segment
# torch.mm loop, the tiled kernel) may order their inner sums over d_in ≤ 32 terms differently from
# the reference's loop of matmuls. The experts' SwiGLU: numba's float32 σ comes from its own vectorized
# e^{-g} (backends/numba_activation.py), within 3 ulp of the exact σ where torch's is within ~1 ulp.
#   float64: ε = 1.1e-16; a few ulps per op, amplified by ≤ 32-term sums and the layer's 3 GEMMs
#            gives ~1e-14 relative. rtol 1e-10 / atol 1e-12 is that with a wide margin, and still
#            catches any real bug (a wrong index or formula is off by O(1)).
#   float32: ε = 1.2e-7; ~ε × (32-term reduction) × (3 GEMM layers) ≈ 1e-5 relative in the worst
#            element; rtol 1e-4 / atol 1e-5 leaves a small margin over that.
# Measured over all CPU layer cases: the worst element used 14 % of the float32 tolerance (X-MoE's
# projection gradient) and 0.2 % of the float64 one.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}

ROUTER_OPTIONS = {
    "softmax_top_k": dict(top_k=2),
    "noisy_top_k": dict(top_k=2),
    "switch": dict(top_k=1, jitter_epsilon=0.1),
    "gshard": dict(top_k=2),
    "expert_choice": dict(top_k=2),
    "sigmoid": dict(top_k=2, num_groups=2, top_k_groups=1, route_scale=2.5),
    "xmoe": dict(top_k=2, routing_dim=4),
}
assert set(ROUTER_OPTIONS) == set(ROUTERS), "a router was added: give it options here"

#: Every (router, expert kind, dtype) the layer comparison runs for. The expert kinds differ only in an
#: elementwise activation (and whether W3 exists), so the full grid runs one plain and one gated kind;
#: the others run once each in OPTION_CASES.
GRID_EXPERT_KINDS = ("swiglu", "gelu")
LAYER_CASES = list(itertools.product(ROUTERS, GRID_EXPERT_KINDS, DTYPES))

#: Layer options beyond ROUTER_OPTIONS: case -> (router, expert kind, MoELayer keyword arguments). Each
#: option that reaches a backend routing function (groups for softmax, renormalize=False for sigmoid)
#: or only the torch code around it (route_scale for softmax, router_bias, logit_softcap, shared experts).
OPTION_CASES = {
    "softmax-groups-scale": ("softmax_top_k", "swiglu",
                             dict(top_k=2, num_groups=2, top_k_groups=1, route_scale=2.5, renormalize=False)),
    "softmax-groups-renormalized": ("softmax_top_k", "gelu", dict(top_k=2, num_groups=2, top_k_groups=1)),
    "softmax-bias-softcap": ("softmax_top_k", "swiglu", dict(top_k=2, router_bias=True, logit_softcap=1.5)),
    "sigmoid-not-renormalized": ("sigmoid", "swiglu", dict(top_k=2, num_groups=2, top_k_groups=1, route_scale=2.5,
                                                           renormalize=False)),
    "shared-gated": ("softmax_top_k", "swiglu", dict(top_k=2, num_shared_experts=2, shared_d_hidden=8,
                                                     shared_expert_gate=True)),
    "shared-sigmoid": ("sigmoid", "swiglu", dict(top_k=2, num_shared_experts=1, route_scale=2.5)),
    "output-bias": ("softmax_top_k", "swiglu", dict(top_k=2, output_bias=True)),
    "weights-on-input": ("sigmoid", "swiglu", dict(top_k=2, weights_on="input", renormalize=False)),
    # capacity_priority reaches prune_capacity (a token order for the kernels' walk); renormalize_after_dropping
    # and expert_dropout only the torch code around the backend (the layer's draws replayed by seeding).
    "priority-renormalized-after-dropping": ("softmax_top_k", "swiglu", dict(top_k=2, expert_capacity=4,
                                                                            capacity_priority="probability",
                                                                            renormalize_after_dropping=True)),
    "priority-sigmoid": ("sigmoid", "swiglu", dict(top_k=2, expert_capacity=4, capacity_priority="probability",
                                                   route_scale=2.5)),
    "gshard-priority-expert-dropout": ("gshard", "gelu", dict(top_k=2, expert_capacity=4,
                                                              capacity_priority="probability",
                                                              renormalize_after_dropping=True, expert_dropout=0.25)),
    **{f"expert-{kind}": ("softmax_top_k", kind, dict(top_k=2)) for kind in EXPERT_KINDS
       if kind not in GRID_EXPERT_KINDS},
}


def assert_close(got, want, dtype, what):
    torch.testing.assert_close(got, want, **TOLERANCES[dtype], msg=lambda message: f"{what}: {message}")


def assert_equal(got, want, what):
    if not torch.equal(got, want):
        raise AssertionError(f"{what}: not equal\n got  {got.tolist()}\n want {want.tolist()}")


# ----------------------------------------------------------------------------------------------------
# The whole layer
# ----------------------------------------------------------------------------------------------------
def make_layer(router, expert, dtype, backend, device, sizes, capacity_factor=None, options=None):
    """A MoELayer with weights drawn from seed 0 (so every backend gets the same weights)."""
    num_tokens, d_model, d_hidden, num_experts = sizes
    torch.manual_seed(0)
    options = ROUTER_OPTIONS[router] if options is None else options
    layer = MoELayer(d_model, d_hidden, num_experts, router=router, expert=expert, backend=backend,
                     capacity_factor=capacity_factor, bias=(expert in ("gelu", "relu")), **options)
    layer = layer.to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if ".b" in name or name in ("router.logit_bias", "shared_experts.gate"):   # non-zero biases, gate
                param.normal_()
        if router == "sigmoid":                               # a non-trivial selection bias
            layer.router.bias.copy_(torch.randn(num_experts, dtype=dtype, device=device) * 0.1)
    return layer


def forward_backward(layer, x, upstream):
    """Output, routing, input gradient and parameter gradients of one training step."""
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)                                      # noisy routers draw the same noise
    y = layer(x)
    loss = (y * upstream).sum() + layer.aux_loss
    names = [name for name, _ in layer.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *layer.parameters()], allow_unused=True)
    results = {"output": y.detach(), "expert_ids": layer.last_routing.expert_ids,
               "tokens_per_expert": layer.last_routing.tokens_per_expert, "grad input": grads[0]}
    for name, grad in zip(names, grads[1:]):
        results[f"grad {name}"] = grad
    return results


def check_layer(router, expert, dtype_name, device="cpu", sizes=(64, 16, 24, 8), capacity_factor=None,
                backend="numba", options=None):
    """MoELayer(backend) against MoELayer("reference") with identical weights, input and noise.
    ``options``: the MoELayer keyword arguments, instead of ROUTER_OPTIONS[router]."""
    dtype = DTYPES[dtype_name]
    want_layer = make_layer(router, expert, dtype, "reference", device, sizes, capacity_factor, options)
    got_layer = make_layer(router, expert, dtype, backend, device, sizes, capacity_factor, options)
    got_layer.load_state_dict(want_layer.state_dict())
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(sizes[0], sizes[1], generator=generator, dtype=dtype).to(device)
    upstream = torch.randn(sizes[0], sizes[1], generator=generator, dtype=dtype).to(device)

    want = forward_backward(want_layer, x, upstream)
    got = forward_backward(got_layer, x, upstream)
    again = forward_backward(got_layer, x, upstream)
    for name in want:
        if want[name] is None:
            assert got[name] is None or torch.count_nonzero(got[name]) == 0, name
            continue
        if want[name].is_floating_point():
            assert_close(got[name], want[name], dtype, name)
            assert_equal(again[name], got[name], f"{name} (second run, bitwise)")
        else:
            assert_equal(got[name], want[name], name)


def check_second_order(router, dtype_name, device="cpu", sizes=(12, 6, 8, 4), backend="numba"):
    """A gradient penalty through the layer: L = Σ (∂⟨y, u⟩/∂x)² (create_graph=True), then ∂L/∂x and ∂L/∂θ,
    against the reference (the numba backward passes fall back to the reference's torch operations there,
    backends/second_order.py). A kernel-only backward would leave these gradients None."""
    dtype = DTYPES[dtype_name]
    want_layer = make_layer(router, "swiglu", dtype, "reference", device, sizes)
    got_layer = make_layer(router, "swiglu", dtype, backend, device, sizes)
    got_layer.load_state_dict(want_layer.state_dict())
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(sizes[0], sizes[1], generator=generator, dtype=dtype).to(device)
    upstream = torch.randn(sizes[0], sizes[1], generator=generator, dtype=dtype).to(device)
    results = []
    for layer in (want_layer, got_layer):
        inputs = x.clone().requires_grad_(True)
        (grad_x,) = torch.autograd.grad((layer(inputs) * upstream).sum(), inputs, create_graph=True)
        penalty = grad_x.pow(2).sum()
        results.append(torch.autograd.grad(penalty, [inputs, *layer.parameters()], allow_unused=True))
    names = ["input", *(name for name, _ in want_layer.named_parameters())]
    for name, want, got in zip(names, *results):
        if want is None or torch.count_nonzero(want) == 0:
            assert got is None or torch.count_nonzero(got) == 0, f"second-order grad {name}: expected none"
            continue
        assert got is not None, f"second-order grad {name}: None (the backward carried no graph)"
        assert_close(got, want, dtype, f"second-order grad {name}")


# ----------------------------------------------------------------------------------------------------
# Single steps, on random routings and on the edge cases
# ----------------------------------------------------------------------------------------------------
def random_expert_ids(num_tokens, top_k, num_experts, seed, drop_fraction=0.1):
    """k distinct experts per token (like a router), a fraction switched off (-1)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.rand(num_tokens, num_experts, generator=generator).topk(top_k, dim=1).indices
    dropped = torch.rand(num_tokens, top_k, generator=generator) < drop_fraction
    return torch.where(dropped, -1, ids)


def edge_case_ids(name, seed=0):
    """(expert_ids, num_experts) for the named edge case."""
    generator = torch.Generator().manual_seed(seed)
    if name == "expert_without_tokens":               # experts 2 and 5 get nothing
        ids = torch.tensor([0, 1, 3, 4])[torch.randint(0, 4, (20, 1), generator=generator)]
        return ids, 6
    if name == "all_to_one_expert":
        return torch.full((16, 1), 2), 4
    if name == "one_token":
        return torch.tensor([[3, 1]]), 4
    if name == "k_equals_num_experts":
        return torch.stack([torch.randperm(4, generator=generator) for _ in range(7)]), 4
    if name == "all_dropped":
        return torch.full((9, 2), -1), 4
    raise ValueError(name)


EDGE_CASES = ("expert_without_tokens", "all_to_one_expert", "one_token", "k_equals_num_experts", "all_dropped")


def check_integer_steps(expert_ids, num_experts, capacities=(None, 1, 3), device="cpu"):
    """prune_capacity (in token order and by priority, over the batch and per group of tokens), count, prefix sum
    and stable positions: numba equal to the reference."""
    expert_ids = expert_ids.to(device)
    num_tokens = expert_ids.shape[0]
    # Priorities with many ties (4 values), as the router's max p may tie: the ties must keep token order.
    generator = torch.Generator().manual_seed(num_tokens)
    priority = (torch.randint(0, 4, (num_tokens,), generator=generator) / 4).double().to(device)
    group = next((size for size in (5, 3, 2) if num_tokens % size == 0 and size < num_tokens), None)
    for capacity in capacities:
        for tokens_per_group in {None, group}:
            for order in (None, priority):
                what = (f"prune_capacity C={capacity}, tokens_per_group={tokens_per_group}, "
                        f"{'by priority' if order is not None else 'in token order'}")
                args = (expert_ids, num_experts, capacity, tokens_per_group, order)
                assert_equal(numba_backend.prune_capacity(*args), reference.prune_capacity(*args), what)
    counts = reference.count_tokens_per_expert(expert_ids, num_experts)
    assert_equal(numba_backend.count_tokens_per_expert(expert_ids, num_experts), counts, "count_tokens_per_expert")
    starts = reference.exclusive_prefix_sum(counts)
    assert_equal(numba_backend.exclusive_prefix_sum(counts), starts, "exclusive_prefix_sum")
    assert_equal(numba_backend.stable_positions(expert_ids, starts), reference.stable_positions(expert_ids, starts),
                 "stable_positions")


def check_float_steps(expert_ids, num_experts, width, dtype_name, seed=0, device="cpu"):
    """scatter_rows and gather_combine, forward and backward: close to the reference, bitwise repeatable."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    num_tokens = expert_ids.shape[0]
    counts = reference.count_tokens_per_expert(expert_ids, num_experts)
    rows = reference.stable_positions(expert_ids, reference.exclusive_prefix_sum(counts)).to(device)
    num_rows = int(counts.sum())
    x = torch.randn(num_tokens, width, generator=generator, dtype=dtype).to(device)
    grad_buffer = torch.randn(num_rows, width, generator=generator, dtype=dtype).to(device)
    expert_out = torch.randn(num_rows, width, generator=generator, dtype=dtype).to(device)
    weights = (torch.rand(expert_ids.shape, generator=generator, dtype=dtype) * (expert_ids >= 0)).to(device)
    grad_y = torch.randn(num_tokens, width, generator=generator, dtype=dtype).to(device)

    def scatter(backend):
        x_leaf = x.clone().requires_grad_(True)
        buffer = backend.scatter_rows(x_leaf, rows, num_rows)
        return {"scatter_rows": buffer.detach(),
                "scatter_rows backward": torch.autograd.grad(buffer, x_leaf, grad_buffer)[0]}

    def combine(backend):
        out_leaf, weights_leaf = expert_out.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        y = backend.gather_combine(out_leaf, rows, weights_leaf)
        grad_out, grad_weights = torch.autograd.grad(y, (out_leaf, weights_leaf), grad_y)
        return {"gather_combine": y.detach(), "gather_combine backward (expert_out)": grad_out,
                "gather_combine backward (weights)": grad_weights}

    _compare_runs(lambda backend: {**scatter(backend), **combine(backend)}, dtype)


def check_rows_nobody_owns(expert_ids, num_experts, width, dtype_name, extra_rows=3, seed=0, device="cpu"):
    """A buffer with ``extra_rows`` rows past the kept assignments' (the layer never asks for one; the Protocol
    allows it): the scatter leaves them 0 and the combine's backward gives them a zero gradient (kernels that
    write only the kept rows must zero these; output memory starts uninitialized)."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    counts = reference.count_tokens_per_expert(expert_ids, num_experts)
    rows = reference.stable_positions(expert_ids, reference.exclusive_prefix_sum(counts)).to(device)
    num_rows = int(counts.sum()) + extra_rows
    x = torch.randn(expert_ids.shape[0], width, generator=generator, dtype=dtype).to(device)
    expert_out = torch.randn(num_rows, width, generator=generator, dtype=dtype).to(device)
    weights = torch.rand(expert_ids.shape, generator=generator, dtype=dtype).to(device)
    grad_y = torch.randn(expert_ids.shape[0], width, generator=generator, dtype=dtype).to(device)

    def run(backend):
        out_leaf = expert_out.clone().requires_grad_(True)
        y = backend.gather_combine(out_leaf, rows, weights)
        return {"scatter_rows with extra rows": backend.scatter_rows(x, rows, num_rows),
                "gather_combine backward with extra rows": torch.autograd.grad(y, out_leaf, grad_y)[0]}

    _compare_runs(run, dtype)


#: The 16-bit types the row kernels take as they are (numba_cpu.py: bit patterns, float32 sums).
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: Each 16-bit type's explicit mantissa bits and smallest normal exponent (bfloat16: float32's range).
HALF_FORMATS = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}


def half_ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at each of ``values`` (the subnormal spacing below the normals)."""
    mantissa_bits, min_exponent = HALF_FORMATS[dtype]
    exponent = torch.floor(torch.log2(values.abs().clamp(min=2.0 ** min_exponent)))
    return torch.exp2(exponent - mantissa_bits)


def check_float_steps_16bit(expert_ids, num_experts, width, dtype_name, seed=0, device="cpu"):
    """scatter_rows and gather_combine, forward and backward, on bfloat16 / float16 tensors (no float32 copy:
    the kernels read the 16-bit values), against the *exact* results: the reference's functions in float64 on
    the same 16-bit inputs, which float64 holds exactly.

    The scatter is a copy: equal. Every other output element is one sum of n terms (n = k, or the width for the
    weights' gradient) accumulated in float32 (or float64) and rounded once to nearest 16-bit value. The float32
    sum s is within δ = n·2⁻²⁴·Σ|terms| of the exact value v, and rounding moves it by at most half a 16-bit
    ulp at s, so |got − v| ≤ ½ ulp₁₆(|v| + δ) + δ. That bound catches a kernel that truncates instead of rounding
    (its error reaches a whole ulp) as well as a wrong row, weight or slot (hundreds of ulps). Also bitwise
    repeatable from run to run."""
    dtype = HALF_DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    num_tokens, top_k = expert_ids.shape
    counts = reference.count_tokens_per_expert(expert_ids, num_experts)
    rows = reference.stable_positions(expert_ids, reference.exclusive_prefix_sum(counts)).to(device)
    num_rows = int(counts.sum())

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(device)
    x, grad_buffer, expert_out, grad_y = draw(num_tokens, width), draw(num_rows, width), draw(num_rows, width), \
        draw(num_tokens, width)
    weights = (torch.rand(expert_ids.shape, generator=generator) * (expert_ids >= 0)).to(dtype).to(device)

    def run(backend, dtype, magnitudes=False):
        """Every output of the two steps, for inputs converted to ``dtype`` (their magnitudes if asked)."""
        def cast(tensor):
            return (tensor.abs() if magnitudes else tensor).to(dtype).clone().requires_grad_(True)
        x_leaf, out_leaf, weights_leaf = cast(x), cast(expert_out), cast(weights)
        buffer = backend.scatter_rows(x_leaf, rows, num_rows)
        y = backend.gather_combine(out_leaf, rows, weights_leaf)
        return {"scatter_rows": buffer.detach(),
                "scatter_rows backward": torch.autograd.grad(buffer, x_leaf, cast(grad_buffer))[0],
                "gather_combine": y.detach(),
                **dict(zip(("gather_combine backward (expert_out)", "gather_combine backward (weights)"),
                           torch.autograd.grad(y, (out_leaf, weights_leaf), cast(grad_y))))}

    got, again = run(numba_backend, dtype), run(numba_backend, dtype)
    exact, magnitude = run(reference, torch.float64), run(reference, torch.float64, magnitudes=True)
    terms = {"gather_combine backward (weights)": width}
    for name in got:
        if got[name].dtype != dtype:
            raise AssertionError(f"{name}: dtype {got[name].dtype}, expected {dtype}")
        assert_equal(again[name], got[name], f"{name} (second run, bitwise)")
        if name == "scatter_rows":
            assert_equal(got[name].double(), exact[name], name)
            continue
        slack = terms.get(name, top_k) * 2.0 ** -24 * magnitude[name]                 # δ
        bound = 0.5 * half_ulp(exact[name].abs() + slack, dtype) + slack
        error = (got[name].double() - exact[name]).abs()
        if not (error <= bound).all():
            worst = int((error - bound).argmax())
            raise AssertionError(f"{dtype_name} {name}: |got − exact| {error.flatten()[worst]:.3g} exceeds the bound "
                                 f"{bound.flatten()[worst]:.3g} at element {worst}")


def check_routers(num_tokens, num_experts, top_k, dtype_name, seed=0, device="cpu"):
    """The fused routing functions, forward (ids equal) and backward, every variant."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_tokens, num_experts, generator=generator, dtype=dtype) * 2).to(device)
    bias = (torch.randn(num_experts, generator=generator) * 0.1).to(device)
    grad_weights = torch.randn(num_tokens, top_k, generator=generator, dtype=dtype).to(device)
    groups = 2 if num_experts % 2 == 0 and num_experts >= 2 * top_k else None
    variants = {
        "softmax renormalized": lambda backend, l: backend.softmax_top_k_route(l, top_k, True),
        "softmax plain": lambda backend, l: backend.softmax_top_k_route(l, top_k, False),
        "sigmoid": lambda backend, l: backend.sigmoid_top_k_route(l, bias, top_k, 2.5, None, None),
        "sigmoid grouped": lambda backend, l: backend.sigmoid_top_k_route(l, bias, top_k, 1.0, groups,
                                                                        1 if groups else None),
        "sigmoid not renormalized": lambda backend, l: backend.sigmoid_top_k_route(l, bias, top_k, 2.5, groups,
                                                                                 1 if groups else None, False),
    }
    if groups:                                 # DeepSeek-V2: group-limited softmax, groups scored by their max p
        variants["softmax grouped renormalized"] = lambda backend, l: backend.softmax_top_k_route(l, top_k, True,
                                                                                                 groups, 1)
        variants["softmax grouped plain"] = lambda backend, l: backend.softmax_top_k_route(l, top_k, False, groups, 1)

    def run(backend):
        results = {}
        for name, route in variants.items():
            logits_leaf = logits.clone().requires_grad_(True)
            expert_ids, weights = route(backend, logits_leaf)
            results[f"{name} ids"] = expert_ids
            results[f"{name} weights"] = weights.detach()
            results[f"{name} backward"] = torch.autograd.grad(weights, logits_leaf, grad_weights)[0]
        return results

    _compare_runs(run, dtype)


#: The sigmoid router far from zero, where σ underflows to 0 (float32: l < −104; float64: l < −745) or
#: saturates at 1. Logits [T, E = 4]; the selection bias makes the choice unambiguous even where every σ is
#: 0: experts 0 and 1, except row 2 (1 then 0). The chosen σ underflow (rows 0, 3, 4 in float32), saturate
#: (row 1), or one of them is 0 (row 2); row 4 is where float32 σ is subnormal and 1 / Σ σ overflows.
EXTREME_SIGMOID_LOGITS = [
    [-1e4, -1e4 + 1, -1e4 + 2, -1e4 + 3],
    [1e4, 1e4, -1e4, -1e4],
    [-1e4, 2.0, -1e4, -1e4],
    [-200.0, -150.0, -120.0, -100.0],
    [-95.0, -96.0, -1e4, -1e4],
]
EXTREME_SIGMOID_BIAS = [0.3, 0.2, 0.1, 0.0]
EXTREME_SIGMOID_IDS = [[0, 1], [0, 1], [1, 0], [0, 1], [0, 1]]


def check_sigmoid_extreme_logits(dtype_name, device="cpu"):
    """sigmoid_top_k_route on EXTREME_SIGMOID_LOGITS, plain and grouped: finite weights and gradients."""
    dtype = DTYPES[dtype_name]
    logits = torch.tensor(EXTREME_SIGMOID_LOGITS, dtype=dtype, device=device)
    bias = torch.tensor(EXTREME_SIGMOID_BIAS, device=device)
    grad_weights = torch.randn(logits.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)

    def run(backend):
        results = {}
        for groups in (None, 2):
            logits_leaf = logits.clone().requires_grad_(True)
            expert_ids, weights = backend.sigmoid_top_k_route(logits_leaf, bias, 2, 2.5, groups,
                                                                 1 if groups else None)
            grad_logits = torch.autograd.grad(weights, logits_leaf, grad_weights)[0]
            if not (torch.isfinite(weights).all() and torch.isfinite(grad_logits).all()):
                raise AssertionError(f"{backend.NAME}, num_groups={groups}: weights {weights.tolist()}, "
                                     f"gradient {grad_logits.tolist()}")
            results[f"groups={groups} ids"] = expert_ids
            results[f"groups={groups} weights"] = weights.detach()
            results[f"groups={groups} backward"] = grad_logits
        return results

    _compare_runs(run, dtype)


def check_grouped_gemm(implementation, counts, d_in, d_out, dtype_name, tile=None, seed=0, device="cpu"):
    """numba_backend.grouped_matmul with ``implementation`` against the reference, forward and backward."""
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    rows = torch.randn(int(counts.sum()), d_in, generator=generator, dtype=dtype).to(device)
    weight = torch.randn(counts.numel(), d_out, d_in, generator=generator, dtype=dtype).to(device)
    grad_out = torch.randn(rows.shape[0], d_out, generator=generator, dtype=dtype).to(device)
    counts = counts.to(device)

    def run(backend):
        rows_leaf, weight_leaf = rows.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = backend.grouped_matmul(rows_leaf, weight_leaf, counts)
        # First order by the backward pass itself (create_graph=False), then again with a graph: that takes
        # backends/second_order.py's path, whose gradients the penalty on them differentiates once more.
        grad_rows, grad_weight = torch.autograd.grad(out, (rows_leaf, weight_leaf), grad_out, retain_graph=True)
        graph_rows, graph_weight = torch.autograd.grad(out, (rows_leaf, weight_leaf), grad_out, create_graph=True)
        penalty = graph_rows.pow(2).sum() + graph_weight.pow(2).sum()
        second_rows, second_weight = torch.autograd.grad(penalty, (rows_leaf, weight_leaf))
        return {"grouped_matmul": out.detach(), "grad rows": grad_rows.detach(), "grad weight": grad_weight.detach(),
                "second-order rows": second_rows, "second-order weight": second_weight}

    previous = numba_backend.current_grouped_gemm()
    numba_backend.set_grouped_gemm(implementation, tile)
    try:
        _compare_runs(run, dtype)
    finally:
        numba_backend.set_grouped_gemm(*previous)


def check_expert_feed_forward(kind, counts, bias, dtype_name, d_model=8, d_hidden=12, seed=0, device="cpu"):
    """backend.expert_feed_forward against the reference's: the output, the gradients of the rows and of every
    weight and bias, and second order. ``counts`` may hold empty segments; weights of std 0.5 give gate values of
    std ≈ 1.4 (both branches of σ; the extremes are the kernel test's, test_swiglu_kernels_at_extreme_gates), at
    the scale the tolerances above assume."""
    from fastmoe_edu.experts import Experts
    dtype = DTYPES[dtype_name]
    torch.manual_seed(seed)
    constants = CLAMPED_SWIGLU_DEFAULTS if kind == "clamped_swiglu" else {}
    experts = Experts(len(counts), d_model, d_hidden, kind, bias, **constants).to(dtype)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.5)
    experts = experts.to(device)
    generator = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    rows = torch.randn(int(counts.sum()), d_model, generator=generator, dtype=dtype).to(device)
    grad_out = torch.randn(rows.shape[0], d_model, generator=generator, dtype=dtype).to(device)
    counts = counts.to(device)
    names = [name for name, _ in experts.named_parameters()]

    def run(backend):
        rows_leaf = rows.clone().requires_grad_(True)
        leaves = [rows_leaf, *experts.parameters()]
        out = backend.expert_feed_forward(experts, rows_leaf, counts)
        # First order by the backward pass itself, then with a graph (second_order.py's path) for the second
        # order; b2's gradient is Σ of grad_out alone, so the penalty does not depend on b2.
        firsts = torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
        graphs = torch.autograd.grad(out, leaves, grad_out, create_graph=True)
        seconds = torch.autograd.grad(sum(g.pow(2).sum() for g in graphs), leaves, allow_unused=True)
        seconds = [torch.zeros_like(leaf) if second is None else second for leaf, second in zip(leaves, seconds)]
        result = {"expert_feed_forward": out.detach()}
        for name, first, second in zip(["rows", *names], firsts, seconds):
            result[f"grad {name}"], result[f"second-order {name}"] = first.detach(), second
        return result

    _compare_runs(run, dtype)


def _compare_runs(run, dtype):
    """run(backend) -> {name: tensor}: numba vs reference, and numba twice (bitwise)."""
    want, got, again = run(reference), run(numba_backend), run(numba_backend)
    for name in want:
        if want[name].is_floating_point():
            assert_close(got[name], want[name], dtype, name)
            assert_equal(again[name], got[name], f"{name} (second run, bitwise)")
        else:
            assert_equal(got[name], want[name], name)


# ----------------------------------------------------------------------------------------------------
# Step cases for the GPU targets: tiny sizes, because the simulator starts a Python thread per GPU thread
# ----------------------------------------------------------------------------------------------------
def kernel_cases(device: str) -> dict:
    """case id -> a check (no arguments) of single steps, edge cases and the tiled grouped GEMM."""
    cases = {
        # 50 tokens × 2 slots = 4 chunks of the CUDA ranking (32 assignments each).
        "integer-random": lambda: check_integer_steps(random_expert_ids(50, 2, 6, seed=0), 6, (None, 5, 13), device),
        "float-random-float32": lambda: check_float_steps(random_expert_ids(10, 2, 4, seed=1), 4, 3, "float32",
                                                          device=device),
        # 40 columns: a warp's 32 threads take one or two columns each (the column stride of the row kernels).
        **{f"float-random-{name}": lambda n=name: check_float_steps_16bit(random_expert_ids(9, 2, 4, seed=2), 4, 40,
                                                                          n, device=device) for name in HALF_DTYPES},
        "routers-k-equals-E": lambda: check_routers(3, 4, 4, "float64", device=device),
        "float-rows-nobody-owns": lambda: check_rows_nobody_owns(random_expert_ids(7, 2, 4, seed=3), 4, 5, "float32",
                                                                 device=device),
        "tiled-gemm-float64": lambda: check_grouped_gemm("tiled", [3, 0, 5, 2], 5, 6, "float64", 4, device=device),
        "tiled-gemm-float32": lambda: check_grouped_gemm("tiled", [6, 1, 0], 4, 3, "float32", 4, device=device),
        "tiled-gemm-tile16": lambda: check_grouped_gemm("tiled", [17, 0, 2], 3, 5, "float64", 16, device=device),
        "tiled-gemm-all-empty": lambda: check_grouped_gemm("tiled", [0, 0], 3, 2, "float64", 4, device=device),
    }
    for name in EDGE_CASES:
        cases[f"integer-{name}"] = lambda n=name: check_integer_steps(*edge_case_ids(n), device=device)
        cases[f"float-{name}"] = lambda n=name: check_float_steps(*edge_case_ids(n), 3, "float64", device=device)
    for dtype_name in DTYPES:
        cases[f"routers-{dtype_name}"] = lambda d=dtype_name: check_routers(6, 8, 2, d, device=device)
        cases[f"sigmoid-extreme-logits-{dtype_name}"] = (
            lambda d=dtype_name: check_sigmoid_extreme_logits(d, device=device))
        for router in ("softmax_top_k", "sigmoid"):       # the two routers with a numba routing function
            cases[f"second-order-{router}-{dtype_name}"] = (
                lambda r=router, d=dtype_name: check_second_order(r, d, device=device))
    return cases


# ----------------------------------------------------------------------------------------------------
# What cudasim_check.py runs in numba's CUDA simulator
# ----------------------------------------------------------------------------------------------------
SIMULATOR_LAYER_SIZES = (12, 8, 8, 4)          # tokens, d_model, d_hidden, experts
#: The one dtype each option case runs in, in the simulator: float32 and float64 by turns. The simulator runs the
#: kernels' Python source alike for either dtype (nothing is compiled per dtype), the layer grid runs every router
#: in both, and the CPU target and a real GPU run every option case in both; the simulator's run (a Python thread
#: per GPU thread) is the suite's slowest step, and the second dtype of each option case was 40 % of it.
SIMULATOR_OPTION_DTYPES = {case: list(DTYPES)[index % 2] for index, case in enumerate(OPTION_CASES)}


def simulator_cases() -> dict:
    """case id -> a check to run (no arguments). Layer cases are named ``layer-{router}-{expert}-{dtype}``;
    the tensors are CPU tensors, which cudasim_check.py sends through the CUDA kernels."""
    cases = {}
    for router, expert, dtype_name in LAYER_CASES:
        cases[f"layer-{router}-{expert}-{dtype_name}"] = (
            lambda r=router, e=expert, d=dtype_name: check_layer(r, e, d, sizes=SIMULATOR_LAYER_SIZES))
    for router in ("switch", "gshard"):
        cases[f"capacity-{router}"] = (lambda r=router: check_layer(
            r, "swiglu", "float64", sizes=SIMULATOR_LAYER_SIZES, capacity_factor=0.5))
    for case, (router, expert, options) in OPTION_CASES.items():
        dtype_name = SIMULATOR_OPTION_DTYPES[case]
        cases[f"options-{case}-{dtype_name}"] = (lambda r=router, e=expert, o=options, d=dtype_name: check_layer(
            r, e, d, sizes=SIMULATOR_LAYER_SIZES, options=o))
    for router in ROUTERS:                       # an empty batch: no kernel may choke on 0 tokens
        cases[f"zero-tokens-{router}"] = (lambda r=router: check_layer(
            r, "swiglu", "float32", sizes=(0, *SIMULATOR_LAYER_SIZES[1:]), capacity_factor=1.0))
    cases.update(kernel_cases("cpu"))
    return cases
