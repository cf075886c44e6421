"""Mixed precision: matrix products in bfloat16 or float16, weights and their gradients in float32.

    python -m fastmoe_edu.train --dtype=bfloat16
    python -m fastmoe_edu.train --dtype=float16          # with dynamic loss scaling

``dtype = "float32"`` (the default) changes nothing. With ``"bfloat16"`` or ``"float16"`` the forward
pass runs under ``torch.autocast``: matrix products (attention, dense MLPs, the experts' grouped GEMMs)
take low-precision copies of their inputs, while the parameters, their gradients and the optimizer's
state stay float32 (the "master weights" of mixed-precision training, Micikevicius et al. 2018). What
autocast leaves alone stays float32 too: layer norms, softmaxes, the loss. The routers run with
autocast off, on float32 copies of their tokens: ranking experts is a comparison of nearly equal
numbers, and bfloat16's 8 bits of mantissa would reorder them (routers.py).

float16 has 5 exponent bits: gradients below about 6e-8 flush to zero. **Loss scaling** multiplies
the loss by S before the backward pass, so every gradient is S times larger and stays representable,
and divides the gradients by S before they are used. S is found as training goes (dynamic scaling):

    an overflow (a non-finite gradient norm)   ->  skip this step's update, S <- S / 2
    ``growth_interval`` steps without one       ->  S <- 2 S

bfloat16 has float32's exponent range and needs no scaling (S stays 1).

**Where the float32 master weights live** (``master_weights``). ``"model"`` (the default): the model's
parameters are float32 and autocast makes the 16-bit copies; gradients are float32. ``"optimizer"``
(DeepSpeed-TED's and ZeRO's arrangement, bfloat16 only): the model's parameters *and gradients* are
bfloat16 — half the bytes of both — except the routers' (float32, as above), and the optimizer keeps
a float32 master copy of each parameter beside its moments. :class:`MasterWeightAdamW` then steps
the parameter groups (``optimizer_group_size``) one at a time:

    g32 = float32(g16)                       1. upcast this group's gradients (clipped already; S = 1)
    m ← β1 m + (1−β1) g32                    2. AdamW on the float32 master weights θ32
    v ← β2 v + (1−β2) g32²
    θ32 ← θ32 (1 − lr λ) − lr m̂ / (√v̂ + ε)     (m̂, v̂: bias-corrected)
    θ16 = bfloat16(θ32)                      3. round them into the model
    del g32                                  4. free: one group's float32 gradients exist at a time

float16 keeps ``master_weights = "model"``: its loss scale must be divided out of the gradients before
they are used, and done in place on float16 gradients that division flushes the small ones to zero.

A checkpoint written with one ``master_weights`` resumes with the other (:func:`move_master_copies`):
the float32 weights move to where this run keeps them, exactly, never rounded through 16 bits.
"""
from __future__ import annotations

import contextlib

import torch
from torch.optim.adam import adam

#: The ``dtype`` setting's values and the torch dtypes they compute in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """bfloat16 / float16 -> float32; float32 and float64 unchanged (losses and softmaxes use this)."""
    return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor


def autocast(dtype: str, device: torch.device | str):
    """The forward pass's precision: ``torch.autocast`` to ``dtype``, or nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


class LossScaler:
    """Dynamic loss scaling for float16; for other dtypes ``scale`` stays 1 and nothing ever changes.

    The decision to skip uses the gradient norm of the whole model (after the gradients of all ranks
    are reduced), so every rank takes the same decision and the ranks' weights never drift apart.
    """

    def __init__(self, dtype: str, initial_scale: float = 2.0 ** 16, growth_interval: int = 200):
        self.enabled = dtype == "float16"
        self.scale = initial_scale if self.enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0                                  # steps since the last overflow or growth

    def unscale_(self, model: torch.nn.Module) -> None:
        """Gradients ← gradients / S: what the unscaled loss would have given (before clipping)."""
        if self.scale != 1.0:
            for param in model.parameters():
                if param.grad is not None:
                    param.grad.div_(self.scale)

    def update(self, gradients_finite: bool) -> bool:
        """After a step's gradient norm is known. Returns True when that step's non-finite gradients
        were an overflow of the scaled loss (skip the update and go on), not a diverged run."""
        if not self.enabled:
            return False
        if not gradients_finite:
            if self.scale <= 1.0:                            # no scaling left to blame: a real divergence
                return False
            self.scale /= 2.0
            self.good_steps = 0
            return True
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= 2.0
            self.good_steps = 0
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


#: The ``master_weights`` setting's values (see the module docstring).
MASTER_WEIGHTS = ("model", "optimizer")


def store_parameters(model: torch.nn.Module, dtype: str, master_weights: str) -> torch.nn.Module:
    """``master_weights="optimizer"``: the model's parameters (and so its gradients) become ``dtype``,
    except the routers' (every MoE layer's ``router``), which stay float32. ``"model"``: nothing
    changes. Call after the model is sharded, before the optimizer is built."""
    if master_weights == "model":
        return model
    routers = [m.router for m in model.modules() if isinstance(getattr(m, "router", None), torch.nn.Module)]
    model.to(DTYPES[dtype])
    for router in routers:
        router.float()
    return model


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (torch's arithmetic) over float32 master copies of 16-bit parameters, one group at a time.

    The parameters in ``param_groups`` are the model's own (16-bit), so checkpoints number them as they
    number a plain AdamW's; ``state[p]`` holds the master copy ``master`` beside ``exp_avg``,
    ``exp_avg_sq`` and ``step``. Float32 parameters (the routers') are stepped the same way: their
    master copy is then an exact copy.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, foreach: bool | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:                                    # one group at a time
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            state = [self._state_of(p) for p in params]
            grads = [p.grad.float() for p in params]                       # 1. this group's float32 gradients
            beta1, beta2 = group["betas"]
            adam([s["master"] for s in state], grads, [s["exp_avg"] for s in state],      # 2. AdamW on θ32
                 [s["exp_avg_sq"] for s in state], [], [s["step"] for s in state], amsgrad=False,
                 beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                 maximize=False, decoupled_weight_decay=True, foreach=group["foreach"])
            for p, s in zip(params, state):
                p.copy_(s["master"])                                       # 3. θ16 = round(θ32)
            del grads                                                      # 4. freed before the next group

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:                                                      # first step: θ32 from θ16
            master = p.detach().float().clone()
            state.update(master=master, exp_avg=torch.zeros_like(master), exp_avg_sq=torch.zeros_like(master),
                         step=torch.zeros((), dtype=torch.float32))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the master copies and moments stay float32 (torch would cast them to the
        parameters' 16-bit dtype, rounding the master weights away)."""
        super().load_state_dict(state_dict)
        ordered = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            for key in ("master", "exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[ordered[int(index)]][key] = saved[key].to(ordered[int(index)].device, torch.float32)


def move_master_copies(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, state: dict) -> None:
    """Before a checkpoint's ``weights`` (the model's state_dict) and optimizer ``state`` (numbered as
    ``optimizer.state_dict()`` numbers it) are loaded, in place: the float32 master weights go where
    this run keeps them.

    ``"model"`` -> ``"optimizer"``: a parameter's master copy is its float32 weight in the checkpoint
    (the 16-bit model would hold it rounded). ``"optimizer"`` -> ``"model"``: the float32 parameter
    becomes the master copy, and the copy leaves the optimizer's state. Same places: nothing changes.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):     # tied weights: every name
        names.setdefault(id(param), []).append(name)
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    keeps_masters = isinstance(optimizer, MasterWeightAdamW)
    for index, saved in state.items():
        param_names = names[id(ordered[int(index)])]
        if keeps_masters and "master" not in saved:
            saved["master"] = weights[param_names[0]].float()
        elif not keeps_masters and "master" in saved:
            master = saved.pop("master")
            weights.update({name: master for name in param_names})
