#!/usr/bin/env python3
"""The two commands of fastmoe_edu. Needs only Python >= 3.10 and pip.

    python3 run.py train [--key=value ...]   # set up .venv if needed, then train the default model
    python3 run.py test  [pytest args ...]   # set up .venv if needed, then run the whole test suite

Set-up creates (or reuses) the virtual environment ``.venv`` next to this file and installs the
project into it with pip, MPI included (the ``mpich`` wheel gives ``.venv/bin/mpirun``). It is redone
only when pyproject.toml changes. On a machine without an NVIDIA GPU it installs a CPU build of
torch, never the multi-gigabyte CUDA one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".fastmoe_edu-installed"
TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
USAGE = __doc__


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def pip(*args, **kwargs):
    return run(venv_python(), "-m", "pip", *args, **kwargs)


def has_module(name: str) -> bool:
    probe = subprocess.run([str(venv_python()), "-c", f"import {name}"], capture_output=True)
    return probe.returncode == 0


def torch_resolves_to_cpu_build() -> bool:
    """Ask pip (without installing) whether ``torch==2.13.0`` would pull in NVIDIA CUDA packages."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--quiet", "--report", report, TORCH)
        installs = json.loads(report.read_text()).get("install", [])
    names = [item["metadata"]["name"].lower() for item in installs]
    return not any(name.startswith("nvidia") for name in names)


def install_torch() -> None:
    if has_module("torch"):
        return  # honour an already-installed torch
    if shutil.which("nvidia-smi") or torch_resolves_to_cpu_build():
        pip("install", TORCH)
    else:
        # No NVIDIA GPU here: take the CPU wheel from PyTorch's own index instead of the CUDA build.
        pip("install", TORCH, "--index-url", CPU_INDEX)


def setup() -> None:
    fingerprint = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == fingerprint and venv_python().exists():
        return
    if not venv_python().exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip("install", "--quiet", "--upgrade", "pip")
    install_torch()
    pip("install", "--quiet", "-e", ROOT)
    # A Jupyter kernel that runs this environment's python (the notebooks and their tests use it).
    run(venv_python(), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3",
        "--display-name", "Python 3 (fastmoe_edu)")
    STAMP.write_text(fingerprint)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("train", "test"):
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    setup()
    command, rest = argv[0], argv[1:]
    env = dict(os.environ, PATH=f"{venv_python().parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if command == "train":
        cmd = [venv_python(), "-m", "fastmoe_edu.train", *rest]
    else:
        cmd = [venv_python(), "-m", "pytest", "tests", *rest]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
