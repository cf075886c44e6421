"""``parallelize`` checks everything before it changes anything: after each refusal the model is bit-identical.

The layouts here are tp × ep coordinates without a launch (no communicator behind them): every refusal must
come from plain arithmetic before any collective, so a layout that cannot communicate is enough, and a
check that ran after a change (or a collective before a check) shows up as a changed model or as the
"communicated" error below.
"""
import pytest
import torch

from fastmoe_edu import MoELayer
from fastmoe_edu.config import ConfigError, parse_args
from fastmoe_edu.distributed import ParallelLayout, ParallelOptions, parallelize
from fastmoe_edu.distributed.layout import experts_per_rank
from fastmoe_edu.model import ModelConfig, MoETransformer


class _Group:
    """A group's size and rank; any use beyond that is a collective, which a refusal must never reach."""

    def __init__(self, size: int):
        self.size, self.rank = size, 0

    def __getattr__(self, name):
        raise AssertionError(f"parallelize communicated ({name}) before refusing")


class _Layout:
    def __init__(self, tp: int = 1, ep: int = 1):
        self.tp_size, self.ep_size, self.dp_size, self.world_size = tp, ep, 1, tp * ep
        self.tp_rank = self.ep_rank = self.dp_rank = 0
        self.tensor, self.expert, self.data, self.expert_replica = _Group(tp), _Group(ep), _Group(ep), _Group(1)

    def check_num_experts(self, num_experts: int) -> int:
        return experts_per_rank(num_experts, self.ep_size, self.world_size)


def _model(expert_bias: bool = False, d_hidden: int = 8, n_head: int = 2) -> MoETransformer:
    """Two blocks (attention and an MoE layer each): what tensor and expert parallelism both change."""
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig(vocab_size=11, seq_len=8, n_layer=2, n_head=n_head, d_model=8,
                                       d_hidden=d_hidden, num_experts=4))
    if expert_bias:                                   # the second block's experts with biases
        model.blocks[1].mlp = MoELayer(8, d_hidden, num_experts=4, bias=True)
    return model


def _snapshot(model: torch.nn.Module):
    return str(model), [(name, id(p), p.detach().clone()) for name, p in model.named_parameters()]


REFUSALS = {   # case -> (layout, model options, parallelize options, the error's words)
    "exchange": ((1, 2), {}, dict(exchange="carrier-pigeon"), "exchange='carrier-pigeon' is not known"),
    "pipeline_degree": ((1, 2), {}, dict(pipeline_degree=0), "pipeline_degree"),
    "backward_pipeline_degree": ((1, 2), {}, dict(backward_pipeline_degree=-1), "backward_pipeline_degree"),
    "ranks_per_node": ((1, 2), {}, dict(ranks_per_node=3), "ranks_per_node=3 must divide"),
    "drop_duplicate_at": ((2, 1), {}, dict(drop_duplicate_at="nowhere"), "drop_duplicate_at='nowhere'"),
    "shadow_experts": ((1, 2), {}, dict(shadow_experts=-1), "shadow_experts=-1 is not allowed"),
    "shadow_with_tensor_experts": ((2, 1), {}, dict(shadow_experts=1, expert_tensor_parallel=True),
                                   "does not combine with expert_tensor_parallel"),
    "shadow_cost_ratio": ((1, 2), {}, dict(shadow_experts=1, shadow_cost_ratio=0.0), "shadow_cost_ratio=0.0"),
    "pipelined_tensor_experts": ((2, 1), {}, dict(expert_tensor_parallel=True, pipeline_degree=2),
                                 "runs whole experts only"),
    "num_experts": ((1, 3), {}, {}, "num_experts=4 is not divisible"),
    # Found after tensor parallelism had changed the attention (and ep the experts) before this was fixed:
    "tensor_experts_with_bias": ((2, 2), dict(expert_bias=True), dict(expert_tensor_parallel=True),
                                 "tensor-parallel experts cannot have biases"),
    "tensor_experts_hidden": ((4, 1), dict(d_hidden=6, n_head=4), dict(expert_tensor_parallel=True),
                              "d_hidden=6 is not divisible by tp=4"),
    "tensor_parallel_heads": ((2, 1), dict(n_head=1), {}, "n_head=1 is not divisible by tp=2"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_parallelize_leaves_the_model_unchanged(case):
    (tp, ep), model_options, options, words = REFUSALS[case]
    model = _model(**model_options)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parallelize(model, _Layout(tp, ep), **options)
    after = _snapshot(model)
    assert after[0] == before[0], "the model's structure changed before the refusal"
    for (name, ident, value), (_, ident_after, value_after) in zip(before[1], after[1]):
        assert ident_after == ident and torch.equal(value_after, value), f"{name} changed before the refusal"


def test_options_come_as_a_plan_or_as_keywords_not_both():
    model = _model()
    before = _snapshot(model)
    with pytest.raises(TypeError, match="not both"):
        parallelize(model, _Layout(1, 2), ParallelOptions(), exchange="pairwise")
    assert _snapshot(model)[0] == before[0]


# The config refuses a combination with the words of the same check (ParallelPlan.check, the layout's and the
# tensor-parallel arithmetic): each check is written once.
CONFIG_REFUSALS = {
    "shadow_with_tensor_experts": (["--tp=2", "--shadow_experts=1", "--expert_tensor_parallel=true"],
                                   "does not combine with expert_tensor_parallel"),
    "pipelined_tensor_experts": (["--tp=2", "--expert_tensor_parallel=true", "--pipeline_degree=2"],
                                 "runs whole experts only"),
    "num_experts": (["--ep=3", "--num_experts=4"], "num_experts=4 is not divisible by the expert-parallel size 3"),
    "tensor_experts_hidden": (["--tp=4", "--n_head=4", "--d_hidden=6", "--expert_tensor_parallel=true"],
                              "d_hidden=6 is not divisible by tp=4"),
    "tensor_parallel_heads": (["--tp=2", "--n_head=1", "--d_model=8"], "n_head=1 is not divisible by tp=2"),
    "ranks_per_node": (["--ep=2", "--ranks_per_node=3"], "ranks_per_node=3 must divide"),
}


@pytest.mark.parametrize("case", list(CONFIG_REFUSALS))
def test_the_config_refuses_with_the_same_check(case):
    argv, words = CONFIG_REFUSALS[case]
    with pytest.raises(ConfigError, match=words):
        parse_args(["--progress=false", *argv])


def test_the_plan_says_what_parallelize_decided():
    """One rank: every MoE layer named, with the runner's own settings; options that need tp > 1 are off."""
    model = _model()
    plan = parallelize(model, ParallelLayout(), drop_duplicate_tokens=True, exchange="pairwise")
    assert plan.options.drop_duplicate_tokens and [entry.name for entry in plan.layers] == ["blocks.0.ffn", "blocks.1.ffn"]
    for entry in plan.layers:
        assert entry.layer.expert_runner.settings is entry.expert
        assert entry.expert.exchange == "pairwise" and not entry.expert.drop_duplicate_tokens   # tp = 1
        assert not entry.sums_expert_gradients_over_tensor
    assert plan.expert_parameters() == [p for entry in plan.layers for p in entry.layer.experts.parameters()]
    assert plan.sliced_parameters == ()
