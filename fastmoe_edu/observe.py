"""See what the system does: TensorBoard figures of a training run, and measured timelines of its steps.

    python -m fastmoe_edu.train                              # event files in out/tensorboard/ (--tensorboard=false: none)
    tensorboard --logdir out                                 # then open http://localhost:6006
    mpirun -n 4 python -m fastmoe_edu.train --pipeline_degree=2 --profile_steps=5:5
                                                             # out/traces/rank-0000N.json, merged into out/trace.json
    python -m fastmoe_edu.observe merge out/traces           # merge per-rank traces again (-> out/trace.json)
    python -m fastmoe_edu.observe draw out/trace.json t.png  # the named ranges as a Gantt chart, a band per rank

Three parts:

* named ranges (profiling.py: a ``torch.profiler.record_function`` while a profiler records, nothing
  otherwise). The MoE layer (``moe/route``, ``moe/rank``, ``moe/scatter``, ``moe/experts``, ``moe/combine``),
  the expert exchange (``ep/...``), each pipelined chunk (``pipeline/forward chunk 1 send``, ``... receive``,
  ``... experts``, ``... send back``, ``... receive back``; the same for ``backward``), each gradient piece
  (``gradients/piece 0 post``, ``... wait``), each recomputation (``recompute/block``) and every collective
  (``expert/alltoallv``, ``data/allreduce_gradients``, ...: stats.py) open one.
* :class:`Observer`, what train.py calls around each step. Every ``tensorboard_interval`` steps the main
  rank writes the step's figures; ``--profile_steps=A:B`` records steps A to B (numbered from 1, as the
  history) with torch.profiler, one Chrome/Perfetto trace per rank, and the main rank merges them.
* :func:`merge_traces` and :func:`draw_trace`: one trace with a track (pid) per rank, and its picture.

TensorBoard tags (every figure is global: the losses and counts of the whole batch, as history.json's):

    train/loss, lm_loss, aux_loss, lr, grad_norm, tokens_per_sec (and loss_scale with dtype=float16)
    val/loss, val/loss_<language>
    moe/layer_<i>/tokens_per_expert   histogram: x = expert index, height = tokens routed to it
    moe/layer_<i>/imbalance, tokens_dropped    max ÷ mean tokens per expert; assignments over capacity
    communication/<kind>_bytes, <kind>_seconds  kind = all_to_all, all_gather, all_reduce; per step, bytes
                                                summed over ranks, seconds averaged over ranks
    communication/exposed_seconds               time a rank spends blocked in any collective (or in the
                                                wait of a non-blocking one), per step, averaged over ranks

The communication figures exist under parallelism only (one process sends nothing). A non-blocking
collective's wait counts as the kind posted on its communicator. The observer's own gather of the
counters (once per logged step) is left out of them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

TENSORBOARD_DIR, TRACE_DIR, MERGED_TRACE = "tensorboard", "traces", "trace.json"
KINDS = {"all_to_all": ("alltoall", "pairwise"), "all_gather": ("allgather",), "all_reduce": ("allreduce",)}
OWN_GATHER = "allgather_observe"          # the observer's gather of the counters: not counted


def parse_profile_steps(text: str) -> tuple[int, int]:
    """``"A:B"`` -> (A, B), the first and last profiled step (1-based, inclusive); ValueError if malformed."""
    first, colon, last = text.partition(":")
    try:
        steps = int(first), int(last if colon else first)
    except ValueError:
        raise ValueError(f"profile_steps={text!r} must be A:B, the first and last step to profile, e.g. 5:6") from None
    if not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"profile_steps={text!r} must have 1 <= A <= B (steps are numbered from 1)")
    return steps


def collective_kind(key: str, keys) -> str | None:
    """The kind (of KINDS) of the counter ``"<communicator>/<operation>"``; None for broadcasts and barriers.

    A ``wait`` is an all-to-all where its communicator posted one, else an all-reduce (gradient pieces)."""
    comm, operation = key.split("/", 1)
    if operation == "wait":
        posted = [collective_kind(k, ()) for k in keys if k.startswith(comm + "/") and k != key]
        return "all_to_all" if "all_to_all" in posted else "all_reduce"
    return next((kind for kind, words in KINDS.items() if any(word in operation for word in words)), None)


class Observer:
    """TensorBoard figures and profiled steps of one run; every rank makes the same calls at the same steps.

    ``start_step``: the steps already done (a resumed run; later events of an earlier run are discarded).
    ``say``: prints on the main rank (where the merged trace went).
    """

    def __init__(self, cfg, rt, start_step: int, say=print):
        self.cfg, self.rt, self.say = cfg, rt, say
        self.layout = getattr(rt, "layout", None)                     # None: one process, nothing is sent
        self.writer = None
        if cfg.tensorboard and rt.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(cfg.out_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)
        self.window = parse_profile_steps(cfg.profile_steps) if cfg.profile_steps else None
        self.profiler = None
        self.counted, self.counted_at = self._counters(), start_step  # this rank's counters at the last log

    # -- what train.py calls ----------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Before step ``step`` (0-based): start the profiler at the window's first step."""
        if self.window is not None and step + 1 == self.window[0]:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(self.cfg.device).type
                                                   == "cuda" else [])
            self.profiler = profile(activities=activities)
            self.profiler.start()

    def end_step(self, record: dict) -> None:
        """After a step: its figures every ``tensorboard_interval`` steps; the traces after the window's last step."""
        done = record["step"]
        if self.profiler is not None and done == self.window[1]:
            self._write_traces()
        if self.cfg.tensorboard and done % self.cfg.tensorboard_interval == 0:
            self._log_step(record)

    def log_val(self, step: int, val_loss: float, per_language: dict) -> None:
        if self.writer is not None:
            self.writer.add_scalar("val/loss", val_loss, step)
            for language, loss in per_language.items():
                self.writer.add_scalar(f"val/loss_{language}", loss, step)

    def close(self) -> None:
        """End of the run: the traces of a window it stopped inside, and the event file's last figures."""
        if self.profiler is not None:
            self._write_traces()
        if self.writer is not None:
            self.writer.close()

    # -- TensorBoard ----------------------------------------------------------------------------------
    def _log_step(self, record: dict) -> None:
        step, communication = record["step"], self._communication_per_step(record["step"])
        if self.writer is None:
            return
        add = self.writer.add_scalar
        for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_sec"):
            add(f"train/{key}", record[key], step)
        if self.cfg.dtype == "float16":
            add("train/loss_scale", record["loss_scale"], step)
        for i, (tokens, dropped) in enumerate(zip(record["tokens_per_expert"], record["tokens_dropped"])):
            counts = torch.tensor(tokens, dtype=torch.float64)
            experts = torch.arange(len(tokens), dtype=torch.float64)
            self.writer.add_histogram_raw(f"moe/layer_{i}/tokens_per_expert", min=0, max=len(tokens) - 1,
                                          num=int(counts.sum()), sum=float((experts * counts).sum()),
                                          sum_squares=float((experts ** 2 * counts).sum()),
                                          bucket_limits=(experts + 0.5).tolist(), bucket_counts=tokens, global_step=step)
            add(f"moe/layer_{i}/imbalance", float(counts.max() / counts.mean().clamp(min=1e-9)), step)
            add(f"moe/layer_{i}/tokens_dropped", dropped, step)
        for tag, value in communication.items():
            add(f"communication/{tag}", value, step)

    def _counters(self) -> torch.Tensor | None:
        """This rank's communication so far: [bytes, seconds] of each kind, then all seconds (float64)."""
        if self.layout is None:
            return None
        counters = {key: c for key, c in self.layout.stats.counters.items() if not key.endswith("/" + OWN_GATHER)}
        kinds = {key: collective_kind(key, counters) for key in counters}
        figures = [sum(getattr(c, field) for key, c in counters.items() if kinds[key] == kind)
                   for kind in KINDS for field in ("bytes_sent", "seconds")]
        return torch.tensor(figures + [sum(c.seconds for c in counters.values())], dtype=torch.float64)

    def _communication_per_step(self, step: int) -> dict:
        """Since the last log, per step: bytes summed over all ranks, seconds averaged (a collective: every rank)."""
        if self.layout is None:
            return {}
        now = self._counters()
        mine, self.counted, steps, self.counted_at = now - self.counted, now, step - self.counted_at, step
        every = self.layout.world.allgather(mine / steps, purpose=OWN_GATHER).reshape(self.layout.world.size, -1)
        total, mean = every.sum(0).tolist(), every.mean(0).tolist()
        figures = {}
        for i, kind in enumerate(KINDS):
            figures[f"{kind}_bytes"], figures[f"{kind}_seconds"] = total[2 * i], mean[2 * i + 1]
        figures["exposed_seconds"] = mean[-1]
        return figures

    # -- traces ---------------------------------------------------------------------------------------
    def _write_traces(self) -> None:
        self.profiler.stop()
        folder = Path(self.cfg.out_dir) / TRACE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(folder / f"rank-{self.rt.rank:05d}.json"))
        self.profiler = None
        self.rt.barrier()                                             # every rank's file is complete
        if self.rt.is_main:
            merged = merge_traces(folder, ranks=self.rt.world_size)
            self.say(f"profile of steps {self.window[0]}-{self.window[1]}: {folder}/rank-*.json, merged into "
                     f"{merged} (a track per rank; open it in https://ui.perfetto.dev or chrome://tracing)")


# --------------------------------------------------------------------------------------------------
# traces: merging and drawing
# --------------------------------------------------------------------------------------------------

def merge_traces(folder, output=None, ranks: int | None = None) -> Path:
    """The per-rank traces ``folder/rank-NNNNN.json`` (all of them, or ranks 0 .. ranks-1) as one trace:
    rank r's events on track (pid) r, named "rank r", on one clock starting at 0. Written to ``output``
    (default: ``trace.json`` beside the folder); returns its path."""
    folder = Path(folder)
    paths = (sorted(folder.glob("rank-*.json")) if ranks is None
             else [folder / f"rank-{r:05d}.json" for r in range(ranks)])
    if not paths:
        raise FileNotFoundError(f"no per-rank traces (rank-NNNNN.json) in {folder}")
    traces = {int(path.stem.split("-")[1]): json.loads(path.read_text()) for path in paths}

    def clock(trace):   # µs to add to a trace's ts: Kineto's ts count from baseTimeNanoseconds, per process
        return trace.get("baseTimeNanoseconds", 0) / 1e3
    start = min(clock(trace) + event["ts"] for trace in traces.values() for event in trace["traceEvents"]
                if event.get("ph") != "M" and "ts" in event)
    events = []
    for rank, trace in traces.items():
        shift = clock(trace) - start
        events += [{"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}},
                   {"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}}]
        for event in trace["traceEvents"]:
            if event.get("ph") == "M" and event["name"].startswith("process_"):
                continue                                              # replaced by the rank's name above
            event = {**event, "pid": rank}
            if "ts" in event:
                event["ts"] += shift
            if "id" in event:                                         # flow ids: unique per rank
                event["id"] = f"{rank}:{event['id']}"
            events.append(event)
    output = Path(output) if output is not None else folder.parent / MERGED_TRACE
    output.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return output


def named_ranges(trace: dict) -> list[tuple[int, str, float, float]]:
    """The named ranges (record_function) of a merged trace: (rank, name, start ms, end ms), by rank and
    start, an enclosing range before the ranges inside it."""
    ranges = [(e["pid"], e["name"], e["ts"] / 1e3, (e["ts"] + e["dur"]) / 1e3) for e in trace["traceEvents"]
              if e.get("cat") == "user_annotation" and e.get("ph") == "X"]
    return sorted(ranges, key=lambda r: (r[0], r[2], -r[3]))


#: colour of a range: the first of these words in its name decides (a collective's name has "all" in it)
COLOURS = (("receive", "tab:red"), ("wait", "tab:red"), ("all", "tab:red"), ("send", "tab:orange"),
           ("experts", "tab:green"), ("gradients/", "tab:purple"), ("recompute", "tab:grey"), ("moe/", "tab:blue"),
           ("", "tab:olive"))
LEGEND = {"tab:red": "waiting for data / in a collective", "tab:orange": "posting a send", "tab:green": "experts",
          "tab:blue": "layer steps", "tab:purple": "gradient piece", "tab:grey": "recomputation", "tab:olive": "other"}


def draw_trace(ax, trace: dict, start_ms: float = 0.0, end_ms: float | None = None, prefixes=("",)) -> None:
    """A Gantt chart of a merged trace's named ranges whose names start with one of ``prefixes``, between
    ``start_ms`` and ``end_ms``: a band per rank, a row per nesting depth inside it (collectives sit under
    the step that called them), coloured by COLOURS, with a legend."""
    from matplotlib.patches import Patch
    ranges = [r for r in named_ranges(trace) if r[1].startswith(tuple(prefixes))
              and r[3] >= start_ms and (end_ms is None or r[2] <= end_ms)]
    rows, depth_of, open_ends = {}, [], {}
    for rank, name, start, end in ranges:                         # depth: how many ranges still open around it
        stack = [e for e in open_ends.get(rank, []) if e > start]
        depth_of.append(len(stack))
        open_ends[rank] = stack + [end]
        rows[rank] = max(rows.get(rank, 0), len(stack) + 1)
    base, y = {}, 0
    for rank in sorted(rows):
        base[rank], y = y, y + rows[rank] + 0.5
    groups = {}
    for (rank, name, start, end), depth in zip(ranges, depth_of):
        colour = next(c for word, c in COLOURS if word in name)
        groups.setdefault((base[rank] + depth, colour), []).append((start, end - start))
    for (row, colour), spans in groups.items():
        ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=colour, edgecolor="black", linewidth=0.3)
    shown = {colour for _, colour in groups}
    ax.legend(handles=[Patch(color=c, label=label) for c, label in LEGEND.items() if c in shown], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_yticks([base[r] for r in sorted(rows)], [f"rank {r}" for r in sorted(rows)])
    ax.set_ylim(y - 0.5, -0.7)
    ax.set_xlim(start_ms, end_ms if end_ms is not None else max((r[3] for r in ranges), default=1.0))
    ax.set_xlabel("ms")


def main(argv: list[str] | None = None) -> None:
    """``merge FOLDER [--output FILE]`` or ``draw TRACE PNG [--start MS] [--end MS] [--title TEXT]``."""
    parser = argparse.ArgumentParser(prog="python -m fastmoe_edu.observe", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge the per-rank traces rank-NNNNN.json of a folder into one")
    merge.add_argument("folder")
    merge.add_argument("--output", help="the merged trace (default: trace.json beside the folder)")
    draw = commands.add_parser("draw", help="draw a merged trace's named ranges as a Gantt chart (PNG)")
    draw.add_argument("trace")
    draw.add_argument("png")
    draw.add_argument("--start", type=float, default=0.0, help="first millisecond shown")
    draw.add_argument("--end", type=float, help="last millisecond shown (default: the end)")
    draw.add_argument("--title", help="the picture's title (default: the trace's path)")
    args = parser.parse_args(argv)
    if args.command == "merge":
        print(merge_traces(args.folder, args.output))
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    trace = json.loads(Path(args.trace).read_text())
    fig, ax = plt.subplots(figsize=(14, 7))
    draw_trace(ax, trace, args.start, args.end)
    ax.set_title(args.title or f"named ranges of {args.trace}, a band per rank (rendered from the trace)", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(args.png)


if __name__ == "__main__":
    main()
