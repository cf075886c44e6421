"""bench/gpu_suite.sh --smoke runs end to end on this CPU-only machine, so the GPU suite does not rot.

The suite runs on a GPU only in the sessions that are lent one; here its --smoke mode runs every step
at tiny sizes (about a minute on 2 cores). No number is checked: the summary shows them.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
STEPS = ("install", "versions", "tests_gpu", "tests_backends", "cudasim_kernels", "dispatch", "gpu_kernels",
         "layer_bfloat16",
         "layer_float32", "train_default_reference", "train_default_numba", "train_large_reference",
         "train_large_numba", "train_large_bf16_reference", "train_large_bf16_numba", "alltoall", "scaling",
         "cost_model")


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_suite_smoke_runs_every_step(tmp_path):
    out = tmp_path / "suite"
    # The whole-suite deadline (150 s by default with --smoke) is for a device's limited time; here every step must
    # run, so it gets the test's own limit: on a fresh clone numba compiles every kernel once, and CI's 2 cores
    # took 146 s, a step short of the default.
    env = dict(os.environ, PYTHON=sys.executable, SUITE_BUDGET_S="270")
    done = subprocess.run(["bash", str(SUITE), str(out), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else "(no summary.txt)"
    assert done.returncode == 0, f"{summary}\n--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-2000:]}"
    assert done.stdout.rstrip().endswith(summary.rstrip())                    # the summary is printed last
    assert "torch" in (out / "versions.txt").read_text()
    steps = {line.split("\t")[0]: line.split("\t")[1] for line in (out / "steps.tsv").read_text().splitlines()}
    assert tuple(steps) == STEPS
    assert all(status in ("ok", "skipped") for status in steps.values()), steps
    for name in STEPS:
        assert name in summary
    report = json.loads((out / "summary.json").read_text())
    assert report["suite"]["mode"] == "smoke" and report["suite"]["elapsed_s"] <= report["suite"]["budget_s"]
    layer = json.loads((out / "layer_float32.json").read_text())
    assert [row["config"] for row in layer["rows"]] == ["dispatch", "fastmoe", "qwen3"]
    assert (out / "train" / "train_default_numba" / "history.json").exists()
    assert (out / "results.tar.gz").stat().st_size > 0
    # bench/gpu_kernels.py --smoke (its step, in numba's CUDA simulator): every copy kernel variant (element / warp /
    # block per row, 4/8/16-byte words) copies exactly, then it says there is no GPU (and exits 0: the step is ok).
    kernels = (out / "logs" / "gpu_kernels.log").read_text()
    assert kernels.count(": exact") == 9 and "no GPU here" in kernels, kernels


def test_gpu_suite_prints_its_usage():
    done = subprocess.run(["bash", str(SUITE)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage: " in done.stderr and "OUT_DIR [--smoke]" in done.stderr


def test_summary_reads_the_benchmarks_output(tmp_path):
    """The headline parsers against the scripts' printed formats (as of this writing)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_suite_summary as summary
    finally:
        sys.path.pop(0)
    dispatch = ("scatter forward                 0.1 |     0.06ms     0.08ms     0.04ms     0.01ms     0.00ms |"
                "      0.8x       0.5x |          1.3   13.9   0.09")
    assert summary.dispatch_headline(dispatch) == ["numba GB/s ÷ copy_ GB/s: scatter fwd 0.09 (copy_ up to 14 GB/s)"]
    assert summary.alltoall_headline("| all points | 44.8 | 0.520 | 1.92 |")[0].startswith("alpha 44.8 us")
    scaling = "| 1 | 2 | 39.6 | 51,671 | 1.00× | 0% |\n| 2 | 1 | 40.8 | 50,203 | 0.97× | 13% |"
    assert summary.scaling_headline(scaling) == ["tokens/s by ranks: P=1 51,671 (1.00x), P=2 50,203 (0.97x)"]
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"train": [{"tokens_per_sec": r} for r in (10, 100, 200, 300, 400)]}))
    assert summary.tokens_per_sec(history) == 250                              # the first fifth left out
    assert summary.layer_headline(None) == [] and summary.junit_headline(tmp_path / "missing.xml") == []


def test_gpu_kernels_refuses_without_a_gpu():
    """bench/gpu_kernels.py without --smoke on a CPU-only machine refuses (exit 1), so a GPU run that lost its GPU
    cannot pass for a measurement. (Its --smoke run, the copy kernels in numba's CUDA simulator, is the suite's
    gpu_kernels step: test_gpu_suite_smoke_runs_every_step checks its output.)"""
    script = ROOT / "bench" / "gpu_kernels.py"
    if _torch_sees_a_gpu():
        pytest.skip("a GPU is here: without --smoke it would run the whole measurement")
    plain = {key: value for key, value in os.environ.items() if key != "NUMBA_ENABLE_CUDASIM"}
    refused = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=plain, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1 and "needs an NVIDIA GPU" in refused.stdout


def _torch_sees_a_gpu() -> bool:
    import torch
    return torch.cuda.is_available()
