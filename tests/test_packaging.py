"""Packaging: environment.yml and pyproject.toml name the same dependencies; backends install cleanly."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_dependencies() -> set[str]:
    """The required dependencies and those of every optional extra (environment.yml installs them all)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    return {_name(r) for r in project["dependencies"] + extras}


def environment_dependencies() -> set[str]:
    names, in_pip = set(), False
    for line in (ROOT / "environment.yml").read_text().splitlines():
        stripped = line.split("#", 1)[0].rstrip()
        if stripped.strip() == "- pip:":
            in_pip = True
            continue
        if in_pip and stripped.strip().startswith("- "):
            item = stripped.strip()[2:]
            if not item.startswith("-e"):
                names.add(_name(item))
    return names


def test_environment_yml_matches_pyproject():
    assert environment_dependencies() == pyproject_dependencies()


def _run_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    return run_py


def test_run_py_refuses_an_older_python_than_pyproject_allows():
    """run.py's first check is pyproject.toml's requires-python, with a message naming the version found."""
    run_py = _run_py()
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == ">=" + ".".join(map(str, run_py.MIN_PYTHON))
    assert run_py.python_too_old((3, 11, 0)) is None and run_py.python_too_old((3, 13, 1)) is None
    reason = run_py.python_too_old((3, 10, 13))
    assert "needs Python >= 3.11" in reason and "this is Python 3.10.13" in reason


def test_run_py_installs_every_extra():
    """``python3 run.py test`` must install the extras, or their tests (tests/test_hf.py) would only skip."""
    run_py = _run_py()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(run_py.EXTRAS) == set(extras)
    assert "transformers" in {_name(r) for r in extras["hf"]}


def test_named_dependencies_present():
    assert {"torch", "numba", "mpi4py", "mpich", "jupyterlab", "ipywidgets", "pytest"} <= pyproject_dependencies()


def test_backends_installed_as_subpackage_not_top_level(tmp_path):
    import subprocess
    import sys

    import fastmoe_edu.backends as backends

    assert backends.__name__ == "fastmoe_edu.backends"
    assert Path(backends.__file__).resolve().parent == ROOT / "backends"
    # From a folder outside the checkout, the install provides fastmoe_edu.backends but no
    # generic top-level module called "backends".
    probe = ("import importlib.util, fastmoe_edu.backends; "
             "print(importlib.util.find_spec('backends') is None)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
