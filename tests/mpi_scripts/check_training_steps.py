"""Under ``mpirun -n P`` / ``torchrun``: three optimizer steps of the whole language model equal one process.

The model of ``fastmoe_edu.model`` is trained in float64 through the training loop's own
``train_step``: once by every rank alone (one process, the whole global batch) and once by all P ranks (each with its experts and its batch shard, gradients
all-reduced, the global gradient norm clipped). After three AdamW steps each rank compares its
parameters (its expert slices) and the logged losses.
Dropless routers only: for them the P-rank model is the one-process model, exactly. The routers that
draw random numbers (noise, random routing, jitter) run with tp = P: every rank reads the one batch
shard, and the tensor-parallel ranks must draw the same numbers as one process does and route alike.
With 4 or more ranks, tp = 2 with duplicate token dropping and a capacity factor must run (before the
tp ranks routed identically, it died with "Message truncated") and give every tp rank the same loss.

FSMoE's gradient partitioning (``gradient_partitioning_checks``): the same P-rank run with the
replicated gradients all-reduced in pieces during the backward equals the run that all-reduces them
after it — dropless and capacity routers, reference and numba backends, forced small pieces and the
cost model's, an unused parameter, activation checkpointing with pipelining, gradient accumulation.

Run by run_checks.py, which keeps the worst error of each quantity over the ranks.
"""
import torch
from torch import nn

from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed import ParallelLayout
from fastmoe_edu.model import build_model
from fastmoe_edu.runtime import Runtime
from fastmoe_edu.train import (build_dataset, configure_optimizer, get_batch, parallel_runtime, seed_random_draws,
                               train_step)

STEPS = 3
CASES = {
    "softmax_top_k": ["--router=softmax_top_k", "--top_k=2", "--router_options.z_loss_weight=0.001"],
    "sigmoid": ["--router=sigmoid", "--top_k=2", "--router_options.bias_update_rate=0.01"],
    "shared_experts": ["--router=softmax_top_k", "--top_k=2", "--num_shared_experts=1", "--shared_expert_gate=true"],
    "shadow_experts": ["--router=softmax_top_k", "--top_k=2", "--shadow_experts=2"],   # FasterMoE, 3 steps
}
NOISE_CASES = {   # run with --tp=P (one batch shard): equal to one process, noise included
    "tp/noisy_top_k": ["--router=noisy_top_k", "--top_k=2"],
    "tp/gshard": ["--router=gshard", "--top_k=2", "--router_options.random_routing=true"],
    "tp/switch_jitter": ["--router=switch", "--top_k=1", "--router_options.jitter_epsilon=0.1"],
}
# At 8 ranks (oversubscribed 4× on CI's 2 cores) a subset: every case runs at 2 and 4 ranks under both engines.
AT_8_RANKS = {"softmax_top_k", "shadow_experts", "tp/gshard", "dropless_reference", "capacity_numba_cost_model"}
TP_DROP_CAPACITY = ["--tp=2", "--drop_duplicate_tokens=true", "--capacity_factor=1.0", "--router=gshard",
                    "--top_k=2", "--n_head=2"]


def small_config(world_size: int, extra: list[str]):
    return parse_args(["--progress=false", f"--batch_size={2 * world_size}", "--seq_len=12", "--n_layer=2",
                       "--n_head=2", "--d_model=16", "--d_hidden=24", "--num_experts=8", "--warmup_steps=1",
                       "--lr=0.01", "--grad_clip=0.5", *extra])


def train_three_steps(cfg, dataset, rt, unused_parameter: bool = False):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset.vocab_size).double()
    if unused_parameter:                        # a replicated parameter no loss depends on: its grad stays None
        model.blocks[0].unused = nn.Parameter(torch.ones(5, dtype=torch.float64))
    rt.shard_model(model)
    seed_random_draws(cfg, rt)
    optimizer = configure_optimizer(model, cfg)
    records = []
    for step in range(STEPS):
        x, y, lang = get_batch(dataset, cfg, "train", step)
        records.append(train_step(model, optimizer, (x, y, lang), cfg, step, rt))
    return model, records


def training_checks(world: ParallelLayout) -> dict:
    results = {}
    P = world.world_size
    cases = {**CASES, **{name: [*extra, f"--tp={P}", f"--n_head={P}"] for name, extra in NOISE_CASES.items()}}
    for case, extra in cases.items():
        if P >= 8 and case not in AT_8_RANKS:
            continue
        cfg = small_config(world.world_size, extra)
        dataset = build_dataset(cfg)
        # The one-process run, on every rank (deterministic: the same result everywhere).
        alone, alone_records = train_three_steps(cfg, dataset, Runtime())
        reference = {k: v.detach() for k, v in alone.named_parameters()}
        reference_buffers = dict(alone.named_buffers())
        together, together_records = train_three_steps(cfg, dataset, parallel_runtime(cfg, world.world.engine))
        errors = {}
        for name, param in together.named_parameters():
            expected = reference[name]
            if ".experts." in f".{name}":                          # this rank's slice of the experts
                plan = next(m.expert_runner for m in together.modules() if hasattr(m, "expert_runner"))
                expected = expected[plan.first_local_expert: plan.first_local_expert + plan.num_local_experts]
            if param.shape != expected.shape:                     # a tensor-parallel slice: mine of tp pieces
                dim = next(d for d, (n, m) in enumerate(zip(param.shape, expected.shape)) if n != m)
                expected = expected.chunk(expected.shape[dim] // param.shape[dim], dim)[rt_rank_in_tp(together)]
            errors[f"param:{name}"] = float((param - expected).detach().abs().max())
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            errors[f"log:{key}"] = max(abs(a[key] - b[key]) for a, b in zip(alone_records, together_records))
        errors["log:tokens_per_expert"] = float(max(
            abs(torch.tensor(a["tokens_per_expert"]) - torch.tensor(b["tokens_per_expert"])).max()
            for a, b in zip(alone_records, together_records)))
        for name, buffer in together.named_buffers():              # the sigmoid router's bias
            errors[f"buffer:{name}"] = float((buffer - reference_buffers[name]).abs().max())
        errors["scale:grad_norm"] = alone_records[-1]["grad_norm"]
        errors["scale:bias_moved"] = max((float(b.abs().max()) for n, b in reference_buffers.items() if "bias" in n),
                                         default=0.0)
        results[f"train/{case}"] = errors
    if P >= 4:
        results["train/tp2_drop_capacity_noise"] = tp_ranks_agree(world, small_config(P, TP_DROP_CAPACITY))
    return results


def rt_rank_in_tp(model) -> int:
    """This rank's index in its tensor-parallel group (the slice of the attention it holds)."""
    return next(m.comm.rank for m in model.modules() if hasattr(m, "comm") and m.comm.name == "tensor")


def tp_ranks_agree(world: ParallelLayout, cfg) -> dict:
    """Three noisy steps with duplicate token dropping and capacity: runs, and each tp group's losses agree."""
    dataset = build_dataset(cfg)
    rt = parallel_runtime(cfg, world.world.engine)
    _, records = train_three_steps(cfg, dataset, rt)
    mine = torch.tensor([r["loss"] for r in records], dtype=torch.float64)
    everyone = world.world.allgather(mine).reshape(world.world_size, -1)
    partner = rt.layout.rank ^ 1                                  # the other rank of my tp group (tp = 2)
    return {"tp_ranks_loss_difference": float((everyone[partner] - mine).abs().max()),
            "scale:finite_losses": float(torch.isfinite(everyone).all())}


# --------------------------------------------------------------------------------------------------
# gradient_partitioning = true equals false, at P ranks
# --------------------------------------------------------------------------------------------------
SMALL_PIECES = 600     # bytes: 75 float64 values, so most parameters are a piece of their own
PARTITIONING_CASES = {     # name: (options, forced piece bytes or None = the cost model's, extras)
    "dropless_reference": (["--router=softmax_top_k", "--top_k=2", "--num_shared_experts=1"], SMALL_PIECES,
                           {"unused_parameter": True, "accumulate": True}),
    "capacity_numba_cost_model": (["--router=switch", "--top_k=1", "--capacity_factor=1.0", "--backend=numba"],
                                  None, {}),
    "checkpointing_pipeline": (["--router=softmax_top_k", "--top_k=2", "--activation_checkpointing=true",
                                "--pipeline_degree=2", "--backward_pipeline_degree=3"], SMALL_PIECES, {}),
}


def gradient_partitioning_checks(world: ParallelLayout, backends: list[str]) -> dict:
    """{case: {quantity: |partitioned - plain|}} for PARTITIONING_CASES (and tp = 2 from 4 ranks on)."""
    results = {}
    P = world.world_size
    cases = dict(PARTITIONING_CASES)
    if P >= 4:
        cases["tp2_drop_capacity"] = (["--tp=2", "--n_head=2", "--drop_duplicate_tokens=true", "--router=switch",
                                       "--top_k=1", "--capacity_factor=1.25"], SMALL_PIECES, {})
    for case, (extra, piece_bytes, options) in cases.items():
        if P >= 8 and case not in AT_8_RANKS:
            continue
        if any(arg == f"--backend={b}" for arg in extra for b in ("numba",) if b not in backends):
            continue
        cfg = small_config(P, extra)
        dataset = build_dataset(cfg)
        runs = {}
        for partitioned in (False, True):
            cfg.gradient_partitioning = partitioned
            rt = parallel_runtime(cfg, world.world.engine)
            rt.gradient_piece_bytes = piece_bytes
            model, records = train_three_steps(cfg, dataset, rt, options.get("unused_parameter", False))
            if options.get("accumulate"):        # two backwards, one reduce: the hooks see every gradient twice
                for step in (STEPS, STEPS + 1):
                    x, y, _ = rt.shard_batch(get_batch(dataset, cfg, "train", step))
                    model(x, y)[1].backward()
                rt.reduce_gradients(model)
            runs[partitioned] = (model, records, rt)
        (plain, plain_records, _), (pieces, piece_records, rt) = runs[False], runs[True]
        errors = {}
        for (name, a), b in zip(plain.named_parameters(), pieces.parameters()):
            errors[f"param:{name}"] = float((a - b).detach().abs().max())
            if options.get("accumulate"):
                errors[f"grad:{name}"] = float((a.grad - b.grad).abs().max())
        for key in ("loss", "grad_norm"):
            errors[f"log:{key}"] = max(abs(a[key] - b[key]) for a, b in zip(plain_records, piece_records))
        errors["scale:pieces"] = len(rt.gradient_pieces.pieces)
        errors["scale:posted_during_backward"] = rt.gradient_pieces.posted_during_backward   # (the last step's)
        posted = rt.layout.stats.counters.get("data_gradients/allreduce_gradients")
        errors["scale:posted_per_step"] = posted.calls / (STEPS + bool(options.get("accumulate"))) if posted else 0.0
        results[f"gradpart/{case}"] = errors
    return results
