"""Run under ``mpirun -n P``: a tiny HF Mixtral, moefied expert-parallel, trains like one process.

    mpirun -n 2 python tests/mpi_scripts/check_hf_moefy.py results.json

Every rank builds the same random tiny ``MixtralForCausalLM`` (same seed, float64) twice:

* the oracle: ``moefy(model)`` in one process, trained on the whole global batch;
* the parallel model: ``parallelize(moefy(model), layout)``, each swapped MoELayer keeping E / P experts; the
  rank trains on its own sequences and calls ``allreduce_gradients`` after every backward.

The loss is HF's causal-LM loss, the mean over a batch's shifted tokens, written out here in float64
(HF's own ``loss_function`` upcasts the logits to float32, which would cap the agreement at ~1e-7).
The shards have equal sizes, so the global mean is the mean of the shard means, which is what
``allreduce_gradients`` averages (distributed/gradients.py): after every SGD step the parameters
must agree. HF's balance loss is
left out (router_aux_loss_coef = 0): computed on a shard it is not the global batch's (f_e · P_e is
not linear in the tokens), as with any data-parallel HF training.

Rank 0 writes ``{"world_size", "losses" (the oracle's, per step), "scale", "errors": {quantity: worst
error over the ranks}}``: the per-step global loss, every replicated parameter, and every rank's
expert slice against the oracle's.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from torch.nn.functional import cross_entropy

from fastmoe_edu.backends import set_cpu_threads
from fastmoe_edu.distributed import ParallelLayout, abort_on_exception, allreduce_gradients, parallelize
from fastmoe_edu.hf import HFMoEBlock, moefy

SEQS_PER_RANK, SEQ_LEN, STEPS, LR = 2, 6, 2, 0.5


def build():
    config = transformers.MixtralConfig(
        vocab_size=40, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.0,
        output_router_logits=False, attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).double()


def train(model, ids, layout=None, plan=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        logits = model(ids).logits                                       # float64 [B, S, V]
        loss = cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        if layout is not None:
            allreduce_gradients(model, layout, plan)
            loss = layout.data.allreduce_(loss.detach().reshape(1).clone()) / layout.data_size   # global mean
        optimizer.step()
        losses.append(float(loss.detach().reshape(())))
    return losses


def main(output: str) -> None:
    layout = ParallelLayout()
    abort_on_exception(layout.world.engine)
    set_cpu_threads(1, "numba")        # torch and numba's pool: numba's would reset torch's count
    ranks, rank = layout.data_size, layout.data_rank
    ids = torch.randint(0, 40, (ranks * SEQS_PER_RANK, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    mine = slice(rank * SEQS_PER_RANK, (rank + 1) * SEQS_PER_RANK)

    oracle = moefy(build(), backend="reference")
    oracle_losses = train(oracle, ids)
    model = moefy(build(), backend="reference")
    plan = parallelize(model, layout)                        # every swapped MoELayer expert-parallel
    losses = train(model, ids[mine], layout, plan)

    errors = {f"loss:{step}": abs(a - b) for step, (a, b) in enumerate(zip(losses, oracle_losses))}
    expected = dict(oracle.named_parameters())
    local = {}
    for name, module in model.named_modules():
        if isinstance(module, HFMoEBlock):
            runner = module.moe.expert_runner
            first = runner.first_local_expert
            local[f"{name}.moe.experts."] = slice(first, first + runner.num_local_experts)
    for name, param in model.named_parameters():
        target = expected[name].detach()
        prefix = next((p for p in local if name.startswith(p)), None)
        if prefix is not None:
            target = target[local[prefix]]
        errors[f"param:{name}"] = float((param.detach() - target).abs().max())
    for key, value in errors.items():                            # the worst rank decides
        errors[key] = layout.world.allreduce_(torch.tensor([value], dtype=torch.float64), op="max").item()
    if layout.is_main:
        scale = max(float(p.detach().abs().max()) for p in oracle.parameters())
        Path(output).write_text(json.dumps({"world_size": layout.world_size, "losses": oracle_losses,
                                            "scale": scale, "errors": errors}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
