"""Helpers of bench/gpu_suite.sh: the versions file, the launcher choice, and the final summary.

    python bench/gpu_suite_summary.py versions            # python, torch, CUDA device, numba, ... (stdout)
    python bench/gpu_suite_summary.py launcher            # "mpi" or "torch" (stdout), the reason (stderr)
    python bench/gpu_suite_summary.py summary OUT_DIR     # OUT_DIR/summary.txt and summary.json, printed

The summary reads what the suite left in OUT_DIR: steps.tsv (one line per step: name, status, exit
status, seconds, budget, log, note), the logs, the JUnit XML of the tests, the JSON of
bench_layer.py and bench_cost_model.py, and the history.json of each training run; it extracts one
or a few headline numbers per step. Anything missing or unparsable leaves that headline empty: the
summary never fails because a step did.

Standard library only at import time (torch is imported by ``versions`` alone).
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


# ----------------------------------------------------------------------------------------------------
# versions / launcher
# ----------------------------------------------------------------------------------------------------
def package_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions() -> None:
    import os
    import platform
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"platform {platform.platform()}, {os.cpu_count()} CPUs")
    try:
        import torch
        print(f"torch {torch.__version__} (CUDA build {torch.version.cuda})")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            print(f"CUDA device: {torch.cuda.get_device_name(0)}, capability {props.major}.{props.minor}, "
                  f"{props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)")
        else:
            print("CUDA device: none (torch.cuda.is_available() is False)")
    except Exception as error:
        print(f"torch: does not import ({error})")
    for name in ("numba", "numba-cuda", "mpi4py", "transformers", "pytest", "fastmoe_edu"):
        print(f"{name} {package_version(name)}")
    try:
        import numba.cuda
        print(f"numba.cuda.is_available() = {numba.cuda.is_available()}")
    except Exception as error:
        print(f"numba.cuda: does not import ({error})")
    try:
        import fastmoe_edu
        print(f"fastmoe_edu imported from {Path(fastmoe_edu.__file__).parent}")
    except Exception as error:
        print(f"fastmoe_edu: does not import ({error})")
    print(f"MPI: {mpi_status()[1]}")


def mpi_status() -> tuple[bool, str]:
    """(usable, why): an mpirun the project's launcher finds, and an MPI library mpi4py can load."""
    try:
        from fastmoe_edu.distributed.launch import mpirun_path
        path = mpirun_path()
    except Exception as error:
        return False, f"no mpirun ({error})"
    try:
        import mpi4py
        mpi4py.rc.initialize = False               # load the library only, no MPI_Init outside mpirun
        from mpi4py import MPI
        library = MPI.Get_library_version().splitlines()[0].strip()
    except Exception as error:
        return False, f"mpirun at {path}, but mpi4py cannot load an MPI library ({error})"
    return True, f"mpirun {path}, {library}"


def launcher() -> None:
    usable, why = mpi_status()
    print("mpi" if usable else "torch")
    print(why if usable else f"{why}: the multi-rank benchmarks use torchrun (python -m torch.distributed.run)",
          file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# headline numbers, one function per kind of output
# ----------------------------------------------------------------------------------------------------
def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_headline(path: Path) -> list[str]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    line = f"{passed} passed, {total['failures'] + total['errors']} failed, {total['skipped']} skipped"
    failed = [case.get("name") for s in suites for case in s.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return [line] + ([f"failed: {', '.join(failed[:5])}" + (" ..." if len(failed) > 5 else "")] if failed else [])


DISPATCH_ROW = re.compile(r"^(ranking \(count \+ positions\)|scatter forward|scatter backward|combine forward|"
                          r"combine backward)\s.*\|\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
DISPATCH_SHORT = {"ranking (count + positions)": "ranking", "scatter forward": "scatter fwd",
                  "scatter backward": "scatter bwd", "combine forward": "combine fwd", "combine backward": "combine bwd"}


def dispatch_headline(log: str) -> list[str]:
    found = [m.groups() for m in map(DISPATCH_ROW.match, log.splitlines()) if m]
    if not found:
        return []
    ratios = ", ".join(f"{DISPATCH_SHORT[name]} {float(ratio):.2f}" for name, _, _, ratio in found)
    copy_rate = max(float(copy) for _, _, copy, _ in found)
    return [f"numba GB/s ÷ copy_ GB/s: {ratios} (copy_ up to {copy_rate:.0f} GB/s)"]


def cudasim_headline(log: str) -> list[str]:
    """tests/cudasim_check.py prints {case: null or the error} as its last line."""
    try:
        results = json.loads(log.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return []
    failed = [case for case, error in results.items() if error is not None]
    return [f"{len(results) - len(failed)} of {len(results)} cases passed in numba's CUDA simulator"
            + (f"; failed: {', '.join(failed)}" if failed else "")]


def layer_headline(report) -> list[str]:
    if not report:
        return []
    lines = []
    for row in report.get("rows", []):
        try:
            numba = min(row["numba [segments]"], row["numba [grouped_mm]"])
            tflops = row["gemm_flops"] / numba / 1e12
            parts = [f"{row['config']}: numba {numba * 1e3:.1f} ms = {tflops:.2f} TFLOP/s "
                     f"({tflops * 1e12 / report['peak_flops']:.2f} of peak)",
                     f"ref ÷ numba {row['reference'] / numba:.2f}x", f"torch-sort ÷ numba {row['torch-sort'] / numba:.2f}x"]
            parts += [f"{column.replace('HF Mixtral ', 'HF ')} ÷ numba {row[column] / numba:.2f}x"
                      for column in row if column.startswith("HF Mixtral [")]
        except (KeyError, TypeError, ZeroDivisionError):
            continue
        lines.append("; ".join(parts))
    return lines


def tokens_per_sec(history_path: Path) -> float | None:
    """Median tokens/s over the steps after the first fifth (at least 1 step: compilation, warm-up)."""
    history = read_json(history_path)
    if not history:
        return None
    rates = [record["tokens_per_sec"] for record in history.get("train", []) if "tokens_per_sec" in record]
    rates = rates[max(1, len(rates) // 5):] or rates
    return statistics.median(rates) if rates else None


def alltoall_headline(log: str) -> list[str]:
    match = re.search(r"^\| all points \| ([\d.,]+) \| ([\d.,]+) \| ([\d.,]+) \|", log, re.MULTILINE)
    if not match:
        return []
    alpha, beta, rate = (x.replace(",", "") for x in match.groups())
    return [f"alpha {alpha} us per peer, beta {beta} ns/byte ({rate} GB/s), fitted on all points"]


def scaling_headline(log: str) -> list[str]:
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.,]+) \| ([\d,]+) \| ([\d.]+)×", log, re.MULTILINE)
    if not rows:
        return []
    return ["tokens/s by ranks: " + ", ".join(f"P={p} {int(rate.replace(',', '')):,} ({speedup}x)"
                                              for p, _, _, rate, speedup in rows)]


def cost_model_headline(log: str) -> list[str]:
    lines = []
    for label in ("a-priori", "per-P fitted"):
        match = re.search(rf"^{label}.*?mean \|error\| (\d+%), worst (\d+%)", log, re.MULTILINE)
        if match:
            lines.append(f"{label}: mean |error| {match.group(1)}, worst {match.group(2)}")
    return ["; ".join(lines)] if lines else []


def versions_headline(text: str) -> list[str]:
    wanted = ("python ", "torch ", "CUDA device", "numba ", "numba-cuda ", "transformers ", "MPI:")
    picked = [line.strip() for line in text.splitlines() if line.startswith(wanted)]
    short = [line.split(" (")[0] if not line.startswith(("CUDA device", "MPI:")) else line for line in picked]
    return [" | ".join(short)] if short else []


# ----------------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------------
def read_steps(out: Path) -> list[dict]:
    steps = []
    for line in read_text(out / "steps.tsv").splitlines():
        fields = line.split("\t")
        if len(fields) >= 7:
            name, status, rc, seconds, budget, log, note = fields[:7]
            steps.append(dict(name=name, status=status, rc=rc, seconds=float(seconds or 0), budget=budget,
                              log=log, note=note))
    return steps


def headline(out: Path, step: dict) -> list[str]:
    name, log = step["name"], read_text(out / step["log"]) if step["log"] else ""
    if name == "cudasim_kernels":
        return cudasim_headline(log)
    if name.startswith("tests_"):
        return junit_headline(out / f"{name}.xml")
    if name == "dispatch":
        return dispatch_headline(log)
    if name.startswith("layer_"):
        return layer_headline(read_json(out / f"{name}.json"))
    if name.startswith("train_"):
        rate = tokens_per_sec(out / "train" / name / "history.json")
        return [f"{rate:,.0f} tokens/s (median after warm-up)"] if rate else []
    if name == "alltoall":
        return alltoall_headline(log)
    if name == "scaling":
        return scaling_headline(log)
    if name == "cost_model":
        return cost_model_headline(log)
    return []


def train_ratios(out: Path) -> list[str]:
    lines = []
    for size in ("default", "large", "large_bf16"):
        ref = tokens_per_sec(out / "train" / f"train_{size}_reference" / "history.json")
        numba = tokens_per_sec(out / "train" / f"train_{size}_numba" / "history.json")
        if ref and numba:
            lines.append(f"training tokens/s, {size} model: numba ÷ reference = {numba / ref:.2f}x")
    for backend in ("reference", "numba"):
        fp32 = tokens_per_sec(out / "train" / f"train_large_{backend}" / "history.json")
        bf16 = tokens_per_sec(out / "train" / f"train_large_bf16_{backend}" / "history.json")
        if fp32 and bf16:
            lines.append(f"training tokens/s, large model, {backend}: bfloat16 ÷ float32 = {bf16 / fp32:.2f}x")
    return lines


def summary(out: Path) -> str:
    steps = read_steps(out)
    meta = read_json(out / "suite.json") or {}
    lines = [f"GPU suite ({meta.get('mode', '?')} mode) in {out}: {meta.get('elapsed_s', '?')} s "
             f"of a {meta.get('budget_s', '?')} s budget; launcher for the multi-rank steps: {meta.get('launcher', '?')}"]
    lines += versions_headline(read_text(out / "versions.txt"))
    lines.append(f"{'step':26s} {'status':8s} {'time':>6s}  headline")
    records = []
    for step in steps:
        numbers = headline(out, step)
        status = step["status"] if step["status"] != "failed" else f"FAILED({step['rc']})"
        if step["status"] == "timeout":
            status = "TIMEOUT"
        first = numbers[0] if numbers else step["note"]
        lines.append(f"{step['name']:26s} {status:8s} {step['seconds']:5.0f}s  {first}")
        rest = numbers[1:] + ([step["note"]] if numbers and step["note"] else [])
        lines += [f"{'':42s} {extra}" for extra in rest]
        records.append({**step, "headline": numbers})
    lines += train_ratios(out)
    counts = {status: sum(s["status"] == status for s in steps) for status in ("ok", "failed", "timeout", "skipped")}
    lines.append(f"steps: {counts['ok']} ok, {counts['failed']} failed, {counts['timeout']} timed out, "
                 f"{counts['skipped']} skipped; logs in {out}/logs")
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(json.dumps({"suite": meta, "steps": records}, indent=1))
    return text


def main(argv: list[str]) -> int:
    if argv[:1] == ["versions"]:
        versions()
    elif argv[:1] == ["launcher"]:
        launcher()
    elif argv[:1] == ["summary"] and len(argv) == 2:
        print(summary(Path(argv[1])), end="")
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
