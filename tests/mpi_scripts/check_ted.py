"""Run under ``mpirun -n 8``: TED 3D parallelism (+ token dropping, pipelining, hierarchical all-to-all) == one process.

    mpirun -n 8 python tests/mpi_scripts/check_ted.py results.json

For every case (tp, ep, dp, options) each rank builds the whole float64 model from the same seed,
computes the loss of the *global* batch alone (the reference), then builds it again as one rank of
the layout (make_ted), runs its batch shard, all-reduces the gradients and compares:

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
from mpi4py import MPI

from fastmoe_edu.distributed import ParallelLayout, abort_on_exception
from fastmoe_edu.distributed.expert_parallel import keep_local_experts
from fastmoe_edu.distributed.hierarchical import count_flat_messages
from fastmoe_edu.distributed.ted import allreduce_ted_gradients, make_ted
from fastmoe_edu.distributed.tensor_parallel import make_tensor_parallel
from fastmoe_edu.layer import MoELayer
from fastmoe_edu.model import ModelConfig, MoETransformer

FACTORIZATIONS = [(1, 8, 1), (2, 4, 1), (4, 2, 1), (8, 1, 1), (1, 4, 2), (2, 2, 2), (1, 2, 4), (1, 1, 8),
                  (4, 1, 2), (2, 1, 4)]
MODEL = dict(vocab_size=32, seq_len=8, n_layer=4, n_head=8, d_model=32, d_hidden=16, num_experts=8, top_k=2,
             moe_every=2, router="softmax_topk", router_options={"z_loss_weight": 1e-3})
BATCH = 8


def cases():
    """(name, tp, ep, dp, options) for every case this launch checks."""
    out = []
    for tp, ep, dp in FACTORIZATIONS:
        for drop in ([False, True] if tp > 1 else [False]):
            out.append((f"tp{tp}_ep{ep}_dp{dp}" + ("_drop" if drop else ""), tp, ep, dp,
                        dict(drop_duplicate_tokens=drop)))
    # Pipelined (overlapped) exchanges and hierarchical all-to-alls, with and without dropping.
    out += [("tp1_ep8_dp1_pipe3", 1, 8, 1, dict(pipeline_degree=3)),
            ("tp2_ep2_dp2_drop_pipe2", 2, 2, 2, dict(drop_duplicate_tokens=True, pipeline_degree=2)),
            ("tp1_ep4_dp2_pipe2_alltoallv", 1, 4, 2, dict(pipeline_degree=2, exchange="alltoallv")),
            ("tp1_ep8_dp1_hier2", 1, 8, 1, dict(ranks_per_node=2)),
            ("tp1_ep8_dp1_hier4", 1, 8, 1, dict(ranks_per_node=4)),
            ("tp2_ep4_dp1_drop_hier2", 2, 4, 1, dict(drop_duplicate_tokens=True, ranks_per_node=2)),
            ("tp1_ep4_dp2_hier2", 1, 4, 2, dict(ranks_per_node=2)),
            ("tp1_ep8_dp1_alltoallv", 1, 8, 1, dict(exchange="alltoallv")),
            ("tp2_ep4_dp1_drop_alltoallv", 2, 4, 1, dict(drop_duplicate_tokens=True, exchange="alltoallv"))]
    return out


def build():
    torch.manual_seed(0)
    return MoETransformer(ModelConfig(**MODEL))


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


def sliced_like(ref_grads: dict, layout: ParallelLayout) -> dict:
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
    return dict(grads.named_parameters())


def exchange_bytes(stats) -> int:
    """Bytes of the token-row exchanges this rank sent (all flat and hierarchical row all-to-alls)."""
    row_ops = ("pairwise", "alltoallv", "ialltoallv")
    return sum(c.bytes_sent for key, c in stats.counters.items()
               if key.startswith("expert") and key.split("/")[1] in row_ops)


def run_case(tp, ep, dp, options, ref_logits, ref_loss, ref_grads) -> dict:
    layout = ParallelLayout(tensor_parallel=tp, expert_parallel=ep, expert_replicas=dp)
    model = build()
    make_ted(model, layout, **options)
    x, y = global_batch()
    rows = layout.check_batch_size(BATCH)
    mine = slice(layout.data_rank * rows, (layout.data_rank + 1) * rows)
    layout.stats.reset()
    logits, loss = model(x[mine], y[mine])
    loss.backward()
    sent = exchange_bytes(layout.stats)
    allreduce_ted_gradients(model, layout)
    global_loss = layout.data.comm.allreduce(loss.item(), op=MPI.SUM) / layout.data_size

    expected = sliced_like(ref_grads, layout)
    grad_error = 0.0
    for name, p in model.named_parameters():
        grad_error = max(grad_error, (p.grad - expected[name]).abs().max().item())
    errors = {"logits": (logits.detach() - ref_logits[mine]).abs().max().item(),
              "loss": abs(global_loss - ref_loss), "grad": grad_error}
    totals = {"exchange_bytes": layout.world.comm.allreduce(sent, op=MPI.SUM)}
    for level in ("intra_node", "inter_node"):
        messages = [m.expert_parallel.hierarchical.messages[level] for m in model.modules()
                    if getattr(getattr(m, "expert_parallel", None), "hierarchical", None) is not None]
        totals[f"hier_{level}_messages"] = layout.world.comm.allreduce(sum(messages), op=MPI.SUM)
    rpn = options.get("ranks_per_node")
    if rpn:   # what a flat exchange of the same rows would send: every row exchange is (P−1)-way here
        flat = count_flat_messages([1] * ep, layout.ep_rank, rpn)
        n_exchanges = 4 * sum(isinstance(m, MoELayer) for m in model.modules())   # fwd + bwd, scatter + gather
        for level in ("intra_node", "inter_node"):
            totals[f"flat_{level}_messages"] = layout.world.comm.allreduce(flat[level] * n_exchanges, op=MPI.SUM)
    return {"errors": errors, "totals": totals}


def main(output: str) -> None:
    abort_on_exception()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    ref_logits, ref_loss, ref_grads = reference()
    results = {}
    for name, tp, ep, dp, options in cases():
        start = time.perf_counter()
        result = run_case(tp, ep, dp, options, ref_logits, ref_loss, ref_grads)
        for key, value in result["errors"].items():
            result["errors"][key] = world.allreduce(value, op=MPI.MAX)       # the worst rank decides
        result["seconds"] = time.perf_counter() - start
        result["tp"], result["options"] = tp, options
        results[name] = result
    if world.Get_rank() == 0:
        Path(output).write_text(json.dumps({"world_size": world.Get_size(), "results": results}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
