"""Check your exercises against the reference: one exercise, several, or all of them.

From the repository root, inside the virtual environment (``source .venv/bin/activate``):

    python -m tutorial.exercises.check             # all ten, in order
    python -m tutorial.exercises.check 3           # exercise 3 only (also: positions, ex03, ex03_positions)
    python -m tutorial.exercises.check 1 routing scatter
    python -m tutorial.exercises.check --solutions # the answer key (tutorial/exercises/solutions/)

``python tutorial/exercises/check.py 3`` works too. A passing exercise prints PASS; a failing one prints
a hint that says what is wrong and where (shape, token and slot, expert, rank), never the answer. The
multi-rank exercises (8-10) first have their single-process helpers checked here, then run together in
one ``mpirun -n 2`` job (tutorial/exercises/_rank_checks.py). Exit status: 0 when every exercise checked
passed, 1 otherwise.

From Python (tests/test_exercises.py does this): ``run(["routing"], package="tutorial.exercises")``
returns one :class:`Result` per exercise; ``check_local(name, module)`` runs the single-process part
against any module object; ``run_rank_jobs([(name, package), ...])`` runs multi-rank checks of any
importable packages in one mpirun.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):                     # run as a file: python tutorial/exercises/check.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tutorial.exercises import _local_checks                                          # noqa: E402
from tutorial.exercises._harness import ROOT, Hint, Result, display_path             # noqa: E402

STUBS = "tutorial.exercises"
SOLUTIONS = "tutorial.exercises.solutions"
RANKS = 2
MPI_TIMEOUT_S = 240


@dataclass(frozen=True)
class Exercise:
    number: int
    name: str
    module: str                  # the file the student edits, without .py
    taught_in: str               # where the notebooks teach the idea
    multi_rank: bool = False

    @property
    def local_check(self):
        return getattr(_local_checks, f"check_{self.name}")


EXERCISES = [
    Exercise(1, "routing", "ex01_routing", "tutorial/01_gating.py, section 2"),
    Exercise(2, "capacity", "ex02_capacity", "tutorial/01_gating.py, section 1"),
    Exercise(3, "positions", "ex03_positions", "tutorial/02_dispatch.py, section 1"),
    Exercise(4, "scatter", "ex04_scatter", "tutorial/02_dispatch.py, section 1"),
    Exercise(5, "experts", "ex05_experts", "tutorial/02_dispatch.py, section 1"),
    Exercise(6, "combine", "ex06_combine", "tutorial/02_dispatch.py, section 1"),
    Exercise(7, "balance", "ex07_balance", "tutorial/01_gating.py, section 1"),
    Exercise(8, "expert_parallel", "ex08_expert_parallel", "tutorial/03_multinode.py, section 2", multi_rank=True),
    Exercise(9, "ted", "ex09_ted", "tutorial/03_multinode.py, section 4", multi_rank=True),
    Exercise(10, "pipeline", "ex10_pipeline", "tutorial/06_schedules.py, section 2", multi_rank=True),
]
BY_NAME = {exercise.name: exercise for exercise in EXERCISES}


def find(selector: str) -> Exercise:
    """An exercise by number ("3"), name ("positions"), or file ("ex03", "ex03_positions", "ex03_positions.py")."""
    key = selector.strip().lower().removesuffix(".py")
    for exercise in EXERCISES:
        if key in (str(exercise.number), exercise.name, exercise.module, exercise.module[:4]):
            return exercise
    known = ", ".join(f"{e.number} {e.name}" for e in EXERCISES)
    raise SystemExit(f"no exercise {selector!r}; known: {known}")


def check_local(name: str, module) -> Result:
    """The single-process part of exercise ``name`` against ``module`` (anything with the exercise's functions)."""
    try:
        BY_NAME[name].local_check(module)
    except Hint as hint:
        return Result(name, str(hint))
    return Result(name, None)


def run_rank_jobs(jobs: list[tuple[str, str]], extra_path: list[str] | None = None,
                  timeout: float = MPI_TIMEOUT_S) -> dict[tuple[str, str], Result]:
    """The multi-rank checks of ``jobs`` = [(exercise name, package), ...], all in one ``mpirun -n 2``.

    ``extra_path``: folders the ranks need on their import path (where a package other than this
    repository's lives). A rank that did not report (a crash, a hang past ``timeout``) is a failure
    whose hint carries the end of the job's output.
    """
    if not jobs:
        return {}
    from fastmoe_edu.distributed.launch import mpirun_command

    specs = [f"{name}={package}" for name, package in jobs]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *(extra_path or []), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="fastmoe_edu_exercises_") as out_dir:
        command = mpirun_command(RANKS, ["-m", "tutorial.exercises._rank_checks", out_dir, *specs])
        try:
            finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            output = finished.stdout + finished.stderr
        except subprocess.TimeoutExpired as expired:
            output = f"(stopped after {timeout:g} s) " + str(expired.stdout or "") + str(expired.stderr or "")
        reports = []
        for rank in range(RANKS):
            path = Path(out_dir) / f"rank{rank}.json"
            reports.append(json.loads(path.read_text()) if path.exists() else {})
    results = {}
    for (name, package), spec in zip(jobs, specs):
        if any(spec not in report for report in reports):
            tail = "\n".join(output.strip().splitlines()[-15:])
            results[(name, package)] = Result(name, f"the {RANKS}-rank job did not finish this check (a rank crashed "
                                                    f"or hung); the end of its output:\n{tail}")
            continue
        hints = [report[spec] for report in reports if report[spec] is not None]
        results[(name, package)] = Result(name, hints[0] if hints else None)
    return results


def run(selectors: list[str] | None = None, package: str = STUBS) -> list[Result]:
    """Check the selected exercises (default: all) of ``package``; one Result each, in exercise order."""
    chosen = sorted({find(s).number: find(s) for s in (selectors or [e.name for e in EXERCISES])}.values(),
                    key=lambda e: e.number)
    results: dict[str, Result] = {}
    for exercise in chosen:
        try:
            module = importlib.import_module(f"{package}.{exercise.module}")
        except Exception as error:                                        # noqa: BLE001 (their syntax error, ...)
            results[exercise.name] = Result(exercise.name, f"could not import {package}.{exercise.module}: "
                                                           f"{type(error).__name__}: {error}")
            continue
        results[exercise.name] = check_local(exercise.name, module)
    waiting = [(e.name, package) for e in chosen if e.multi_rank and results[e.name].passed]
    for (name, _), result in run_rank_jobs(waiting).items():
        results[name] = result
    return [results[e.name] for e in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tutorial.exercises.check",
                                     description="Check the exercises of tutorial/exercises/ against the reference.")
    parser.add_argument("exercises", nargs="*", help="numbers or names (default: all): 1 routing, 2 capacity, "
                        "3 positions, 4 scatter, 5 experts, 6 combine, 7 balance, 8 expert_parallel, 9 ted, 10 pipeline")
    parser.add_argument("--solutions", action="store_true", help="check the answer key instead of your files")
    parser.add_argument("--package", default=None, help="check another package with the same files (dotted name)")
    args = parser.parse_args(argv)
    package = args.package or (SOLUTIONS if args.solutions else STUBS)
    import torch
    torch.set_num_threads(1)                                               # tiny tensors: one thread is fastest
    results = run(args.exercises or None, package)
    for result in results:
        exercise = BY_NAME[result.exercise]
        where = display_path(ROOT / Path(*package.split("."))) + f"/{exercise.module}.py"
        status = "PASS" if result.passed else "FAIL"
        print(f"[{exercise.number:2d}] {exercise.name:<16} {status}   {where}")
        if not result.passed:
            print("      hint: " + result.hint.replace("\n", "\n      "))
            print(f"      (taught in {exercise.taught_in})")
    passed = sum(r.passed for r in results)
    print(f"{passed} of {len(results)} passed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
