"""The exercise track (tutorial/exercises/) cannot rot: every exercise is checked twice, and wrong answers get
pointed hints.

* the stubs (what the student starts from) fail, each with the hint that names its first unwritten function;
* the answer key (tutorial/exercises/solutions/) passes every check, single-process and multi-rank;
* deliberately wrong answers get the hint meant for them: unnormalized routing weights, a token-major capacity
  walk, a scatter that ignores the rows, a combine that lets row −1 wrap around, a forgotten regroup in the
  expert-parallel exchange, TED's gradient summed over the tensor group, a pipeline that does not overlap;
* stubs and solutions keep the same signatures and docstrings; the notebooks link every exercise; run.py's
  notebook generation never picks the exercise files up.

All multi-rank checks (the solutions' and the wrong variants') run in one ``mpirun -n 2``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import shutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                      # `tutorial` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from tutorial.exercises import check                 # noqa: E402

EXERCISES_DIR = ROOT / "tutorial" / "exercises"
NAMES = [exercise.name for exercise in check.EXERCISES]

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(package: str, exercise: check.Exercise):
    return importlib.import_module(f"{package}.{exercise.module}")


def _public_functions(module) -> dict:
    return {name: value for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")}


def _mutant(name: str, **replacements):
    """The solution module of exercise ``name`` with some functions replaced by wrong ones."""
    solution = _module(check.SOLUTIONS, check.BY_NAME[name])
    mutant = types.ModuleType(f"mutant_{name}")
    mutant.__dict__.update({key: value for key, value in vars(solution).items() if not key.startswith("__")})
    mutant.__dict__.update(replacements)
    return mutant


# --------------------------------------------------------------------------------------------------
# stubs and solutions
# --------------------------------------------------------------------------------------------------
def test_stubs_fail_with_their_hint():
    """Every stub fails on its first function (in file order), with the "not written yet" hint; the
    multi-rank ones fail in their single-process part, before any mpirun."""
    results = check.run(None, check.STUBS)
    assert [r.exercise for r in results] == NAMES
    for exercise, result in zip(check.EXERCISES, results):
        first = next(iter(_public_functions(_module(check.STUBS, exercise))))
        assert result.hint == (f"{first}() in tutorial/exercises/{exercise.module}.py is not written yet: it raises "
                               f"NotImplementedError. Replace the `raise` with your code (the equation is in its "
                               f"docstring)."), (exercise.name, result.hint)


@pytest.mark.parametrize("name", NAMES)
def test_solution_passes_single_process_part(name):
    result = check.check_local(name, _module(check.SOLUTIONS, check.BY_NAME[name]))
    assert result.passed, result.hint


@pytest.mark.parametrize("name", NAMES)
def test_stub_matches_solution(name):
    """Same functions, signatures and docstrings: the student reads exactly the model answer's contract;
    every stub body is only `raise NotImplementedError`."""
    exercise = check.BY_NAME[name]
    stub, solution = _module(check.STUBS, exercise), _module(check.SOLUTIONS, exercise)
    stub_functions, solution_functions = _public_functions(stub), _public_functions(solution)
    assert list(stub_functions) == list(solution_functions)
    for function_name, function in stub_functions.items():
        model = solution_functions[function_name]
        assert inspect.signature(function) == inspect.signature(model), function_name
        assert inspect.getdoc(function) == inspect.getdoc(model), function_name
        assert inspect.getdoc(function), f"{exercise.module}.{function_name} has no docstring"
        body = inspect.getsource(function).split('"""')[-1].strip()
        assert body == "raise NotImplementedError", f"{exercise.module}.{function_name}: the stub does more than raise"


def test_solutions_import_nothing_from_fastmoe_edu():
    """The answer key is written out, not borrowed: no solution imports fastmoe_edu (the parallel ones get
    the project's Communicator as an argument)."""
    import ast

    for path in sorted((EXERCISES_DIR / "solutions").glob("ex*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(alias.name.startswith("fastmoe_edu") for alias in node.names), path.name
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("fastmoe_edu"), path.name


# --------------------------------------------------------------------------------------------------
# wrong answers get pointed hints (single process)
# --------------------------------------------------------------------------------------------------
def test_unnormalized_routing_weights_hint_at_normalization():
    def softmax_top_k(logits, top_k):
        chosen, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        return ids, chosen                                                    # p[ids], never renormalized

    hint = check.check_local("routing", _mutant("routing", softmax_top_k=softmax_top_k)).hint
    assert hint is not None and "token 0's 2 weights sum to" in hint
    assert "raw probabilities p[ids]; normalize them over the k chosen experts" in hint


def test_token_major_capacity_hints_at_slot_major():
    def prune_capacity(expert_ids, num_experts, capacity):
        kept, used = expert_ids.clone(), [0] * num_experts
        for t in range(expert_ids.shape[0]):                                  # token-major: the wrong walk
            for s in range(expert_ids.shape[1]):
                e = int(expert_ids[t, s])
                if e >= 0:
                    if used[e] < capacity:
                        used[e] += 1
                    else:
                        kept[t, s] = -1
        return kept

    hint = check.check_local("capacity", _mutant("capacity", prune_capacity=prune_capacity)).hint
    assert hint is not None and "you walked the assignments token-major" in hint and "slot-major" in hint


def test_scatter_in_token_order_hints_at_the_slot():
    def scatter_rows(x, rows, num_rows):
        token_of = torch.arange(x.shape[0]).repeat_interleave(rows.shape[1])
        return x[token_of[rows.reshape(-1) >= 0]]                             # t·k + s order, rows ignored

    hint = check.check_local("scatter", _mutant("scatter", scatter_rows=scatter_rows)).hint
    assert hint is not None
    assert "buffer row" in hint and ", slot " in hint and "holds token" in hint, hint


def test_combine_reading_row_minus_one_hints_at_python_indexing():
    def gather_combine(expert_out, rows, weights):
        gathered = expert_out[rows]                                           # -1 wraps to the last row
        return (weights[..., None] * gathered).sum(dim=1)

    hint = check.check_local("combine", _mutant("combine", gather_combine=gather_combine)).hint
    assert hint is not None and "is dropped (row −1)" in hint and "index −1 is the last row" in hint, hint


# --------------------------------------------------------------------------------------------------
# multi-rank: the solutions and three wrong variants, one mpirun
# --------------------------------------------------------------------------------------------------
MUTATIONS = {
    "ex08_expert_parallel.py": '''
def expert_parallel_forward(buffer, counts, comm, num_local_experts, local_experts):
    """Mutation: runs the experts on the received rows as they arrive, (source, expert) order."""
    send_counts, recv_counts = exchange_counts(counts, num_local_experts, comm)
    send_rows, recv_rows = send_counts.sum(dim=1).tolist(), recv_counts.sum(dim=1).tolist()
    received = comm.alltoallv(buffer, send_rows, recv_rows)
    computed = local_experts(received, recv_counts.sum(dim=0))
    return comm.alltoallv(computed, recv_rows, send_rows)
''',
    "ex09_ted.py": '''
def gather_backward(grad_y, comm):
    """Mutation: sums the (identical) gradients over the tensor group before taking the share."""
    start, stop = token_share(grad_y.shape[0], comm.size, comm.rank)
    return comm.allreduce_(grad_y.clone())[start:stop]
''',
    "ex10_pipeline.py": '''
def pipelined_exchange(buffer, counts, comm, num_local_experts, local_experts, degree=2):
    """Mutation: right rows, no overlap: each chunk posted, waited for, computed and returned in turn."""
    num_ranks = comm.size
    send_counts, recv_counts = exchange_counts(counts, num_local_experts, comm)
    send_chunks, send_chunk_counts = chunk_rows(send_counts.reshape(-1), degree)
    _, recv_chunk_counts = chunk_rows(recv_counts.reshape(-1), degree)
    send_rows = send_chunk_counts.reshape(degree, num_ranks, -1).sum(dim=2).tolist()
    recv_rows = recv_chunk_counts.reshape(degree, num_ranks, -1).sum(dim=2).tolist()
    out = torch.empty_like(buffer)
    for c in range(degree):
        received = comm.ialltoallv(buffer[send_chunks[c]], send_rows[c], recv_rows[c]).wait()
        piece_counts = recv_chunk_counts[c].reshape(num_ranks, num_local_experts)
        computed = local_experts(regroup_by_expert(received, piece_counts), piece_counts.sum(dim=0))
        returned = regroup_by_source(computed, piece_counts)
        out[send_chunks[c]] = comm.ialltoallv(returned, recv_rows[c], send_rows[c]).wait()
    return out
''',
}


@pytest.mark.mpi
def test_multi_rank_solutions_pass_and_mutations_get_their_hints(tmp_path):
    package = tmp_path / "exercise_mutants"
    shutil.copytree(EXERCISES_DIR / "solutions", package)
    for file, mutation in MUTATIONS.items():
        with (package / file).open("a") as handle:
            handle.write("\n" + mutation)                                     # the later definition wins
    multi_rank = [e.name for e in check.EXERCISES if e.multi_rank]
    jobs = [(name, check.SOLUTIONS) for name in multi_rank] + [(name, "exercise_mutants") for name in multi_rank]
    results = check.run_rank_jobs(jobs, extra_path=[str(tmp_path)])
    for name in multi_rank:
        assert results[(name, check.SOLUTIONS)].passed, results[(name, check.SOLUTIONS)].hint

    forgot_regroup = results[("expert_parallel", "exercise_mutants")].hint
    assert forgot_regroup is not None and forgot_regroup.startswith("rank ")
    assert "came back computed by expert" in forgot_regroup and "regroup them by local expert" in forgot_regroup
    summed = results[("ted", "exercise_mutants")].hint
    assert summed is not None and "your gradient share is tp = 2 times the incoming one" in summed
    serial = results[("pipeline", "exercise_mutants")].hint
    assert serial is not None and "the result is right, but chunk 1 was posted only after the experts ran on " \
                                  "chunk 0" in serial


def test_schedule_hint_accepts_the_overlapped_order_only():
    """The pipeline's schedule check on hand-written logs (the mpirun test sees the real ones)."""
    overlapped = [("alltoall", 4), ("post", 0), ("post", 1), ("wait", 0), ("compute", 3), ("post", 2), ("wait", 1),
                  ("compute", 2), ("post", 3), ("wait", 2), ("wait", 3)]
    from tutorial.exercises._rank_checks import schedule_hint
    assert schedule_hint(overlapped, 2) is None
    waits_all_first = [("post", 0), ("post", 1), ("wait", 0), ("wait", 1), ("compute", 3), ("post", 2),
                       ("compute", 2), ("post", 3), ("wait", 2), ("wait", 3)]
    assert "you waited for chunk 1's rows before" in schedule_hint(waits_all_first, 2)
    returns_late = [("post", 0), ("post", 1), ("wait", 0), ("compute", 3), ("wait", 1), ("compute", 2),
                    ("post", 2), ("post", 3), ("wait", 2), ("wait", 3)]
    assert "posted back only after chunk 1 was computed" in schedule_hint(returns_late, 2)
    blocking = [("alltoall", 4), ("alltoallv", 5), ("compute", 5), ("alltoallv", 5)]
    assert "blocking comm.alltoallv" in schedule_hint(blocking, 2)


# --------------------------------------------------------------------------------------------------
# the command, the notebooks, the packaging
# --------------------------------------------------------------------------------------------------
def test_command_line_both_spellings():
    """`python -m tutorial.exercises.check` on a stub fails with the hint; the file form checks the answer key."""
    stub = subprocess.run([sys.executable, "-m", "tutorial.exercises.check", "routing"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert stub.returncode == 1, stub.stdout + stub.stderr
    assert "[ 1] routing          FAIL" in stub.stdout and "softmax_top_k() in tutorial/exercises/ex01_routing.py " \
                                                             "is not written yet" in stub.stdout
    assert "0 of 1 passed" in stub.stdout
    key = subprocess.run([sys.executable, "tutorial/exercises/check.py", "--solutions", "2", "ex03"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert key.returncode == 0, key.stdout + key.stderr
    assert "[ 2] capacity         PASS" in key.stdout and "2 of 2 passed" in key.stdout


def test_notebooks_link_each_exercise_where_it_is_taught():
    for exercise in check.EXERCISES:
        notebook = exercise.taught_in.split(",")[0]
        assert f"(exercises/{exercise.module}.py)" in (ROOT / notebook).read_text(), (
            f"{notebook} does not link exercises/{exercise.module}.py")
    readme = (EXERCISES_DIR / "README.md").read_text()
    for exercise in check.EXERCISES:
        assert f"{exercise.module}.py" in readme
    assert "python -m tutorial.exercises.check" in readme
    assert "python -m tutorial.exercises.check" in (ROOT / "README.md").read_text()


def test_exercises_are_neither_notebooks_nor_tests(tmp_path):
    """run.py's prepare_notebooks writes nothing for the exercise files (they are no NN_name.py sources), and
    pytest collects only tests/."""
    spec = importlib.util.spec_from_file_location("fastmoe_edu_run_py_for_exercises", ROOT / "run.py")
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    copy = tmp_path / "tutorial"
    shutil.copytree(EXERCISES_DIR, copy / "exercises", ignore=shutil.ignore_patterns("__pycache__"))
    assert run_py.prepare_notebooks(copy) == []
    assert run_py.prepare_notebooks(copy / "exercises") == []
    assert run_py.prepare_notebooks(copy / "exercises" / "solutions") == []
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert not [p for p in EXERCISES_DIR.rglob("*.py") if p.name.startswith("test_") or p.name.endswith("_test.py")]
