#!/usr/bin/env python3
"""The commands of fastmoe_edu. Needs only Python >= 3.11 and pip.

    python3 run.py train [--key=value ...]   # set up .venv if needed, then train the default model
    python3 run.py test  [pytest args ...]   # set up .venv if needed, then run the whole test suite
    python3 run.py notebooks                 # set up .venv if needed and write the tutorial notebooks

Set-up creates (or reuses) the virtual environment ``.venv`` next to this file and installs the
project into it with pip, its optional extras (``[hf]``: transformers) and MPI included (the ``mpich``
wheel gives ``.venv/bin/mpirun``). It is redone only when pyproject.toml changes. On a machine without an NVIDIA GPU it installs a CPU build of
torch, never the multi-gigabyte CUDA one. Every command also writes the tutorial notebooks
``tutorial/NN_name.ipynb`` from their sources ``tutorial/NN_name.py`` where they are missing or out of
date (see ``prepare_notebooks``); a notebook the student has edited is never overwritten.
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
TUTORIAL = ROOT / "tutorial"
VENV = ROOT / ".venv"
STAMP = VENV / ".fastmoe_edu-installed"
TORCH = "torch==2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
EXTRAS = ("hf",)           # pyproject.toml's optional extras the set-up installs (hf: transformers, fastmoe_edu/hf.py)
USAGE = __doc__
#: pyproject.toml's requires-python: fastmoe_edu.config reads TOML with the standard library's tomllib (3.11+).
MIN_PYTHON = (3, 11)


def python_too_old(version: tuple = tuple(sys.version_info[:3])) -> str | None:
    """The reason this Python cannot run fastmoe_edu, or None if it can."""
    if tuple(version[:2]) >= MIN_PYTHON:
        return None
    return (f"fastmoe_edu needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} (its configs are read with the standard "
            f"library's tomllib); this is Python {'.'.join(map(str, version))} ({sys.executable}). Run the command "
            f"with a newer interpreter, e.g. python3.{MIN_PYTHON[1]} run.py test")


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
    pip("install", "--quiet", "-e", f"{ROOT}[{','.join(EXTRAS)}]")   # the extras too: their tests run
    # A Jupyter kernel that runs this environment's python (the notebooks and their tests use it).
    run(venv_python(), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3",
        "--display-name", "Python 3 (fastmoe_edu)")
    STAMP.write_text(fingerprint)


# --------------------------------------------------------------------------------------------------
# tutorial notebooks
#
# The jupytext sources tutorial/NN_name.py are the only committed form of the notebooks. The
# tutorial/NN_name.ipynb files that JupyterLab opens are generated from them, ignored by git, and
# belong to the student: running, saving and editing them never touches a committed file.
# --------------------------------------------------------------------------------------------------

def cells_fingerprint(notebook: dict) -> str:
    """Hash of a notebook's cell types and sources (outputs and metadata left out)."""
    cells = [[cell["cell_type"], "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]]
             for cell in notebook["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def write_notebook(source: Path, target: Path, python: Path | None = None) -> None:
    """Convert the jupytext source ``source`` to the notebook ``target`` and stamp it.

    The notebook is not paired with its source (no jupytext ``formats``), so saving it in JupyterLab
    writes only the .ipynb; the stamp records its cells as written, to tell later whether the student
    changed them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        converted = Path(tmp) / target.name
        subprocess.run([str(python or venv_python()), "-m", "jupytext", "--quiet", "--to", "ipynb",
                        "--output", str(converted), str(source)], check=True)
        notebook = json.loads(converted.read_text(encoding="utf-8"))
    notebook["metadata"].pop("jupytext", None)
    notebook["metadata"]["fastmoe_edu"] = {"generated_from": source.name,
                                           "cells_sha256": cells_fingerprint(notebook)}
    target.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def student_edited(notebook_path: Path) -> bool:
    """True when the notebook's cells are no longer those it was generated with (or it has no stamp)."""
    try:
        notebook = json.loads(notebook_path.read_text(encoding="utf-8"))
        stamp = notebook["metadata"]["fastmoe_edu"]["cells_sha256"]
    except (ValueError, KeyError, TypeError):
        return True                                       # not ours, or unreadable: leave it alone
    return cells_fingerprint(notebook) != stamp


def prepare_notebooks(folder: Path = TUTORIAL, python: Path | None = None) -> list[Path]:
    """Write ``folder/NN_name.ipynb`` from ``NN_name.py`` where it is missing or older than its source.

    A notebook whose cells the student changed is kept as it is, with a note saying how to get a fresh
    copy; outputs alone (from running it) do not count as a change. Returns the notebooks written.
    """
    written = []
    for source in sorted(folder.glob("[0-9][0-9]_*.py")):
        notebook = source.with_suffix(".ipynb")
        if notebook.exists():
            source_is_newer = source.stat().st_mtime > notebook.stat().st_mtime
            if student_edited(notebook):
                print(f"note: keeping your edited {notebook.relative_to(folder.parent)}"
                      + (" (the tutorial's source changed since)" if source_is_newer else "")
                      + "; for a fresh copy rename or delete it and run: python3 run.py notebooks", flush=True)
                continue
            if not source_is_newer:
                continue                                  # up to date
        try:
            write_notebook(source, notebook, python)
        except subprocess.CalledProcessError as error:     # a broken source must not stop `train`
            print(f"warning: could not write {notebook.name} from {source.name} ({error})", flush=True)
            continue
        print(f"wrote {notebook.relative_to(folder.parent)} from {source.name}", flush=True)
        written.append(notebook)
    return written


def main(argv: list[str]) -> int:
    reason = python_too_old()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("train", "test", "notebooks"):
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    setup()
    prepare_notebooks()
    command, rest = argv[0], argv[1:]
    if command == "notebooks":
        print(f"open them with: {venv_python().parent / 'jupyter'} lab {TUTORIAL.relative_to(ROOT)}/")
        return 0
    env = dict(os.environ, PATH=f"{venv_python().parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if command == "train":
        cmd = [venv_python(), "-m", "fastmoe_edu.train", *rest]
    else:
        cmd = [venv_python(), "-m", "pytest", "tests", *rest]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
