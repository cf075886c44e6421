"""Train the small MoE language model. The default run takes about a minute on a 2-core CPU.

    python -m fastmoe_edu.train                                        # defaults (configs/default.toml)
    python -m fastmoe_edu.train --config fastmoe_edu/configs/stdlib.toml
    python -m fastmoe_edu.train --router=switch --top_k=1 --capacity_factor=1.0
    python -m fastmoe_edu.train --resume                               # continue from out_dir/ckpt.pt
    python -m fastmoe_edu.train --help                                 # every setting
    mpirun -n 4 python -m fastmoe_edu.train                            # 4 ranks over MPI
    torchrun --nproc-per-node=4 -m fastmoe_edu.train                   # 4 ranks over torch.distributed

One optimizer step:

    batch  = sample(seed, "train", step)            a pure function of the step: nothing to save
    loss   = cross_entropy + Σ aux_loss             (model.py), on this rank's slice of the batch
    loss.backward()
    runtime.reduce_gradients(model)                 nothing in one process; all-reduces across ranks
    clip the gradient norm, AdamW step with a warmup + cosine learning rate
    model.update_router_biases()                    loss-free balancing of the sigmoid router

Besides the loss, the progress bar shows tokens/s and two load-balance figures of the MoE layers:
``imb`` = max/mean tokens per expert, averaged over MoE layers (1.0 = perfectly even, E = one
expert gets everything) and ``drop`` = fraction of (token, expert) assignments dropped by the
capacity limit (always 0 without ``capacity_factor``).

Checkpoints (``out_dir/ckpt.pt``) hold the model, the optimizer, the step, the RNG state and the
history, and the data is a function of the step, so ``--resume`` reproduces the uninterrupted run's
losses exactly. ``out_dir/history.json`` has one record per step (loss, aux loss, tokens/s, tokens
per expert) for the notebooks. Ctrl-C finishes the current step, saves a checkpoint and stops.

Under a launcher (``mpirun -n P`` or ``torchrun --nproc-per-node=P``) the same loop runs on every
rank; the *runtime* (runtime.py: one process; distributed/runtime.py: P ranks) is the only part that
differs. Each rank holds num_experts / ep experts per MoE layer and reads its share of every global
batch (both must divide; the error says so on every rank before any communication); replicated
gradients are averaged, the gradient norm and the logged losses are those of the whole model and the
whole global batch; rank 0 alone prints; each rank writes its own checkpoint file
(``experts-rankNNNNN.pt``) and rank 0 the replicated part (``ckpt.pt``).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .backends import set_cpu_threads
from .checkpoint import SHARED_FILE
from .config import TrainConfig, format_config, parse_args, to_toml
from .data import batch_rng, get_dataset
from .distributed.engines import launch_rank
from .model import MoETransformer, build_model
from .runtime import Runtime, start_runtime

HISTORY_NAME = "history.json"


def log(rt: Runtime, cfg: TrainConfig, message: str) -> None:
    """Print on the main process only, without breaking the progress bar."""
    if rt.is_main and cfg.progress:
        tqdm.write(message)


# --------------------------------------------------------------------------------------------------
# building blocks of the run
# --------------------------------------------------------------------------------------------------

def build_dataset(cfg: TrainConfig):
    options = {"max_bytes": cfg.stdlib_max_bytes} if cfg.dataset == "stdlib" else {}
    return get_dataset(cfg.dataset, **options)


def get_batch(dataset, cfg: TrainConfig, split: str, step: int, device: str | torch.device = "cpu"):
    """Batch number ``step`` of ``split``: (x, y, lang_ids), the same on every call and every machine."""
    x, y, lang_ids = dataset.sample_batch(split, cfg.batch_size, cfg.seq_len, batch_rng(cfg.seed, split, step))
    return x.to(device), y.to(device), lang_ids.to(device)


def configure_optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (embeddings, linear maps, expert weights), not on norms/biases."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


def routing_stats(model: MoETransformer, rt: Runtime | None = None) -> dict:
    """Load balance of the last forward: tokens per expert per MoE layer, imbalance, dropped fraction.

    With several ranks the counts of all ranks are added up: the figures describe the whole global batch.
    """
    layers = model.moe_layers()
    if not layers:
        return {"tokens_per_expert": [], "load_imbalance": 0.0, "dropped_frac": 0.0}
    tokens = torch.stack([layer.last_routing.tokens_per_expert.cpu() for layer in layers])   # [layers, E]
    dropped_per_layer = torch.tensor([layer.last_routing.num_dropped for layer in layers])
    if rt is not None:
        packed = rt.sum(torch.cat([tokens.reshape(-1), dropped_per_layer]))
        tokens, dropped_per_layer = packed[:tokens.numel()].reshape(tokens.shape), packed[tokens.numel():]
    per_layer, imbalance, dropped, assigned = [], [], 0, 0
    for counts_of_layer, dropped_of_layer in zip(tokens, dropped_per_layer.tolist()):
        counts = counts_of_layer.float()
        per_layer.append(counts_of_layer.tolist())
        imbalance.append((counts.max() / counts.mean().clamp(min=1e-9)).item())   # 1.0 = perfectly even
        dropped += dropped_of_layer
        assigned += int(counts_of_layer.sum()) + dropped_of_layer
    return {"tokens_per_expert": per_layer,
            "load_imbalance": sum(imbalance) / max(len(imbalance), 1),
            "dropped_frac": dropped / max(assigned, 1)}


def train_step(model: MoETransformer, optimizer, batch, cfg: TrainConfig, step: int, rt: Runtime) -> dict:
    """One optimizer step on batch number ``step``; returns the step's record for the history."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y, _ = rt.shard_batch(batch)
    _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    rt.reduce_gradients(model)                                       # per-shard -> global-batch gradients
    grad_norm = rt.clip_gradients(model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()
    model.update_router_biases()                                     # after the step, as DeepSeek-V3 does
    # The global batch's losses (all shards have the same size, so the mean of the shards' means).
    losses = rt.mean([loss.item(), model.last_lm_loss.item(), model.last_aux_loss.item()])
    return {"step": step + 1, "lr": lr, "loss": losses[0], "lm_loss": losses[1], "aux_loss": losses[2],
            "grad_norm": grad_norm.item(), **routing_stats(model, rt)}


@torch.no_grad()
def estimate_val_loss(model: MoETransformer, dataset, cfg: TrainConfig, device,
                      rt: Runtime | None = None) -> tuple[float, dict]:
    """LM loss (no aux loss) on the same ``eval_iters`` val batches every time: (mean, {language: mean}).

    With several ranks every rank evaluates its slice of each val batch and the sums are added up.
    """
    rt = rt or Runtime()
    model.eval()
    total = torch.zeros(len(dataset.language_names))
    count = torch.zeros(len(dataset.language_names))
    for i in range(cfg.eval_iters):
        x, y, lang = rt.shard_batch(get_batch(dataset, cfg, "val", i, device))
        logits, _ = model(x)
        token_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        total.index_add_(0, lang.cpu(), token_loss.sum(dim=1).cpu())
        count.index_add_(0, lang.cpu(), torch.full((len(lang),), float(y.shape[1])))
    total, count = rt.sum(total), rt.sum(count)
    model.train()
    per_language = {name: (total[i] / count[i]).item()
                    for i, name in enumerate(dataset.language_names) if count[i] > 0}
    return (total.sum() / count.sum()).item(), per_language


@torch.no_grad()
def expert_usage_by_language(model: MoETransformer, dataset, cfg: TrainConfig, num_batches: int = 4,
                             device="cpu") -> torch.Tensor:
    """Fraction of each language's (token, slot) assignments that go to each expert, from val batches.

    Returns a tensor [num_moe_layers, num_languages, num_experts] whose rows sum to 1: the picture
    of expert specialisation (a language routed mostly to one or two experts shows as a bright cell).
    """
    layers = model.moe_layers()
    usage = torch.zeros(len(layers), len(dataset.language_names), model.cfg.num_experts)
    model.eval()
    for i in range(num_batches):
        x, y, lang = get_batch(dataset, cfg, "val", i, device)
        model(x, y)
        token_lang = lang[:, None].expand_as(x).reshape(-1).cpu()                   # language of each token
        for li, layer in enumerate(layers):
            ids = layer.last_routing.expert_ids.cpu()                               # [T, slots], -1 = none
            langs = token_lang[:, None].expand_as(ids)
            keep = ids >= 0
            usage[li].index_put_((langs[keep], ids[keep]), torch.ones(int(keep.sum())), accumulate=True)
    model.train()
    return usage / usage.sum(dim=-1, keepdim=True).clamp(min=1)


@torch.no_grad()
def generate_samples(model: MoETransformer, dataset, cfg: TrainConfig, device) -> str:
    """Continue a short val prompt of each language; returns printable text, prompt | continuation."""
    x, _, lang = get_batch(dataset, cfg, "val", 0, device)
    prompt_len = max(1, min(16, cfg.seq_len // 4))
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    lines = []
    for lang_id, lang_name in enumerate(dataset.language_names):
        rows = (lang == lang_id).nonzero()
        if len(rows) == 0:
            continue
        prompt = x[rows[0, 0]: rows[0, 0] + 1, :prompt_len]
        out = model.generate(prompt, cfg.sample_tokens, temperature=cfg.sample_temperature, generator=generator)
        text = dataset.decode(out[0, :prompt_len]) + " | " + dataset.decode(out[0, prompt_len:])
        lines.append(f"[{lang_name}] {text!r}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# checkpoints and history
# --------------------------------------------------------------------------------------------------

def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """Settings that differ between a checkpoint and the current run (other than resume/max_steps...)."""
    harmless = {"resume", "max_steps", "progress", "eval_interval", "checkpoint_interval", "sample_tokens",
                "sample_temperature", "num_threads", "out_dir", "exchange", "engine"}
    current = cfg.to_dict()
    return [f"{k}: checkpoint {saved.get(k)!r} -> now {current[k]!r}"
            for k in current if k not in harmless and saved.get(k) != current[k]]


def save_run(cfg: TrainConfig, model, optimizer, step: int, history: dict, rt: Runtime) -> None:
    """Checkpoint (every rank its own file, the main rank the shared one) and the history."""
    rt.save(cfg.out_dir, model, optimizer, {"step": step, "config": cfg.to_dict(), "history": history})
    if rt.is_main:
        write_history(cfg, history)


def write_history(cfg: TrainConfig, history: dict) -> None:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (HISTORY_NAME + ".tmp")
    tmp.write_text(json.dumps(history))
    os.replace(tmp, out_dir / HISTORY_NAME)


class StopOnCtrlC:
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C stops at once.

    Stopping *between* steps matters for exact resumption: an interrupt inside ``optimizer.step()``
    could leave half-updated parameters behind.
    """

    def __enter__(self):
        self.requested, self._previous = False, None
        if threading.current_thread() is threading.main_thread():   # signals only reach the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig, *, stop_at: int | None = None, rt: Runtime | None = None) -> dict:
    """Run (or resume) training as configured. Returns the history and the final figures.

    ``stop_at``: stop after this many completed steps as if interrupted (a checkpoint is saved), so a
    later ``resume=True`` run can continue; the learning-rate schedule still follows ``max_steps``.

    Returned dict: ``history`` ({"train": per-step records, "val": [{"step", "val_loss"}]}),
    ``train_loss`` (total loss per step), ``final_val_loss``, ``sample`` (text), ``steps``,
    ``seconds`` (wall time of this call), ``model`` (the trained module), ``interrupted`` (True when
    the run stopped before ``max_steps``: stop_at or Ctrl-C).
    """
    cfg = cfg.validate()
    rt = rt or start_runtime(cfg)
    t_start = time.time()
    if cfg.num_threads > 0:
        set_cpu_threads(cfg.num_threads, cfg.backend)               # torch and numba: one thread budget
    device = torch.device(cfg.device)
    if rt.is_main and cfg.progress:
        print(format_config(cfg), flush=True)

    dataset = build_dataset(cfg)
    torch.manual_seed(cfg.seed)                                      # model init is reproducible
    model = build_model(cfg, dataset.vocab_size).to(device)
    counts = model.num_parameters()
    log(rt, cfg, f"model: {counts['total']:,} parameters ({counts['expert']:,} in experts, "
                 f"{counts['active_per_token']:,} active per token); vocab {dataset.vocab_size}")
    rt.shard_model(model)                                            # this rank's part of the model
    log(rt, cfg, rt.describe(model))
    optimizer = configure_optimizer(model, cfg)

    start_step, history = 0, {"train": [], "val": []}
    if cfg.resume:
        saved = rt.load(cfg.out_dir, model, optimizer)
        start_step, history = saved["step"], saved["history"]
        log(rt, cfg, f"resumed from {Path(cfg.out_dir) / SHARED_FILE} at step {start_step}")
        for line in config_differences(saved["config"], cfg):
            log(rt, cfg, f"warning: the resumed run changes {line}")
    if rt.is_main:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out_dir) / "config.toml").write_text(to_toml(cfg))

    last_step = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(range(start_step, last_step), initial=start_step, total=last_step, desc="train",
               disable=not (rt.is_main and cfg.progress), dynamic_ncols=True, file=sys.stdout)
    model.train()
    step, tok_rate = start_step, None
    with StopOnCtrlC() as ctrl_c:
        for step in bar:
            t0 = time.perf_counter()
            batch = get_batch(dataset, cfg, "train", step, device)
            record = train_step(model, optimizer, batch, cfg, step, rt)
            record["tokens_per_sec"] = tokens_per_step / (time.perf_counter() - t0)
            history["train"].append(record)
            tok_rate = record["tokens_per_sec"] if tok_rate is None else 0.9 * tok_rate + 0.1 * record["tokens_per_sec"]
            bar.set_postfix(loss=f"{record['lm_loss']:.3f}", aux=f"{record['aux_loss']:.3f}",
                            tok_s=f"{tok_rate:,.0f}", imb=f"{record['load_imbalance']:.2f}",
                            drop=f"{record['dropped_frac']:.1%}", refresh=False)
            done = step + 1
            if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.max_steps:
                val, per_language = estimate_val_loss(model, dataset, cfg, device, rt)
                history["val"].append({"step": done, "val_loss": val, "per_language": per_language})
                by_lang = ", ".join(f"{k} {v:.2f}" for k, v in per_language.items()) if len(per_language) > 1 else ""
                log(rt, cfg, f"step {done:>5}: train loss {record['lm_loss']:.4f}, val loss {val:.4f}"
                             + (f" ({by_lang})" if by_lang else ""))
            # All ranks must stop at the same step, even if Ctrl-C reached only some of them.
            interrupted = rt.any(ctrl_c.requested)
            if interrupted or done == last_step or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0):
                save_run(cfg, model, optimizer, done, history, rt)
            if interrupted:
                log(rt, cfg, f"interrupted: checkpoint of step {done} saved in {cfg.out_dir}; "
                             f"continue with --resume")
                break
        step = len(history["train"])                                   # completed steps
    bar.close()

    stopped_early = step < cfg.max_steps
    sample = ""
    if not stopped_early and cfg.sample_tokens > 0:
        sample = generate_samples(model, dataset, cfg, device)       # on every rank: the MoE layers
        log(rt, cfg, "sample (prompt | generated):\n" + sample)      # of each forward communicate
    final_val = history["val"][-1]["val_loss"] if history["val"] else None
    if rt.is_main:
        write_history(cfg, history)
    seconds = time.time() - t_start
    if history["train"]:
        log(rt, cfg, f"done: step {step}, first loss {history['train'][0]['lm_loss']:.4f}, "
                     f"last loss {history['train'][-1]['lm_loss']:.4f}, val loss {final_val}, {seconds:.1f} s")
    return {"history": history, "train_loss": [r["loss"] for r in history["train"]],
            "final_val_loss": final_val, "sample": sample, "steps": step, "seconds": seconds,
            "model": model, "interrupted": stopped_early}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: parse and validate the configuration, then train."""
    try:
        cfg = parse_args(argv)
        rt = start_runtime(cfg)                     # under a launcher: num_experts, batch_size vs the ranks
    except ValueError as error:                     # ConfigError: a bad key or value, say which and stop
        if launch_rank() == 0:                      # (every rank stops here, none is left waiting)
            print(f"config error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    train(cfg, rt=rt)


if __name__ == "__main__":
    main()
