"""The numba backend against the reference: the whole layer and every step, on every target.

Targets:
    reference       the reference against itself (checks the harness: identical weights, input, noise)
    numba-cpu       numba_cpu.py, in this process
    numba-cudasim   numba_cuda.py in numba's CUDA simulator, in one subprocess (tests/cudasim_check.py)
    numba-gpu       numba_cuda.py on a real NVIDIA GPU (skipped without one)

The checks and their tolerances are in backend_cases.py (tolerances justified there).
"""
import importlib
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import backend_cases
from backend_cases import (DTYPES, EDGE_CASES, HALF_DTYPES, LAYER_CASES, OPTION_CASES, SIMULATOR_OPTION_DTYPES,
                           check_float_steps,
                           check_float_steps_16bit, check_grouped_gemm, check_expert_feed_forward,
                           check_integer_steps, check_layer,
                           check_routers, check_rows_nobody_owns, check_second_order,
                           check_sigmoid_extreme_logits, edge_case_ids, random_expert_ids)
from fastmoe_edu import ROUTERS, MoELayer, backends
from fastmoe_edu.backends import get_backend, numba_backend, numba_cpu, reference, set_cpu_threads
from fastmoe_edu.backends.interface import FUNCTIONS, Backend, HasThreadPool, missing_members

HAS_GPU = torch.cuda.is_available() and numba_backend.available("cuda")[0]
TARGETS = ["reference", "numba-cpu", "numba-cudasim",
           pytest.param("numba-gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")])]
SIMULATOR_CASES = list(backend_cases.simulator_cases())


@pytest.fixture(scope="session")
def cudasim_results():
    """Run every simulator case once, in a subprocess with NUMBA_ENABLE_CUDASIM=1 (about a minute)."""
    script = Path(__file__).resolve().parent / "cudasim_check.py"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"cudasim_check.py failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# The whole layer: targets × routers × expert kinds × dtypes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router,expert,dtype_name", LAYER_CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_layer_matches_reference(target, router, expert, dtype_name, request):
    if target == "numba-cudasim":
        error = request.getfixturevalue("cudasim_results")[f"layer-{router}-{expert}-{dtype_name}"]
        assert error is None, error
    elif target == "numba-gpu":
        check_layer(router, expert, dtype_name, device="cuda")
    else:
        check_layer(router, expert, dtype_name, backend="reference" if target == "reference" else "numba")


def _option_params():
    """target × dtype × option case; the simulator takes each case in one dtype (SIMULATOR_OPTION_DTYPES)."""
    params = []
    for target in TARGETS:
        name, marks = (target.values[0], target.marks) if hasattr(target, "values") else (target, ())
        if name == "reference":
            continue
        params += [pytest.param(name, dtype_name, case, marks=marks, id=f"{name}-{dtype_name}-{case}")
                   for case in OPTION_CASES for dtype_name in DTYPES
                   if name != "numba-cudasim" or SIMULATOR_OPTION_DTYPES[case] == dtype_name]
    return params


@pytest.mark.parametrize("target,dtype_name,case", _option_params())
def test_layer_options_match_reference(target, dtype_name, case, request):
    """Router options (groups, route_scale, renormalize, router_bias, logit_softcap), shared experts and the
    expert kinds outside the grid: forward, input gradient and every router/expert/shared gradient (in the
    simulator in one dtype per case, float32 and float64 by turns: backend_cases.SIMULATOR_OPTION_DTYPES)."""
    router, expert, options = OPTION_CASES[case]
    if target == "numba-cudasim":
        error = request.getfixturevalue("cudasim_results")[f"options-{case}-{dtype_name}"]
        assert error is None, error
    else:
        check_layer(router, expert, dtype_name, device="cuda" if target == "numba-gpu" else "cpu", options=options)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_layer_with_capacity_drops(router):
    check_layer(router, "swiglu", "float64", capacity_factor=0.5)


@pytest.mark.parametrize("router", ["softmax_top_k", "sigmoid"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_second_order_gradients(router, dtype_name):
    """create_graph=True through the numba layer (CPU kernels): the gradient of a gradient penalty equals
    the reference's, where the kernels' backward alone would give None (float32) or a torch error (float64)."""
    check_second_order(router, dtype_name)


@pytest.mark.parametrize("case", [c for c in SIMULATOR_CASES if not c.startswith(("layer-", "options-"))])
def test_cuda_kernels_in_simulator(case, cudasim_results):
    """Steps, edge cases and the tiled grouped GEMM through numba.cuda, in the simulator."""
    assert cudasim_results[case] is None, cudasim_results[case]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")
@pytest.mark.parametrize("case", list(backend_cases.kernel_cases("cuda")))
def test_cuda_kernels_on_gpu(case):
    """The same step cases as in the simulator, on CUDA tensors on a real GPU."""
    backend_cases.kernel_cases("cuda")[case]()


# ----------------------------------------------------------------------------------------------------
# Single steps on the CPU target
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(3000, 2, 64), (700, 3, 5), (5000, 1, 16)])
def test_integer_steps_random(num_tokens, top_k, num_experts):
    """Random routings with drops; T·k > ASSIGNMENTS_PER_CHUNK so the ranking spans several chunks."""
    expert_ids = random_expert_ids(num_tokens, top_k, num_experts, seed=num_tokens)
    assert expert_ids.numel() > numba_cpu.ASSIGNMENTS_PER_CHUNK or num_tokens == 700
    check_integer_steps(expert_ids, num_experts, capacities=(None, 1, 17, num_tokens // num_experts))


@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_cases(name):
    expert_ids, num_experts = edge_case_ids(name)
    check_integer_steps(expert_ids, num_experts)
    for dtype_name in DTYPES:
        check_float_steps(expert_ids, num_experts, 5, dtype_name)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_float_steps_random(dtype_name):
    check_float_steps(random_expert_ids(3000, 2, 64, seed=5), 64, 33, dtype_name)


def test_rows_nobody_owns_are_zero():
    check_rows_nobody_owns(random_expert_ids(300, 2, 8, seed=4), 8, 16, "float64")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(200, 16, 2), (50, 8, 1), (9, 4, 4), (1, 6, 3)])
def test_routers(num_tokens, num_experts, top_k, dtype_name):
    check_routers(num_tokens, num_experts, top_k, dtype_name)


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_sigmoid_router_extreme_logits(dtype_name):
    """Where σ underflows or saturates: finite, and numba equal to the reference (ids) and close (floats)."""
    check_sigmoid_extreme_logits(dtype_name)


def test_capacity_all_dropped_outputs_zero():
    """Capacity 0 for everyone is impossible through a router, but the steps must still agree."""
    expert_ids = random_expert_ids(40, 2, 4, seed=3)
    pruned = numba_backend.prune_capacity(expert_ids, 4, 0)
    assert (pruned == -1).all()
    check_float_steps(pruned, 4, 3, "float64")


# ----------------------------------------------------------------------------------------------------
# Grouped GEMM implementations
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["segments", "grouped_mm"])
@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("counts,d_in,d_out", [
    ([5, 0, 7, 3], 8, 12),          # widths of 16-byte rows in float32: torch._grouped_mm runs
    ([5, 0, 7, 3], 7, 9),           # odd widths: grouped_mm falls back to the segment loop
    ([0, 0, 0], 8, 4),              # no rows at all
    ([0, 11], 4, 4),                # leading empty segment
])
def test_grouped_gemm(implementation, dtype_name, counts, d_in, d_out):
    check_grouped_gemm(implementation, counts, d_in, d_out, dtype_name)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("kind,counts,bias", [
    ("swiglu", [5, 0, 70, 3], False),   # the fused SwiGLUExperts: an empty segment, a segment over 64 rows
    ("swiglu", [0, 0, 0], False),       # no rows at all
    ("swiglu", [4, 6, 0], True),        # biases: the reference's function on numba's grouped GEMM
    ("geglu", [3, 0, 5], False),
    ("clamped_swiglu", [3, 0, 5], True),
])
def test_expert_feed_forward(kind, counts, bias, dtype_name):
    check_expert_feed_forward(kind, counts, bias, dtype_name)


def test_fused_experts_refuse_rows_outside_the_segments():
    from fastmoe_edu.experts import Experts
    with pytest.raises(ValueError, match="rows has 11 rows but counts sum to 10"):
        numba_backend.expert_feed_forward(Experts(3, 8, 12), torch.randn(11, 8), torch.tensor([5, 0, 5]))


def test_swiglu_kernels_at_extreme_gates():
    """numba_activation's two float32 passes against torch's formulas where σ is hardest: gates of 0, ±1e-30,
    ±100 and −88.5 (past the clamp at 87), and random ones spanning ±16. The backward's recomputed hidden units
    are the forward's to 2 float32 ulp (fastmath lets the compiler contract g·σ·u differently in the two loops)."""
    from fastmoe_edu.backends import numba_activation
    from fastmoe_edu.experts import hidden_activation
    generator = torch.Generator().manual_seed(0)
    gate = torch.randn(37, 24, generator=generator) * 4
    gate.view(-1)[:6] = torch.tensor([0.0, 1e-30, -1e-30, 100.0, -100.0, -88.5])
    up, grad_hidden = torch.randn(37, 24, generator=generator), torch.randn(37, 24, generator=generator)
    hidden, again, grad_gate, grad_up = (torch.empty_like(gate) for _ in range(4))
    numba_activation.swiglu_forward_float32(gate.numpy(), up.numpy(), hidden.numpy())
    numba_activation.swiglu_backward_float32(gate.numpy(), up.numpy(), grad_hidden.numpy(), grad_gate.numpy(),
                                             grad_up.numpy(), again.numpy())
    gate_leaf, up_leaf = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    want = hidden_activation("swiglu", gate_leaf, up_leaf)
    want_gate, want_up = torch.autograd.grad(want, (gate_leaf, up_leaf), grad_hidden.double())
    for got, expected, name in ((hidden, want, "hidden"), (grad_gate, want_gate, "grad gate"),
                                (grad_up, want_up, "grad up")):
        torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(again, hidden, rtol=2 * 2.0 ** -23, atol=1e-38, msg="recomputed hidden")


def test_float32_sigmoid_within_3_ulp():
    """numba_activation's vectorized float32 σ (the fused SwiGLU's) against σ in float64, on a dense grid of
    g in [-90, 90]: relative error ≤ 3 float32 ulp (3 · 2⁻²³) wherever σ(g) is a normal float32."""
    from fastmoe_edu.backends import numba_activation
    gate = torch.linspace(-90, 90, 200_001, dtype=torch.float32)[None, :]
    up = torch.ones_like(gate)
    hidden = torch.empty_like(gate)
    numba_activation.swiglu_forward_float32(gate.numpy(), up.numpy(), hidden.numpy())   # g σ(g)
    nonzero = gate != 0
    sigma = hidden[nonzero].double() / gate[nonzero].double()
    exact = torch.sigmoid(gate[nonzero].double())
    normal = exact > torch.finfo(torch.float32).tiny * 4
    relative = ((sigma - exact).abs() / exact)[normal]
    assert relative.max() <= 3 * 2.0 ** -23, f"worst relative error {relative.max():.3g}"


def test_set_grouped_gemm_rejects_unknown():
    with pytest.raises(ValueError, match="not known"):
        numba_backend.set_grouped_gemm("cublas")
    with pytest.raises(ValueError, match="tile"):
        numba_backend.set_grouped_gemm("segments", tile=8)


def test_tiled_gemm_needs_cuda_tensors():
    previous = numba_backend.current_grouped_gemm()
    numba_backend.set_grouped_gemm("tiled")
    try:
        with pytest.raises(RuntimeError, match="simulator"):
            numba_backend.grouped_matmul(torch.randn(3, 4), torch.randn(2, 5, 4), torch.tensor([1, 2]))
    finally:
        numba_backend.set_grouped_gemm(*previous)


# ----------------------------------------------------------------------------------------------------
# The backend as a module: same interface, registry, availability, determinism, other dtypes
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(backends.REGISTRY))
def test_registered_backends_follow_the_protocol(name):
    """Every registered backend has every member of the Backend Protocol, with its parameter names
    (and the optional thread hook's, where it has one)."""
    module = importlib.import_module(f"fastmoe_edu.backends.{backends.REGISTRY[name]}")
    assert isinstance(module, Backend) and missing_members(module) == []
    assert module.NAME == name
    functions = [(Backend, function) for function in FUNCTIONS]
    if isinstance(module, HasThreadPool):
        functions.append((HasThreadPool, "set_num_threads"))
    for protocol, function in functions:
        want = list(inspect.signature(getattr(protocol, function)).parameters)[1:]          # without self
        got = list(inspect.signature(getattr(module, function)).parameters)
        assert got == want, f"{module.__name__}.{function}"


def _fake_backend(name, available=True, without=()):
    """A backend module called ``name`` made of the reference's functions (the register fixture registers it)."""
    module = types.ModuleType(f"fastmoe_edu.backends.{name}_module")
    for function in FUNCTIONS:
        if function not in without:
            setattr(module, function, getattr(reference, function))
    module.NAME = name
    module.available = lambda device: (available, "" if available else f"{name} is switched off")
    return module


@pytest.fixture
def register(monkeypatch):
    """register(module): put a fake backend module in the registry (undone after the test)."""
    def register_module(module):
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(backends.REGISTRY, module.NAME, module.__name__.rsplit(".", 1)[1])
        return module
    return register_module


def test_registered_backend_is_used(register):
    fake = register(_fake_backend("fake"))
    assert get_backend("fake", "cpu") is fake
    routed = []                                        # the router gets the layer's backend as an argument
    fake.softmax_top_k_route = lambda *args: routed.append(args) or reference.softmax_top_k_route(*args)
    layer = MoELayer(8, 16, 4, backend="fake")
    layer(torch.randn(5, 8)).sum().backward()
    assert len(routed) == 1
    register(_fake_backend("off", available=False))
    with pytest.raises(RuntimeError, match="backend='off' cannot run on device cpu: off is switched off"):
        get_backend("off", "cpu")
    register(_fake_backend("broken", without=("grouped_matmul", "scatter_rows")))
    with pytest.raises(TypeError, match="lacks scatter_rows, grouped_matmul"):
        get_backend("broken", "cpu")


def test_auto_follows_the_preference_order(register, monkeypatch):
    fake = register(_fake_backend("fake"))
    register(_fake_backend("off", available=False))
    monkeypatch.setitem(backends.REGISTRY, "missing", "no_such_module")             # cannot be imported
    monkeypatch.setattr(backends, "AUTO_PREFERENCE", ("missing", "off", "fake", "numba", "reference"))
    assert get_backend("auto", "cpu") is fake
    monkeypatch.setattr(backends, "AUTO_PREFERENCE", ("off", "reference", "fake"))
    assert get_backend("auto", "cpu") is reference
    monkeypatch.setattr(backends, "AUTO_PREFERENCE", ("missing", "off"))
    with pytest.raises(RuntimeError, match="none of missing, off can run"):
        get_backend("auto", "cpu")


def test_set_cpu_threads_calls_the_backends_hook(register, monkeypatch):
    """set_cpu_threads sets the resolved backend's pool first, then torch's (see its docstring)."""
    assert isinstance(numba_backend, HasThreadPool) and not isinstance(reference, HasThreadPool)
    calls = []
    fake = register(_fake_backend("fake"))
    fake.set_num_threads = lambda count: calls.append((count, torch.get_num_threads()))
    monkeypatch.setattr(backends, "AUTO_PREFERENCE", ("fake", "reference"))
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    try:
        set_cpu_threads(other, "fake")
        assert calls == [(other, before)] and torch.get_num_threads() == other
        set_cpu_threads(before, "auto")
        assert calls[-1] == (before, other) and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_registry_and_availability():
    assert get_backend("numba", "cpu") is numba_backend
    assert get_backend("auto", "cpu") is numba_backend
    assert numba_backend.available("cpu") == (True, "")
    ok, reason = numba_backend.available("meta")
    assert not ok and "meta" in reason
    if not HAS_GPU:
        ok, reason = numba_backend.available("cuda")
        assert not ok and "numba.cuda" in reason
        with pytest.raises(RuntimeError, match="cannot run"):
            get_backend("numba", "cuda")


@pytest.mark.parametrize("router", list(ROUTERS))
def test_auto_backend_runs_every_router(router):
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 8, router=router, backend="auto", **backend_cases.ROUTER_OPTIONS[router])
    x = torch.randn(2, 10, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype_name", list(HALF_DTYPES))
def test_float_steps_16bit(dtype_name):
    """bfloat16 / float16 go into the CPU kernels as they are (their 16-bit patterns, float32 sums inside),
    within half a 16-bit ulp of the exact result (backend_cases.check_float_steps_16bit)."""
    check_float_steps_16bit(random_expert_ids(3000, 2, 64, seed=5), 64, 33, dtype_name)
    for name in EDGE_CASES:
        check_float_steps_16bit(*edge_case_ids(name), 5, dtype_name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_tensors_reach_the_kernels_without_a_copy(dtype):
    """The kernels' view of a 16-bit tensor is the tensor's own memory (no float32 staging copy); routing
    16-bit logits runs in float32, as the reference's does (same ids, float32 weights)."""
    x = torch.randn(6, 8, dtype=dtype)
    view = numba_cpu.array(x)
    assert view.ctypes.data == x.data_ptr() and view.dtype.itemsize == 2
    logits = torch.randn(30, 4, dtype=dtype)
    ids, weights = numba_backend.softmax_top_k_route(logits, 2, True)
    want_ids, want_weights = reference.softmax_top_k_route(logits, 2, True)
    assert torch.equal(ids, want_ids) and weights.dtype == want_weights.dtype == torch.float32


def test_set_cpu_threads_survives_numba_kernels():
    """One thread budget for torch and numba: a numba parallel loop must not reset torch's count
    (it did, through the shared OpenMP runtime, before set_cpu_threads set numba's count too)."""
    before = torch.get_num_threads()
    try:
        set_cpu_threads(1, "numba")
        layer = MoELayer(d_model=16, d_hidden=32, num_experts=4, backend="numba")
        layer(torch.randn(64, 16)).sum().backward()
        assert torch.get_num_threads() == 1
    finally:
        set_cpu_threads(before, "numba")
    with pytest.raises(ValueError, match="count=0"):
        set_cpu_threads(0)
    with pytest.raises(ValueError, match="backend='cuda'"):
        set_cpu_threads(1, "cuda")
