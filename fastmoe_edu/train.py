"""Train the small MoE language model. The default run takes about a minute on a 2-core CPU.

    python -m fastmoe_edu.train                                        # defaults (configs/default.toml)
    python -m fastmoe_edu.train --config fastmoe_edu/configs/stdlib.toml
    python -m fastmoe_edu.train --router=switch --top_k=1 --capacity_factor=1.0
    python -m fastmoe_edu.train --resume                               # continue from out_dir's checkpoint
    python -m fastmoe_edu.train --help                                 # every setting
    mpirun -n 4 python -m fastmoe_edu.train                            # 4 ranks over MPI
    torchrun --nproc-per-node=4 -m fastmoe_edu.train                   # 4 ranks over torch.distributed

One optimizer step:

    batch  = sample(seed, "train", step)            a pure function of the step: nothing to save
    loss   = cross_entropy + Σ aux_loss             (model.py), on this rank's slice of the batch
    loss.backward()                                 (float16: the loss times the loss scale, precision.py)
    runtime.reduce_gradients(model)                 nothing in one process; all-reduces across ranks
    clip the gradient norm, AdamW step with a warmup + cosine learning rate
    model.update_router_biases()                    loss-free balancing of the sigmoid router

Besides the loss, the progress bar shows tokens/s and two load-balance figures of the MoE layers:
``imb`` = max/mean tokens per expert, averaged over MoE layers (1.0 = perfectly even, E = one
expert gets everything) and ``drop`` = fraction of (token, expert) assignments dropped by the
capacity limit (always 0 without ``capacity_factor``).

Checkpoints (checkpoint.py: ``out_dir/checkpoint.json`` names the verified files of ``out_dir/step-NNNNNNNN/``)
hold the model, the optimizer, the step, the RNG state and the history, and the data is a function of the step, so ``--resume`` reproduces the uninterrupted run's
losses exactly (run_dir.py: saving, resuming, what a resumed run may change). ``out_dir/history.json`` has one record per step (loss, aux loss, tokens/s, tokens
per expert) for the notebooks; ``out_dir/tensorboard/`` the same figures for TensorBoard, and
``--profile_steps=A:B`` a measured timeline of those steps, a track per rank (observe.py: the ``observer``
calls in the loop). Ctrl-C finishes the current step, saves a checkpoint and stops (guards.py: that,
non-finite steps and the loss warnings).

Under a launcher (``mpirun -n P`` or ``torchrun --nproc-per-node=P``) the same loop runs on every
rank; the *runtime* (runtime.py: one process; distributed/runtime.py: P ranks) is the only part that
differs. Each rank holds num_experts / ep experts per MoE layer and reads its share of every global
batch (both must divide; the error says so on every rank before any communication); replicated
gradients are averaged, the gradient norm and the logged losses are those of the whole model and the
whole global batch; rank 0 alone prints; each rank writes its own checkpoint file into the step's folder
(``experts-rankNNNNN.pt``) and rank 0 the replicated part (``ckpt.pt``).
"""
from __future__ import annotations

import functools
import math
import sys
import time

import torch
from tqdm.auto import tqdm

from .backends import set_cpu_threads
from .checkpoint import CheckpointError, exclusive_out_dir
from .config import ConfigError, TrainConfig, format_config, parse_args
from .data import build_dataset, get_batch
from .distributed.engines import launch_rank, launch_world_size, resolve_engine, signal_status_note
from .distributed.layout import layout_sizes
from .evaluate import estimate_val_loss, generate_samples, routing_stats
from .guards import LossWatch, NonFiniteError, StopOnCtrlC, check_skipped_steps
from .model import MoETransformer, build_model
from .observe import Observer
from .precision import LossScaler, MasterWeightAdamW, autocast, store_parameters
from .run_dir import check_out_dir, save_run, start_or_resume, write_history
from .runtime import Runtime


def start_runtime(cfg: TrainConfig) -> Runtime:
    """The runtime of this launch: checks first (arithmetic only, the same error on every rank), then engines.

    No launcher: the one-process :class:`Runtime` (no engine is imported). Under mpirun / torchrun: a
    ``ParallelRuntime`` over the launcher's engine (``engine`` key), imported only then.
    """
    engine = resolve_engine(cfg.engine)
    layout_sizes(cfg, launch_world_size())      # --tp=2 without a launcher: a clear error, not a silent no-op
    if engine is None:
        return Runtime()
    return parallel_runtime(cfg, engine)


def parallel_runtime(cfg: TrainConfig, engine: str) -> Runtime:
    """The :class:`ParallelRuntime` of ``cfg`` over ``engine``: its parallel options and the sizes it checks."""
    from .distributed.plan import ParallelOptions
    from .distributed.runtime import ParallelRuntime
    return ParallelRuntime(engine, ParallelOptions.of(cfg), tp=cfg.tp, ep=cfg.ep, dp=cfg.dp, num_experts=cfg.num_experts,
                           batch_size=cfg.batch_size, seq_len=cfg.seq_len, device=cfg.device,
                           collective_timeout_s=cfg.collective_timeout_s, gradient_partitioning=cfg.gradient_partitioning)


def log(rt: Runtime, cfg: TrainConfig, message: str) -> None:
    """Print on the main process only, without breaking the progress bar."""
    if rt.is_main and cfg.progress:
        tqdm.write(message)


# --------------------------------------------------------------------------------------------------
# building blocks of the run
# --------------------------------------------------------------------------------------------------

def configure_optimizer(model: MoETransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices (embeddings, linear maps, expert weights), not on norms/biases.

    With ``optimizer_group_size`` > 0 each class is cut into parameter groups of at most that many
    elements (a larger tensor is a group alone). AdamW updates one group after another and its
    multi-tensor ("foreach") arithmetic allocates temporaries for a whole group at once, so the
    step's extra memory is that of the largest group, not of the whole model (DeepSpeed-TED's
    tiled optimizer step). With ``master_weights = "optimizer"`` (bfloat16 parameters) it is
    :class:`MasterWeightAdamW`: the same arithmetic on float32 master copies, and the groups' float32
    gradients exist one group at a time too.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": chunk, "weight_decay": weight_decay}
              for params, weight_decay in ((decay, cfg.weight_decay), (no_decay, 0.0))
              for chunk in parameter_chunks(params, cfg.optimizer_group_size)]
    optimizer = MasterWeightAdamW if cfg.master_weights == "optimizer" else torch.optim.AdamW
    return optimizer(groups, lr=cfg.lr, betas=(0.9, 0.99))


def parameter_chunks(params: list, max_elements: int) -> list[list]:
    """Consecutive runs of ``params`` holding at most ``max_elements`` elements each (0 = one run)."""
    if max_elements == 0:
        return [params]
    chunks, size = [[]], 0
    for param in params:
        if chunks[-1] and size + param.numel() > max_elements:
            chunks.append([])
            size = 0
        chunks[-1].append(param)
        size += param.numel()
    return [chunk for chunk in chunks if chunk]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


# Added to the seed, times the shard's index, for each batch shard's own random stream.
_SHARD_SEED_STRIDE = 1_000_003


def seed_random_draws(cfg: TrainConfig, rt: Runtime) -> None:
    """After the model is built: one random stream per batch shard, for the routers' noise and jitter.

    Seeded by the shard (``rt.data_rank``), not the rank: the ranks of a tensor-parallel group read the
    same shard, so they draw the same noise and route their identical tokens identically.
    """
    torch.manual_seed(cfg.seed + _SHARD_SEED_STRIDE * rt.data_rank)


def train_step(model: MoETransformer, optimizer, batch, cfg: TrainConfig, step: int, rt: Runtime,
               scaler: LossScaler | None = None) -> dict:
    """One optimizer step on batch number ``step``; returns the step's record for the history.

    A non-finite loss or gradient norm never reaches the weights: the step raises
    :class:`NonFiniteError` (``nonfinite = "stop"``) or is skipped (``"skip_step"``, ``record["skipped"]``).
    Under float16 an overflow of the scaled gradients skips the step and halves the loss scale
    (``scaler`` carries the scale from step to step; None = a fresh one, which is all that float32 and
    bfloat16 need: their scale is always 1).
    """
    scaler = scaler or LossScaler(cfg.dtype)
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    x, y, _ = rt.shard_batch(batch)
    with autocast(cfg.dtype, x.device):                              # float32: no-op (precision.py)
        _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    (loss * scaler.scale).backward()                                 # scale = 1 unless float16
    rt.reduce_gradients(model)                                       # per-shard -> global-batch gradients
    scaler.unscale_(model)
    grad_norm = rt.clip_gradients(model, cfg.grad_clip if cfg.grad_clip > 0 else math.inf).item()
    # The global batch's losses (all shards have the same size, so the mean of the shards' means).
    losses = rt.mean([loss.item(), model.last_lm_loss.item(), model.last_aux_loss.item()])
    # Both figures are global, so every rank takes the same decision here.
    finite = math.isfinite(losses[0]) and math.isfinite(grad_norm)
    overflow = math.isfinite(losses[0]) and scaler.update(math.isfinite(grad_norm))
    if not finite and not overflow and cfg.nonfinite == "stop":
        raise NonFiniteError(f"step {step + 1}: the loss is {losses[0]} and the gradient norm {grad_norm}; "
                             f"training stopped before the update (nonfinite=\"stop\"). Lower lr (now {lr:.3g}) "
                             f"or grad_clip, or set nonfinite=\"skip_step\"")
    if finite:
        optimizer.step()
        model.update_router_biases()                                 # after the step, as DeepSeek-V3 does
    return {"step": step + 1, "lr": lr, "loss": losses[0], "lm_loss": losses[1], "aux_loss": losses[2],
            "grad_norm": grad_norm, "skipped": not finite, "overflow": overflow, "loss_scale": scaler.scale,
            **routing_stats(model, rt)}


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
    check_out_dir(cfg.out_dir)
    with exclusive_out_dir(cfg.out_dir, rt):                     # out_dir is this run's alone (checkpoint.py)
        return _run(cfg, stop_at, rt)


def _run(cfg: TrainConfig, stop_at: int | None, rt: Runtime) -> dict:
    """:func:`train`'s work, while this run holds its out_dir."""
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
    store_parameters(model, cfg.dtype, cfg.master_weights)           # bfloat16 weights? (precision.py)
    seed_random_draws(cfg, rt)
    log(rt, cfg, rt.describe(model))
    optimizer = configure_optimizer(model, cfg)
    scaler = LossScaler(cfg.dtype)

    say = functools.partial(log, rt, cfg)                            # say(message): log on the main rank
    start_step, history, run_id = start_or_resume(cfg, rt, model, optimizer, scaler, say)   # run_dir.py
    observer = Observer(cfg, rt, start_step, say=say)                # TensorBoard, traces

    last_step = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(range(start_step, last_step), initial=start_step, total=last_step, desc="train",
               disable=not (rt.is_main and cfg.progress), dynamic_ncols=True, file=sys.stdout)
    model.train()
    step, tok_rate, watch = start_step, None, LossWatch()
    with StopOnCtrlC() as ctrl_c:
        for step in bar:
            observer.begin_step(step)
            t0 = time.perf_counter()
            batch = get_batch(dataset, cfg, "train", step, device)
            record = train_step(model, optimizer, batch, cfg, step, rt, scaler)
            record["tokens_per_sec"] = tokens_per_step / (time.perf_counter() - t0)
            history["train"].append(record)
            check_skipped_steps(history["train"], cfg)
            observer.end_step(record)
            warning = watch.warning(record)                            # skipped, or a climbing loss
            if warning:
                log(rt, cfg, warning)
            tok_rate = record["tokens_per_sec"] if tok_rate is None else 0.9 * tok_rate + 0.1 * record["tokens_per_sec"]
            bar.set_postfix(loss=f"{record['lm_loss']:.3f}", aux=f"{record['aux_loss']:.3f}",
                            tok_s=f"{tok_rate:,.0f}", imb=f"{record['load_imbalance']:.2f}",
                            drop=f"{record['dropped_frac']:.1%}", refresh=False,
                            **({"scale": f"{scaler.scale:g}"} if scaler.enabled else {}))
            done = step + 1
            if (cfg.eval_interval and done % cfg.eval_interval == 0) or done == cfg.max_steps:
                val, per_language = estimate_val_loss(model, dataset, cfg, device, rt)
                history["val"].append({"step": done, "val_loss": val, "per_language": per_language})
                observer.log_val(done, val, per_language)
                by_lang = ", ".join(f"{k} {v:.2f}" for k, v in per_language.items()) if len(per_language) > 1 else ""
                log(rt, cfg, f"step {done:>5}: train loss {record['lm_loss']:.4f}, val loss {val:.4f}"
                             + (f" ({by_lang})" if by_lang else ""))
            # All ranks must stop at the same step, even if Ctrl-C reached only some of them.
            interrupted = rt.any(ctrl_c.requested)
            if interrupted or done == last_step or (cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0):
                save_run(cfg, model, optimizer, scaler, done, history, run_id, rt)
            if interrupted:
                log(rt, cfg, f"interrupted: checkpoint of step {done} saved in {cfg.out_dir}; "
                             f"continue with --resume{signal_status_note()}")
                break
        step = len(history["train"])                                   # completed steps
    bar.close()
    observer.close()

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
    """Command-line entry point: parse and validate the configuration, then train.

    Expected failures end with one clear line and a non-zero status, on every rank alike:
    2 = the configuration (or out_dir, or a resume that changes the schedule), 1 = a checkpoint that
    cannot be written or trusted, or a loss / gradient norm that became non-finite.
    """
    try:
        cfg = parse_args(argv)
        rt = start_runtime(cfg)                     # under a launcher: num_experts, batch_size vs the ranks
    except ValueError as error:                     # ConfigError or a layout check: say which and stop
        _fail(f"config error: {error}", status=2)
    try:
        train(cfg, rt=rt)
    except ConfigError as error:
        _fail(f"config error: {error}", status=2)
    except (CheckpointError, NonFiniteError) as error:
        _fail(f"error: {error}", status=1)


def _fail(message: str, status: int) -> None:
    if launch_rank() == 0:                          # (every rank stops here, none is left waiting)
        print(message, file=sys.stderr)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
