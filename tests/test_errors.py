"""Bad input gets a clear error that names the bad value and what is allowed, before any work."""
import pytest
import torch

from fastmoe_edu import MoELayer

BAD_LAYERS = [
    (dict(top_k=5), r"top_k=5 must be an integer in \[1, num_experts=4\]"),
    (dict(top_k=0), r"top_k=0 must be an integer"),
    (dict(capacity_factor=0), r"capacity_factor=0 must be a finite number > 0, or None for dropless"),
    (dict(capacity_factor=-1.5), r"capacity_factor=-1.5 must be a finite number > 0"),
    (dict(capacity_factor=float("inf")), r"capacity_factor=inf must be a finite number > 0, or None for dropless"),
    (dict(capacity_factor=float("nan")), r"capacity_factor=nan must be a finite number > 0"),
    (dict(router="top3000"), r"router='top3000' is not a known router; allowed: softmax_top_k"),
    (dict(expert="tanh"), r"expert='tanh' is not a known expert kind; allowed: swiglu, geglu, gelu, relu"),
    (dict(backend="cuda-magic"), r"backend='cuda-magic' is not a known backend; allowed: reference, numba, auto"),
    (dict(router="switch"), r"router='switch' routes each token to exactly 1 expert\(s\); got top_k=2"),
    (dict(router="gshard", top_k=1), r"router='gshard' routes each token to exactly 2 expert\(s\); got top_k=1"),
    (dict(temperature_typo=3), r"unknown option 'temperature_typo' for router='softmax_top_k'; allowed:"),
    (dict(router="sigmoid", num_groups=3, top_k_groups=1), r"num_groups=3 must be a positive divisor of num_experts=4"),
    (dict(router="sigmoid", num_groups=2), r"set both or neither"),
    (dict(router="sigmoid", num_groups=2, top_k_groups=3), r"top_k_groups=3 must be an integer in \[1, num_groups=2\]"),
    (dict(router="sigmoid", top_k=3, num_groups=2, top_k_groups=1), r"fewer than top_k=3"),
    (dict(router="switch", top_k=1, jitter_epsilon=1.5), r"jitter_epsilon=1.5 must be in \[0, 1\)"),
    (dict(balance_loss_weight=-1), r"balance_loss_weight=-1 must be a finite number >= 0"),
    (dict(router="xmoe", temperature=0), r"temperature=0 must be a finite number > 0"),
    # nan and inf in the float options: nan slips past every comparison, inf makes the losses inf or nan.
    (dict(balance_loss_weight=float("inf")), r"balance_loss_weight=inf must be a finite number >= 0"),
    (dict(balance_loss_weight=float("nan")), r"balance_loss_weight=nan must be a finite number >= 0"),
    (dict(z_loss_weight=float("inf")), r"z_loss_weight=inf must be a finite number >= 0"),
    (dict(router="noisy_top_k", noise_epsilon=float("inf")), r"noise_epsilon=inf must be a finite number >= 0"),
    (dict(router="switch", top_k=1, jitter_epsilon=float("nan")), r"jitter_epsilon=nan must be a finite number >= 0"),
    (dict(router="sigmoid", bias_update_rate=float("inf")), r"bias_update_rate=inf must be a finite number >= 0"),
    (dict(router="xmoe", temperature=float("inf")), r"temperature=inf must be a finite number > 0"),
    (dict(router="xmoe", temperature=float("nan")), r"temperature=nan must be a finite number > 0"),
    (dict(router="sigmoid", route_scale=float("nan")), r"route_scale=nan must be a finite number > 0"),
    (dict(router="sigmoid", route_scale=float("-inf")), r"route_scale=-inf must be a finite number > 0"),
    # options added for real models: fixed / per-sequence capacity, renormalization shapes, clamped SwiGLU
    (dict(capacity_per="tokens"), r"capacity_per='tokens' is not known; allowed: batch, sequence"),
    (dict(expert_capacity=-2), r"expert_capacity=-2 must be an integer >= 1"),
    (dict(renormalize_p=-1.0), r"renormalize_p=-1.0 must be a finite number > 0"),
    # capacity priority, renormalization after dropping, expert output dropout (NLLB-MoE)
    (dict(capacity_factor=1.0, capacity_priority="prob"), r"capacity_priority='prob' is not known; allowed: order, "
                                                          r"probability"),
    (dict(capacity_priority="probability"), r"capacity_priority='probability' orders the tokens that compete for "
                                            r"capacity, but there is none"),
    (dict(renormalize_after_dropping="yes"), r"renormalize_after_dropping='yes' must be True or False"),
    (dict(capacity_factor=1.0, renormalize=False, renormalize_after_dropping=True),
     r"router='softmax_top_k' with renormalize=False has other weights"),
    (dict(expert_dropout=1.5), r"expert_dropout=1.5 must be a number in \[0, 1\)"),
    (dict(expert="relu", swiglu_alpha=1.7), r"swiglu_alpha=1.7, swiglu_limit=None are constants of "
                                            r"expert='clamped_swiglu' \(GPT-OSS\); expert='relu' has none"),
]


@pytest.mark.parametrize("kwargs,message", BAD_LAYERS)
def test_bad_layer_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoELayer(8, 16, 4, **kwargs)


@pytest.mark.parametrize("name,value", [("d_model", 0), ("d_hidden", -3), ("num_experts", 2.5)])
def test_bad_sizes(name, value):
    sizes = dict(d_model=8, d_hidden=16, num_experts=4)
    sizes[name] = value
    with pytest.raises(ValueError, match=f"{name}={value!r} must be an integer >= 1"):
        MoELayer(**sizes)


def test_wrong_input_width():
    layer = MoELayer(8, 16, 4)
    with pytest.raises(ValueError, match="input's last dimension is 7, expected d_model=8"):
        layer(torch.randn(3, 7))


BAD_INPUTS = [
    (torch.randn(3, 8, dtype=torch.float64), TypeError,
     r"input dtype torch.float64 differs from the layer's parameter dtype torch.float32; "
     r"convert the input with x.to\(torch.float32\) or the layer with layer.to\(torch.float64\)"),
    (torch.ones(3, 8, dtype=torch.int64), TypeError,
     r"input dtype torch.int64 is not a floating-point dtype; convert it with x.to\(torch.float32\)"),
    (torch.tensor(1.0), ValueError, r"input is 0-dimensional \(a scalar\); expected shape \[..., d_model=8\]"),
]


@pytest.mark.parametrize("x,error,message", BAD_INPUTS, ids=["float64-into-float32", "int64", "0-D"])
def test_bad_input(x, error, message):
    layer = MoELayer(8, 16, 4)
    with pytest.raises(error, match=message):
        layer(x)
    assert layer.last_routing is None                  # refused before any work


def test_forced_backend_that_cannot_run_is_loud():
    from fastmoe_edu.backends import get_backend

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="backend='numba' cannot run on device cuda"):
        get_backend("numba", "cuda")
    assert get_backend("auto", "cuda").NAME == "reference"
