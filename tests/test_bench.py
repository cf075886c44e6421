"""The benchmark scripts run end to end (tiny sizes) and print their tables; no timing is checked."""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_bench_layer_prints_ratios():
    out = run_script("bench_layer.py", "--config", "dispatch", "--tokens", "128", "--experts", "4",
                     "--repeats", "1", "--loop-tokens", "2", "--peak-size", "128", "--device", "cpu")
    for column in ("reference", "numba [grouped_mm]", "torch-sort", "per-token loop", "experts only"):
        assert column in out
    assert "(time / fastest numba)" in out and "ceiling with zero-time dispatch" in out and "of peak" in out


@pytest.mark.slow
def test_bench_dispatch_prints_bandwidth():
    out = run_script("bench_dispatch.py", "--tokens", "256", "--d-model", "32", "--experts", "4", "--repeats", "1",
                     "--device", "cpu")
    for step in ("ranking", "scatter forward", "scatter backward", "combine forward", "combine backward"):
        assert step in out
    assert "GB/s" in out


def test_bench_rejects_a_bad_device():
    result = subprocess.run([sys.executable, str(BENCH / "bench_layer.py"), "--device", "tpu"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "'tpu': allowed are cpu and cuda[:N]" in result.stderr


# The parallel benchmarks launch mpirun / torchrun themselves (2 ranks at most here).
@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["mpi", "torch"])
def test_bench_alltoall_fits_alpha_beta(engine):
    out = run_script("bench_alltoall.py", "--ranks", "2", "--repeats", "1", "--method", "pairwise", "--engine", engine)
    assert f"engine {engine}" in out and "All-to-all (`pairwise`)" in out
    assert "| all points |" in out and "| P = 2 only |" in out


@pytest.mark.mpi
@pytest.mark.slow
def test_bench_scaling_prints_throughput():
    out = run_script("bench_scaling.py", "--ranks", "1", "2", "--steps", "1", "--warmup", "0")
    assert "exchange `alltoallv`" in out and "in MPI (share of step)" in out
    assert "\n| 1 | " in out and "\n| 2 | " in out


@pytest.mark.mpi
@pytest.mark.slow
def test_bench_cost_model_calibrates_and_extrapolates():
    out = run_script("bench_cost_model.py", "--ranks", "1", "2")
    assert "## Calibration on this machine" in out and "## Extrapolation" in out
    assert "| 2 | 2 | 1 | 1 | off | 16 |" in out                 # the tp=2 layout of 2 ranks ran


@pytest.mark.slow
def test_bench_hf_compares_hf_blocks_with_moefy():
    pytest.importorskip("transformers")
    out = run_script("bench_hf.py", "--tokens", "64", "--repeats", "1", "--train-steps", "1")
    for row in ("HF [eager]", "moefy [reference]", "moefy [numba]", "HF's fastest ÷ this", "GEMM peak",
                "the expert GEMMs alone"):
        assert row in out
    assert "after moefy" in out


@pytest.mark.mpi
@pytest.mark.slow
def test_bench_gradient_partitioning_prints_with_and_without():
    out = run_script("bench_gradient_partitioning.py", "--ranks", "2", "--steps", "1", "--warmup", "0", "--n-layer", "1",
                     "--d-model", "32", "--n-head", "2", "--seq-len", "16", "--sequences-per-rank", "2", "--piece-kb", "1")
    assert "| off | 1 |" in out and "| cost model |" in out and "| 1 kB |" in out
    assert "exposed all-reduce" in out and "predicted exposed" in out and "gradient partitioning: " in out


@pytest.mark.mpi
@pytest.mark.slow
def test_bench_schedule_and_shadowing_print_predicted_and_measured():
    out = run_script("bench_schedule.py", "--ranks", "2", "--tokens", "256", "--degrees", "1", "2", "--repeats", "1")
    assert "| D_f | D_b | predicted (ms) | measured (ms) |" in out and "the cost model's choice" in out and "regret" in out
    assert out.count("\n| 1 | ") == 2 and out.count("\n| 2 | ") == 2            # every pair of degrees ran
    out = run_script("bench_shadowing.py", "--ranks", "2", "--skew", "4", "--repeats", "1", "--tokens", "512")
    assert "latency model (ms)" in out and "| 4 | " in out and "| off |" in out and "| on |" in out
