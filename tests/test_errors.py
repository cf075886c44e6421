"""Bad input gets a clear error that names the bad value and what is allowed, before any work."""
import pytest
import torch

from fastmoe_edu import MoELayer

BAD_LAYERS = [
    (dict(top_k=5), r"top_k=5 must be an integer in \[1, num_experts=4\]"),
    (dict(top_k=0), r"top_k=0 must be an integer"),
    (dict(capacity_factor=0), r"capacity_factor=0 must be a number > 0"),
    (dict(capacity_factor=-1.5), r"capacity_factor=-1.5 must be a number > 0"),
    (dict(router="top3000"), r"router='top3000' is not a known router; allowed: softmax_top_k"),
    (dict(expert="relu"), r"expert='relu' is not a known expert kind; allowed: swiglu, gelu"),
    (dict(backend="cuda-magic"), r"backend='cuda-magic' is not a known backend; allowed: reference, numba, auto"),
    (dict(router="switch"), r"router='switch' routes each token to exactly 1 expert\(s\); got top_k=2"),
    (dict(router="gshard", top_k=1), r"router='gshard' routes each token to exactly 2 expert\(s\); got top_k=1"),
    (dict(temperature_typo=3), r"unknown option 'temperature_typo' for router='softmax_top_k'; allowed:"),
    (dict(router="sigmoid", num_groups=3, top_k_groups=1), r"num_groups=3 must be a positive divisor of num_experts=4"),
    (dict(router="sigmoid", num_groups=2), r"set both or neither"),
    (dict(router="sigmoid", num_groups=2, top_k_groups=3), r"top_k_groups=3 must be an integer in \[1, num_groups=2\]"),
    (dict(router="sigmoid", top_k=3, num_groups=2, top_k_groups=1), r"fewer than top_k=3"),
    (dict(router="switch", top_k=1, jitter_epsilon=1.5), r"jitter_epsilon=1.5 must be in \[0, 1\)"),
    (dict(balance_loss_weight=-1), r"balance_loss_weight=-1 must be a number >= 0"),
    (dict(router="xmoe", temperature=0), r"temperature=0 must be > 0"),
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


def test_forced_backend_that_cannot_run_is_loud():
    from fastmoe_edu.backends import get_backend

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="backend='numba' cannot run on device cuda"):
        get_backend("numba", "cuda")
    assert get_backend("auto", "cuda").NAME == "reference"
