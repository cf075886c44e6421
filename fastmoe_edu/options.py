"""LayerOptions: every option of an MoE layer, declared once: its name, default, meaning and check.

    MoELayer(d_model, d_hidden, num_experts, top_k=2, router="sigmoid", ...)   # builds LayerOptions(...)
    MoELayer(options=LayerOptions(d_model=64, ...))                           # the same layer

The model's config (model.ModelConfig) and the training config (config.TrainConfig: TOML, the command
line, ``--help``) *are* LayerOptions with more fields, so an option is settable everywhere the moment it
is declared here; ``hf.to_hf`` compares two LayerOptions. A keyword that is not a field is an option of
the router (``router_options``), checked by its router class (routers.py).

The rule for a new option (docs/design.md): it enters with the model family or tutorial that needs it,
as one field here (default, help, and its check in ``check``), applied in one named step of the layer.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from .backends import BACKEND_NAMES, check_backend_name
from .checks import is_finite_number
from .experts import EXPERT_KINDS, check_expert_options
from .routers import CAPACITY_PRIORITIES, ROUTERS

SOFT_MOE = "soft_moe"                           # Soft MoE's router name (soft_moe.py: its own layer)
#: every ``router=`` a layer accepts: the top-k family of routers.py, and Soft MoE, kept out of ROUTERS
#: because it has no top-k, no capacity and no place in the causal language model.
LAYER_ROUTERS = (*ROUTERS, SOFT_MOE)
#: Where the tokens that compete for an expert's capacity come from (``capacity_per``).
CAPACITY_PER = ("batch", "sequence")
#: Where a token's router weight acts (``weights_on``): y = Σ w·expert(x), or y = Σ expert(w·x) (Llama-4).
WEIGHTS_ON = ("output", "input")
DEFAULT_TOP_K = 2


def option(default, section: str, help: str, *, choices=None, minimum=None, above=None, maximum=None):
    """A dataclass field carrying its documentation and range (read by --help and config.validate):
    ``minimum`` and ``maximum`` are inclusive, ``above`` strict."""
    meta = {"section": section, "help": help, "choices": choices, "minimum": minimum, "above": above,
            "maximum": maximum}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LayerOptions:
    """The options of one MoE layer (MoELayer, SoftMoELayer); ``check()`` refuses a bad value or combination."""

    d_model: int = option(64, "model", "width of the tokens (the residual stream)")
    d_hidden: int = option(128, "model", "hidden width of each expert (and of the model's dense MLPs)")
    num_experts: int = option(8, "model", "E, experts per MoE layer (a multiple of the expert-parallel degree ep; "
                              "8 runs on 1, 2, 4 or 8 ranks)")
    top_k: int = option(DEFAULT_TOP_K, "model", "experts each token is sent to (switch needs 1, gshard 2; expert_choice: the "
                        "default capacity factor; soft_moe: unused, leave it at 2)")
    router: str = option("softmax_top_k", "model", "routing algorithm: a router of routers.py, or soft_moe (its own "
                         "layer, soft_moe.py; not causal, so the language model refuses it)", choices=tuple(ROUTERS))
    expert: str = option("swiglu", "model", "expert feed-forward kind (experts.py; clamped_swiglu: GPT-OSS)",
                         choices=EXPERT_KINDS)
    capacity_factor: typing.Optional[float] = option(
        None, "model", "cf: each expert takes at most C = ceil(cf * top_k * T / E) assignments, the rest are "
        "dropped; none = dropless")
    expert_capacity: typing.Optional[int] = option(None, "model", "C itself, a fixed number of assignments per "
                                                   "expert (Switch Transformers), instead of capacity_factor")
    capacity_per: str = option("batch", "model", "batch: all T tokens of a call compete for an expert's C places; "
                               "sequence: the tokens of each sequence (x [..., S, d]) among themselves, C per "
                               "sequence (Switch Transformers). Needs a capacity", choices=CAPACITY_PER)
    capacity_priority: str = option("order", "model", "which assignments win an expert's places, slot-major: order "
                                    "(tokens in order) or probability (by decreasing max router probability: "
                                    "batch-prioritized routing, NLLB-MoE). Needs a capacity",
                                    choices=CAPACITY_PRIORITIES)
    renormalize_after_dropping: bool = option(False, "model", "rescale a token's kept weights to the sum its k "
                                              "weights had, w'_s = w_s * sum_all w / sum_kept w (NLLB-MoE); "
                                              "false: normalized before dropping")
    expert_dropout: float = option(0.0, "model", "p: while training, zero each element of the routed experts' "
                                   "outputs with probability p, the rest times 1/(1-p) (NLLB-MoE); 0 = off")
    bias: bool = option(False, "model", "give the expert linear maps biases (the shared experts' too)")
    num_shared_experts: int = option(0, "model", "always-on experts every token runs besides its routed ones "
                                     "(DeepSeekMoE / DeepSeek-V2/V3; 0 = none)")
    shared_d_hidden: typing.Optional[int] = option(None, "model", "hidden width of one shared expert; none = d_hidden")
    shared_expert_gate: bool = option(False, "model", "scale the shared experts' output by sigmoid(x . g), g "
                                      "learned (Qwen2-MoE)")
    output_bias: bool = option(False, "model", "add a learned bias b [d_model] to every token's output (JetMoE)")
    weights_on: str = option("output", "model", "where a token's router weight acts: output (y = sum w * "
                             "expert(x)) or input (y = sum expert(w * x), Llama-4)", choices=WEIGHTS_ON)
    swiglu_alpha: typing.Optional[float] = option(None, "model", "alpha of expert=clamped_swiglu (GPT-OSS); "
                                                  "none = 1.702")
    swiglu_limit: typing.Optional[float] = option(None, "model", "limit of expert=clamped_swiglu (GPT-OSS); "
                                                  "none = 7.0")
    backend: str = option("reference", "backend", "MoE dispatch/expert implementation: reference (plain PyTorch), "
                          "numba (numba kernels: CPU target, or numba.cuda for CUDA tensors) or auto (the first of "
                          "the backends' preference list that runs here)", choices=BACKEND_NAMES)
    router_options: dict = option({}, "model", "the router's own keyword options, e.g. balance_loss_weight, "
                                  "z_loss_weight (TOML table [router_options], CLI --router_options.NAME=VALUE)")

    def __post_init__(self):
        # A field's name in router_options (a config's --router_options.capacity_priority=...) sets the field.
        fields = _field_names() & self.router_options.keys()
        for name in fields:
            setattr(self, name, self.router_options[name])
        self.router_options = {key: value for key, value in self.router_options.items() if key not in fields}

    @classmethod
    def from_keywords(cls, **keywords) -> LayerOptions:
        """LayerOptions from MoELayer's keywords: the fields, and the router's options (every other keyword)."""
        names = _field_names()
        router_options = {key: value for key, value in keywords.items() if key not in names}
        return cls(**{key: value for key, value in keywords.items() if key in names}, router_options=router_options)

    @classmethod
    def of(cls, config) -> LayerOptions:
        """The layer options of a config that has their fields (ModelConfig, TrainConfig)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LayerOptions)})

    def resolved(self) -> LayerOptions:
        """The same layer, each None that stands for a default replaced by it (what hf.to_hf compares)."""
        alpha, limit = check_expert_options(self.expert, self.swiglu_alpha, self.swiglu_limit)
        shared = (self.shared_d_hidden or self.d_hidden) if self.num_shared_experts else None
        return dataclasses.replace(self, swiglu_alpha=alpha, swiglu_limit=limit, shared_d_hidden=shared)

    def router_keywords(self) -> dict:
        """The keyword options of the top-k router: ``router_options`` and the three layer fields it applies."""
        return dict(self.router_options, expert_capacity=self.expert_capacity,
                    capacity_priority=self.capacity_priority,
                    renormalize_after_dropping=self.renormalize_after_dropping)

    def check(self) -> LayerOptions:
        """Refuse, before anything is built, a value or combination the layer cannot take; returns self."""
        for name in ("d_model", "d_hidden", "num_experts"):
            _check_int(name, getattr(self, name), 1)
        soft = self.router == SOFT_MOE
        if soft and self.top_k != DEFAULT_TOP_K:
            raise ValueError(f"router='soft_moe' does not use top_k (every token reaches every slot); got "
                             f"top_k={self.top_k!r}, leave it at its default ({DEFAULT_TOP_K})")
        if not soft and not (_is_int(self.top_k) and 1 <= self.top_k <= self.num_experts):
            raise ValueError(f"top_k={self.top_k!r} must be an integer in [1, num_experts={self.num_experts}]")
        cf = self.capacity_factor
        if not soft and cf is not None and not (is_finite_number(cf) and cf > 0):
            raise ValueError(f"capacity_factor={cf!r} must be a finite number > 0, or None for dropless")
        if self.router not in LAYER_ROUTERS:
            raise ValueError(f"router={self.router!r} is not a known router; allowed: {', '.join(LAYER_ROUTERS)}")
        check_expert_options(self.expert, self.swiglu_alpha, self.swiglu_limit)     # the kind, then its constants
        check_backend_name(self.backend)
        self._check_shared()
        if self.capacity_per not in CAPACITY_PER:
            raise ValueError(f"capacity_per={self.capacity_per!r} is not known; allowed: {', '.join(CAPACITY_PER)}")
        if not (is_finite_number(self.expert_dropout) and 0 <= self.expert_dropout < 1):
            raise ValueError(f"expert_dropout={self.expert_dropout!r} must be a number in [0, 1) (the probability of "
                             f"zeroing an element of an expert's output while training; 0: off)")
        if not isinstance(self.output_bias, bool):
            raise ValueError(f"output_bias={self.output_bias!r} must be True or False")
        if self.weights_on not in WEIGHTS_ON or (soft and self.weights_on != "output"):
            raise ValueError(f"weights_on={self.weights_on!r} is not allowed; allowed: "
                             + ("'output' (Soft MoE weighs the slots' outputs)" if soft else ", ".join(WEIGHTS_ON)))
        if soft:
            self._check_soft_moe()
            return self
        if self.router == "expert_choice" and self.capacity_per != "batch":
            raise ValueError("router='expert_choice' has no token-choice capacity to prune: capacity_per="
                             f"{self.capacity_per!r} applies to the other top-k routers")
        if self.capacity_per == "sequence" and cf is None and self.expert_capacity is None:
            raise ValueError("capacity_per='sequence' needs a capacity to count per sequence: set capacity_factor or "
                             "expert_capacity (without either the layer is dropless)")
        ROUTERS[self.router].check_options(self.router, self.num_experts, self.top_k, cf, self.router_keywords())
        return self

    def _check_shared(self) -> None:
        """The shared experts: a count >= 0; a width and a gate only with a count > 0."""
        _check_int("num_shared_experts", self.num_shared_experts, 0, " (0: no shared experts)")
        if self.shared_d_hidden is not None:
            _check_int("shared_d_hidden", self.shared_d_hidden, 1, ", or None for d_hidden")
        if not isinstance(self.shared_expert_gate, bool):
            raise ValueError(f"shared_expert_gate={self.shared_expert_gate!r} must be True or False")
        if self.num_shared_experts == 0 and (self.shared_d_hidden is not None or self.shared_expert_gate):
            raise ValueError(f"shared_d_hidden={self.shared_d_hidden!r}, shared_expert_gate="
                             f"{self.shared_expert_gate!r} describe shared experts, but num_shared_experts=0; set "
                             f"num_shared_experts >= 1 or leave them unset")

    def _check_soft_moe(self) -> None:
        """Soft MoE has no capacity and no expert-sorted rows: the top-k options stay at their defaults."""
        if self.capacity_factor is not None:
            raise ValueError(f"router='soft_moe' has no capacity (every expert processes exactly slots_per_expert "
                             f"slots per group, nothing is dropped); got capacity_factor={self.capacity_factor!r}, "
                             f"pass capacity_factor=None")
        if self.expert_capacity is not None or self.capacity_per != "batch":
            raise ValueError(f"router='soft_moe' has no token-choice capacity to prune: expert_capacity="
                             f"{self.expert_capacity!r} and capacity_per={self.capacity_per!r} apply to the top-k "
                             f"routers ({', '.join(r for r in ROUTERS if r != 'expert_choice')})")
        if self.capacity_priority != "order" or self.renormalize_after_dropping is not False or self.expert_dropout:
            raise ValueError(f"capacity_priority={self.capacity_priority!r}, renormalize_after_dropping="
                             f"{self.renormalize_after_dropping!r}, expert_dropout={self.expert_dropout!r}: "
                             f"router='soft_moe' has no capacity dropping and no expert-sorted rows; these apply to "
                             f"the top-k routers ({', '.join(ROUTERS)})")


def _field_names() -> set[str]:
    """The options that are fields of LayerOptions (the router's own are entries of router_options)."""
    return {f.name for f in dataclasses.fields(LayerOptions)} - {"router_options"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int, note: str = "") -> None:
    if not (_is_int(value) and value >= minimum):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{note}")
