"""Router semantics: capacity, drop order, expert choice, loss-free balancing, and loss values
checked against numbers computed by hand."""
import math
import re

import pytest
import torch

from backend_cases import EXTREME_SIGMOID_BIAS, EXTREME_SIGMOID_IDS, EXTREME_SIGMOID_LOGITS
from fastmoe_edu import ROUTERS, MoELayer
from fastmoe_edu.backends import get_backend
from fastmoe_edu.dispatch import prune_capacity
from fastmoe_edu.router_zoo import GShardRouter, NoisyTopKRouter, SwitchRouter, cv_squared
from fastmoe_edu.routers import router_options, router_z_loss, switch_balance_loss

CAPACITY_ROUTERS = [("softmax_top_k", 2), ("noisy_top_k", 2), ("switch", 1), ("gshard", 2), ("sigmoid", 2), ("xmoe", 2)]


@pytest.mark.parametrize("router,top_k", CAPACITY_ROUTERS)
@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 1.5])
def test_capacity_never_exceeded(router, top_k, capacity_factor):
    torch.manual_seed(0)
    layer = MoELayer(16, 8, 8, top_k=top_k, router=router, capacity_factor=capacity_factor)
    layer(torch.randn(100, 16) * 3)
    record = layer.last_routing
    assert record.capacity == math.ceil(capacity_factor * top_k * 100 / 8)
    assert int(record.tokens_per_expert.max()) <= record.capacity
    kept = record.expert_ids[record.expert_ids >= 0]
    assert torch.equal(torch.bincount(kept, minlength=8), record.tokens_per_expert)


def test_drop_order_is_slot_major_then_token_order():
    # Capacity 2. Slot 0 first, in token order: t0->0, t1->1, t2->1 (expert 1 now full).
    # Then slot 1: t0->1 dropped (full), t1->0 kept (second row of expert 0), t2->0 dropped.
    ids = torch.tensor([[0, 1], [1, 0], [1, 0]])
    assert prune_capacity(ids, 2, 2).tolist() == [[0, -1], [1, 0], [1, -1]]
    # Switch (k = 1): plain token order, the first C tokens of each expert are kept.
    ids = torch.tensor([[2], [2], [0], [2], [2]])
    assert prune_capacity(ids, 3, 2).tolist() == [[2], [2], [0], [-1], [-1]]
    # Already switched-off assignments (-1) claim nothing.
    ids = torch.tensor([[0, -1], [0, 1]])
    assert prune_capacity(ids, 2, 1).tolist() == [[0, -1], [-1, 1]]


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_drop_order_with_priority_by_hand(backend):
    """Batch-prioritized: tokens by decreasing priority (ties: token order), still slot-major; per group likewise."""
    prune = get_backend(backend).prune_capacity
    # Capacity 1, k = 1: token 2 (priority 0.9) beats tokens 0 and 1 at expert 0; token 3 ties token 4 at expert 1
    # (0.5 each): the earlier token wins.
    ids, priority = torch.tensor([[0], [0], [0], [1], [1]]), torch.tensor([0.3, 0.6, 0.9, 0.5, 0.5])
    assert prune(ids, 2, 1, None, priority).tolist() == [[-1], [-1], [0], [1], [-1]]
    # k = 2, capacity 2, priority t2 > t1 > t0. Slot 0: t2->1, t1->1 (expert 1 full), t0->0. Slot 1: t2->0 kept
    # (second row of expert 0), t1->0 dropped (full), t0->1 dropped. In token order t0 would keep both instead.
    ids, priority = torch.tensor([[0, 1], [1, 0], [1, 0]]), torch.tensor([0.2, 0.5, 0.7])
    assert prune(ids, 2, 2, None, priority).tolist() == [[0, -1], [1, -1], [1, 0]]
    # Two sequences of 2 tokens, capacity 1 each: in each, the token of larger priority keeps expert 0.
    ids, priority = torch.tensor([[0], [0], [0], [0]]), torch.tensor([0.1, 0.8, 0.9, 0.2])
    assert prune(ids, 1, 1, 2, priority).tolist() == [[-1], [0], [0], [-1]]


def test_gshard_first_choices_claim_capacity_first():
    torch.manual_seed(0)
    layer = MoELayer(8, 8, 4, top_k=2, router="gshard", capacity_factor=0.5, random_routing=False)
    layer(torch.randn(40, 8))
    ids = layer.last_routing.expert_ids
    raw_first = layer.last_routing.probs.argmax(dim=1)
    # A second choice may only be kept for an expert whose first-choice demand fit in its capacity.
    for e in range(4):
        first_demand = int((raw_first == e).sum())
        second_kept = int((ids[:, 1] == e).sum())
        if first_demand >= layer.last_routing.capacity:
            assert second_kept == 0


def test_gshard_random_routing_keeps_second_iff_2g2_above_u():
    torch.manual_seed(0)
    router = GShardRouter(8, 4, 2, None)
    router.train()
    out = router.route(torch.randn(200, 8))
    keep = 2 * out.weights[:, 1].detach() > out.random_draws["uniform"]
    assert torch.equal(out.expert_ids[:, 1] >= 0, keep)
    assert 0 < int(keep.sum()) < 200
    torch.testing.assert_close(out.weights.sum(dim=1), torch.ones(200))  # g1 + g2 = 1
    router.eval()
    assert (router.route(torch.randn(20, 8)).expert_ids >= 0).all()     # no random drop at eval


@pytest.mark.parametrize("capacity_factor,expected_c", [(None, 10), (1.0, 5), (0.5, 3)])
def test_expert_choice_picks_exactly_c_tokens(capacity_factor, expected_c):
    torch.manual_seed(0)
    layer = MoELayer(8, 8, 4, top_k=2, router="expert_choice", capacity_factor=capacity_factor)
    layer(torch.randn(20, 8))
    record = layer.last_routing
    assert record.tokens_per_expert.tolist() == [expected_c] * 4   # C = ceil(cf·T/E), cf defaults to k
    # Each expert took its C most probable tokens.
    for e in range(4):
        chosen = (record.expert_ids[:, e] == e).nonzero().flatten()
        top = record.probs[:, e].topk(expected_c).indices
        assert set(chosen.tolist()) == set(top.tolist())


def test_sigmoid_bias_moves_toward_balance():
    torch.manual_seed(0)
    layer = MoELayer(8, 8, 4, top_k=1, router="sigmoid", bias_update_rate=0.05)
    with torch.no_grad():
        layer.router.weight[0] += 2.0  # expert 0 wins nearly every token
    x = torch.randn(256, 8).abs()
    layer(x)
    first_max = int(layer.last_routing.tokens_per_expert.max())
    for _ in range(60):
        layer(x)
        layer.update_router_bias()
    assert layer.router.bias[0] < 0, "the overloaded expert's bias must fall"
    assert int(layer.last_routing.tokens_per_expert.max()) < first_max * 0.6
    assert not layer.router.bias.requires_grad  # b is not trained by gradients


def test_sigmoid_bias_update_rule_by_hand():
    layer = MoELayer(4, 4, 4, top_k=1, router="sigmoid", bias_update_rate=0.1)
    layer.update_router_bias(torch.tensor([4.0, 0.0, 2.0, 2.0]))   # mean 2
    assert layer.router.bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


@pytest.mark.parametrize("num_groups", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_sigmoid_weights_where_sigmoid_underflows(backend, dtype, num_groups):
    """Far below zero σ(l) underflows to 0 and s / Σ s would be 0/0. The weights and their gradient must
    still be s_i / Σ_j s_j · route_scale, here computed exactly as softmax_i(log σ(l)) in float64."""
    route = get_backend(backend).sigmoid_top_k_route
    logits = torch.tensor(EXTREME_SIGMOID_LOGITS, dtype=dtype, requires_grad=True)
    expert_ids, weights = route(logits, torch.tensor(EXTREME_SIGMOID_BIAS), 2, 2.5, num_groups,
                                1 if num_groups else None)
    assert expert_ids.tolist() == EXTREME_SIGMOID_IDS
    exact_logits = logits.detach().double().requires_grad_(True)
    exact = torch.softmax(torch.nn.functional.logsigmoid(exact_logits.gather(1, expert_ids)), dim=-1) * 2.5
    torch.testing.assert_close(weights, exact.to(dtype))
    upstream = torch.randn(weights.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad = torch.autograd.grad(weights, logits, upstream.to(dtype))[0]
    exact_grad = torch.autograd.grad(exact, exact_logits, upstream)[0]
    torch.testing.assert_close(grad, exact_grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_sigmoid_layer_with_huge_logits(backend, dtype):
    """Logits of ±1e4 (σ exactly 0 or 1) through the whole layer, forward and backward: everything finite
    and every token's weights sum to route_scale. float16/bfloat16 layers route in float32."""
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, top_k=2, router="sigmoid", backend=backend, route_scale=2.5).to(dtype)
    with torch.no_grad():                       # logits[t, e] = sign_t · 1e4 · c_e, c = (1, 0.9, 0.8, 0.7)
        layer.router.weight.copy_(torch.tensor([1.0, 0.9, 0.8, 0.7])[:, None].expand(4, 8) * 1250)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0])
    x = (signs[:, None] * torch.ones(6, 8)).to(dtype).requires_grad_(True)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert layer.last_routing.logits.abs().min() >= 7000
    (y * torch.randn(y.shape).to(dtype)).sum().backward()
    for name, tensor in [("input", x), *layer.named_parameters()]:
        assert torch.isfinite(tensor.grad).all(), name
    torch.testing.assert_close(layer.last_routing.weights.sum(dim=1), torch.full((6,), 2.5))


def test_switch_balance_loss_by_hand():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    ids = torch.tensor([[0], [0]])
    # f = [1, 0], P = [0.65, 0.35]  ->  E · Σ f·P = 2 · 0.65
    assert float(switch_balance_loss(probs, ids)) == pytest.approx(1.3)
    ids = torch.tensor([[0], [1]])   # f = [0.5, 0.5] -> 2 · (0.325 + 0.175) = 1 (balanced)
    assert float(switch_balance_loss(probs, ids)) == pytest.approx(1.0)


def test_switch_router_aux_loss_by_hand():
    router = SwitchRouter(2, 2, 1, None, balance_loss_weight=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    router.eval()
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    out, aux = router(x)
    p = torch.softmax(x, dim=1)                       # logits = x since W = I
    f = torch.tensor([2 / 3, 1 / 3])                  # argmax: 0, 0, 1
    assert float(aux.detach()) == pytest.approx(float(2 * (f * p.mean(0)).sum()), rel=1e-6)
    assert out.expert_ids.flatten().tolist() == [0, 0, 1]
    torch.testing.assert_close(out.weights.flatten(), p.max(dim=1).values)   # not renormalized


def test_gshard_aux_loss_by_hand():
    router = GShardRouter(2, 2, 2, None, balance_loss_weight=1.0, random_routing=False)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
    _, aux = router(x)
    p = torch.softmax(x, dim=1)
    first = torch.tensor([1 / 3, 2 / 3])              # first choices: 0, 1, 1
    assert float(aux.detach()) == pytest.approx(float(2 * (p.mean(0) * first).sum()), rel=1e-6)


def test_z_loss_and_cv_by_hand():
    assert float(router_z_loss(torch.zeros(3, 2))) == pytest.approx(math.log(2) ** 2)
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert float(router_z_loss(logits)) == pytest.approx(math.log(math.e + math.e ** 2 + math.e ** 3) ** 2)
    assert float(cv_squared(torch.tensor([1.0, 3.0]))) == pytest.approx(0.25)    # var 1 / mean² 4
    assert float(cv_squared(torch.tensor([2.0, 2.0, 2.0]))) == pytest.approx(0.0)


def test_z_loss_weight_enters_aux_loss():
    torch.manual_seed(0)
    x = torch.randn(10, 8)
    base = MoELayer(8, 8, 4, balance_loss_weight=0.0)
    with_z = MoELayer(8, 8, 4, balance_loss_weight=0.0, z_loss_weight=0.5)
    with_z.load_state_dict(base.state_dict())
    base(x), with_z(x)
    assert float(base.aux_loss.detach()) == 0.0
    assert float(with_z.aux_loss.detach()) == pytest.approx(0.5 * float(router_z_loss(x @ base.router.weight.t()).detach()), rel=1e-6)


def test_noisy_top_k_balance_loss_eval_uses_counts():
    torch.manual_seed(0)
    router = NoisyTopKRouter(8, 4, 2, None, balance_loss_weight=1.0)
    router.eval()
    x = torch.randn(30, 8)
    out, aux = router(x)
    gates = torch.zeros(30, 4).scatter(1, out.expert_ids, out.weights)
    expected = cv_squared(gates.sum(0)) + cv_squared((gates > 0).float().sum(0))
    assert float(aux.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_noisy_top_k_smooth_load_is_expected_count():
    """Training: load_e = Σ_t P(e in top-k) estimated by Φ; compare with Monte Carlo over the noise."""
    torch.manual_seed(0)
    router = NoisyTopKRouter(6, 4, 1, None, balance_loss_weight=1.0, noise_epsilon=0.5)
    router.train()
    x = torch.randn(5, 6)
    clean = x @ router.weight.t()
    std = torch.nn.functional.softplus(x @ router.noise_weight.t()) + 0.5
    noisy = clean + torch.randn_like(clean) * std
    smooth = router._smooth_load(clean, noisy, std)
    # For k = 1 and a fixed noisy draw, P(e wins) = Φ((clean_e − max_{j≠e} h_j)/std_e): check one entry.
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = sum(normal.cdf((clean[t, 0] - torch.cat([noisy[t, 1:]]).max()) / std[t, 0]) for t in range(5))
    assert float(smooth[0].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# The reducer seam: balance losses are global-batch quantities built from sums passed through `reduce`
# ----------------------------------------------------------------------------------------------------
ROUTER_K = {"softmax_top_k": 2, "noisy_top_k": 2, "switch": 1, "gshard": 2, "expert_choice": 2, "sigmoid": 2,
            "xmoe": 2}


@pytest.mark.parametrize("router", sorted(ROUTER_K))
def test_balance_and_z_loss_go_through_reduce(router):
    """Two ranks holding the same tokens (reduce = ×2) must report the loss of the doubled batch.

    Every sum over tokens a router uses must pass through ``reduce``: a local sum left out would make
    the two sides differ. Evaluation mode: no random draws, so both sides route identically.
    """
    torch.manual_seed(0)
    layer = MoELayer(8, 12, 4, top_k=ROUTER_K[router], router=router, z_loss_weight=0.1,
                     balance_loss_weight=1.0).double().eval()
    x = torch.randn(10, 8, dtype=torch.float64)
    layer(torch.cat([x, x]))
    doubled_batch = layer.aux_loss.detach()
    layer.reduce = lambda tensor: 2 * tensor        # the sum over two ranks that hold the same tokens
    layer(x)
    torch.testing.assert_close(layer.aux_loss.detach(), doubled_batch, rtol=1e-12, atol=1e-14)


def test_a_router_without_balance_loss_fails_loudly():
    from fastmoe_edu.routers import Router, RouterOutput

    class Uniform(Router):                          # a new router that forgot its balance_loss method
        def route(self, x, backend):
            logits = self.logits(x)
            return RouterOutput(logits.topk(self.top_k, -1).indices, x.new_full((x.shape[0], self.top_k), 0.5),
                                None, logits)

    with pytest.raises(NotImplementedError, match="Uniform defines no balance_loss"):
        Uniform(8, 4, 2, None)(torch.randn(5, 8))


# ----------------------------------------------------------------------------------------------------
# Options for real models: every invalid value or combination is refused with a message naming it
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(num_shared_experts=-1), "num_shared_experts=-1 must be an integer >= 0"),
    (dict(num_shared_experts=1.5), "num_shared_experts=1.5"),
    (dict(num_shared_experts=1, shared_d_hidden=0), "shared_d_hidden=0 must be an integer >= 1"),
    (dict(shared_d_hidden=8), "num_shared_experts=0"),
    (dict(shared_expert_gate=True), "num_shared_experts=0"),
    (dict(num_shared_experts=1, shared_expert_gate="yes"), "shared_expert_gate='yes' must be True or False"),
    (dict(expert="swish"), "expert='swish' is not a known expert kind; allowed: swiglu, geglu, gelu, relu"),
    (dict(logit_softcap=0.0), "logit_softcap=0.0 must be a finite number > 0"),
    (dict(logit_softcap=float("nan")), "logit_softcap=nan"),
    (dict(router_bias=1), "router_bias=1 must be True or False"),
    (dict(route_scale=-1.0), "route_scale=-1.0 must be a finite number > 0"),
    (dict(num_groups=2), "num_groups=2 and top_k_groups=None: set both or neither"),
    (dict(num_groups=3, top_k_groups=1), "num_groups=3 must be a positive divisor of num_experts=4"),
    (dict(num_groups=4, top_k_groups=1), "top_k_groups=1 groups of 1 experts hold fewer than top_k=2"),
    (dict(router="gshard", num_groups=2, top_k_groups=1), "unknown option 'num_groups' for router='gshard'"),
    (dict(router="switch", top_k=1, route_scale=2.0), "unknown option 'route_scale' for router='switch'"),
    (dict(router="noisy_top_k", renormalize=False), "unknown option 'renormalize' for router='noisy_top_k'"),
    (dict(router="sigmoid", renormalize="no"), "renormalize='no' must be True or False"),
    # renormalization shapes (DBRX's p-norm, ERNIE's clamp, an epsilon) and ERNIE's selection bias
    (dict(renormalize_p=0), "renormalize_p=0 must be a finite number > 0"),
    (dict(renormalize_p=float("inf")), "renormalize_p=inf must be a finite number > 0"),
    (dict(renormalize_p=2.0, renormalize=False), "renormalize_p=2.0 shape the renormalization, but renormalize=False"),
    (dict(renormalize_min=1e-12, renormalize=False), "renormalize_min=1e-12 shape the renormalization"),
    (dict(renormalize_min=-1), "renormalize_min=-1 must be a finite number >= 0"),
    (dict(renormalize_eps=float("nan")), "renormalize_eps=nan must be a finite number >= 0"),
    (dict(selection_bias="yes"), "selection_bias='yes' must be True or False"),
    (dict(router="sigmoid", selection_bias=True), "unknown option 'selection_bias' for router='sigmoid'"),
    (dict(router="gshard", renormalize_p=2.0), "unknown option 'renormalize_p' for router='gshard'"),
    # fixed and per-sequence capacity (Switch Transformers)
    (dict(expert_capacity=0), "expert_capacity=0 must be an integer >= 1"),
    (dict(expert_capacity=2.5), "expert_capacity=2.5 must be an integer >= 1"),
    (dict(expert_capacity=2, capacity_factor=1.0), "capacity_factor=1.0 and expert_capacity=2: set one of them"),
    (dict(capacity_per="token"), "capacity_per='token' is not known; allowed: batch, sequence"),
    (dict(capacity_per="sequence"), "capacity_per='sequence' needs a capacity to count per sequence"),
    (dict(router="expert_choice", expert_capacity=2), "router='expert_choice' has no token-choice capacity"),
    (dict(router="soft_moe", top_k=2, capacity_per="sequence"), "router='soft_moe' has no token-choice capacity"),
    # capacity priority (batch-prioritized routing), weights renormalized after dropping, expert dropout (NLLB-MoE)
    (dict(capacity_factor=1.0, capacity_priority="random"),
     "capacity_priority='random' is not known; allowed: order, probability"),
    (dict(capacity_priority="probability"), "capacity_priority='probability' orders the tokens that compete for "
                                            "capacity, but there is none: set capacity_factor or expert_capacity"),
    (dict(router="expert_choice", capacity_factor=1.0, capacity_priority="probability"),
     "capacity_priority='probability': router='expert_choice' has no token-choice capacity to prune"),
    (dict(router="expert_choice", renormalize_after_dropping=True),
     "renormalize_after_dropping=True: router='expert_choice' has no token-choice capacity to prune"),
    (dict(capacity_factor=1.0, renormalize_after_dropping=1), "renormalize_after_dropping=1 must be True or False"),
    (dict(renormalize_after_dropping=True), "renormalize_after_dropping=True renormalizes over the assignments "
                                            "capacity kept, but router='softmax_top_k' without capacity_factor or "
                                            "expert_capacity drops none"),
    (dict(router="gshard", random_routing=False, renormalize_after_dropping=True), "router='gshard' without "
                                                                                   "capacity_factor"),
    (dict(router="switch", top_k=1, capacity_factor=1.0, renormalize_after_dropping=True),
     "renormalize_after_dropping=True: router='switch' weighs its one expert by w = p"),
    (dict(capacity_factor=1.0, renormalize=False, renormalize_after_dropping=True),
     "router='softmax_top_k' with renormalize=False has other weights"),
    (dict(capacity_factor=1.0, renormalize_p=2.0, renormalize_after_dropping=True),
     "router='softmax_top_k' with renormalize_p=2.0 has other weights"),
    (dict(router="xmoe", capacity_factor=1.0, renormalize_after_dropping=True),
     "router='xmoe' with renormalize=False has other weights"),
    (dict(router="sigmoid", capacity_factor=1.0, renormalize=False, renormalize_after_dropping=True),
     "router='sigmoid' with renormalize=False has other weights"),
    (dict(expert_dropout=1.0), "expert_dropout=1.0 must be a number in [0, 1)"),
    (dict(expert_dropout=-0.1), "expert_dropout=-0.1 must be a number in [0, 1)"),
    (dict(expert_dropout=float("nan")), "expert_dropout=nan must be a number in [0, 1)"),
    (dict(expert_dropout=True), "expert_dropout=True must be a number in [0, 1)"),
    (dict(router="soft_moe", top_k=2, expert_dropout=0.1), "expert_dropout=0.1: router='soft_moe' has no capacity "
                                                           "dropping and no expert-sorted rows"),
    (dict(router="soft_moe", top_k=2, capacity_priority="probability"), "capacity_priority='probability', "
                                                                        "renormalize_after_dropping=False"),
    # GPT-OSS's clamped SwiGLU constants
    (dict(swiglu_limit=7.0), "swiglu_alpha=None, swiglu_limit=7.0 are constants of expert='clamped_swiglu'"),
    (dict(expert="clamped_swiglu", swiglu_limit=0), "swiglu_limit=0 must be a finite number > 0"),
    (dict(expert="clamped_swiglu", swiglu_alpha=float("inf")), "swiglu_alpha=inf must be a finite number > 0"),
    (dict(expert="clamped_swiglu", swiglu_alpha=True), "swiglu_alpha=True must be a finite number > 0"),
])
def test_invalid_options_are_refused(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        MoELayer(8, 8, 4, **{"top_k": 2, **kwargs})


def test_option_defaults_change_nothing():
    """router_bias=False, logit_softcap=None, route_scale=1, renormalize=True, no shared experts, and the
    renormalization / capacity / expert-constant options at their defaults: the same parameters, no buffer,
    and bitwise the same output as before the options existed."""
    torch.manual_seed(0)
    plain = MoELayer(8, 8, 4)
    explicit = MoELayer(8, 8, 4, router_bias=False, logit_softcap=None, route_scale=1.0, num_shared_experts=0,
                        renormalize_p=1.0, renormalize_min=0.0, renormalize_eps=0.0, selection_bias=False,
                        expert_capacity=None, capacity_per="batch", swiglu_alpha=None, swiglu_limit=None,
                        capacity_priority="order", renormalize_after_dropping=False, expert_dropout=0.0)
    assert [n for n, _ in plain.named_parameters()] == ["router.weight", "experts.w1", "experts.w2", "experts.w3"]
    assert list(explicit.state_dict()) == list(plain.state_dict())
    explicit.load_state_dict(plain.state_dict())
    x = torch.randn(6, 8)
    assert torch.equal(plain(x), explicit(x))


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_softcap_bounds_logits_and_groups_limit_choices(backend):
    torch.manual_seed(0)
    layer = MoELayer(8, 8, 8, top_k=3, backend=backend, logit_softcap=0.5, router_bias=True, num_groups=4,
                     top_k_groups=2, route_scale=2.0, renormalize=True)
    layer(torch.randn(40, 8) * 10)
    record = layer.last_routing
    assert record.logits.abs().max() <= 0.5                            # |cap · tanh(l / cap)| <= cap
    groups = record.expert_ids // 2                                   # 4 groups of 2 experts
    assert all(len(set(row)) <= 2 for row in groups.tolist())         # k = 3 experts from at most 2 groups
    torch.testing.assert_close(record.weights.sum(dim=1), torch.full((40,), 2.0))   # renormalized, × route_scale


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_new_renormalizations_by_hand(backend):
    """Weights p_sel / n for n = ‖p_sel‖_2, max(Σ p_sel, m) and Σ p_sel + ε; the selection bias changes the
    choice (an expert with a small p but a large b is picked) but not the weight (still its p)."""
    torch.manual_seed(0)
    x = torch.randn(12, 8, dtype=torch.float64)
    base = MoELayer(8, 8, 4, top_k=2, backend=backend, renormalize=False).double()
    base(x)
    ids, plain = base.last_routing.expert_ids, base.last_routing.weights                     # p_sel
    cases = {"renormalize_p": (2.0, plain / plain.norm(dim=1, keepdim=True)),
             "renormalize_min": (0.95, plain / plain.sum(dim=1, keepdim=True).clamp(min=0.95)),
             "renormalize_eps": (0.25, plain / (plain.sum(dim=1, keepdim=True) + 0.25))}
    for key, (value, expected) in cases.items():
        layer = MoELayer(8, 8, 4, top_k=2, backend=backend, **{key: value}).double()
        layer.load_state_dict(base.state_dict())
        layer(x)
        assert torch.equal(layer.last_routing.expert_ids, ids), key
        torch.testing.assert_close(layer.last_routing.weights, expected, rtol=1e-12, atol=1e-14, msg=key)
    biased = MoELayer(8, 8, 4, top_k=2, backend=backend, renormalize=False, selection_bias=True).double()
    biased.load_state_dict({**base.state_dict(), "router.bias": torch.tensor([0.0, 0.0, 0.0, 5.0])})
    biased(x)
    assert (biased.last_routing.expert_ids == 3).any(dim=1).all()                  # b_3 = 5 wins a place everywhere
    probs = biased.last_routing.probs
    torch.testing.assert_close(biased.last_routing.weights, probs.gather(1, biased.last_routing.expert_ids))
    assert not biased.router.bias.requires_grad


@pytest.mark.parametrize("router", [r for r in ROUTERS if r != "expert_choice"])
def test_dropping_options_are_router_options(router):
    """capacity_priority and renormalize_after_dropping are options of every top-k router (router_options, which
    a config's --router_options.KEY is checked against), defaulting to today's behaviour; passed as router options
    (a dict, as model.py passes the config's) they reach the router like MoELayer's keyword arguments do."""
    options = router_options(router)
    assert options["capacity_priority"] == "order" and options["renormalize_after_dropping"] is False
    top_k = 1 if router == "switch" else 2
    extra = {"capacity_priority": "probability"}
    if router != "switch":
        extra["renormalize_after_dropping"] = True
        if router == "xmoe":
            extra["renormalize"] = True
    layer = MoELayer(8, 8, 4, top_k=top_k, router=router, capacity_factor=1.0, **extra)
    assert layer.router.capacity_priority == "probability"
    assert layer.router.renormalize_after_dropping is (router != "switch")
