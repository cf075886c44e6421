"""Run under ``mpirun -n P`` or ``torchrun``: TED 3D parallelism (+ token dropping, pipelining, hierarchical
all-to-all) == one process, for every factorization P = tp × ep × dp (pipelining: equal and unequal
forward / backward degrees).

    mpirun -n 8 python tests/mpi_scripts/check_ted.py results.json
    torchrun --nproc-per-node=4 tests/mpi_scripts/check_ted.py results.json

For every case (tp, ep, dp, options) each rank builds the whole float64 model from the same seed,
computes the loss of the *global* batch alone (the reference), then builds it again as one rank of
the layout (``parallelize``), runs its batch shard, all-reduces the gradients and compares:

* logits of its shard, the global loss (mean over the data group of the per-shard losses),
* every parameter's gradient against the *same slice* of the reference gradient. The slice is made
  by running the very same slicing code (make_tensor_parallel, keep_local_experts) on a copy of the
  reference model whose weights are replaced by their gradients, so names and shapes line up.

It also records the bytes of the token exchange (all ranks, forward + backward) and the
message counts of the flat and hierarchical exchanges. Rank 0 writes everything as JSON.
"""
import json
import sys
import time
from pathlib import Path

import torch
from fastmoe_edu.backends import set_cpu_threads
from fastmoe_edu.distributed import (ParallelLayout, abort_on_exception, allreduce_gradients, keep_local_experts,
                                     open_world, parallelize)
from fastmoe_edu.distributed.expert_tensor_parallel import shard_experts
from fastmoe_edu.distributed.hierarchical import HierarchicalExchange, count_flat_messages
from fastmoe_edu.distributed.tensor_parallel import make_tensor_parallel
from fastmoe_edu.layer import MoELayer
from fastmoe_edu.model import ModelConfig, MoETransformer

MODEL = dict(vocab_size=32, seq_len=8, n_layer=4, n_head=8, d_model=32, d_hidden=16, num_experts=8, top_k=2,
             moe_every=2, router="softmax_top_k", router_options={"z_loss_weight": 1e-3})
BATCH = 8


def factorizations(world_size: int) -> list[tuple[int, int, int]]:
    """Every (tp, ep, dp) with tp · ep · dp = world size (tp must divide n_head = 8, ep num_experts = 8)."""
    return [(tp, ep, world_size // (tp * ep)) for tp in (1, 2, 4, 8) for ep in (1, 2, 4, 8)
            if world_size % (tp * ep) == 0]


def cases(world_size: int):
    """(name, tp, ep, dp, options) for every case this launch checks."""
    P = world_size
    out = []
    for tp, ep, dp in factorizations(P):
        # Dropping on every layout with tp > 1 up to 4 ranks; at 8 ranks on the layouts (2×2×2, 4×2×1)
        # and 2×4×1 only, which keeps the 8-rank job (oversubscribed on CI's 2 cores) short.
        with_drop = tp > 1 and (P <= 4 or (tp, ep, dp) in ((2, 2, 2), (4, 2, 1), (2, 4, 1)))
        for drop in ([False, True] if with_drop else [False]):
            out.append((f"tp{tp}_ep{ep}_dp{dp}" + ("_drop" if drop else ""), tp, ep, dp,
                        dict(drop_duplicate_tokens=drop)))
        # The other drop point and tensor-parallel experts: on every layout with tp > 1 up to 4 ranks, and on
        # the 8-rank layouts (2×2×2, 4×2×1) at 8 ranks, which keeps the 8-rank job short.
        if tp > 1 and (P <= 4 or (tp, ep, dp) in ((2, 2, 2), (4, 2, 1))):
            out.append((f"tp{tp}_ep{ep}_dp{dp}_droprows", tp, ep, dp,
                        dict(drop_duplicate_tokens=True, drop_duplicate_at="expert_rows")))
            for drop in (False, True):   # tensor-parallel experts, with and without dropping
                out.append((f"tp{tp}_ep{ep}_dp{dp}_etp" + ("_drop" if drop else ""), tp, ep, dp,
                            dict(expert_tensor_parallel=True, drop_duplicate_tokens=drop)))
            out.append((f"tp{tp}_ep{ep}_dp{dp}_etp_drop_numba", tp, ep, dp,
                        dict(expert_tensor_parallel=True, drop_duplicate_tokens=True, backend="numba")))
    # Pipelined (overlapped) exchanges, hierarchical all-to-alls and the pairwise exchange, with and
    # without dropping, on the layouts this world size has.
    wanted = [(f"tp1_ep{P}_dp1_pipe3", 1, P, 1, dict(pipeline_degree=3)),
              (f"tp2_ep{P // 4}_dp2_drop_pipe2", 2, P // 4, 2, dict(drop_duplicate_tokens=True, pipeline_degree=2)),
              (f"tp1_ep{P // 2}_dp2_pipe2_pairwise", 1, P // 2, 2, dict(pipeline_degree=2, exchange="pairwise")),
              # FSMoE: the backward cut into other chunks than the forward (pipeline.py's pieces)
              (f"tp1_ep{P}_dp1_pipe2_bwd3", 1, P, 1, dict(pipeline_degree=2, backward_pipeline_degree=3)),
              # ... and each chunk through the hierarchical exchange (its two phases overlapped across chunks)
              (f"tp1_ep{P}_dp1_hier2_pipe3_bwd1", 1, P, 1, dict(ranks_per_node=2, pipeline_degree=3,
                                                                backward_pipeline_degree=1)),
              (f"tp1_ep{P}_dp1_hier2", 1, P, 1, dict(ranks_per_node=2)),
              (f"tp1_ep{P}_dp1_hier4", 1, P, 1, dict(ranks_per_node=4)),
              (f"tp2_ep{P // 2}_dp1_drop_hier2", 2, P // 2, 1, dict(drop_duplicate_tokens=True, ranks_per_node=2)),
              (f"tp1_ep{P // 2}_dp2_hier2", 1, P // 2, 2, dict(ranks_per_node=2)),
              (f"tp1_ep{P}_dp1_pairwise", 1, P, 1, dict(exchange="pairwise")),
              # FasterMoE's shadowing: forced (the 2 most loaded experts), and chosen by the latency model
              (f"tp1_ep{P}_dp1_shadow", 1, P, 1, dict(shadow_experts=2)),
              (f"tp1_ep{P}_dp1_shadow_auto", 1, P, 1, dict(shadow_experts="auto")),
              (f"tp2_ep{P // 2}_dp1_drop_shadow", 2, P // 2, 1, dict(drop_duplicate_tokens=True, shadow_experts=2)),
              (f"tp1_ep{P // 2}_dp2_hier2_shadow", 1, P // 2, 2, dict(ranks_per_node=2, shadow_experts=1)),
              # ... and with the pipelined exchange carrying the rows that still travel
              (f"tp1_ep{P}_dp1_pipe2_bwd3_shadow", 1, P, 1, dict(pipeline_degree=2, backward_pipeline_degree=3,
                                                                 shadow_experts=1)),
              (f"tp2_ep{P // 2}_dp1_drop_pairwise", 2, P // 2, 1, dict(drop_duplicate_tokens=True, exchange="pairwise"))]
    return out + [case for case in wanted
                  if case[2] >= 1 and case[1] * case[2] * case[3] == P
                  and case[4].get("ranks_per_node", 1) <= case[2] and case[2] % case[4].get("ranks_per_node", 1) == 0]


def build(backend: str = "reference"):
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(**MODEL, backend=backend))


def global_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["seq_len"]), generator=g)
    y = torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["seq_len"]), generator=g)
    return x, y


def reference():
    model = build()
    x, y = global_batch()
    logits, loss = model(x, y)
    loss.backward()
    return logits.detach(), loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def sliced_like(ref_grads: dict, layout: ParallelLayout, expert_tensor_parallel: bool = False) -> dict:
    """The reference gradients cut exactly as make_ted cuts the weights on this rank.

    A fresh model whose every weight is replaced by its reference gradient, then sliced.
    """
    grads = build()
    with torch.no_grad():
        for name, p in grads.named_parameters():
            p.copy_(ref_grads[name])
    make_tensor_parallel(grads, layout)
    L = layout.check_num_experts(MODEL["num_experts"])
    for layer in grads.modules():
        if isinstance(layer, MoELayer):
            keep_local_experts(layer.experts, layout.ep_rank * L, L)
            if expert_tensor_parallel and layout.tp_size > 1:
                shard_experts(layer.experts, layout.tensor.rank, layout.tp_size)
    return dict(grads.named_parameters())


def exchange_bytes(stats) -> int:
    """Bytes of the token-row exchanges this rank sent (all flat and hierarchical row all-to-alls)."""
    row_ops = ("pairwise", "alltoallv", "ialltoallv")
    return sum(c.bytes_sent for key, c in stats.counters.items()
               if key.startswith("expert") and key.split("/")[1] in row_ops)


def run_case(world, tp, ep, dp, options, ref_logits, ref_loss, ref_grads) -> dict:
    layout = ParallelLayout(world, tp=tp, ep=ep, dp=dp)
    options = dict(options)
    model = build(options.pop("backend", "reference"))      # the numba backend against the reference's one process
    plan = parallelize(model, layout, **options)
    x, y = global_batch()
    rows = layout.check_batch_size(BATCH)
    mine = slice(layout.data_rank * rows, (layout.data_rank + 1) * rows)
    layout.stats.reset()
    logits, loss = model(x[mine], y[mine])
    loss.backward()
    sent = exchange_bytes(layout.stats)
    allreduce_gradients(model, layout, plan)
    global_loss = total(layout.data, loss.item()) / layout.data_size

    expected = sliced_like(ref_grads, layout, options.get("expert_tensor_parallel", False))
    grad_error = 0.0
    for name, p in model.named_parameters():
        grad_error = max(grad_error, (p.grad - expected[name]).abs().max().item())
    errors = {"logits": (logits.detach() - ref_logits[mine]).abs().max().item(),
              "loss": abs(global_loss - ref_loss), "grad": grad_error}
    shadowed = [len(entry.layer.expert_runner.last_shadowed) for entry in plan.layers
                if entry.expert.shadow_experts != 0]
    gathered = layout.stats.counters.get("tensor/allgather_forward")
    posted = layout.stats.counters.get("expert/ialltoallv")              # the pipelined chunks, both passes
    expert_elements = sum(p.numel() for p in plan.expert_parameters())
    totals = {"exchange_bytes": int(total(layout.world, sent)),
              "max_expert_elements_per_rank": int(total(layout.world, expert_elements, op="max")),
              "min_shadowed_experts": int(total(layout.world, min(shadowed, default=-1), op="max")),
              "tp_allgather_forward_bytes": int(total(layout.world, gathered.bytes_sent if gathered else 0)),
              "max_ialltoallv_calls": int(total(layout.world, posted.calls if posted else 0, op="max"))}
    for level in ("intra_node", "inter_node"):
        messages = [m.expert_runner.exchange.messages[level] for m in model.modules()
                    if isinstance(getattr(getattr(m, "expert_runner", None), "exchange", None), HierarchicalExchange)]
        totals[f"hier_{level}_messages"] = int(total(layout.world, sum(messages)))
    rpn = options.get("ranks_per_node")
    if rpn:   # what a flat exchange of the same rows would send: every row exchange is (P−1)-way here
        flat = count_flat_messages([1] * ep, layout.ep_rank, rpn)
        n_exchanges = 4 * sum(isinstance(m, MoELayer) for m in model.modules())   # fwd + bwd, scatter + gather
        for level in ("intra_node", "inter_node"):
            totals[f"flat_{level}_messages"] = int(total(layout.world, flat[level] * n_exchanges))
    return {"errors": errors, "totals": totals}


def total(comm, value: float, op: str = "sum") -> float:
    return comm.allreduce_(torch.tensor([float(value)], dtype=torch.float64), op=op).item()


def main(output: str) -> None:
    world = open_world()
    abort_on_exception(world.engine)
    torch.set_default_dtype(torch.float64)
    set_cpu_threads(1, "numba")        # torch and numba's pool: numba's would reset torch's count
    ref_logits, ref_loss, ref_grads = reference()
    results = {}
    for name, tp, ep, dp, options in cases(world.size):
        start = time.perf_counter()
        result = run_case(world, tp, ep, dp, options, ref_logits, ref_loss, ref_grads)
        for key, value in result["errors"].items():
            result["errors"][key] = total(world, value, op="max")         # the worst rank decides
        result["seconds"] = time.perf_counter() - start
        result["tp"], result["ep"], result["dp"], result["options"] = tp, ep, dp, options
        results[name] = result
    if world.rank == 0:
        Path(output).write_text(json.dumps({"world_size": world.size, "engine": world.engine, "results": results},
                                           indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
