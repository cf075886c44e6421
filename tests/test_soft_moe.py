"""Soft MoE (``MoELayer(..., router="soft_moe")``, fastmoe_edu/soft_moe.py) against a brute-force oracle.

The oracle follows the paper's definitions (Puigcerver et al. 2023, §2.1) one scalar at a time, with
Python loops over groups, slots and tokens, sharing nothing with the layer but its parameters:

    D[i, s] = exp(L[i, s]) / Σ_j exp(L[j, s])     X̃_s = Σ_i D[i, s] x_i      ỹ_s = expert_{s // p}(X̃_s)
    C[i, s] = exp(L[i, s]) / Σ_r exp(L[i, r])     y_i = Σ_s C[i, s] ỹ_s
    L[i, s] = <x_i, φ_s>   or, normalised,   scale · <x_i / ‖x_i‖, φ_s / ‖φ_s‖>

Also: the refusals (capacity, top_k, unknown options, the causal language model through
``parse_args``, ``main`` and the command line), the routing record, and, under mpirun / torchrun,
N ranks with the experts spread over them == one process (tests/mpi_scripts/check_soft_moe.py).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fastmoe_edu import ROUTERS, MoELayer
from fastmoe_edu.config import ConfigError, parse_args
from fastmoe_edu.model import ModelConfig, MoETransformer
from fastmoe_edu.soft_moe import NOT_CAUSAL, SOFT_MOE
from launcher import launch

D_MODEL, D_HIDDEN, NUM_EXPERTS = 6, 10, 4
SCRIPT = Path(__file__).resolve().parent / "mpi_scripts" / "check_soft_moe.py"

# Both sides run in float64 and do the same arithmetic in a different order (batched matmuls and a
# max-shifted softmax against per-scalar loops and exp / Σ exp): results agree to a few ulp of values of
# order 0.01 .. 10 (measured over all cases below: <= 3e-15). 1e-10 is five orders above that and far
# below any real mistake (a softmax over the wrong dimension, a slot sent to the wrong expert, a missing
# normalisation: all off by > 1e-3).
TOLERANCE = dict(rtol=1e-9, atol=1e-10)


def make_layer(slots_per_expert=2, normalize=False, expert="swiglu", bias=False, backend="reference", seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, router="soft_moe", expert=expert, bias=bias, backend=backend,
                     slots_per_expert=slots_per_expert, normalize=normalize).double()
    with torch.no_grad():
        if bias:                                      # non-zero biases, so their gradients are exercised
            for name, param in layer.named_parameters():
                if name.startswith("experts.b"):
                    param.normal_()
        if normalize:                                 # a scale away from its initial 1
            layer.router.scale.fill_(2.5)
    return layer


# ----------------------------------------------------------------------------------------------------
# The oracle
# ----------------------------------------------------------------------------------------------------
def oracle_expert(layer, e: int, row: torch.Tensor) -> torch.Tensor:
    """expert_e(x) for one row, from the stacked weights (experts.py's formulas)."""
    ex = layer.experts

    def linear(w, b):
        return w[e] @ row + (b[e] if b is not None else 0.0)

    hidden = linear(ex.w1, ex.b1)
    hidden = F.silu(hidden) * linear(ex.w3, ex.b3) if ex.kind == "swiglu" else F.gelu(hidden)
    return ex.w2[e] @ hidden + (ex.b2[e] if ex.b2 is not None else 0.0)


def oracle_group(layer, X: torch.Tensor) -> torch.Tensor:
    """Soft MoE on one group X [n, d], scalar by scalar."""
    router = layer.router
    p, num_slots = router.slots_per_expert, layer.num_experts * router.slots_per_expert
    phi = router.weight
    n = X.shape[0]

    def logit(i, s):
        if router.normalize:
            return router.scale * torch.dot(X[i] / X[i].square().sum().sqrt(), phi[s] / phi[s].square().sum().sqrt())
        return torch.dot(X[i], phi[s])

    exp_logits = [[torch.exp(logit(i, s)) for s in range(num_slots)] for i in range(n)]
    slot_outputs = []
    for s in range(num_slots):                                      # dispatch: a softmax over the tokens
        column = sum(exp_logits[j][s] for j in range(n))
        slot_input = sum(exp_logits[i][s] / column * X[i] for i in range(n))
        slot_outputs.append(oracle_expert(layer, s // p, slot_input))   # slot s belongs to expert s // p
    outputs = []
    for i in range(n):                                              # combine: a softmax over the slots
        row = sum(exp_logits[i][s] for s in range(num_slots))
        outputs.append(sum(exp_logits[i][s] / row * slot_outputs[s] for s in range(num_slots)))
    return torch.stack(outputs)


def oracle(layer, x: torch.Tensor) -> torch.Tensor:
    """A 2-D x is one group; a 3-D x is one group per sequence (dimension 0)."""
    if x.dim() == 2:
        return oracle_group(layer, x)
    return torch.stack([oracle_group(layer, x[g]) for g in range(x.shape[0])])


# ----------------------------------------------------------------------------------------------------
# The layer against the oracle
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
@pytest.mark.parametrize("shape", [(7, D_MODEL), (3, 5, D_MODEL)], ids=["2d", "3d"])
@pytest.mark.parametrize("expert,bias", [("swiglu", False), ("gelu", True)])
def test_matches_oracle(backend, normalize, shape, expert, bias):
    layer = make_layer(slots_per_expert=2, normalize=normalize, expert=expert, bias=bias, backend=backend)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    x_oracle = x.detach().clone().requires_grad_(True)
    y_oracle = oracle(layer, x_oracle)
    torch.testing.assert_close(y, y_oracle, **TOLERANCE)
    assert layer.aux_loss.item() == 0.0

    upstream = torch.randn_like(y)
    names, params = zip(*layer.named_parameters())
    assert ("router.scale" in names) == normalize
    grads = torch.autograd.grad((y * upstream).sum(), [x, *params])
    grads_oracle = torch.autograd.grad((y_oracle * upstream).sum(), [x_oracle, *params])
    for name, got, want in zip(("input", *names), grads, grads_oracle):
        assert torch.count_nonzero(want) > 0, name
        torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{name}: {m}")


def test_gradcheck_float64():
    """Finite differences against autograd for the input and every parameter (normalised: scale too)."""
    layer = make_layer(slots_per_expert=2, normalize=True, expert="gelu", bias=True)
    names, params = zip(*[(n, p.detach()) for n, p in layer.named_parameters()])

    def run(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    inputs = (torch.randn(2, 3, D_MODEL, dtype=torch.float64, requires_grad=True),
              *[p.clone().requires_grad_(True) for p in params])
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_buffer_goes_through_the_expert_runner_seam():
    """The slot buffer is expert-major (expert, group, slot), counts[e] = groups · p, and it is what the
    layer's ``expert_runner`` receives: a replaced runner (as under expert parallelism) sees it all."""
    layer = make_layer(slots_per_expert=3)
    calls = []
    default_runner = layer.expert_runner

    def recording_runner(experts, buffer, counts, backend):
        calls.append((buffer.detach().clone(), counts.clone()))
        return default_runner(experts, buffer, counts, backend)

    layer.expert_runner = recording_runner
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    layer(x)
    (buffer, counts), = calls
    assert counts.tolist() == [2 * 3] * NUM_EXPERTS
    dispatch = layer.last_routing.dispatch_weights.reshape(2, 5, NUM_EXPERTS * 3)         # D per group
    for e in range(NUM_EXPERTS):
        for g in range(2):
            for j in range(3):
                slot_input = dispatch[g, :, e * 3 + j] @ x[g]                              # X̃ = Dᵀ X
                torch.testing.assert_close(buffer[(e * 2 + g) * 3 + j], slot_input, **TOLERANCE)


def test_routing_record():
    """dispatch weights sum to 1 over a group's tokens, combine weights to 1 over the slots; nothing dropped."""
    layer = make_layer(slots_per_expert=2)
    groups, n, slots = 3, 4, NUM_EXPERTS * 2
    layer(torch.randn(groups, n, D_MODEL, dtype=torch.float64))
    record = layer.last_routing
    assert record.expert_ids.tolist() == [[s // 2 for s in range(slots)]] * (groups * n)
    for name in ("weights", "logits", "dispatch_weights"):
        assert getattr(record, name).shape == (groups * n, slots), name
    torch.testing.assert_close(record.weights.sum(dim=1), torch.ones(groups * n, dtype=torch.float64))
    torch.testing.assert_close(record.dispatch_weights.reshape(groups, n, slots).sum(dim=1),
                               torch.ones(groups, slots, dtype=torch.float64))
    torch.testing.assert_close(record.probs, record.weights.reshape(groups * n, NUM_EXPERTS, 2).sum(-1))
    assert record.tokens_per_expert.tolist() == [groups * 2] * NUM_EXPERTS
    assert record.num_dropped == 0 and record.capacity is None and record.random_draws == {}
    assert not record.weights.requires_grad


def test_groups_are_sequences_and_not_causal():
    """A token's output depends on every token of its own sequence (later ones too), never on another sequence."""
    layer = make_layer()
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    y = layer(x)
    changed = x.clone()
    changed[1, 4] += 1.0                                      # the last token of sequence 1
    y_changed = layer(changed)
    assert torch.equal(y_changed[0], y[0])                    # sequence 0: untouched
    assert not torch.allclose(y_changed[1, 0], y[1, 0])       # position 0 of sequence 1 sees position 4
    torch.testing.assert_close(layer(x[1]), y[1], **TOLERANCE)   # a 2-D input is one group


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("shape", [(0, D_MODEL), (2, 0, D_MODEL), (0, 5, D_MODEL)], ids=["0xd", "2x0xd", "0x5xd"])
def test_zero_tokens(backend, shape):
    """No tokens: an empty output, aux loss 0, zero gradients (the slots of an empty group are zero rows)."""
    layer = make_layer(normalize=True, bias=True, backend=backend).float()
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and layer.aux_loss.item() == 0.0
    y.sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.count_nonzero(param.grad) == 0, name


# ----------------------------------------------------------------------------------------------------
# Construction: parameters, options, refusals
# ----------------------------------------------------------------------------------------------------
def test_parameters_and_options():
    layer = MoELayer(16, 24, 3, router="soft_moe", slots_per_expert=4)
    assert layer.router.weight.shape == (3 * 4, 16)            # Φ: row e·p + j = slot j of expert e
    assert layer.router.scale is None and "slots_per_expert=4" in repr(layer)
    normalized = MoELayer(16, 24, 3, router="soft_moe", normalize=True)
    assert normalized.router.weight.shape == (3, 16)          # slots_per_expert defaults to 1
    assert normalized.router.scale.item() == 1.0 and normalized.router.scale.requires_grad
    assert MoELayer(16, 24, 1, router="soft_moe")(torch.randn(2, 3, 16)).shape == (2, 3, 16)   # E=1, top_k default
    layer.update_router_bias()                                 # no bias: a no-op, as for the other routers


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(capacity_factor=1.25), r"soft_moe.*no capacity.*capacity_factor=1.25.*capacity_factor=None"),
    (dict(capacity_factor=0.5), r"no capacity"),
    (dict(top_k=1), r"soft_moe.*does not use top_k.*top_k=1"),
    (dict(z_loss_weight=0.01), r"unknown option 'z_loss_weight'.*normalize, slots_per_expert"),
    (dict(balance_loss_weight=0.01), r"unknown option 'balance_loss_weight'"),
    (dict(slots_per_expert=0), r"slots_per_expert=0 must be an integer >= 1"),
    (dict(slots_per_expert=1.5), r"slots_per_expert=1.5"),
    (dict(normalize="yes"), r"normalize='yes' must be True or False"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MoELayer(8, 12, 4, router="soft_moe", **kwargs)


def test_not_in_the_top_k_router_table_but_listed_by_the_layer():
    """ROUTERS is the table of top-k routers (config choices, tests over every top-k router); MoELayer
    accepts soft_moe besides them and names it among the allowed routers."""
    assert SOFT_MOE == "soft_moe" and SOFT_MOE not in ROUTERS
    with pytest.raises(ValueError, match=r"allowed: softmax_top_k, .*, soft_moe"):
        MoELayer(8, 12, 4, router="soft")


def test_causal_language_model_refuses_soft_moe(capsys):
    with pytest.raises(ConfigError, match=r"router='soft_moe' cannot be used by the causal language model.*later"):
        parse_args(["--router=soft_moe"])
    with pytest.raises(ValueError, match="causal language model"):
        MoETransformer(ModelConfig(vocab_size=16, seq_len=8, router="soft_moe"))

    from fastmoe_edu.train import main
    with pytest.raises(SystemExit) as exit_info:
        main(["--router=soft_moe", "--max_steps=1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"config error: {NOT_CAUSAL}\n"      # one line, before any work


def test_causal_language_model_refuses_soft_moe_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastmoe_edu.train", "--router=soft_moe",
                           f"--out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"config error: {NOT_CAUSAL}"]
    assert not (tmp_path / "out").exists()                                  # refused before any work


# ----------------------------------------------------------------------------------------------------
# N ranks == one process (expert parallelism through the unchanged expert_runner seam)
# ----------------------------------------------------------------------------------------------------
# Tolerance 1e-10 as in test_distributed.py: float64, the same rows in the same order on both sides;
# only the gradient sums are split differently (per-rank partial sums all-reduced), a few ulp.
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("engine,num_ranks", [("mpi", 2), ("mpi", 4), ("torch", 2)])
def test_expert_parallel_soft_moe_equals_one_process(engine, num_ranks, tmp_path):
    output = tmp_path / "soft_moe.json"
    done = launch(engine, num_ranks, [str(SCRIPT), str(output)], timeout=300)
    assert done.returncode == 0, f"{engine} with {num_ranks} ranks failed:\n{done.stdout}\n{done.stderr}"
    report = json.loads(output.read_text())
    assert report["engine"] == engine and report["world_size"] == num_ranks
    backends = ["reference"] + ([] if "numba" in report["skipped"] else ["numba"])
    layouts = ["", "/dp2"] if num_ranks >= 4 else [""]
    cases = ["p1", "p1_pairwise", "p2_normalize", "p3_gelu_bias_pipelined"]
    expected = {f"{b}/{c}{s}" for b in backends for c in cases for s in layouts if b == "reference" or not s}
    assert set(report["results"]) == expected
    for name, errors in report["results"].items():
        checked = {k: v for k, v in errors.items() if not k.startswith("scale:")}
        assert {"output", "input_grad", "aux_loss", "grad:router.weight", "grad:experts.w1",
                "grad:experts.w2", "unequal_blocks"} <= checked.keys(), name
        assert ("grad:router.scale" in checked) == ("normalize" in name), name
        assert errors["scale:output"] > 1e-2 and errors["scale:grad:router.weight"] > 1e-3, name   # not vacuous
        for quantity, error in checked.items():
            assert error < 1e-10, f"{name}: {quantity} differs by {error:.3e}"
