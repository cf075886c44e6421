"""Run under ``mpirun -n P`` or ``torchrun``: the expert-parallel Soft MoE layer == one process on the global batch.

    mpirun -n 4 python tests/mpi_scripts/check_soft_moe.py results.json
    torchrun --nproc-per-node=2 tests/mpi_scripts/check_soft_moe.py results.json

The global batch is R · SEQS_PER_RANK sequences (R = ep · dp data ranks); data rank r holds sequences
r·b .. r·b + b − 1. A Soft MoE group is one sequence, so every rank's groups are whole and the layer
needs no communication but the experts' all-to-all: the ``expert_runner`` seam, unchanged.

Every rank builds the layer from the same seed, runs the whole batch in one process (the oracle), then
builds it again, ``parallelize(layer, layout)``, runs its own sequences and all-reduces the gradients.
The loss conventions are those of check_expert_parallel.py:

    rank r:    L_r = Σ_{t in shard r} <y_t, g_t> / T_r           one process:  L = Σ_t <y_t, g_t> / T
    allreduce_gradients averages over the R shards (T_r = T / R):  (1/R) Σ_r ∂L_r/∂θ = ∂L/∂θ

so parameter gradients compare directly and a rank's input gradient is R times the oracle's.
Also recorded: every rank sends and receives exactly ``L · b · p`` rows to / from every expert rank
(``L = E / ep`` local experts, ``p`` slots): the exchange is a plain all-to-all of equal blocks.
Rank 0 writes ``{"world_size", "engine", "results": {case: {quantity: worst error over the ranks}},
"skipped"}``.
"""
import json
import sys
from pathlib import Path

import torch

from fastmoe_edu import MoELayer
from fastmoe_edu.backends import get_backend, set_cpu_threads
from fastmoe_edu.distributed import ParallelLayout, abort_on_exception, allreduce_gradients, parallelize
from fastmoe_edu.distributed.exchange import exchange_counts

D_MODEL, D_HIDDEN, NUM_EXPERTS, SEQ_LEN, SEQS_PER_RANK = 8, 12, 8, 5, 2
CASES = {   # name: (layer options, parallelize options)
    "p1": (dict(slots_per_expert=1), dict(exchange="alltoallv")),
    "p1_pairwise": (dict(slots_per_expert=1), dict(exchange="pairwise")),
    "p2_normalize": (dict(slots_per_expert=2, normalize=True), dict(exchange="alltoallv")),
    "p3_gelu_bias_pipelined": (dict(slots_per_expert=3, expert="gelu", bias=True),
                               dict(exchange="alltoallv", pipeline_degree=2)),
}


def build(options, backend, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, router="soft_moe", backend=backend, **options).double()
    with torch.no_grad():   # non-zero expert biases, so their gradients are exercised
        for name, param in layer.named_parameters():
            if name.startswith("experts.b"):
                param.copy_(torch.linspace(-1, 1, param.numel(), dtype=param.dtype).reshape(param.shape))
    return layer


def max_error(a, b):
    return float((a - b).abs().max()) if a.numel() else 0.0


def one_case(layout, options, parallel_options, backend, x, upstream, mine):
    ranks = layout.data_size
    # One process, the whole batch.
    ref = build(options, backend)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    ((y_ref * upstream).sum() / (x.shape[0] * x.shape[1])).backward()
    # This rank's sequences, experts spread over the expert group.
    layer = build(options, backend)
    plan = parallelize(layer, layout, **parallel_options)
    x_local = x[mine].clone().requires_grad_(True)
    y = layer(x_local)
    ((y * upstream[mine]).sum() / (x_local.shape[0] * x_local.shape[1])).backward()
    allreduce_gradients(layer, layout, plan)

    runner = layer.expert_runner
    local = slice(runner.first_local_expert, runner.first_local_expert + runner.num_local_experts)
    errors = {"output": max_error(y.detach(), y_ref.detach()[mine]),
              "input_grad": max_error(x_local.grad / ranks, x_ref.grad[mine]),
              "aux_loss": abs(float(layer.aux_loss))}
    ref_params = dict(ref.named_parameters())
    for name, param in layer.named_parameters():
        expected = ref_params[name].grad
        errors[f"grad:{name}"] = max_error(param.grad, expected[local] if name.startswith("experts.") else expected)
    # The counts the runner got, and the exchange plan they make: equal blocks for every pair of ranks.
    plan = exchange_counts(layer.last_routing.tokens_per_expert, runner.num_local_experts, layout.expert)
    block = runner.num_local_experts * SEQS_PER_RANK * options["slots_per_expert"]
    errors["unequal_blocks"] = float(any(rows != block for rows in plan.send_rows + plan.recv_rows))
    errors["scale:output"] = float(y_ref.detach().abs().max())
    errors["scale:grad:router.weight"] = float(ref.router.weight.grad.abs().max())
    return errors


def soft_moe_checks(world: ParallelLayout) -> tuple[dict, dict]:
    layouts = {"": world}
    if world.world_size >= 4:                      # also two copies of every expert slice
        layouts["/dp2"] = ParallelLayout(world.world, ep=world.world_size // 2, dp=2)
    backends, skipped = ["reference"], {}
    try:
        get_backend("numba")
        backends.append("numba")
    except Exception as error:        # noqa: BLE001  (recorded, the pytest side decides)
        skipped["numba"] = f"{type(error).__name__}: {error}"

    results = {}
    for suffix, layout in layouts.items():
        ranks, rank = layout.data_size, layout.data_rank
        generator = torch.Generator().manual_seed(1234)
        x = torch.randn(ranks * SEQS_PER_RANK, SEQ_LEN, D_MODEL, generator=generator, dtype=torch.float64)
        upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        mine = slice(rank * SEQS_PER_RANK, (rank + 1) * SEQS_PER_RANK)
        for backend in backends:
            if suffix and backend != "reference":          # dp = 2: one backend is enough
                continue
            for case, (options, parallel_options) in CASES.items():
                results[f"{backend}/{case}{suffix}"] = one_case(layout, options, parallel_options, backend,
                                                                x, upstream, mine)
    return results, skipped


def main(output: str) -> None:
    world = ParallelLayout()
    abort_on_exception(world.world.engine)
    set_cpu_threads(1, "numba")        # torch and numba's pool: numba's would reset torch's count
    results, skipped = soft_moe_checks(world)
    for errors in results.values():                      # the worst rank decides
        for key, value in errors.items():
            errors[key] = world.world.allreduce_(torch.tensor([float(value)], dtype=torch.float64), op="max").item()
    if world.is_main:
        Path(output).write_text(json.dumps({"world_size": world.world_size, "engine": world.world.engine,
                                            "results": results, "skipped": skipped}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
