"""Training configuration: one explicit dataclass, TOML files, and ``--key=value`` overrides.

Every setting of a training run is a field of ``TrainConfig`` below, with its default and a one-line
description. A run's configuration is resolved in three layers, later layers winning:

    1. the dataclass defaults,
    2. TOML files given with ``--config path.toml`` (several allowed, applied in order),
    3. ``--key=value`` command-line overrides (``--flag`` alone sets a boolean to true).

    python -m fastmoe_edu.train --help                                   # every key, default, meaning
    python -m fastmoe_edu.train --config fastmoe_edu/configs/switch.toml --max_steps=200
    python -m fastmoe_edu.train --router_options.balance_loss_weight=0.02

Values are converted with the field's type (``--lr=1e-3`` is a float, ``--resume=true`` a bool,
``--capacity_factor=none`` an unset optional). A key that is not a field, in a file or on the
command line, is an error that lists the allowed keys; ``validate()`` checks every value's range
before any work starts, so a typo fails in a second instead of after a long run.

To add a setting, add a field with ``_field(default, section, help, ...)``:
parsing, ``--help``, TOML loading and range checks all follow from the declaration. The MoE layer's
options are not repeated here: TrainConfig is a ``LayerOptions`` (options.py), so every layer option is
a key, with its default, help and check declared once there; the same for parallelize's options
(``ParallelOptions``, distributed/plan.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from .data import DATASETS
from .distributed.engines import DEFAULT_TIMEOUT_S, ENGINES
from .distributed.expert_tensor_parallel import hidden_units_per_rank
from .distributed.layout import experts_per_rank
from .distributed.plan import DEGREE, ParallelOptions
from .distributed.tensor_parallel import check_divisible
from .distributed.pipeline import AUTO
from .observe import parse_profile_steps
from .options import SOFT_MOE, LayerOptions, option as _field
from .precision import DTYPES, MASTER_WEIGHTS
from .routers import ROUTERS, check_option_names, router_options as accepted_router_options
from .soft_moe import NOT_CAUSAL as SOFT_MOE_NOT_CAUSAL

CONFIG_DIR = Path(__file__).with_name("configs")   # the packaged TOML files

# Allowed values of the choice-type settings are those of the modules that implement them:
# ENGINES, DATASETS here; the layer options' in options.py, the parallel options' in distributed/plan.py.
SECTIONS = ("data", "model", "backend", "parallel", "optimization", "eval", "checkpoint", "sample", "system")


class ConfigError(ValueError):
    """A configuration key or value is not acceptable; the message says which and why."""




@dataclass
class TrainConfig(LayerOptions, ParallelOptions):
    """All settings of one training run (see the module docstring for how they are resolved): the MoE layers'
    options (inherited from LayerOptions: d_model, num_experts, top_k, router, ..., backend, router_options),
    parallelize's (inherited from ParallelOptions: exchange, drop_duplicate_tokens, ..., ranks_per_node) and the
    fields below."""

    # --- data ---------------------------------------------------------------------------------
    dataset: str = _field("languages", "data", "dataset name: 'languages' (synthetic mixture) or 'stdlib' "
                          "(characters of Python's standard library)", choices=tuple(DATASETS))
    seq_len: int = _field(64, "data", "tokens per training sequence (also the model's context length)", minimum=1)
    batch_size: int = _field(32, "data", "sequences per optimizer step (the global batch)", minimum=1)
    stdlib_max_bytes: int = _field(2_000_000, "data", "size cap of the 'stdlib' corpus in characters", minimum=10_000)

    # --- model --------------------------------------------------------------------------------
    n_layer: int = _field(2, "model", "number of transformer blocks", minimum=1)
    n_head: int = _field(4, "model", "attention heads per block (must divide d_model)", minimum=1)
    moe_every: int = _field(1, "model", "every n-th block has an MoE feed-forward, the others a dense MLP "
                            "(1 = all blocks are MoE)", minimum=1)
    tie_weights: bool = _field(True, "model", "share the token embedding matrix with the output head")
    activation_checkpointing: bool = _field(False, "model", "keep only each block's input in the forward pass "
                                            "and recompute the block in the backward (less memory, about one "
                                            "more forward of compute); under parallelism the recomputation "
                                            "replays the block's messages instead of sending them again")

    # --- parallel (only under mpirun or torchrun; docs/parallelism.md; parallelize's options: plan.py) ---
    engine: str = _field("auto", "parallel", "communication engine: mpi (mpirun), torch (torchrun: gloo on CPU, "
                         "NCCL on CUDA) or auto (the launcher's; no launcher = one process, no engine)",
                         choices=ENGINES)
    collective_timeout_s: float = _field(DEFAULT_TIMEOUT_S, "parallel", "the longest any rank waits inside one collective; "
                                         "past it the rank says which collective and communicator, and the "
                                         "whole job ends (a stalled or dead rank never hangs the others)",
                                         above=0.0)
    tp: int = _field(1, "parallel", "tensor-parallel degree: attention heads and dense-MLP units split over tp ranks "
                     "that read the same tokens (DeepSpeed-TED); n_head must be divisible by tp", minimum=1)
    ep: typing.Optional[int] = _field(None, "parallel", "expert-parallel degree: each rank holds num_experts / ep "
                                      "experts; none = world size / (tp * dp)", minimum=1)
    dp: int = _field(1, "parallel", "expert data-parallel degree: copies of each expert slice, the expert "
                     "replicas (tp * ep * dp = world size)", minimum=1)
    gradient_partitioning: bool = _field(False, "parallel", "FSMoE's adaptive gradient partitioning: the replicated "
                                         "gradients' all-reduce cut into pieces (sizes from the cost model, printed "
                                         "at start-up) and each posted, non-blocking, as soon as its gradients are "
                                         "ready in the backward, so it travels while the MoE layers compute; the "
                                         "same gradients (no effect in one process)")

    # --- optimization -------------------------------------------------------------------------
    lr: float = _field(6e-3, "optimization", "peak learning rate of AdamW", above=0.0)
    min_lr: float = _field(6e-4, "optimization", "learning rate at the end of the cosine decay", minimum=0.0)
    weight_decay: float = _field(0.1, "optimization", "AdamW weight decay (matrices only, not norms/biases)",
                                 minimum=0.0)
    warmup_steps: int = _field(30, "optimization", "steps of linear learning-rate warmup", minimum=0)
    max_steps: int = _field(500, "optimization", "total optimizer steps of the run", minimum=1)
    grad_clip: float = _field(1.0, "optimization", "clip the global gradient norm to this (0 = no clipping)",
                              minimum=0.0)
    seed: int = _field(1337, "optimization", "seed of model init, data stream and router noise", minimum=0)
    optimizer_group_size: int = _field(0, "optimization", "DeepSpeed-TED's optimizer step: AdamW updates the "
                                       "parameters in groups of at most this many elements, one group after "
                                       "another, so its temporaries exist for one group at a time (0 = one "
                                       "group per weight-decay class)", minimum=0)
    nonfinite: str = _field("stop", "optimization", "what a non-finite loss or gradient norm does: stop (the run "
                            "ends with an error naming the step; the last good checkpoint is kept) or skip_step "
                            "(that step's update is dropped and training goes on)", choices=("stop", "skip_step"))
    max_consecutive_skips: int = _field(10, "optimization", "nonfinite=skip_step: this many steps skipped in a row "
                                        "end the run with an error (it has diverged; the last checkpoint is kept). "
                                        "float16 overflows that the loss scale absorbs do not count", minimum=1)

    # --- eval ---------------------------------------------------------------------------------
    eval_interval: int = _field(100, "eval", "estimate the val loss every this many steps (0 = only at the end)",
                                minimum=0)
    eval_iters: int = _field(8, "eval", "batches averaged per val-loss estimate", minimum=1)

    # --- checkpoint ---------------------------------------------------------------------------
    out_dir: str = _field("out", "checkpoint", "directory for checkpoint, history.json and config.toml; one run's "
                          "alone (a second run into it is refused while the first runs). '.' = the current "
                          "directory; empty is refused")
    checkpoint_interval: int = _field(250, "checkpoint", "save a checkpoint every this many steps "
                                      "(0 = only at the end)", minimum=0)
    resume: bool = _field(False, "checkpoint", "continue from the checkpoint in out_dir")
    allow_schedule_change: bool = _field(False, "checkpoint", "on --resume, accept a learning-rate schedule "
                                         "(lr, min_lr, warmup_steps, max_steps) that differs from the checkpoint's")

    # --- sample -------------------------------------------------------------------------------
    sample_tokens: int = _field(128, "sample", "tokens to generate after training (0 = none)", minimum=0)
    sample_temperature: float = _field(0.8, "sample", "softmax temperature of the generated sample", above=0.0)

    # --- system -------------------------------------------------------------------------------
    device: str = _field("cpu", "system", "torch device: cpu, cuda or cuda:N")
    dtype: str = _field("float32", "system", "precision of the forward pass's matrix products: float32, or "
                        "bfloat16 / float16 under autocast with float32 master weights (float16 with dynamic "
                        "loss scaling; routers stay float32)", choices=tuple(DTYPES))
    master_weights: str = _field("model", "system", "where the float32 master weights live: model (the model's "
                                 "parameters and gradients are float32) or optimizer (DeepSpeed-TED: with "
                                 "dtype=bfloat16 the parameters and gradients are bfloat16, the optimizer keeps "
                                 "float32 copies and steps them one optimizer_group_size group at a time)",
                                 choices=MASTER_WEIGHTS)
    num_threads: int = _field(1, "system", "torch CPU threads (0 = torch's default; 1 is fastest for the tiny default model and for MPI ranks)", minimum=0)
    progress: bool = _field(True, "system", "show the tqdm progress bar and log lines")
    tensorboard: bool = _field(True, "system", "write TensorBoard figures (losses, learning rate, gradient norm, "
                               "tokens/s, tokens per expert, communication) into out_dir/tensorboard "
                               "(observe.py; view with: tensorboard --logdir OUT_DIR)")
    tensorboard_interval: int = _field(10, "system", "write the TensorBoard figures every this many steps",
                                       minimum=1)
    profile_steps: typing.Optional[str] = _field(None, "system", "A:B records steps A to B (from 1) with "
                                                 "torch.profiler: a Chrome/Perfetto trace per rank in "
                                                 "out_dir/traces, merged into out_dir/trace.json; none = off")

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every value; raise ConfigError naming the key, the value and what is allowed."""
        if self.router == SOFT_MOE:        # not one of the choices; say why rather than just "not allowed"
            raise ConfigError(SOFT_MOE_NOT_CAUSAL)
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            _check_type(f.name, value, _FIELD_TYPES[f.name])
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}={value!r} is not a finite number")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ConfigError(f"{f.name}={value!r} is not allowed; allowed values: {', '.join(meta['choices'])}")
            if isinstance(value, str):                               # a word ("auto") has no range
                continue
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise ConfigError(f"{f.name}={value!r} is out of range; it must be >= {meta['minimum']}")
            if meta["above"] is not None and value <= meta["above"]:
                raise ConfigError(f"{f.name}={value!r} is out of range; it must be > {meta['above']}")
            if meta["maximum"] is not None and value > meta["maximum"]:
                raise ConfigError(f"{f.name}={value!r} is out of range; it must be <= {meta['maximum']}")
        if not self.out_dir.strip():
            raise ConfigError(f"out_dir={self.out_dir!r} is empty; name the directory for this run's checkpoints "
                              f"(out_dir=. for the current directory)")
        self._check_layer_options()
        # Relations between fields.
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        self._check_parallel_options()
        if self.master_weights == "optimizer" and self.dtype != "bfloat16":
            raise ConfigError(f"master_weights='optimizer' with dtype={self.dtype!r}: 16-bit parameters with float32 "
                              f"copies in the optimizer need dtype='bfloat16' (float16's loss scale would be divided "
                              f"out of float16 gradients, flushing the small ones to zero); use master_weights='model'")
        if self.profile_steps is not None:
            try:
                _, last = parse_profile_steps(self.profile_steps)
            except ValueError as error:
                raise ConfigError(str(error)) from None
            if last > self.max_steps:
                raise ConfigError(f"profile_steps={self.profile_steps!r} ends after max_steps={self.max_steps}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr={self.min_lr} is out of range; it must be <= lr={self.lr}")
        if not (self.device == "cpu" or self.device == "cuda" or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ConfigError(f"device={self.device!r} is not allowed; allowed values: cpu, cuda, cuda:N")
        return self

    def _check_parallel_options(self) -> None:
        """The parallel options, by the same checks parallelize and the layout run (plain arithmetic), as ConfigErrors."""
        try:
            check_divisible("n_head", self.n_head, self.tp)              # each tp rank computes whole heads
            if self.moe_every > 1:                                       # the dense MLPs' hidden units
                check_divisible("d_hidden", self.d_hidden, self.tp)
            if self.ep is not None:
                experts_per_rank(self.num_experts, self.ep)
            if self.expert_tensor_parallel:
                hidden_units_per_rank(self.d_hidden, self.tp)
            ParallelOptions.of(self).check(self.ep)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def _check_layer_options(self) -> None:
        """The MoE layers' options, by LayerOptions.check (the router's own by its class), as ConfigErrors."""
        try:
            check_option_names(self.router, self.router_options, prefix="router_options.")
            for key, value in self.router_options.items():
                if not isinstance(value, (bool, int, float, str)):
                    raise ConfigError(f"router_options.{key}={value!r} must be a number, bool or string")
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"router_options.{key}={value!r} is not a finite number")
            LayerOptions.of(self).check()
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELD_TYPES = typing.get_type_hints(TrainConfig)     # field name -> its declared type (DEGREE, Optional[int], ...)


# --------------------------------------------------------------------------------------------------
# types: converting strings / TOML values into a field's declared type
# --------------------------------------------------------------------------------------------------

def _is_optional(tp) -> bool:
    return typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)


def _base_type(tp):
    """float for Optional[float], DEGREE for Optional[DEGREE], else the type itself."""
    if _is_optional(tp):
        rest = tuple(a for a in typing.get_args(tp) if a is not type(None))
        return rest[0] if len(rest) == 1 else typing.Union[rest]
    return tp


def _type_name(tp) -> str:
    base = _base_type(tp)
    name = f"int or {AUTO!r}" if base == DEGREE else base.__name__
    return f"{name} or none" if _is_optional(tp) else name


def _coerce_degree(name: str, value) -> int | str:
    """A pipeline degree: an integer >= 1 (``2``, ``"2"``) or the word ``"auto"``."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        return _coerce(name, value, int)
    except ConfigError:
        lowest = next((f.metadata["minimum"] for f in dataclasses.fields(TrainConfig) if f.name == name), 1)
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: an integer >= {lowest}, or {AUTO!r} "
                          f"(measured and chosen during the first steps)") from None


def _check_type(name, value, tp):
    if value is None and _is_optional(tp):
        return
    base = _base_type(tp)
    if base == DEGREE:
        ok = value == AUTO or (isinstance(value, int) and not isinstance(value, bool))
    else:
        ok = isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{name}={value!r} has the wrong type; expected {_type_name(tp)}")


def _coerce(name: str, value, tp):
    """Turn ``value`` (a CLI string or a TOML value) into the field type ``tp``."""
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        tp = _base_type(tp)
    if tp == DEGREE:
        return _coerce_degree(name, value)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp in (int, float) and isinstance(value, bool):           # True is an int to Python, not a number here
            raise ValueError
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if tp is dict:
            if isinstance(value, str):
                value = _parse_literal(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        allowed = "; allowed: true or false (also 1/0, yes/no, on/off)" if tp is bool else ""
        raise ConfigError(f"{name}={value!r} cannot be read as {_type_name(tp)}{allowed}") from None
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def _parse_literal(text: str):
    """A CLI value written like a TOML value: 0.01, true, "abc", {a = 1}. Bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# --------------------------------------------------------------------------------------------------
# applying overrides, TOML files and the command line
# --------------------------------------------------------------------------------------------------

def field_names() -> list[str]:
    """Every key, section by section."""
    fields = dataclasses.fields(TrainConfig)
    return [f.name for section in SECTIONS for f in fields if f.metadata["section"] == section]


def _unknown_key(key: str, source: str) -> ConfigError:
    names = field_names()
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {source}{hint}; allowed keys: {', '.join(names)}")


def apply_overrides(cfg: TrainConfig, overrides: dict, source: str = "overrides") -> TrainConfig:
    """Return a copy of ``cfg`` with ``overrides`` (key -> value) applied and converted to field types.

    A key ``router_options.NAME`` sets one entry of the router_options dict; a key ``router_options``
    with a dict value merges into it.
    """
    changes = {}
    router_options = dict(cfg.router_options)
    for key, value in overrides.items():
        if key.startswith("router_options."):
            option = key.split(".", 1)[1]
            router_options[option] = _parse_literal(value) if isinstance(value, str) else value
            continue
        if key not in _FIELD_TYPES:
            raise _unknown_key(key, source)
        if key == "router_options":
            router_options.update(_coerce(key, value, dict))
            continue
        changes[key] = _coerce(key, value, _FIELD_TYPES[key])
    changes["router_options"] = router_options
    return dataclasses.replace(cfg, **changes)


def load_toml(path: str | Path) -> dict:
    """Read a config TOML file into a flat key -> value dict (only the [router_options] table is allowed)."""
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / path.name).exists() and path.parent == Path("."):
        path = CONFIG_DIR / path.name                       # "--config switch.toml" finds the packaged file
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    for key, value in data.items():
        if isinstance(value, dict) and key != "router_options":
            raise _unknown_key(key, f"{path} (as a [table])")
    return data


def from_dict(values: dict) -> TrainConfig:
    """A validated TrainConfig from a plain dict (e.g. the one stored in a checkpoint)."""
    return apply_overrides(TrainConfig(), values, source="dict").validate()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """defaults <- ``--config`` TOML files (in order) <- ``--key=value`` overrides; then validate.

    ``--help`` / ``-h`` prints every key and exits with status 0.
    """
    args = iter(sys.argv[1:] if argv is None else argv)
    config_files, overrides = [], {}
    for arg in args:
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: settings are written --key=value (see --help)")
        key, eq, value = arg[2:].partition("=")
        if key == "config":
            if not eq:                                       # "--config path" form
                value = next(args, None)
                if value is None:
                    raise ConfigError("--config needs a file path")
            config_files.append(value)
        elif eq:
            overrides[key] = value
        else:                                                # "--flag": a boolean set to true
            if key not in field_names() and not key.startswith("router_options."):
                raise _unknown_key(key, "the command line")
            if _FIELD_TYPES.get(key) is not bool:
                raise ConfigError(f"--{key} needs a value: write --{key}=VALUE")
            overrides[key] = "true"
    cfg = TrainConfig()
    for path in config_files:
        cfg = apply_overrides(cfg, load_toml(path), source=str(path))
    cfg = apply_overrides(cfg, overrides, source="the command line")
    return cfg.validate()


# --------------------------------------------------------------------------------------------------
# printing
# --------------------------------------------------------------------------------------------------

def help_text() -> str:
    lines = [
        "usage: python -m fastmoe_edu.train [--config FILE.toml ...] [--key=value ...] [--resume]",
        "",
        "Settings resolve as: defaults <- --config TOML files (in order) <- --key=value overrides.",
        f"Packaged configs: {', '.join(sorted(p.name for p in CONFIG_DIR.glob('*.toml')))} (in {CONFIG_DIR})",
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(TrainConfig):
            if f.metadata["section"] != section:
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"  --{f.name}=<{_type_name(_FIELD_TYPES[f.name])}>  (default: {_show(default)})")
            lines.append(f"      {f.metadata['help']}")
            if f.metadata["choices"]:
                lines.append(f"      one of: {', '.join(f.metadata['choices'])}")
            if f.name == "router_options":
                for router in ROUTERS:
                    options = ", ".join(f"{k}={_show(v)}" for k, v in sorted(accepted_router_options(router).items()))
                    lines.append(f"      {router}: {options}")
    return "\n".join(lines)


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def format_config(cfg: TrainConfig) -> str:
    """The resolved configuration, one ``key = value`` line per field, grouped by section."""
    lines = []
    for section in SECTIONS:
        lines += [f"[{section}]"] + [f"  {f.name:<20} = {_show(getattr(cfg, f.name))}"
                                     for f in dataclasses.fields(cfg) if f.metadata["section"] == section]
    return "\n".join(lines)


def to_toml(cfg: TrainConfig) -> str:
    """A TOML file that reproduces ``cfg`` (written next to the checkpoint)."""
    def value(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "router_options"}
    lines = [f"{k} = {value(v)}" if v is not None else f"# {k} unset (none)" for k, v in settings.items()]
    lines.append("\n[router_options]")
    lines += [f"{k} = {value(v)}" for k, v in cfg.router_options.items()]
    return "\n".join(lines) + "\n"
