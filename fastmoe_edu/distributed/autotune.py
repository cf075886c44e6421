"""``pipeline_degree="auto"``: measure the layer in its first passes, then let the cost model choose (FSMoE).

FSMoE (Pan et al. 2025) picks the pipeline degrees of each MoE layer from a model in which every task
costs α + β·n per chunk, with α and β profiled on the machine. This runner does the same, online and per
layer, with nothing to calibrate beforehand:

    pass 1              run unpipelined (warm-up: first-call allocations and caches; not measured)
    passes 2 .. K       run unpipelined, timing on the way (K = PROFILE_PASSES):
                          a probe all-to-all of one row per rank         -> the exchange's α
                          the scatter and the gather of the real rows    -> its β (seconds per byte)
                          the experts on 1/8 of the rows, then on all    -> the experts' α_c and β_c
                          the layer's backward (from output to input)    -> the measured step time
    end of pass K       all-reduce (max) the measurements over the world: the slowest rank's figures,
                        the same on every rank; keep each task's fastest pass (noise only adds time)
                        -> fit α, β (cost_model.fit_alpha_beta, fit_task) ->
                        choose_pipeline_degrees -> (D_f, D_b), powers of 2 up to MAX_DEGREE;
                        world rank 0 prints the choice, predicted and measured times, once
    passes K+1, K+2     a pipelined choice runs, the second pass timed (forward and backward)
    pass K+3            all-reduce (max) that time; slower than the unpipelined passes' -> the "auto"
                        degrees go back to 1 (world rank 0 says so): measured, not assumed
    passes K+3 ..       the chosen degrees (pipeline.py)

Every rank makes the same choice because it decides from the same all-reduced numbers with the same
code; the record is ``runner.chosen_degrees`` and ``runner.tuning`` (the fitted tasks and the times).
A degree given as an integer stays as given; only the ``"auto"`` ones are chosen. The exchange is
measured as the layer runs it. A hierarchical exchange (``ranks_per_node``) is timed phase by phase
(hierarchical.py's ``last_phase_seconds``), so the intra-node and the inter-node level each get their
own α and β, and the cost model prices them as two lanes that overlap each other and the compute
(``cost_model.overlapped_pass``), as the pipelined loop co-schedules them.

The profiling passes compute exactly what the unpipelined layer computes (the probes run beside it,
without gradients), so a run with ``"auto"`` equals a run with the chosen degrees fixed, up to the
rounding that any change of degree brings (the order of the expert weight gradients' partial sums).

Activation checkpointing recomputes a block's forward during the backward, replaying its recorded
collectives in order (recompute.py); a recomputed pass therefore takes the path its original took,
with the same collectives, and measures and decides nothing.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from .cost_model import LayerTasks, choose_pipeline_degrees, fit_alpha_beta, fit_task, predict_layer
from .hierarchical import HierarchicalExchange
from .pipeline import AUTO, chunk_rows
from .recompute import active_stash
from .stats import wall_clock

PROFILE_PASSES = 4          # forward passes of each layer before the choice (the first is a warm-up)
MAX_DEGREE = 16             # the largest degree "auto" may choose
SMALL_CALL = 8              # the small expert call runs the first of this many chunks of the rows
# the columns of one pass's measurements (each rank's own; all-reduced with max before fitting)
COLUMNS = ("probe_s", "probe_bytes", "scatter_s", "scatter_bytes", "gather_s", "gather_bytes",
           "small_rows", "small_s", "rows", "experts_s",
           "probe_inter_s", "scatter_inter_s", "gather_inter_s",   # hierarchical: of *_s, the inter-node phase
           "backward_s")


class DegreeTuner:
    """Chooses one layer's (D_f, D_b) from its first passes (see the module docstring)."""

    def __init__(self, layout, forward, backward, label: str, profile_passes: int = PROFILE_PASSES,
                 max_degree: int = MAX_DEGREE):
        self.layout, self.requested, self.label = layout, (forward, backward), label
        self.profile_passes, self.max_degree = max(2, profile_passes), max_degree
        self.chosen: tuple[int, int] | None = None
        self.tuning: dict | None = None
        self.passes, self.samples = 0, []
        self._last: tuple[bool, bool] | None = None     # (measure, decide) of the last recorded pass
        self._backward_start: float | None = None
        self._device = torch.device("cpu")
        self.runner_exchange = None                     # the layer's exchange (flat or hierarchical), from run()
        self._check = None                              # after a pipelined choice: "warm", "verify", "judge"
        self._checked = [0.0, 0.0]                      # the verifying pass: forward, backward seconds

    def next_pass(self) -> tuple[bool, bool] | str | None:
        """None once chosen; else whether this profiling pass measures and decides, or "warm" / "verify" /
        "judge" (the check of a pipelined choice). A recomputation (activation checkpointing) repeats its
        original pass's path."""
        if getattr(active_stash(), "replaying", False):
            return self._last
        if self.chosen is None:
            self.passes += 1
            self._last = (self.passes > 1, self.passes >= self.profile_passes)
        elif self._check is not None:
            self._last, self._check = self._check, {"warm": "verify", "verify": "judge", "judge": None}[self._check]
        else:
            self._last = None
        return self._last

    def run(self, plan: tuple[bool, bool] | str, runner, experts, buffer, counts, backend) -> torch.Tensor:
        """One profiling pass: the unpipelined layer, timed; after the last one, the choice. Then, for a
        pipelined choice, one pass with it, timed ("verify"), and at the next pass the check ("judge")."""
        recording = not getattr(active_stash(), "replaying", False)
        if plan in ("warm", "verify", "judge"):
            return self._check_choice(plan, recording, runner, experts, buffer, counts, backend)
        measure, decide = plan
        timed_backward = recording and measure and torch.is_grad_enabled() and buffer.requires_grad
        self._device, self.runner_exchange = buffer.device, runner.exchange
        if timed_backward:                                             # the backward of this layer ends here ...
            buffer = _Noted.apply(buffer, self._note_backward_end)
        clock = PassClock(runner, experts, buffer, backend)
        out = runner.exchange_and_run(experts, buffer, counts, backend, clock)   # the runner's own exchange, timed
        if recording and measure:
            self.samples.append(clock.sample())
        if timed_backward:                                             # ... and starts here
            out = _Noted.apply(out, self._note_backward_start)
        if decide:
            self._decide(runner.layout.expert.size, record=recording)
        return out

    def _note_backward_start(self) -> None:
        self._backward_start = wall_clock(self._device)

    def _note_backward_end(self) -> None:
        if self._backward_start is not None and self.samples and self.samples[-1][-1] == 0.0:
            self.samples[-1][-1] = wall_clock(self._device) - self._backward_start   # the pass whose backward ran
        self._backward_start = None

    def _decide(self, P: int, record: bool) -> None:
        worst = self.layout.world.allreduce_(torch.tensor(self.samples, dtype=torch.float64), op="max",
                                             purpose="allreduce_pipeline_profile")
        if not record:                              # a recomputation: the collective only, decided already
            return
        m = [dict(zip(COLUMNS, row)) for row in worst.tolist()]

        def fastest(task: str) -> dict:            # noise (a descheduled rank, a late peer) only adds time
            return min(m, key=lambda s: s[f"{task}_s"])

        def fit(level: str) -> tuple[float, float]:   # α, β of the whole exchange, or of one of its levels
            def seconds(sample, task):
                inter = sample[f"{task}_inter_s"]
                return {"whole": sample[f"{task}_s"], "intra": sample[f"{task}_s"] - inter, "inter": inter}[level]
            return fit_alpha_beta([{"ranks": P, "bytes_per_rank": fastest(task)[f"{task}_bytes"],
                                    "seconds": max(seconds(fastest(task), task), 1e-9)}
                                   for task in ("probe", "scatter", "gather")])
        two_levels = isinstance(self.runner_exchange, HierarchicalExchange)
        alpha, beta = fit("intra" if two_levels else "whole")     # hierarchical: the intra-node phase here,
        inter_alpha, inter_beta = fit("inter") if two_levels else (0.0, 0.0)   # the inter-node one apart
        compute_alpha, compute_beta = fit_task([(fastest("small")["small_rows"], fastest("small")["small_s"]),
                                                (fastest("experts")["rows"], fastest("experts")["experts_s"])])
        last = m[-1]
        exchanged = max(last["scatter_bytes"], last["gather_bytes"])
        tasks = LayerTasks(exchange_alpha=alpha * (P - 1), exchange_seconds=beta * exchanged,
                           compute_alpha=compute_alpha, compute_seconds=compute_beta * last["rows"],
                           inter_alpha=inter_alpha * (P - 1), inter_seconds=inter_beta * exchanged)
        best = choose_pipeline_degrees(tasks, self.max_degree)
        self.chosen = tuple(d if d != AUTO else b for d, b in zip(self.requested, best))
        if self.chosen != tuple(d if d != AUTO else 1 for d in self.requested):   # pipelining chosen: check it
            self._check = "warm"
        measured_fwd = min(s["scatter_s"] + s["experts_s"] + s["gather_s"] for s in m)
        backwards = [s["backward_s"] for s in m if s["backward_s"] > 0]
        self.tuning = {"tasks": tasks, "exchange_alpha_per_message": alpha, "exchange_beta_per_byte": beta,
                       "inter_alpha_per_message": inter_alpha, "inter_beta_per_byte": inter_beta,
                       "predicted": predict_layer(tasks, *self.chosen), "predicted_unpipelined": predict_layer(tasks, 1, 1),
                       "measured_unpipelined": {"forward": measured_fwd,
                                                "total": measured_fwd + min(backwards) if backwards else None},
                       "model_choice": self.chosen}
        if self.layout.world.rank == 0:
            tqdm.write(self.describe())                # (a line of its own under the training progress bar)

    def _check_choice(self, plan: str, recording: bool, runner, experts, buffer, counts, backend) -> torch.Tensor:
        """Measured, not assumed: the chosen degrees run a pass ("warm": first-call costs), then one timed
        ("verify"); at the next pass ("judge") the slowest rank's time is compared with the unpipelined passes' and, if it is slower,
        the "auto" degrees go back to 1 — the cost model cannot see what it does not contain (the chunks'
        own overheads, an MPI without asynchronous progress), and the measurement can."""
        if plan == "judge":
            self._judge(record=recording)
        if plan != "verify":                         # "warm": the chosen degrees' first pass, not timed
            return runner.exchange_and_run(experts, buffer, counts, backend)
        timed_backward = recording and torch.is_grad_enabled() and buffer.requires_grad
        if timed_backward:
            buffer = _Noted.apply(buffer, self._note_checked_backward_end)
        start = wall_clock(buffer.device)
        out = runner.exchange_and_run(experts, buffer, counts, backend)           # with the chosen degrees
        if recording:
            self._checked = [wall_clock(buffer.device) - start, 0.0]
        if timed_backward:
            out = _Noted.apply(out, self._note_backward_start)
        return out

    def _note_checked_backward_end(self) -> None:
        if self._backward_start is not None:
            self._checked[1] = wall_clock(self._device) - self._backward_start
        self._backward_start = None

    def _judge(self, record: bool) -> None:
        worst = self.layout.world.allreduce_(torch.tensor(self._checked, dtype=torch.float64), op="max",
                                             purpose="allreduce_pipeline_check")
        if not record:                              # a recomputation: the collective only, judged already
            return
        forward, backward = worst.tolist()
        unpipelined = self.tuning["measured_unpipelined"]
        both = backward > 0 and unpipelined["total"]
        measured, before = (forward + backward, unpipelined["total"]) if both else (forward, unpipelined["forward"])
        self.tuning["measured_chosen"] = measured
        if measured > before:
            chosen = self.chosen
            self.chosen = tuple(d if d != AUTO else 1 for d in self.requested)
            if self.layout.world.rank == 0:
                tqdm.write(f"auto pipeline degrees, {self.label} checked: {chosen[0]}/{chosen[1]} measured "
                           f"{measured * 1e3:.3f} ms, slower than {before * 1e3:.3f} ms unpipelined: "
                           f"running {self.chosen[0]}/{self.chosen[1]}")

    def describe(self) -> str:
        """The one log line of the choice (after it is made)."""
        t, D_f, D_b = self.tuning, *self.chosen
        ms = 1e3
        measured = t["measured_unpipelined"]
        step = (f"{measured['total'] * ms:.3f} ms (forward {measured['forward'] * ms:.3f})" if measured["total"]
                else f"forward {measured['forward'] * ms:.3f} ms")
        def link(alpha, beta):
            bandwidth = f"{1e-9 / beta:.3g} GB/s" if beta > 0 else "bandwidth unmeasurable (latency-bound)"
            return f"α {alpha * 1e6:.1f} µs/message, {bandwidth}"
        exchange = link(t["exchange_alpha_per_message"], t["exchange_beta_per_byte"])
        if t["tasks"].inter_alpha or t["tasks"].inter_seconds:          # hierarchical: the two levels apart
            exchange = (f"intra-node {exchange}; inter-node "
                        f"{link(t['inter_alpha_per_message'], t['inter_beta_per_byte'])}")
        alternative = (f", {t['predicted_unpipelined']['total'] * ms:.3f} ms at 1/1" if (D_f, D_b) != (1, 1) else "")
        return (f"auto pipeline degrees, {self.label}: forward {D_f}, backward {D_b} | exchange + experts per step: "
                f"predicted {t['predicted']['total'] * ms:.3f} ms at {D_f}/{D_b}{alternative}; "
                f"measured at 1/1: {step} | exchange {exchange}; experts α {t['tasks'].compute_alpha * 1e6:.1f} "
                f"µs/call, {t['tasks'].compute_seconds * ms:.3f} ms for all rows")


class PassClock:
    """The clock of one profiling pass: ``ExpertParallel.exchange_and_run(..., clock=this)`` tells it where each
    unpipelined step ends; it adds its two probes (a one-row all-to-all on the layer's exchange, and the experts
    on 1/8 of the rows) and ``sample`` is that pass's row of COLUMNS."""

    def __init__(self, runner, experts, buffer: torch.Tensor, backend):
        self.exchange, self.experts, self.backend = runner.exchange, experts, backend
        self.device, self.width, self.comm = buffer.device, buffer.shape[1], runner.layout.expert
        self.row_bytes = self.width * buffer.element_size()
        self.probe_rows = buffer.new_zeros((self.comm.size, self.width))       # one row to every rank

    def _inter_node_seconds(self) -> float:     # a hierarchical exchange's second phase, 0 for a flat one
        return getattr(self.exchange, "last_phase_seconds", (0.0, 0.0))[1]

    def counted(self, plan) -> None:             # (the counts' exchange also lines the ranks up for the clock)
        P = self.comm.size
        self.plan, self.start = plan, wall_clock(self.device)
        self.exchange.alltoallv(self.probe_rows, [1] * P, [1] * P)                   # the probe
        self.probe, self.probe_inter = wall_clock(self.device), self._inter_node_seconds()

    def scattered(self) -> None:
        self.scatter, self.scatter_inter = wall_clock(self.device), self._inter_node_seconds()

    def regrouped(self, expert_rows: torch.Tensor, local_counts: torch.Tensor) -> None:
        rows, small_counts = chunk_rows(local_counts, SMALL_CALL)
        self.small_rows, self.rows = float(len(rows[0])), float(expert_rows.shape[0])
        self.begin = wall_clock(self.device)
        with torch.no_grad():                                          # the small call: 1/8 of the rows
            self.experts(expert_rows.detach()[rows[0].to(self.device)], small_counts[0].to(local_counts.device),
                         self.backend)
        self.small = wall_clock(self.device)

    def computed(self) -> None:
        self.compute = wall_clock(self.device)

    def ungrouped(self, returned: torch.Tensor) -> None:
        self.returned_row_bytes = self.width * returned.element_size()
        self.begin_gather = wall_clock(self.device)

    def gathered(self) -> None:
        self.gather, self.gather_inter = wall_clock(self.device), self._inter_node_seconds()

    def sample(self) -> list[float]:
        plan, P, me = self.plan, self.comm.size, self.comm.rank
        return [self.probe - self.start, (P - 1) * self.row_bytes,
                self.scatter - self.probe, (sum(plan.send_rows) - plan.send_rows[me]) * self.row_bytes,
                self.gather - self.begin_gather,
                (sum(plan.recv_rows) - plan.recv_rows[me]) * self.returned_row_bytes,
                self.small_rows, self.small - self.begin, self.rows, self.compute - self.small,
                self.probe_inter, self.scatter_inter, self.gather_inter, 0.0]


class _Noted(torch.autograd.Function):
    """The identity; its backward calls ``note`` (the profiled layer's backward starts / ends there)."""

    @staticmethod
    def forward(ctx, tensor, note):
        ctx.note = note
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.note()
        return grad, None
