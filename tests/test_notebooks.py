"""The tutorial notebooks: sources, the generated .ipynb working copies, and headless runs with self-checks.

Each notebook exists in the repository only as ``tutorial/NN_name.py`` (jupytext percent format, the
one source of truth). ``run.py``'s set-up (``prepare_notebooks``) writes ``tutorial/NN_name.ipynb``
from it for JupyterLab; those files are ignored by git and belong to the student, so running and
saving a notebook never dirties the repository. These tests check

* every source reads as a notebook with this project's kernel, and has a checks file
  ``tests/notebook_checks/NN_name.py``;
* the .ipynb files are not committed and are ignored by git;
* the generation step writes a notebook with the same cells as its source (unpaired, no outputs),
  regenerates an unedited notebook when its source is newer, and never overwrites one the student
  edited;
* every notebook executes top to bottom in a Jupyter kernel that runs this environment's python,
  with ``FASTMOE_EDU_QUICK=1`` (small sizes), followed in the same kernel by one extra cell: the
  source of its checks file. The checks move the widgets, call the ``redraw`` functions with other
  values and assert that the plotted data changed (and whatever else the notebook claims); their
  last act is to print ``self-check passed``, which the test looks for in that cell's output. The
  checks live outside the notebook so that students do not meet test scaffolding.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
zmq = pytest.importorskip("zmq")

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "tutorial"
CHECKS = Path(__file__).resolve().parent / "notebook_checks"
PY_SOURCES = sorted(TUTORIAL.glob("[0-9][0-9]_*.py"))
NAMES = [p.stem for p in PY_SOURCES]

KERNEL_NAME = "python3"
# A whole notebook runs in 10-40 s under QUICK here, 03 (MPI launches) in ~100 s; the longest cell, 03's TED
# job (4 ranks on 2 cores, PyTorch's memory profiler in every variant), took 57-64 s at a load average of 4-7.
# A known upstream race (jupyter/nbclient#312, zeromq/pyzmq#1558) leaves the executing client waiting for a
# kernel reply that has already arrived: zmq.asyncio watches each socket's edge-triggered file descriptor, and
# now and then the edge is missed, so nothing wakes the wait until its timeout, when a last check finds the
# reply. Seen after widget cells (01, 03, 06): 2 of 30 `jupyter nbconvert --execute` runs of the six notebooks
# each sat out one whole 120 s cell timeout and then went on; a replay of 06's first explorer 310 times in
# nbclient missed 4 replies, each found only at the timeout. So _WakingClient below checks its two sockets for
# waiting messages twice a second while a cell runs (the same 290 replays: no wait over 0.5 s), and the cell
# timeout and the retries stay as the net for a kernel that does not answer at all: about twice the slowest
# real cell (120 s) but small against CI's budget, and up to two retries of the notebook. tutorial/README.md
# documents the same timeout for headless runs by hand (test_documented_headless_command_bounds_each_cell
# keeps the two in step).
CELL_TIMEOUT_S = 120
ATTEMPTS = 3
# Wall-clock bound per notebook, retries included. Why: a hung kernel or a race that trips on every
# attempt must cost a bounded, small part of the suite's run, not CI's whole budget. 360 s holds 03's
# normal run (~100 s) twice plus one race at 120 s, and the others' (10-40 s) plus two races, so each
# notebook costs at most 6 minutes even in the worst case. No new attempt starts when less than one cell timeout is left,
# and pytest-timeout ends the test a little later if a kernel does not answer at all.
NOTEBOOK_WALL_CLOCK_S = 360
# Text the checks cell prints as its last act when every check passed.
PASS_MARKER = "self-check passed"


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def _load_run_py():
    """run.py as a module (it only defines functions at import time)."""
    spec = importlib.util.spec_from_file_location("fastmoe_edu_run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# sources and checks files
# --------------------------------------------------------------------------------------------------

def test_tutorial_has_notebooks():
    assert PY_SOURCES, f"no NN_*.py notebooks in {TUTORIAL}"


@pytest.mark.parametrize("name", NAMES)
def test_source_is_a_notebook(name):
    nb = jupytext.read(TUTORIAL / f"{name}.py")
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL_NAME, f"{name}.py: kernel is not {KERNEL_NAME!r}"
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{name}.py: should open with a markdown cell"
    assert sum(cell.cell_type == "code" for cell in nb.cells) > 1, f"{name}.py: hardly any code cells"
    assert not any(PASS_MARKER in cell.source for cell in nb.cells), (
        f"{name}.py: self-checks belong in tests/notebook_checks/{name}.py, not in the notebook")


@pytest.mark.parametrize("name", NAMES)
def test_checks_file_exists(name):
    checks = CHECKS / f"{name}.py"
    assert checks.is_file(), f"{name}: no checks file tests/notebook_checks/{name}.py"
    assert PASS_MARKER in checks.read_text(), f"tests/notebook_checks/{name}.py never prints {PASS_MARKER!r}"


# --------------------------------------------------------------------------------------------------
# the generated .ipynb working copies
# --------------------------------------------------------------------------------------------------

def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_notebooks_are_ignored_not_committed():
    if shutil.which("git") is None or _git("rev-parse", "--is-inside-work-tree").returncode != 0:
        pytest.skip("not a git work tree")
    for name in NAMES:
        assert _git("check-ignore", "-q", "--no-index", f"tutorial/{name}.ipynb").returncode == 0, (
            f"tutorial/{name}.ipynb is not ignored by git; add tutorial/*.ipynb to .gitignore")
    committed = _git("ls-files", "tutorial/*.ipynb").stdout.split()
    assert not committed, f"{committed} are in git's index; the .py is the source (git rm --cached them)"


@pytest.mark.parametrize("name", NAMES)
def test_generated_notebook_equals_source(name, tmp_path):
    shutil.copy2(TUTORIAL / f"{name}.py", tmp_path / f"{name}.py")
    written = _load_run_py().prepare_notebooks(tmp_path, python=Path(sys.executable))
    assert written == [tmp_path / f"{name}.ipynb"]
    generated = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    source = jupytext.read(TUTORIAL / f"{name}.py")
    assert _cells(generated) == _cells(source), f"{name}: the generated notebook's cells differ from the .py"
    assert "jupytext" not in generated.metadata, f"{name}.ipynb is paired: JupyterLab would rewrite the .py"
    assert generated.metadata["kernelspec"]["name"] == KERNEL_NAME
    assert not any(cell.get("outputs") for cell in generated.cells if cell.cell_type == "code")


def test_generation_keeps_student_edits(tmp_path, capsys):
    run_py = _load_run_py()
    source, notebook = tmp_path / "01_tiny.py", tmp_path / "01_tiny.ipynb"
    source.write_text("# %% [markdown]\n# # Tiny\n\n# %%\nprint(1 + 1)\n")

    def prepare():
        return run_py.prepare_notebooks(tmp_path, python=Path(sys.executable))

    def set_mtimes(source_s, notebook_s):
        now = time.time()
        os.utime(source, (now + source_s, now + source_s))
        os.utime(notebook, (now + notebook_s, now + notebook_s))

    assert prepare() == [notebook]                          # missing: written
    assert prepare() == []                                  # up to date: left alone
    # The student runs it: outputs and execution counts are saved, the cells stay the same.
    nb = json.loads(notebook.read_text())
    nb["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["2\n"]}]
    nb["cells"][1]["execution_count"] = 1
    notebook.write_text(json.dumps(nb))
    assert prepare() == []
    # The tutorial is updated (the source is newer): an unedited notebook is regenerated.
    source.write_text("# %% [markdown]\n# # Tiny, updated\n\n# %%\nprint(2 + 2)\n")
    set_mtimes(10, 0)
    assert prepare() == [notebook]
    assert "2 + 2" in notebook.read_text() and '"outputs": []' in notebook.read_text()
    # The student edits a cell: kept, whether or not the source is newer, with a note.
    nb = json.loads(notebook.read_text())
    nb["cells"][1]["source"] = ["print('my own experiment')\n"]
    notebook.write_text(json.dumps(nb))
    edited = notebook.read_text()
    capsys.readouterr()
    for source_s, notebook_s in ((0, 10), (10, 0)):
        set_mtimes(source_s, notebook_s)
        assert prepare() == []
        assert notebook.read_text() == edited
        assert "keeping your edited" in capsys.readouterr().out
    # A fresh copy: delete it and prepare again.
    notebook.unlink()
    assert prepare() == [notebook]


# --------------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory):
    """Environment for kernels that run *this* interpreter under the name "python3".

    jupyter_client starts a kernelspec whose argv[0] is "python" with ``sys.executable``; a spec
    that names another interpreter (e.g. a user-wide one) is shadowed by a temporary spec for
    ``sys.executable``, found first through JUPYTER_PATH.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    # Plots render through the kernel's inline backend, as in JupyterLab (no display needed).
    env = {"FASTMOE_EDU_QUICK": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")   # mpirun of this environment
    plain = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
    try:
        argv0 = KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv[0]
        usable = argv0 in plain or Path(argv0).resolve() == Path(sys.executable).resolve()
    except NoSuchKernel:
        usable = False
    if not usable:
        spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (fastmoe_edu test)", "language": "python"}))
        env["JUPYTER_PATH"] = str(spec_dir.parents[1]) + os.pathsep + os.environ.get("JUPYTER_PATH", "")
    return env


class _WakingClient(nbclient.NotebookClient):
    """nbclient's NotebookClient that looks at its shell and iopub sockets twice a second while a cell runs.

    Reading a zmq.asyncio socket's EVENTS hands any message already waiting to the coroutine that waits for
    it, so a missed wake-up (the upstream race described at CELL_TIMEOUT_S) costs at most half a second.
    """

    WAKE_INTERVAL_S = 0.5

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        waker = asyncio.ensure_future(self._wake())
        try:
            return await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        finally:
            waker.cancel()

    async def _wake(self) -> None:
        while True:
            await asyncio.sleep(self.WAKE_INTERVAL_S)
            for channel in (self.kc.shell_channel, self.kc.iopub_channel):
                channel.socket.get(zmq.EVENTS)


def _execute(nb, env: dict, cwd: Path, monkeypatch, cell_timeout_s: float = CELL_TIMEOUT_S) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)          # the kernel process inherits this environment
    client = _WakingClient(nb, kernel_name=KERNEL_NAME, timeout=int(cell_timeout_s),
                           resources={"metadata": {"path": str(cwd)}})
    client.execute()


def _text_outputs(cells) -> str:
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "".join(parts)


def test_documented_headless_command_bounds_each_cell():
    """The headless command in tutorial/README.md bounds every cell as these tests do: without a timeout the
    upstream widget race would hang it for good, with a long one a stall would cost minutes."""
    text = (TUTORIAL / "README.md").read_text()
    assert "jupyter nbconvert --to notebook --execute" in text
    assert f"--ExecutePreprocessor.timeout={CELL_TIMEOUT_S} " in text, (
        f"tutorial/README.md's headless command should pass --ExecutePreprocessor.timeout={CELL_TIMEOUT_S}, "
        "the cell timeout of tests/test_notebooks.py")


def test_kernel_runs_this_environment(kernel_env, tmp_path, monkeypatch):
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(
        "import sys, os, fastmoe_edu; print(sys.executable); print(os.environ['FASTMOE_EDU_QUICK'])"))
    _execute(nb, kernel_env, tmp_path, monkeypatch)
    executable, quick = _text_outputs(nb.cells).split()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert quick == "1"


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_WALL_CLOCK_S + 60)   # backstop only: the loop below keeps the bound itself
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, kernel_env, monkeypatch):
    checks = CHECKS / f"{name}.py"
    if not checks.is_file():
        pytest.fail(f"{name}: no checks file tests/notebook_checks/{name}.py; every notebook needs one", pytrace=False)
    started = time.perf_counter()
    for attempt in range(1, ATTEMPTS + 1):
        nb = jupytext.read(TUTORIAL / f"{name}.py")   # the source of truth
        nb.cells.append(nbformat.v4.new_code_cell(checks.read_text()))
        left = NOTEBOOK_WALL_CLOCK_S - (time.perf_counter() - started)
        try:
            _execute(nb, kernel_env, TUTORIAL, monkeypatch, cell_timeout_s=min(CELL_TIMEOUT_S, left))
            break
        except nbclient.exceptions.CellTimeoutError:
            left = NOTEBOOK_WALL_CLOCK_S - (time.perf_counter() - started)
            if attempt == ATTEMPTS or left < CELL_TIMEOUT_S:   # the race every time: not the race any more
                pytest.fail(f"{name}: a cell timed out on attempt {attempt} of {ATTEMPTS}, "
                            f"{time.perf_counter() - started:.0f} s spent of the {NOTEBOOK_WALL_CLOCK_S} s "
                            f"allowed per notebook", pytrace=False)
            print(f"{name}: a cell timed out after {CELL_TIMEOUT_S} s (nbclient/ipywidgets race); retrying")
        except nbclient.exceptions.CellExecutionError as error:
            pytest.fail(f"{name} failed:\n{error}", pytrace=False)
    seconds = time.perf_counter() - started
    assert PASS_MARKER in _text_outputs(nb.cells[-1:]), (
        f"{name}: the checks cell (tests/notebook_checks/{name}.py) did not print {PASS_MARKER!r}")
    print(f"{name}: executed with its checks in {seconds:.1f} s (QUICK)")
