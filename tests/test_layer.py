"""The reference MoELayer against the per-token oracle (tests/oracle.py), forward and backward,
for every router × expert kind, with and without capacity; plus gradcheck in float64."""
import itertools
import math

import pytest
import torch

from fastmoe_edu import ROUTERS, MoELayer
from oracle import oracle_forward

D_MODEL, D_HIDDEN, NUM_EXPERTS, NUM_TOKENS = 8, 12, 4, 10

ROUTER_OPTIONS = {
    "switch": dict(top_k=1, jitter_epsilon=0.1),
    "gshard": dict(top_k=2),
    "sigmoid": dict(top_k=2, num_groups=2, top_k_groups=1, route_scale=2.5),
    "noisy_top_k": dict(top_k=2),
    "expert_choice": dict(top_k=2),
    "softmax_top_k": dict(top_k=2),
    "xmoe": dict(top_k=2, routing_dim=4),
}


def make_layer(router, expert="swiglu", capacity_factor=None, bias=False, dtype=torch.float64, seed=0, **extra):
    torch.manual_seed(seed)
    options = dict(ROUTER_OPTIONS[router], **extra)
    layer = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, router=router, expert=expert,
                     capacity_factor=capacity_factor, bias=bias, **options).to(dtype)
    if bias:  # non-zero biases so their gradients are exercised
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if ".b" in name:
                    param.normal_()
    if getattr(layer.router, "bias", None) is not None:  # a non-trivial selection bias (sigmoid; ERNIE's softmax)
        layer.router.bias.copy_(torch.randn(NUM_EXPERTS, dtype=dtype) * 0.1)
    return layer


# Both implementations run in float64 and do the same arithmetic in a different order (vectorized
# einsum/matmul vs per-token loops): agreement to ~1e-12 relative is expected; 1e-9 leaves room.
TOLERANCE = dict(rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("router,expert,capacity_factor,training", [
    (r, e, cf, tr) for r, e, cf, tr in itertools.product(ROUTERS, ("swiglu", "gelu"), (None, 0.75), (True, False))
])
def test_reference_matches_oracle(router, expert, capacity_factor, training):
    layer = make_layer(router, expert, capacity_factor, bias=(expert == "gelu"))
    layer.train(training)
    x = torch.randn(NUM_TOKENS, D_MODEL, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    draws = layer.last_routing.random_draws
    if training and router in ("switch", "gshard", "noisy_top_k"):
        assert draws, "the router drew no random numbers while training"

    x_oracle = x.detach().clone().requires_grad_(True)
    y_oracle = oracle_forward(layer, x_oracle, draws)
    torch.testing.assert_close(y, y_oracle, **TOLERANCE)

    upstream = torch.randn_like(y)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * upstream).sum(), [x, *params], allow_unused=True)
    grads_oracle = torch.autograd.grad((y_oracle * upstream).sum(), [x_oracle, *params], allow_unused=True)
    names = ["input"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, grads, grads_oracle):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0, name
        else:
            torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_dropped_tokens_output_zero():
    layer = make_layer("switch", capacity_factor=0.5)
    layer.eval()
    x = torch.randn(NUM_TOKENS, D_MODEL, dtype=torch.float64)
    y = layer(x)
    dropped = (layer.last_routing.expert_ids < 0).all(dim=1)
    assert dropped.any(), "capacity 0.5 should drop some tokens"
    assert torch.count_nonzero(y[dropped]) == 0
    assert torch.count_nonzero(y[~dropped].abs().sum(dim=1)) == int((~dropped).sum())


@pytest.mark.parametrize("router", list(ROUTERS))
def test_gradcheck_float64(router):
    """Finite differences against autograd, for the input and every parameter, in float64."""
    layer = make_layer(router, capacity_factor=1.0 if router in ("switch", "gshard") else None, bias=True)
    x = torch.randn(6, D_MODEL, dtype=torch.float64)
    names, params = zip(*[(n, p.detach()) for n, p in layer.named_parameters()])

    def run(x, *param_values):
        torch.manual_seed(3)  # routers that draw noise draw the same noise on every evaluation
        out = torch.func.functional_call(layer, dict(zip(names, param_values)), (x,))
        return out, layer.aux_loss

    inputs = (x.requires_grad_(True), *[p.clone().requires_grad_(True) for p in params])
    # fast_mode checks random projections of the Jacobian (Tolerance: central differences with eps=1e-6
    # in float64 have truncation error ~eps² and rounding ~1e-16/eps, far below atol).
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    # The full Jacobian with respect to the input and the gate weight (few entries, so affordable).
    gate_index = 1 + list(names).index("router.weight")

    def run_input_and_gate(x, gate_weight):
        values = list(inputs[1:])
        values[gate_index - 1] = gate_weight
        return run(x, *values)

    assert torch.autograd.gradcheck(run_input_and_gate, (inputs[0], inputs[gate_index]), eps=1e-6,
                                    atol=1e-5, rtol=1e-4)


def test_any_leading_shape():
    layer = make_layer("softmax_top_k")
    for shape in [(D_MODEL,), (3, D_MODEL), (2, 3, D_MODEL), (2, 1, 3, D_MODEL)]:
        x = torch.randn(*shape, dtype=torch.float64)
        assert layer(x).shape == x.shape


def test_public_contract_shapes():
    layer = MoELayer(16, 24, 6)
    assert layer.router.weight.shape == (6, 16)
    assert layer.experts.w1.shape == (6, 24, 16)
    assert layer.experts.w2.shape == (6, 16, 24)
    assert layer.experts.w3.shape == (6, 24, 16)
    assert MoELayer(16, 24, 6, expert="gelu").experts.w3 is None
    y = layer(torch.randn(5, 16))
    record = layer.last_routing
    assert record.expert_ids.shape == (5, 2) and record.weights.shape == (5, 2)
    assert int(record.tokens_per_expert.sum()) == 10 and record.num_dropped == 0
    assert layer.aux_loss.ndim == 0 and y.shape == (5, 16)


@pytest.mark.parametrize("expert", ["swiglu", "gelu"])
def test_expert_formula(expert):
    """With one expert and top_k=1 the layer is exactly the documented feed-forward network."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 1, top_k=1, expert=expert).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    w1, w2, w3 = layer.experts.w1[0], layer.experts.w2[0], layer.experts.w3
    hidden = torch.nn.functional.gelu(x @ w1.t()) if expert == "gelu" else \
        torch.nn.functional.silu(x @ w1.t()) * (x @ w3[0].t())
    torch.testing.assert_close(layer(x), hidden @ w2.t())  # single expert: weight 1 after renormalization


@pytest.mark.parametrize("shape", [(0, D_MODEL), (2, 0, D_MODEL)], ids=["0xd", "2x0xd"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_zero_tokens(router, backend, shape):
    """An empty batch (a rank with no tokens, a ragged last batch) is a no-op, not an error or a NaN:
    an empty output, aux loss exactly 0, and zero gradients for every parameter."""
    layer = make_layer(router, dtype=torch.float32, backend=backend, capacity_factor=1.0,
                       balance_loss_weight=1.0, z_loss_weight=0.1).train()
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    assert layer.aux_loss.item() == 0.0
    (y.sum() + layer.aux_loss).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name


# ----------------------------------------------------------------------------------------------------
# Options for real models: shared experts, more expert kinds, router bias / soft cap / scale / groups
# ----------------------------------------------------------------------------------------------------
#: (router, expert kind, options) checked against the oracle on both backends. NUM_EXPERTS = 4: two groups of 2.
OPTION_CASES = {
    "shared-deepseek": ("softmax_top_k", "swiglu", dict(num_shared_experts=2, shared_d_hidden=5)),
    "shared-qwen2-gated": ("softmax_top_k", "swiglu", dict(num_shared_experts=1, shared_expert_gate=True)),
    "shared-gelu-bias": ("softmax_top_k", "gelu", dict(num_shared_experts=2, bias=True)),
    "shared-sigmoid-v3": ("sigmoid", "swiglu", dict(num_shared_experts=1, shared_d_hidden=6)),
    "relu": ("softmax_top_k", "relu", dict(bias=True)),
    "geglu": ("softmax_top_k", "geglu", dict(bias=True)),
    "router-bias-softcap": ("softmax_top_k", "swiglu", dict(router_bias=True, logit_softcap=0.8)),
    "router-bias-sigmoid": ("sigmoid", "swiglu", dict(router_bias=True, logit_softcap=2.0)),
    "router-bias-noisy": ("noisy_top_k", "swiglu", dict(router_bias=True)),
    "softmax-route-scale": ("softmax_top_k", "swiglu", dict(route_scale=2.5, renormalize=False)),
    "softmax-groups-v2": ("softmax_top_k", "swiglu", dict(num_groups=2, top_k_groups=1, route_scale=1.5,
                                                          renormalize=False)),
    "softmax-groups-renormalized": ("softmax_top_k", "swiglu", dict(num_groups=2, top_k_groups=1)),
    "sigmoid-not-renormalized": ("sigmoid", "swiglu", dict(renormalize=False)),
    # GPT-OSS: clamped SwiGLU (a small limit, so both clamps act), expert biases, router bias
    "clamped-swiglu": ("softmax_top_k", "clamped_swiglu", dict(bias=True, router_bias=True, swiglu_limit=0.5)),
    "clamped-swiglu-shared": ("softmax_top_k", "clamped_swiglu", dict(num_shared_experts=1, swiglu_alpha=1.0,
                                                                      swiglu_limit=0.7)),
    # DBRX: weights / ‖weights‖_2; ERNIE-4.5: selection bias, normalizer clamped (0.9: often active); epsilon
    "renormalize-p-norm": ("softmax_top_k", "swiglu", dict(renormalize_p=2.0)),
    "selection-bias-clamped-normalizer": ("softmax_top_k", "swiglu", dict(selection_bias=True, renormalize_min=0.9)),
    "selection-bias-groups-eps": ("softmax_top_k", "swiglu", dict(selection_bias=True, num_groups=2, top_k_groups=1,
                                                                  renormalize_eps=0.5, route_scale=1.5)),
    "fixed-expert-capacity": ("softmax_top_k", "swiglu", dict(expert_capacity=3)),
    # JetMoE: a learned bias on every token's output; with a capacity, a fully dropped token's output is b
    "output-bias-capacity-shared": ("softmax_top_k", "geglu", dict(output_bias=True, expert_capacity=2,
                                                                   num_shared_experts=1)),
    # Llama-4: the weight scales the expert's input, y = Σ_s expert_s(w_s · x) (+ shared); with biases and drops
    "weights-on-input-sigmoid": ("sigmoid", "swiglu", dict(weights_on="input", renormalize=False,
                                                           num_shared_experts=1)),
    "weights-on-input-capacity-bias": ("softmax_top_k", "gelu", dict(weights_on="input", bias=True,
                                                                      expert_capacity=2)),
}


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_oracle(case, backend):
    """Forward, input gradient and every router / expert / shared-expert gradient against the oracle."""
    router, expert, options = OPTION_CASES[case]
    options = dict(options)
    bias = options.pop("bias", False)
    layer = make_layer(router, expert, bias=bias, backend=backend, **options)
    with torch.no_grad():                       # non-zero logit bias and shared gate, so their gradients matter
        for name, param in layer.named_parameters():
            if (name in ("router.logit_bias", "shared_experts.gate", "output_bias")
                    or name.startswith("shared_experts.b")):
                param.normal_()
    layer.eval()
    x = torch.randn(NUM_TOKENS, D_MODEL, dtype=torch.float64, requires_grad=True)
    _check_against_oracle(layer, x, only_unused=("router.noise_weight",))   # every option's parameter is used


def test_shared_experts_are_one_wide_mlp_outside_the_experts():
    layer = MoELayer(8, 12, 4, num_shared_experts=3, shared_d_hidden=5, shared_expert_gate=True)
    assert layer.shared_experts.w1.shape == (15, 8) and layer.shared_experts.w2.shape == (8, 15)
    assert layer.shared_experts.gate.shape == (8,)
    assert not any(p is q for p in layer.shared_experts.parameters() for q in layer.experts.parameters())
    assert MoELayer(8, 12, 4, num_shared_experts=2).shared_experts.w1.shape == (24, 8)   # width 2 · d_hidden
    assert MoELayer(8, 12, 4).shared_experts is None


def test_shared_experts_with_soft_moe():
    """Soft MoE + shared experts: the soft output plus shared(x), every token."""
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, router="soft_moe", num_shared_experts=1, shared_expert_gate=True).double()
    with torch.no_grad():
        layer.shared_experts.gate.normal_()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y = layer(x)
    shared, layer.shared_experts = layer.shared_experts, None
    torch.testing.assert_close(y, layer(x) + shared(x.reshape(-1, 8)).reshape(x.shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("expert,activation", [("relu", torch.relu), ("geglu", torch.nn.functional.gelu)])
def test_new_expert_formulas(expert, activation):
    """One expert, top_k=1: relu → W2 relu(W1 x); geglu → W2 (gelu(W1 x) ⊙ W3 x)."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 1, top_k=1, expert=expert).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    hidden = activation(x @ layer.experts.w1[0].t())
    if expert == "geglu":
        hidden = hidden * (x @ layer.experts.w3[0].t())
    torch.testing.assert_close(layer(x), hidden @ layer.experts.w2[0].t())


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("router,top_k,capacity", [("switch", 1, dict(expert_capacity=1)),
                                                   ("softmax_top_k", 2, dict(capacity_factor=0.5)),
                                                   ("softmax_top_k", 2, dict(expert_capacity=2))])
def test_capacity_per_sequence_matches_oracle(router, top_k, capacity, backend):
    """capacity_per="sequence": each sequence of x [B, S, d] has its own C places per expert (C = expert_capacity,
    or ceil(cf·k·S/E)), its tokens competing in slot-major order among themselves; forward and gradients."""
    torch.manual_seed(0)
    layer = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, top_k=top_k, router=router, capacity_per="sequence",
                     backend=backend, **capacity).double().eval()
    x = torch.randn(3, 6, D_MODEL, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    record = layer.last_routing
    assert record.num_dropped > 0
    expected_capacity = (capacity.get("expert_capacity")
                         or math.ceil(capacity["capacity_factor"] * top_k * 6 / NUM_EXPERTS))
    assert record.capacity == expected_capacity
    per_sequence = torch.stack([torch.bincount(ids[ids >= 0], minlength=NUM_EXPERTS)
                                for ids in record.expert_ids.reshape(3, -1)])
    assert int(per_sequence.max()) <= record.capacity
    x_oracle = x.detach().clone().requires_grad_(True)
    y_oracle = oracle_forward(layer, x_oracle.reshape(-1, D_MODEL), {}, tokens_per_sequence=6).reshape(x.shape)
    torch.testing.assert_close(y, y_oracle, **TOLERANCE)
    upstream = torch.randn_like(y)
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad((y * upstream).sum(), [x, *params])
    grads_oracle = torch.autograd.grad((y_oracle * upstream).sum(), [x_oracle, *params])
    for name, got, want in zip(["input", *names], grads, grads_oracle):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{name}: {m}")
    # Over the batch instead, the same C would be shared by all 18 tokens: more of them dropped.
    batch = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, top_k=top_k, router=router, backend=backend,
                     **capacity).double().eval()
    batch.load_state_dict(layer.state_dict())
    batch(x)
    if "expert_capacity" in capacity:
        assert batch.last_routing.num_dropped > record.num_dropped


def test_clamped_swiglu_formula():
    """One expert, top_k=1: W2 (min(g, L)·σ(α·min(g, L)) ⊙ (clamp(u, −L, L) + 1)) + b2, with g = W1 x + b1 and
    u = W3 x + b3."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 1, top_k=1, expert="clamped_swiglu", bias=True, swiglu_alpha=1.5,
                     swiglu_limit=0.4).double()
    with torch.no_grad():
        for name in ("b1", "b2", "b3"):
            getattr(layer.experts, name).normal_()
    ex = layer.experts
    x = torch.randn(4, 8, dtype=torch.float64)
    gate = x @ ex.w1[0].t() + ex.b1[0]
    up = x @ ex.w3[0].t() + ex.b3[0]
    assert (gate > 0.4).any() and (up.abs() > 0.4).any()             # both clamps are active here
    gate, up = gate.clamp(max=0.4), up.clamp(-0.4, 0.4)
    hidden = gate * torch.sigmoid(1.5 * gate) * (up + 1)
    torch.testing.assert_close(layer(x), hidden @ ex.w2[0].t() + ex.b2[0])


# ----------------------------------------------------------------------------------------------------
# Capacity priority by router probability, weights renormalized after dropping, expert output dropout
# ----------------------------------------------------------------------------------------------------
def _check_against_oracle(layer, x, tokens_per_sequence=None, only_unused=None):
    """The layer's forward, input gradient and every parameter gradient against the oracle (x [..., S, d]).
    ``only_unused``: the names of the only parameters the oracle may leave without a gradient."""
    torch.manual_seed(1)                                     # noisy routers draw the same noise every time
    y = layer(x)
    x_oracle = x.detach().clone().requires_grad_(True)
    y_oracle = oracle_forward(layer, x_oracle.reshape(-1, D_MODEL), layer.last_routing.random_draws,
                              tokens_per_sequence=tokens_per_sequence).reshape(x.shape)
    torch.testing.assert_close(y, y_oracle, **TOLERANCE)
    upstream = torch.randn_like(y)
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad((y * upstream).sum(), [x, *params], allow_unused=True)
    grads_oracle = torch.autograd.grad((y_oracle * upstream).sum(), [x_oracle, *params], allow_unused=True)
    for name, got, want in zip(["input", *names], grads, grads_oracle):
        assert only_unused is None or want is not None or name in only_unused, name
        if want is None:                                     # the noise weight, in eval mode
            assert got is None or torch.count_nonzero(got) == 0, name
        else:
            torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{name}: {m}")
    return y


#: (router, options) for batch-prioritized capacity: every top-k router family, k = 1 and k = 2.
PRIORITY_CASES = {
    "switch": ("switch", dict(capacity_factor=0.5)),
    "softmax": ("softmax_top_k", dict(capacity_factor=0.5)),
    "gshard": ("gshard", dict(capacity_factor=0.5)),
    "sigmoid": ("sigmoid", dict(expert_capacity=2)),                    # priority = max σ(l), not a softmax
    "noisy": ("noisy_top_k", dict(capacity_factor=0.5)),
    "xmoe-per-sequence": ("xmoe", dict(capacity_factor=0.75, capacity_per="sequence")),
}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("case", list(PRIORITY_CASES))
def test_capacity_priority_probability_matches_oracle(case, backend, training):
    """capacity_priority="probability": slot-major, tokens by decreasing max_e p (V-MoE's / NLLB's batch-prioritized
    routing); forward and every gradient against the oracle, and a different choice than token order."""
    router, capacity = PRIORITY_CASES[case]
    layer = make_layer(router, backend=backend, capacity_priority="probability", **capacity).train(training)
    x = torch.randn(3, 6, D_MODEL, dtype=torch.float64, requires_grad=True)
    per_sequence = capacity.get("capacity_per") == "sequence"
    _check_against_oracle(layer, x, tokens_per_sequence=6 if per_sequence else None)
    kept = layer.last_routing.expert_ids
    assert layer.last_routing.num_dropped > 0
    in_order = make_layer(router, backend=backend, **capacity).train(training)
    in_order.load_state_dict(layer.state_dict())
    torch.manual_seed(1)
    in_order(x)
    assert not torch.equal(in_order.last_routing.expert_ids, kept), "the priority should change who is dropped"
    assert layer.router.capacity_priority == "probability"


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_capacity_priority_keeps_the_most_probable_tokens(backend):
    """Top-1 (Switch), C = 2 per expert: each expert keeps exactly its two tokens of largest p (no tie here)."""
    layer = make_layer("switch", backend=backend, expert_capacity=2, capacity_priority="probability").eval()
    x = torch.randn(24, D_MODEL, dtype=torch.float64)
    layer(x)
    record = layer.last_routing
    chosen = record.probs.argmax(dim=1)
    best = record.probs.max(dim=1).values
    for expert in range(NUM_EXPERTS):
        tokens = (chosen == expert).nonzero()[:, 0]
        want = tokens[best[tokens].argsort(descending=True)[:2]].sort().values
        got = (record.expert_ids[:, 0] == expert).nonzero()[:, 0]
        assert got.tolist() == want.tolist(), expert


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_capacity_priority_ties_keep_token_order(backend):
    """Equal probabilities (identical tokens): the stable sort decides, i.e. token order, as with "order"."""
    layer = make_layer("softmax_top_k", backend=backend, expert_capacity=3, capacity_priority="probability").eval()
    x = torch.randn(1, D_MODEL, dtype=torch.float64).expand(NUM_TOKENS, D_MODEL)
    layer(x)
    ids = layer.last_routing.expert_ids
    assert ids[:3].ge(0).all() and ids[3:].eq(-1).all()     # 3 places per expert: the first 3 tokens keep both


#: (router, options) with weights renormalized after dropping.
AFTER_DROPPING_CASES = {
    "softmax": ("softmax_top_k", dict(capacity_factor=0.5)),
    "softmax-top3-scale": ("softmax_top_k", dict(top_k=3, capacity_factor=0.5, route_scale=2.5)),
    "gshard-train": ("gshard", dict(capacity_factor=0.75)),                  # random routing drops as well
    "gshard-no-capacity": ("gshard", dict()),                                # random routing is the only drop
    "sigmoid-priority": ("sigmoid", dict(expert_capacity=2, capacity_priority="probability")),
    "noisy": ("noisy_top_k", dict(capacity_factor=0.5)),
    "xmoe": ("xmoe", dict(capacity_factor=0.5, renormalize=True)),
}


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("case", list(AFTER_DROPPING_CASES))
def test_renormalize_after_dropping_matches_oracle(case, backend):
    """renormalize_after_dropping=True (NLLB-MoE's default): a token's kept weights are rescaled to the sum its k
    weights had; forward and every gradient against the oracle; tokens with drops sum to that, not less."""
    router, options = AFTER_DROPPING_CASES[case]
    layer = make_layer(router, backend=backend, renormalize_after_dropping=True, **options)
    layer.train(router == "gshard")
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64, requires_grad=True)
    _check_against_oracle(layer, x)
    record = layer.last_routing
    kept = record.expert_ids >= 0
    partly = kept.any(dim=1) & ~kept.all(dim=1)
    assert partly.any(), "some token should have lost part of its assignments"
    scale = getattr(layer.router, "route_scale", 1.0)
    torch.testing.assert_close(record.weights[kept.any(dim=1)].sum(dim=1),
                               torch.full((int(kept.any(dim=1).sum()),), scale, dtype=torch.float64))
    assert (record.weights[~kept] == 0).all()


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_renormalize_after_dropping_is_nllb_formula(backend):
    """GShard top-2 as NLLB-MoE computes it (normalize_router_prob_before_dropping=False): w_s = p_s / Σ_kept p over
    the kept of the two choices (1 for a lone survivor, 0 for nothing kept); before dropping: p_s / (p_1 + p_2)."""
    after = make_layer("gshard", backend=backend, capacity_factor=0.5, renormalize_after_dropping=True).eval()
    before = make_layer("gshard", backend=backend, capacity_factor=0.5).eval()
    x = torch.randn(NUM_TOKENS, D_MODEL, dtype=torch.float64)
    after(x), before(x)
    record = after.last_routing
    assert torch.equal(record.expert_ids, before.last_routing.expert_ids)           # the same assignments kept
    kept = record.expert_ids >= 0
    chosen = record.probs.topk(2, dim=1)
    kept_p = chosen.values * kept
    torch.testing.assert_close(record.weights, kept_p / kept_p.sum(dim=1, keepdim=True).clamp(min=1e-300))
    torch.testing.assert_close(before.last_routing.weights,
                               chosen.values / chosen.values.sum(dim=1, keepdim=True) * kept)
    alone = kept.sum(dim=1) == 1                                                    # a lone survivor weighs 1
    assert alone.any()
    torch.testing.assert_close(record.weights[alone].sum(dim=1), torch.ones(int(alone.sum()), dtype=torch.float64))


def test_renormalize_after_dropping_gradient_finite_when_all_dropped():
    """A token with every assignment dropped gets weight 0 and finite (zero) gradients: no 0/0."""
    layer = make_layer("softmax_top_k", expert_capacity=1, renormalize_after_dropping=True).eval()
    x = torch.randn(NUM_TOKENS, D_MODEL, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    nothing_kept = (layer.last_routing.expert_ids < 0).all(dim=1)
    assert nothing_kept.any()
    assert torch.count_nonzero(y[nothing_kept]) == 0
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters()) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("router,options", [("softmax_top_k", dict(capacity_factor=0.75)),
                                            ("gshard", dict(num_shared_experts=1)), ("switch", dict())])
def test_expert_dropout_matches_oracle(router, options, backend):
    """expert_dropout=p in training: the experts' output rows times the drawn 0/1 mask / (1 − p) before the combine
    (the oracle replays the mask from random_draws, row by row); forward and every gradient."""
    layer = make_layer(router, backend=backend, expert_dropout=0.3, **options).train()
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64, requires_grad=True)
    _check_against_oracle(layer, x)
    mask = layer.last_routing.random_draws["expert_dropout"]
    assert mask.shape == (int(layer.last_routing.tokens_per_expert.sum()), D_MODEL)
    assert set(mask.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_expert_dropout_statistics_and_eval_identity(backend):
    """The mask keeps a fraction ≈ 1 − p of the elements (with a fixed seed: reproducible), so the output is
    unbiased in expectation; in eval mode the layer is bitwise the layer without dropout, and draws nothing."""
    p = 0.25
    layer = make_layer("softmax_top_k", backend=backend, expert_dropout=p).train()
    plain = make_layer("softmax_top_k", backend=backend)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(400, D_MODEL, dtype=torch.float64)
    torch.manual_seed(5)
    y = layer(x)
    mask = layer.last_routing.random_draws["expert_dropout"]
    # 800 rows × 8 elements, each kept with probability 0.75: the kept fraction has std ≈ 0.0054; 5 std allowed.
    assert abs(mask.mean().item() - (1 - p)) < 0.027
    torch.manual_seed(5)
    assert torch.equal(layer(x), y)                                          # the same seed, the same mask
    # Unbiased: averaged over many masks the output approaches the dropout-free output. The 2000 masks come from
    # one forward of 2000 copies of the 4 tokens (dropless routing: every copy routes alike; each row draws its own
    # mask), the same average as 2000 forwards of the 4 tokens, in one call instead of 2000.
    torch.manual_seed(6)
    small = x[:4]
    mean = layer(small.repeat(2000, 1)).reshape(2000, *small.shape).mean(dim=0)
    reference_output = plain(small)
    assert (mean - reference_output).abs().max() < 0.1 * reference_output.abs().max()
    layer.eval(), plain.eval()
    state = torch.random.get_rng_state()
    assert torch.equal(layer(x), plain(x))
    assert torch.equal(torch.random.get_rng_state(), state), "eval mode must draw no random numbers"
    assert "expert_dropout" not in layer.last_routing.random_draws


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_dropping_option_defaults_are_bitwise_unchanged(backend):
    """capacity_priority="order", renormalize_after_dropping=False, expert_dropout=0 spelled out: the same state,
    bitwise the same output and gradients as a layer without them, with capacity drops, in training mode."""
    torch.manual_seed(0)
    plain = MoELayer(8, 8, 4, router="gshard", capacity_factor=0.5, backend=backend)
    explicit = MoELayer(8, 8, 4, router="gshard", capacity_factor=0.5, backend=backend, capacity_priority="order",
                        renormalize_after_dropping=False, expert_dropout=0.0)
    assert list(explicit.state_dict()) == list(plain.state_dict())
    explicit.load_state_dict(plain.state_dict())
    x = torch.randn(3, 5, 8)
    results = []
    for layer in (plain, explicit):
        torch.manual_seed(1)
        y = layer(x)
        results.append([y, *torch.autograd.grad(y.square().sum(), list(layer.parameters()))])
    assert plain.last_routing.num_dropped > 0
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_weights_on_and_output_bias_are_checked():
    with pytest.raises(ValueError, match="weights_on='inputs' is not allowed; allowed: output, input"):
        MoELayer(8, 12, 4, weights_on="inputs")
    with pytest.raises(ValueError, match="weights_on='input' is not allowed; allowed: 'output'"):
        MoELayer(8, 12, 4, router="soft_moe", capacity_factor=None, weights_on="input")
    with pytest.raises(ValueError, match="output_bias=1 must be True or False"):
        MoELayer(8, 12, 4, output_bias=1)
