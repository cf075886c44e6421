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
losses exactly. ``out_dir/history.json`` has one record per step (loss, aux loss, tokens/s, tokens
per expert) for the notebooks; ``out_dir/tensorboard/`` the same figures for TensorBoard, and
``--profile_steps=A:B`` a measured timeline of those steps, a track per rank (observe.py: the ``observer``
calls in the loop). Ctrl-C finishes the current step, saves a checkpoint and stops.

Under a launcher (``mpirun -n P`` or ``torchrun --nproc-per-node=P``) the same loop runs on every
rank; the *runtime* (runtime.py: one process; distributed/runtime.py: P ranks) is the only part that
differs. Each rank holds num_experts / ep experts per MoE layer and reads its share of every global
batch (both must divide; the error says so on every rank before any communication); replicated
gradients are averaged, the gradient norm and the logged losses are those of the whole model and the
whole global batch; rank 0 alone prints; each rank writes its own checkpoint file into the step's folder
(``experts-rankNNNNN.pt``) and rank 0 the replicated part (``ckpt.pt``).
"""
from __future__ import annotations

import dataclasses
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
from .checkpoint import MANIFEST, CheckpointError, ModelMismatch, exclusive_out_dir, read_manifest, write_failure
from .config import ConfigError, TrainConfig, format_config, parse_args, to_toml
from .data import batch_rng, get_dataset
from .distributed.engines import launch_rank, launch_world_size, resolve_engine, signal_status_note
from .distributed.layout import layout_sizes
from .model import MoETransformer, build_model
from .observe import Observer
from .precision import LossScaler, MasterWeightAdamW, at_least_float32, autocast, store_parameters
from .runtime import Runtime

HISTORY_NAME = "history.json"


def start_runtime(cfg: TrainConfig) -> Runtime:
    """The runtime of this launch: checks first (arithmetic only, the same error on every rank), then engines.

    No launcher: the one-process :class:`Runtime` (no engine is imported). Under mpirun / torchrun: a
    ``ParallelRuntime`` over the launcher's engine (``engine`` key), imported only then.
    """
    engine = resolve_engine(cfg.engine)
    layout_sizes(cfg, launch_world_size())      # --tp=2 without a launcher: a clear error, not a silent no-op
    if engine is None:
        return Runtime()
    from .distributed.runtime import ParallelRuntime
    return ParallelRuntime(cfg, engine)


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


def routing_stats(model: MoETransformer, rt: Runtime | None = None) -> dict:
    """Load balance of the last forward: tokens per expert and dropped assignments per MoE layer, imbalance,
    dropped fraction.

    With several ranks the counts of all ranks are added up: the figures describe the whole global batch.
    """
    layers = model.moe_layers()
    if not layers:
        return {"tokens_per_expert": [], "tokens_dropped": [], "load_imbalance": 0.0, "dropped_frac": 0.0}
    tokens = torch.stack([layer.last_routing.tokens_per_expert.cpu() for layer in layers])   # [layers, E]
    dropped_per_layer = torch.tensor([layer.last_routing.num_dropped for layer in layers])
    if rt is not None:
        packed = rt.sum(torch.cat([tokens.reshape(-1), dropped_per_layer]))
        tokens, dropped_per_layer = packed[:tokens.numel()].reshape(tokens.shape), packed[tokens.numel():]
    counts = tokens.float()
    imbalance = counts.amax(dim=1) / counts.mean(dim=1).clamp(min=1e-9)      # per layer; 1.0 = perfectly even
    dropped = int(dropped_per_layer.sum())
    return {"tokens_per_expert": tokens.tolist(), "tokens_dropped": dropped_per_layer.tolist(),
            "load_imbalance": sum(imbalance.tolist()) / len(layers),
            "dropped_frac": dropped / max(int(tokens.sum()) + dropped, 1)}   # of all (token, expert) assignments


# Added to the seed, times the shard's index, for each batch shard's own random stream.
_SHARD_SEED_STRIDE = 1_000_003


def seed_random_draws(cfg: TrainConfig, rt: Runtime) -> None:
    """After the model is built: one random stream per batch shard, for the routers' noise and jitter.

    Seeded by the shard (``rt.data_rank``), not the rank: the ranks of a tensor-parallel group read the
    same shard, so they draw the same noise and route their identical tokens identically.
    """
    torch.manual_seed(cfg.seed + _SHARD_SEED_STRIDE * rt.data_rank)


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite (nonfinite = "stop"), or stayed so for
    ``max_consecutive_skips`` steps (nonfinite = "skip_step")."""


def check_skipped_steps(records: list[dict], cfg: TrainConfig) -> None:
    """nonfinite="skip_step" has a limit: ``max_consecutive_skips`` non-finite steps in a row end the run
    (float16 overflows, which the loss scale absorbs, do not count)."""
    run = 0
    for record in reversed(records):
        if not record["skipped"] or record["overflow"]:
            break
        run += 1
    if run >= cfg.max_consecutive_skips:
        last = records[-1]["step"]
        raise NonFiniteError(f"steps {last - run + 1} to {last}: {run} steps in a row had a non-finite loss or "
                             f"gradient norm and were skipped (nonfinite=\"skip_step\", max_consecutive_skips="
                             f"{cfg.max_consecutive_skips}): the run has diverged; the last checkpoint in "
                             f"{cfg.out_dir} is kept. Lower lr (or use grad_clip, or dtype=bfloat16 instead of "
                             f"float16), or raise max_consecutive_skips")


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
        with autocast(cfg.dtype, x.device):
            logits, _ = model(x)
        token_loss = F.cross_entropy(at_least_float32(logits).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
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

SCHEDULE_KEYS = ("lr", "min_lr", "warmup_steps", "max_steps")   # what lr_at(step) depends on


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """Settings that differ between a checkpoint and the current run (other than how it runs and logs)."""
    harmless = {"resume", "progress", "eval_interval", "checkpoint_interval", "sample_tokens", "allow_schedule_change",
                "sample_temperature", "num_threads", "out_dir", "exchange", "engine", "collective_timeout_s",
                "tensorboard", "tensorboard_interval", "profile_steps", "max_consecutive_skips"}
    current = cfg.to_dict()
    return [f"{k}: checkpoint {saved.get(k)!r} -> now {current[k]!r}"
            for k in current if k not in harmless and saved.get(k) != current[k]]


def check_schedule_unchanged(saved: dict, cfg: TrainConfig) -> None:
    """A resumed run follows the checkpoint's learning-rate schedule unless told otherwise."""
    changed = [f"{k}={getattr(cfg, k)!r} (checkpoint: {saved.get(k)!r})" for k in SCHEDULE_KEYS
               if saved.get(k) != getattr(cfg, k)]
    if changed and not cfg.allow_schedule_change:
        raise ConfigError(f"--resume with {', '.join(changed)} would change the learning-rate schedule "
                          f"mid-run; keep the checkpoint's values, or pass --allow_schedule_change=true")
    saved_groups = saved.get("optimizer_group_size", 0)
    if saved_groups != cfg.optimizer_group_size:
        raise ConfigError(f"--resume with optimizer_group_size={cfg.optimizer_group_size} (checkpoint: "
                          f"{saved_groups}): the optimizer state is stored per parameter group, so the "
                          f"groups must stay as they were; keep optimizer_group_size={saved_groups}")


def model_differences(saved: dict, cfg: TrainConfig) -> str:
    """The data and model options that differ from a checkpoint's: "checkpoint has d_model=64, this run d_model=32"."""
    changed = [f.name for f in dataclasses.fields(cfg) if f.metadata["section"] in ("data", "model")
               and f.name in saved and saved[f.name] != getattr(cfg, f.name)]
    if not changed:
        return ""
    return (f"checkpoint has {', '.join(f'{k}={saved[k]!r}' for k in changed)}, "
            f"this run {', '.join(f'{k}={getattr(cfg, k)!r}' for k in changed)}")


def new_run_id(rt: Runtime) -> str:
    """A fresh identity, unique per run: the main rank's start time (UTC) and 4 random bytes, e.g.
    ``20261201-142501-9f3a61c2``, the same on every rank. (A resumed run keeps its checkpoint's.)"""
    mine = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + os.urandom(4).hex()
    return bytes(rt.broadcast_(torch.tensor(list(mine.encode()), dtype=torch.uint8)).tolist()).decode()


def save_run(cfg: TrainConfig, model, optimizer, scaler: LossScaler, step: int, history: dict, run_id: str,
             rt: Runtime) -> None:
    """Checkpoint (every rank its own file, the main rank the shared one), then the history."""
    rt.save(cfg.out_dir, model, optimizer, {"step": step, "run_id": run_id, "config": cfg.to_dict(),
                                            "history": history, "loss_scale": scaler.state_dict()})
    if rt.is_main:
        write_history(cfg, history)


def check_out_dir(out_dir: str) -> None:
    """Fail at start, not at the first checkpoint: out_dir must be (or become) a writable directory."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as failure:
        raise ConfigError(f"out_dir={out_dir!r} is not a writable directory: {failure.strerror or failure}") from None


def write_history(cfg: TrainConfig, history: dict) -> None:
    out_dir = Path(cfg.out_dir)
    tmp = out_dir / f".{HISTORY_NAME}.{os.getpid()}.tmp"
    text = json.dumps(history)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, out_dir / HISTORY_NAME)
    except OSError as failure:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{HISTORY_NAME}: " + write_failure(failure, out_dir, len(text))) from None


class StopOnCtrlC:
    """First Ctrl-C (SIGINT) or SIGTERM (a scheduler's "please stop"): finish the current step, save a
    checkpoint, stop. A second one stops at once.

    Stopping *between* steps matters for exact resumption: an interrupt inside ``optimizer.step()``
    could leave half-updated parameters behind.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested, self._previous = False, {}
        if threading.current_thread() is threading.main_thread():   # signals only reach the main thread
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc_info):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class LossWatch:
    """Warn when a finite loss climbs far above its running minimum (a learning rate too high, usually)."""

    FACTOR, PATIENCE, QUIET_STEPS = 3.0, 10, 100

    def __init__(self):
        self.lowest, self.seen, self.last_warning = math.inf, 0, -math.inf

    def check(self, step: int, loss: float) -> str | None:
        self.seen += 1
        self.lowest = min(self.lowest, loss)
        if (self.seen > self.PATIENCE and loss > self.FACTOR * self.lowest
                and step - self.last_warning >= self.QUIET_STEPS):
            self.last_warning = step
            return (f"warning: step {step}: loss {loss:.4g} is {loss / self.lowest:.1f}x its running minimum "
                    f"{self.lowest:.4g}; the learning rate may be too high")
        return None


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

    start_step, history = 0, {"train": [], "val": []}
    run_id = new_run_id(rt)
    if cfg.resume:
        saved_config = read_manifest(cfg.out_dir).get("config", {})
        check_schedule_unchanged(saved_config, cfg)                  # before any weight is touched
        try:
            saved = rt.load(cfg.out_dir, model, optimizer)
        except ModelMismatch as mismatch:
            differences = model_differences(saved_config, cfg)
            raise ModelMismatch(f"--resume: {differences + ': ' if differences else ''}{mismatch}") from None
        start_step, history, run_id = saved["step"], saved["history"], saved["run_id"]
        if saved.get("loss_scale") and saved["config"].get("dtype") == cfg.dtype:
            scaler.load_state_dict(saved["loss_scale"])
        log(rt, cfg, f"resumed from {Path(cfg.out_dir) / MANIFEST} at step {start_step} (run {run_id})")
        for line in config_differences(saved["config"], cfg):
            log(rt, cfg, f"warning: the resumed run changes {line}")
    if rt.is_main:                                                   # (check_out_dir created out_dir)
        (Path(cfg.out_dir) / "config.toml").write_text(to_toml(cfg))
    observer = Observer(cfg, rt, start_step, say=lambda message: log(rt, cfg, message))   # TensorBoard, traces

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
            if record["overflow"]:          # float16: routine while the loss scale settles; the bar shows it
                warning = None
            elif record["skipped"]:
                warning = (f"warning: step {step + 1}: non-finite loss or gradient norm, update skipped "
                           f"(nonfinite=\"skip_step\")")
            else:
                warning = watch.check(step + 1, record["loss"])
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
