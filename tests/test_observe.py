"""Seeing what the system does (observe.py): TensorBoard event files read back with TensorBoard's own reader,
and the profiler's merged trace, in one process and on 2 ranks under mpirun and torchrun."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fastmoe_edu.config import ConfigError, parse_args
from fastmoe_edu.observe import MERGED_TRACE, TENSORBOARD_DIR, TRACE_DIR, collective_kind, named_ranges
from fastmoe_edu.train import train
from launcher import launch

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--batch_size=4", "--seq_len=16", "--n_layer=1", "--d_model=16", "--n_head=2", "--d_hidden=32",
        "--num_experts=4", "--eval_iters=1", "--sample_tokens=0", "--checkpoint_interval=0",
        "--tensorboard_interval=1"]
TRAIN_TAGS = {f"train/{key}" for key in ("loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_sec")}
MOE_TAGS = {"moe/layer_0/imbalance", "moe/layer_0/tokens_dropped"}
COMMUNICATION_TAGS = {f"communication/{kind}_{unit}" for kind in ("all_to_all", "all_gather", "all_reduce")
                      for unit in ("bytes", "seconds")} | {"communication/exposed_seconds"}
LAYER_RANGES = {f"moe/{step}" for step in ("route", "capacity", "count", "rank", "scatter", "experts", "combine")}
# With pipeline_degree=2, gradient_partitioning and activation_checkpointing on 2 ranks:
PARALLEL_RANGES = LAYER_RANGES | {f"pipeline/{p} chunk {c} {what}" for p in ("forward", "backward") for c in (0, 1)
                                  for what in ("send", "receive", "experts", "send back", "receive back")} | {
    "gradients/piece 0 post", "gradients/piece 0 wait", "recompute/block", "expert/alltoall", "expert/ialltoallv",
    "expert/wait", "data_gradients/allreduce_gradients", "data_gradients/wait"}


def scalars(out_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], EventAccumulator]:
    """Every scalar of the run's event files, as TensorBoard reads them (tag -> [(step, value)]), and the reader."""
    events = EventAccumulator(str(out_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}, events


def ranges_by_rank(out_dir: Path) -> dict[int, set[str]]:
    trace = json.loads((out_dir / MERGED_TRACE).read_text())          # valid JSON
    found = {}
    for rank, name, start, end in named_ranges(trace):
        assert 0 <= start <= end
        found.setdefault(rank, set()).add(name)
    return found


def test_profile_steps_option():
    assert parse_args(["--profile_steps=2:3", "--max_steps=5"]).profile_steps == "2:3"
    for bad, message in (("3:2", "1 <= A <= B"), ("0:1", "1 <= A <= B"), ("a:b", "must be A:B"),
                         ("2:9", "ends after max_steps=5")):
        with pytest.raises(ConfigError, match=message):
            parse_args([f"--profile_steps={bad}", "--max_steps=5"])


def test_collective_kinds():
    keys = ["expert/alltoall", "expert/ialltoallv", "expert/wait", "data_gradients/allreduce_gradients",
            "data_gradients/wait", "tensor/allgather", "world/bcast"]
    assert [collective_kind(k, keys) for k in keys] == ["all_to_all", "all_to_all", "all_to_all", "all_reduce",
                                                        "all_reduce", "all_gather", None]


def test_one_process(tmp_path):
    """Every figure of every step, equal to history.json's; the trace of steps 2-3 with every layer step."""
    result = train(parse_args([f"--out_dir={tmp_path}", *TINY, "--progress=false", "--max_steps=4",
                               "--eval_interval=2", "--capacity_factor=1.0", "--profile_steps=2:3"]))
    figures, events = scalars(tmp_path)
    assert set(figures) == TRAIN_TAGS | MOE_TAGS | {"val/loss", "val/loss_counting", "val/loss_dyck"}
    history = result["history"]["train"]
    for key in ("loss", "lr", "grad_norm", "aux_loss"):
        assert figures[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in history]
    assert figures["moe/layer_0/tokens_dropped"] == [(r["step"], r["tokens_dropped"][0]) for r in history]
    assert sum(value for _, value in figures["moe/layer_0/tokens_dropped"]) > 0   # cf 1.0 drops some
    assert figures["val/loss"] == [(v["step"], pytest.approx(v["val_loss"], rel=1e-6)) for v in result["history"]["val"]]
    histograms = events.Histograms("moe/layer_0/tokens_per_expert")
    assert [h.histogram_value.bucket for h in histograms] == [r["tokens_per_expert"][0] for r in history]
    assert [p.name for p in (tmp_path / TRACE_DIR).iterdir()] == ["rank-00000.json"]
    assert set(ranges_by_rank(tmp_path)) == {0} and LAYER_RANGES <= ranges_by_rank(tmp_path)[0]

    train(parse_args([f"--out_dir={tmp_path / 'off'}", *TINY, "--progress=false", "--max_steps=1",
                      "--tensorboard=false"]))
    assert not (tmp_path / "off" / TENSORBOARD_DIR).exists() and not (tmp_path / "off" / MERGED_TRACE).exists()


@pytest.mark.mpi
def test_two_ranks_under_mpirun_and_torchrun(tmp_path):
    """The same figures from both engines (losses to rounding, bytes exactly); every named range on both ranks."""
    figures = {}
    for engine in ("mpi", "torch"):
        out = tmp_path / engine
        args = ["-m", "fastmoe_edu.train", f"--out_dir={out}", *TINY, "--max_steps=3", "--eval_interval=0",
                "--pipeline_degree=2", "--gradient_partitioning=true", "--activation_checkpointing=true",
                "--profile_steps=2:2"]
        done = launch(engine, 2, args, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert f"merged into {out / MERGED_TRACE}" in done.stdout
        found = ranges_by_rank(out)
        assert set(found) == {0, 1}
        for rank, names in found.items():
            assert PARALLEL_RANGES <= names, (engine, rank, sorted(PARALLEL_RANGES - names))
        figures[engine], _ = scalars(out)
        assert set(figures[engine]) == TRAIN_TAGS | MOE_TAGS | COMMUNICATION_TAGS | {"val/loss", "val/loss_counting",
                                                                                    "val/loss_dyck"}
        assert all(value > 0 for _, value in figures[engine]["communication/exposed_seconds"])
    for tag in ("train/loss", "train/grad_norm", "moe/layer_0/imbalance", "val/loss"):
        assert figures["torch"][tag] == [(s, pytest.approx(v, rel=1e-5)) for s, v in figures["mpi"][tag]], tag
    for tag in ("all_to_all_bytes", "all_gather_bytes", "all_reduce_bytes"):
        assert figures["torch"][f"communication/{tag}"] == figures["mpi"][f"communication/{tag}"], tag
    assert all(value > 0 for _, value in figures["mpi"]["communication/all_to_all_bytes"])

    # The merge command rebuilds the same merged trace from the per-rank files.
    merged = tmp_path / "mpi" / MERGED_TRACE
    written = merged.read_text()
    merged.unlink()
    subprocess.run([sys.executable, "-m", "fastmoe_edu.observe", "merge", str(tmp_path / "mpi" / TRACE_DIR)],
                   check=True, capture_output=True)
    assert merged.read_text() == written


def test_bench_observe_prints_the_ratio():
    """bench/bench_observe.py runs (one timed step each) and prints on ÷ off and the idle ranges' cost."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_observe.py"
    done = subprocess.run([sys.executable, str(bench), "--steps", "1", "--warmup", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on ÷ off = " in done.stdout
    assert "named ranges with no profiler: 14 per step" in done.stdout    # 7 layer steps × 2 MoE layers
