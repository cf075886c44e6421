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
"""
from __future__ import annotations

import contextlib

import torch

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
