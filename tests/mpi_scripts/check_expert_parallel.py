"""Under ``mpirun -n P`` / ``torchrun``: the expert-parallel MoELayer against one process on the same global batch.

Every rank builds the single-process layer itself (same seed) and compares what it owns:

    forward output and input gradient of its own tokens, the gradient of its local experts,
    the gradient of the replicated gate, the global-batch aux loss, and the sigmoid bias update.

The objective is the mean over ranks of the per-rank loss (see distributed/gradients.py):

    L = (1/R) Σ_r [ Σ_{t in shard r} <y_t, g_t> / T_r + aux_r ]    =  Σ_t <y_t, g_t> / T + aux_global

so the single-process oracle is  Σ_t <y_t, g_t> / T + aux(whole batch)  and a rank's input
gradient is R times the oracle's (its loss is R times "heavier" per token than L).
Capacity-limited routers apply capacity per rank: the oracle then runs each rank's shard separately
(the aux loss still comes from the whole batch; routing itself does not depend on the shards).

Each case runs with the pairwise and the all-to-all-v exchange, and with the most loaded expert shadowed
while the other rows take the pipelined exchange (forward 2, backward 3 chunks). With 4 or more ranks
the checks of the reference backend also run with two copies of each expert slice (ep = P/2, dp = 2).
Run by run_checks.py, which keeps the worst error of each quantity over the ranks.
"""
import torch

from fastmoe_edu import MoELayer
from fastmoe_edu.backends import get_backend
from fastmoe_edu.distributed import ParallelLayout, allreduce_gradients, parallelize, split_parameters

D_MODEL, D_HIDDEN, NUM_EXPERTS, TOKENS_PER_RANK = 8, 12, 8, 6
CASES = {   # name: layer options (all deterministic: no jitter, no random routing)
    "softmax_top_k": dict(router="softmax_top_k", top_k=2, capacity_factor=None, z_loss_weight=0.01),
    "switch_capacity": dict(router="switch", top_k=1, capacity_factor=1.0),
    "gshard_capacity_gelu_bias": dict(router="gshard", top_k=2, capacity_factor=0.75, random_routing=False,
                                      expert="gelu", bias=True, output_bias=True),
    # the weights on the experts' input rows (Llama-4): the scaled rows travel through the exchange
    "sigmoid_weights_on_input": dict(router="sigmoid", top_k=2, capacity_factor=None, bias_update_rate=0.1,
                                     weights_on="input"),
}
# (name, exchange, gradient bucket bytes, schedule options): the two flat exchanges, and FasterMoE's shadowing
# of the most loaded expert with the other rows through the pipelined exchange (FSMoE's separate degrees).
VARIANTS = [("pairwise", "pairwise", 256, {}), ("alltoallv", "alltoallv", 25 * 2**20, {}),
            ("pipelined_shadowed", "alltoallv", 25 * 2**20,
             dict(pipeline_degree=2, backward_pipeline_degree=3, shadow_experts=1))]


def build(options, backend, seed=0):
    torch.manual_seed(seed)
    layer = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, backend=backend, **options).double()
    with torch.no_grad():   # non-zero expert and output biases, so their gradients are exercised
        for name, param in layer.named_parameters():
            if name.startswith("experts.b") or name == "output_bias":
                param.copy_(torch.linspace(-1, 1, param.numel(), dtype=param.dtype).reshape(param.shape))
    return layer


def oracle(options, backend, x, upstream, shards):
    """One process: y, dL/dx, and the parameter gradients of the global objective."""
    layer = build(options, backend)
    x = x.clone().requires_grad_(True)
    y_whole = layer(x)
    aux = layer.aux_loss
    if options["capacity_factor"] is None:
        y = y_whole
    else:    # per-rank capacity: each shard routed and pruned on its own
        y = torch.cat([layer(x[shard]) for shard in shards])
    loss = (y * upstream).sum() / x.shape[0] + aux
    loss.backward()
    layer.update_router_bias()       # sigmoid (dropless): the load of the whole batch's forward
    return layer, y.detach(), x.grad, aux.detach()


def distributed(options, backend, layout, x_local, upstream_local, exchange, bucket_bytes, schedule):
    layer = build(options, backend)
    plan = parallelize(layer, layout, exchange=exchange, **schedule)
    x_local = x_local.clone().requires_grad_(True)
    y = layer(x_local)
    loss = (y * upstream_local).sum() / x_local.shape[0] + layer.aux_loss
    loss.backward()
    allreduce_gradients(layer, layout, plan, bucket_bytes=bucket_bytes)
    layer.update_router_bias()
    aux_mean = layout.data.allreduce_(layer.aux_loss.detach().clone().reshape(1), average=True)[0]
    return layer, plan, y.detach(), x_local.grad, aux_mean


def max_error(a, b):
    return float((a - b).abs().max()) if a.numel() else 0.0


def layer_checks(world: ParallelLayout) -> tuple[dict, dict]:
    """All layer comparisons on this rank: ({case: {quantity: error}}, {backend: why skipped})."""
    # Experts over all ranks; with 4 or more ranks also two copies of every expert slice (dp = 2).
    layouts = {"": world}
    if world.world_size >= 4:
        layouts["/dp2"] = ParallelLayout(world.world, ep=world.world_size // 2, dp=2)

    backends = ["reference"]
    results, skipped = {}, {}
    try:
        get_backend("numba")
        backends.append("numba")
    except Exception as error:        # noqa: BLE001  (recorded, the pytest side decides)
        skipped["numba"] = f"{type(error).__name__}: {error}"

    for suffix, layout in layouts.items():
        ranks, rank = layout.data_size, layout.data_rank
        generator = torch.Generator().manual_seed(1234)
        total = TOKENS_PER_RANK * ranks
        x = torch.randn(total, D_MODEL, generator=generator, dtype=torch.float64)
        upstream = torch.randn(total, D_MODEL, generator=generator, dtype=torch.float64)
        shards = [slice(r * TOKENS_PER_RANK, (r + 1) * TOKENS_PER_RANK) for r in range(ranks)]
        mine = shards[rank]
        for backend in backends:
            for case, options in CASES.items():
                ref, y_ref, dx_ref, aux_ref = oracle(options, backend, x, upstream, shards)
                outputs = {}
                for variant, exchange, bucket_bytes, schedule in VARIANTS:
                    if suffix and (backend != "reference" or schedule):   # dp = 2: one backend, plain exchanges
                        continue
                    layer, parallel_plan, y, dx, aux = distributed(options, backend, layout, x[mine], upstream[mine],
                                                    exchange, bucket_bytes, schedule)
                    plan = layer.expert_runner
                    local = slice(plan.first_local_expert, plan.first_local_expert + plan.num_local_experts)
                    errors = {
                        "output": max_error(y, y_ref[mine]),
                        "input_grad": max_error(dx / ranks, dx_ref[mine]),
                        "aux_loss": abs(float(aux - aux_ref)),
                    }
                    _, experts = split_parameters(layer, parallel_plan)
                    ref_params = dict(ref.named_parameters())
                    for name, param in layer.named_parameters():
                        expected = ref_params[name].grad
                        if name.startswith("experts."):
                            expected = expected[local]
                        errors[f"grad:{name}"] = max_error(param.grad, expected)
                    if getattr(layer.router, "bias", None) is not None:    # sigmoid: updated by load
                        errors["router_bias_after_update"] = max_error(layer.router.bias, ref.router.bias)
                    errors["scale:output"] = float(y_ref.abs().max())
                    errors["scale:grad:router.weight"] = float(ref.router.weight.grad.abs().max())
                    errors["num_expert_params"] = len(experts)
                    errors["num_shadowed_experts"] = len(plan.last_shadowed or [])
                    outputs[variant] = (y, dx)
                    results[f"{backend}/{case}/{variant}{suffix}"] = errors
                if "pairwise" not in outputs:
                    continue
                # The two exchanges move the same numbers: bitwise equal results.
                results[f"{backend}/{case}/pairwise_vs_alltoallv{suffix}"] = {
                    "output": max_error(outputs["pairwise"][0], outputs["alltoallv"][0]),
                    "input_grad": max_error(outputs["pairwise"][1], outputs["alltoallv"][1])}
    return results, skipped
