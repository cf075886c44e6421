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
