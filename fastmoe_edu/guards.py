"""What stops a training run, or makes it warn (train.py checks these between steps).

    StopOnCtrlC           the first Ctrl-C or SIGTERM finishes the step, saves a checkpoint and stops
    NonFiniteError        a NaN or infinite loss or gradient norm (nonfinite="stop"), or too many such steps
                          in a row under nonfinite="skip_step" (check_skipped_steps)
    LossWatch             the warning to print after a step, if any: an update skipped, or a loss far above
                          its running minimum
"""
from __future__ import annotations

import math
import signal
import threading

from .config import TrainConfig


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
    """Warn when a finite loss climbs far above its running minimum (a learning rate too high, usually),
    or when a step's update was skipped."""

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

    def warning(self, record: dict) -> str | None:
        """The warning after the step of ``record`` (train_step's), if any. None after a float16 overflow:
        routine while the loss scale settles, and the progress bar shows the scale."""
        if record["overflow"]:
            return None
        if record["skipped"]:
            return (f"warning: step {record['step']}: non-finite loss or gradient norm, update skipped "
                    f"(nonfinite=\"skip_step\")")
        return self.check(record["step"], record["loss"])
