"""Under ``mpirun -n P`` / ``torchrun``: three optimizer steps of the whole language model equal one process.

The model of ``fastmoe_edu.model`` is trained in float64 through the training loop's own
``train_step``: once by every rank alone (one process, the whole global batch) and once by all P ranks (each with its experts and its batch shard, gradients
all-reduced, the global gradient norm clipped). After three AdamW steps each rank compares its
parameters (its expert slices) and the logged losses.
Dropless routers only: for them the P-rank model is the one-process model, exactly.

Run by run_checks.py, which keeps the worst error of each quantity over the ranks.
"""
import torch

from fastmoe_edu.config import parse_args
from fastmoe_edu.distributed import ParallelLayout
from fastmoe_edu.distributed.runtime import ParallelRuntime
from fastmoe_edu.model import build_model
from fastmoe_edu.runtime import Runtime
from fastmoe_edu.train import build_dataset, configure_optimizer, get_batch, train_step

STEPS = 3
CASES = {
    "softmax_top_k": ["--router=softmax_top_k", "--top_k=2", "--router_options.z_loss_weight=0.001"],
    "sigmoid": ["--router=sigmoid", "--top_k=2", "--router_options.bias_update_rate=0.01"],
}


def small_config(world_size: int, extra: list[str]):
    return parse_args(["--progress=false", f"--batch_size={2 * world_size}", "--seq_len=12", "--n_layer=2",
                       "--n_head=2", "--d_model=16", "--d_hidden=24", "--num_experts=8", "--warmup_steps=1",
                       "--lr=0.01", "--grad_clip=0.5", *extra])


def train_three_steps(cfg, dataset, rt):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, dataset.vocab_size).double()
    rt.shard_model(model)
    optimizer = configure_optimizer(model, cfg)
    records = []
    for step in range(STEPS):
        x, y, lang = get_batch(dataset, cfg, "train", step)
        records.append(train_step(model, optimizer, (x, y, lang), cfg, step, rt))
    return model, records


def training_checks(world: ParallelLayout) -> dict:
    results = {}
    for case, extra in CASES.items():
        cfg = small_config(world.world_size, extra)
        dataset = build_dataset(cfg)
        # The one-process run, on every rank (deterministic: the same result everywhere).
        alone, alone_records = train_three_steps(cfg, dataset, Runtime())
        reference = {k: v.detach() for k, v in alone.named_parameters()}
        reference_buffers = dict(alone.named_buffers())
        together, together_records = train_three_steps(cfg, dataset, ParallelRuntime(cfg, world.world.engine))
        errors = {}
        for name, param in together.named_parameters():
            expected = reference[name]
            if ".experts." in f".{name}":                          # this rank's slice of the experts
                plan = next(m.expert_runner for m in together.modules() if hasattr(m, "expert_runner"))
                expected = expected[plan.first_local_expert: plan.first_local_expert + plan.num_local_experts]
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
    return results
