"""The multi-rank checks (exercises 8-10), run under ``mpirun -n 2`` by check.py; one launch for all of them.

    mpirun -n 2 python -m tutorial.exercises._rank_checks OUT_DIR expert_parallel=tutorial.exercises ...

Every job ``exercise=package`` imports ``package.exNN_<exercise>`` and runs its check on every rank, on a
fresh sub-communicator of the project's MPI ``Communicator`` (so a student's collective that never
completes times out there, and the ranks still meet on the world communicator afterwards). The data of
every rank is derived from fixed seeds, so each rank knows what every other rank holds and computes the
expected result without communicating. After each part the ranks agree (an all-reduce of "did anyone
fail") whether to go on, so they never drift into different collectives. Each rank writes
``OUT_DIR/rank<r>.json``: job -> hint or null, rewritten after every job.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

from ._harness import Hint, all_close, call, expect_pair, expect_tensor, first_bad_row

DTYPE = torch.float64
STUDENT_TIMEOUT_S = 20.0           # the longest one of the student's collectives may take
MODULES = {"expert_parallel": "ex08_expert_parallel", "ted": "ex09_ted", "pipeline": "ex10_pipeline"}


# ----------------------------------------------------------------------------------------------------
# The experts every check uses: expert g is x ↦ tanh(x · A_gᵀ), A_g different for every g
# ----------------------------------------------------------------------------------------------------
def expert_matrices(num_experts: int, width: int) -> torch.Tensor:
    return torch.randn(num_experts, width, width, generator=torch.Generator().manual_seed(77), dtype=DTYPE)


def apply_expert(matrices: torch.Tensor, expert: int, rows: torch.Tensor) -> torch.Tensor:
    return torch.tanh(rows @ matrices[expert].t())


class LocalExperts:
    """The ``local_experts(rows, local_counts)`` handed to the student: this rank's L experts, one segment
    each; it records every call (the pipeline check reads the log)."""

    def __init__(self, matrices: torch.Tensor, first: int, num_local: int, log: list):
        self.matrices, self.first, self.num_local, self.log = matrices, first, num_local, log

    def __call__(self, rows: torch.Tensor, local_counts) -> torch.Tensor:
        local_counts = torch.as_tensor(local_counts).reshape(-1).tolist()
        if len(local_counts) != self.num_local:
            raise ValueError(f"local_experts got counts for {len(local_counts)} experts; it runs this rank's "
                             f"L = {self.num_local} local experts (local_counts[e] = Σ_s recv_counts[s, e])")
        if sum(local_counts) != rows.shape[0]:
            raise ValueError(f"local_experts got {rows.shape[0]} rows but local_counts {local_counts} add up to "
                             f"{sum(local_counts)}")
        self.log.append(("compute", rows.shape[0]))
        segments = rows.split(local_counts)
        outs = [apply_expert(self.matrices, self.first + e, segment) for e, segment in enumerate(segments)]
        return torch.cat(outs) if outs else rows.new_zeros(0, rows.shape[1])


# ----------------------------------------------------------------------------------------------------
# The data of the expert-parallel cases: every rank's counts, known to all ranks
# ----------------------------------------------------------------------------------------------------
#: (label, counts[rank][global expert]) for 2 ranks and E = 4 (L = 2)
EP_CASES = [
    ("rows for every expert, expert 2 gets none from rank 0", [[3, 1, 0, 2], [1, 2, 2, 1]]),
    ("rank 1 has no rows at all (all its tokens dropped)", [[2, 0, 1, 3], [0, 0, 0, 0]]),
    ("nobody sends anything to rank 1's experts", [[2, 1, 0, 0], [1, 1, 0, 0]]),
    ("segments of one row (a chunk may be empty)", [[1, 1, 1, 1], [0, 1, 1, 0]]),
]
WIDTH = 3


def ep_buffer(case: int, rank: int, counts: list[int]) -> torch.Tensor:
    return torch.randn(sum(counts), WIDTH, generator=torch.Generator().manual_seed(1000 * case + rank), dtype=DTYPE)


def _diagnose_rows(got: torch.Tensor, buffer: torch.Tensor, counts: list[int], matrices: torch.Tensor,
                   rank: int, num_local: int, label: str) -> None:
    """Raise a Hint saying which of this rank's segments came back wrong, and how (if it can tell)."""
    start = 0
    for expert, count in enumerate(counts):
        segment = slice(start, start + count)
        start += count
        rows, want = buffer[segment], apply_expert(matrices, expert, buffer[segment])
        if all_close(got[segment], want):
            continue
        owner = expert // num_local
        where = f"rank {rank}: {label}: the rows it sent for expert {expert} (held by rank {owner})"
        others = [g for g in range(matrices.shape[0]) if g != expert and all_close(got[segment], apply_expert(matrices, g, rows))]
        if others:
            raise Hint(f"{where} came back computed by expert {others[0]}: the received rows arrive ordered by "
                       f"(source rank, local expert); regroup them by local expert before the experts run, and back "
                       f"by source before they go home")
        if all_close(got[segment], rows):
            raise Hint(f"{where} came back unchanged: they never went through local_experts")
        if count > 1 and all_close(got[segment].sort(dim=0).values, want.sort(dim=0).values):
            raise Hint(f"{where} came back in the wrong order: rows keep their order inside each block")
        raise Hint(f"{where} came back wrong (row {first_bad_row(got[segment], want)} of that segment): was each "
                   f"block sent to the rank that holds the expert, and returned to where it came from?")


# ----------------------------------------------------------------------------------------------------
# 8. the expert-parallel exchange
# ----------------------------------------------------------------------------------------------------
def check_expert_parallel(mod, comm, agree) -> None:
    P, rank = comm.size, comm.rank
    num_experts = len(EP_CASES[0][1][0])
    L = num_experts // P
    matrices = expert_matrices(num_experts, WIDTH)
    for case, (label, all_counts) in enumerate(EP_CASES):
        counts = torch.tensor(all_counts[rank])
        hint = None
        try:
            result = expect_pair("exchange_counts", call(mod, "exchange_counts", counts.clone(), L, comm))
            send_counts, recv_counts = (torch.as_tensor(v) for v in result)
            expect_tensor(f"rank {rank}: {label}: send_counts", send_counts, (P, L), "[P, L]", integer=True)
            expect_tensor(f"rank {rank}: {label}: recv_counts", recv_counts, (P, L), "[P, L]", integer=True)
            want_recv = torch.tensor([all_counts[s][rank * L:(rank + 1) * L] for s in range(P)])
            if not torch.equal(send_counts, counts.reshape(P, L)):
                raise Hint(f"rank {rank}: {label}: send_counts row p must be this rank's counts for rank p's experts "
                           f"(global experts p·L .. p·L + L − 1)")
            if not torch.equal(recv_counts, want_recv):
                if torch.equal(recv_counts, send_counts):
                    raise Hint(f"rank {rank}: {label}: recv_counts equals send_counts: the counts must travel "
                               f"through comm.alltoall (row s of the result comes from rank s)")
                raise Hint(f"rank {rank}: {label}: recv_counts[s, e] should be the rows rank s sends for this "
                           f"rank's local expert e")
        except Hint as error:
            hint = str(error)
        if not agree(hint):
            return _raise(hint)

        buffer = ep_buffer(case, rank, all_counts[rank])
        log: list = []
        try:
            out = call(mod, "expert_parallel_forward", buffer.clone(), counts.clone(), comm, L,
                       LocalExperts(matrices, rank * L, L, log))
            expect_tensor(f"rank {rank}: {label}: expert_parallel_forward's result", out, tuple(buffer.shape),
                          "[Σ counts, d] (this rank's rows, in buffer order)")
            _diagnose_rows(out, buffer, all_counts[rank], matrices, rank, L, label)
        except Hint as error:
            hint = str(error)
        if not agree(hint):
            return _raise(hint)


def _raise(hint: str | None) -> None:
    """After agreeing to stop: this rank's own hint, or nothing if another rank failed."""
    if hint is not None:
        raise Hint(hint)
    raise _OtherRankFailed()


class _OtherRankFailed(Exception):
    """This rank passed, another did not: the job stops here; the failing rank reports."""


# ----------------------------------------------------------------------------------------------------
# 9. TED's duplicate token dropping (the world of 2 ranks is one tensor group of tp = 2)
# ----------------------------------------------------------------------------------------------------
def _share_owner(row: int, shares: list[int]) -> int:
    """The tp rank whose share (consecutive rows, in rank order) holds ``row``."""
    return next(r for r in range(len(shares)) if row < sum(shares[:r + 1]))


def check_ted(mod, comm, agree) -> None:
    rank, tp = comm.rank, comm.size
    num_experts, top_k = 4, 2
    matrices = expert_matrices(num_experts, WIDTH)
    for num_tokens in (9, 4, 1):
        label = f"T = {num_tokens} tokens on tp = {tp} ranks"
        g = torch.Generator().manual_seed(500 + num_tokens)                     # the same on every tp rank
        x = torch.randn(num_tokens, WIDTH, generator=g, dtype=DTYPE)
        ids = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
        weights = torch.rand(num_tokens, top_k, generator=g, dtype=DTYPE)
        shares = [num_tokens // tp + (1 if r < num_tokens % tp else 0) for r in range(tp)]
        start = sum(shares[:rank])
        dispatched: list[int] = []

        def dispatch_and_combine(x_part, ids_part, weights_part):
            """The rest of the layer on the tokens given: y[t] = Σ_s w[t, s] · expert_ids[t, s](x[t])."""
            dispatched.append(x_part.shape[0])
            y = torch.zeros_like(x_part)
            for t in range(x_part.shape[0]):
                for s in range(ids_part.shape[1]):
                    y[t] += weights_part[t, s] * apply_expert(matrices, int(ids_part[t, s]), x_part[t:t + 1])[0]
            return y

        want = dispatch_and_combine(x, ids, weights)
        dispatched.clear()
        hint = None
        try:
            y = call(mod, "ted_forward", x.clone(), ids.clone(), weights.clone(), comm, dispatch_and_combine)
            if sum(dispatched) != shares[rank]:
                raise Hint(f"rank {rank}: {label}: dispatch_and_combine ran on {sum(dispatched)} tokens; with duplicate "
                           f"token dropping each tp rank dispatches only its own share ({shares[rank]} here)")
            expect_tensor(f"rank {rank}: {label}: ted_forward's result", y, tuple(x.shape), "[T, d] (every token)")
            bad = first_bad_row(y, want)
            if bad is not None:
                owner = _share_owner(bad, shares)
                raise Hint(f"rank {rank}: {label}: y[{bad}] is off; token {bad} is in rank {owner}'s share: all-gather "
                           f"the shares' outputs in rank order (comm.allgatherv)")
        except Hint as error:
            hint = str(error)
        if not agree(hint):
            return _raise(hint)

        grad_y = torch.randn(num_tokens, WIDTH, generator=g, dtype=DTYPE)          # identical on every tp rank
        try:
            got = call(mod, "gather_backward", grad_y.clone(), comm)
            expect_tensor(f"rank {rank}: {label}: gather_backward's result", got, (shares[rank], WIDTH),
                          "[this rank's share, d]")
            mine = grad_y[start:start + shares[rank]]
            if not all_close(got, mine):
                if shares[rank] and all_close(got, tp * mine):
                    raise Hint(f"rank {rank}: {label}: your gradient share is tp = {tp} times the incoming one: every "
                               f"tp rank already holds the full, identical ∂L/∂y; summing over the tensor group counts "
                               f"it tp times")
                raise Hint(f"rank {rank}: {label}: gather_backward's rows are off: this rank's share of ∂L/∂y")
        except Hint as error:
            hint = str(error)
        if not agree(hint):
            return _raise(hint)

        grad_shares = [torch.randn(shares[r], WIDTH, generator=torch.Generator().manual_seed(900 + 10 * num_tokens + r),
                                   dtype=DTYPE) for r in range(tp)]
        try:
            got = call(mod, "split_backward", grad_shares[rank].clone(), comm, num_tokens)
            expect_tensor(f"rank {rank}: {label}: split_backward's result", got, (num_tokens, WIDTH), "[T, d]")
            bad = first_bad_row(got, torch.cat(grad_shares))
            if bad is not None:
                owner = _share_owner(bad, shares)
                raise Hint(f"rank {rank}: {label}: row {bad} of ∂L/∂x is off: it is the gradient of rank {owner}'s "
                           f"share; ∂L/∂x is every rank's share gradient, side by side in rank order")
        except Hint as error:
            hint = str(error)
        if not agree(hint):
            return _raise(hint)


# ----------------------------------------------------------------------------------------------------
# 10. the two-chunk pipelined exchange
# ----------------------------------------------------------------------------------------------------
class RecordingComm:
    """The student's Communicator, logging what they post and wait for (the schedule check reads the log)."""

    def __init__(self, comm, log: list):
        self._comm, self._log = comm, log
        self.size, self.rank, self.name = comm.size, comm.rank, comm.name

    def alltoall(self, send):
        self._log.append(("alltoall", send.numel()))
        return self._comm.alltoall(send)

    def alltoallv(self, rows, send_rows, recv_rows, *args, **kwargs):
        self._log.append(("alltoallv", rows.shape[0]))
        return self._comm.alltoallv(rows, send_rows, recv_rows, *args, **kwargs)

    def ialltoallv(self, rows, send_rows, recv_rows, *args, **kwargs):
        number = sum(1 for event in self._log if event[0] == "post")
        self._log.append(("post", number))
        return _RecordingPending(self._comm.ialltoallv(rows, send_rows, recv_rows, *args, **kwargs), number, self._log)

    def __getattr__(self, name):
        return getattr(self._comm, name)


class _RecordingPending:
    def __init__(self, pending, number: int, log: list):
        self._pending, self._number, self._log = pending, number, log

    def wait(self):
        self._log.append(("wait", self._number))
        return self._pending.wait()

    def __getattr__(self, name):
        return getattr(self._pending, name)


def schedule_hint(log: list, degree: int) -> str | None:
    """What is wrong with the order of posts, waits and expert runs of a ``degree``-chunk pipeline, or None."""
    kinds = [event[0] for event in log]
    posts, computes = kinds.count("post"), kinds.count("compute")
    if "alltoallv" in kinds:
        return ("the rows went through the blocking comm.alltoallv; post each chunk with the non-blocking "
                "comm.ialltoallv, so that one chunk travels while another is computed")
    if posts != 2 * degree:
        return (f"you posted {posts} non-blocking exchanges; a {degree}-chunk pipeline posts {2 * degree}: each "
                f"chunk's rows out and each chunk's results back")
    if computes != degree:
        return f"local_experts ran {computes} times; it runs once per chunk, on that chunk's rows ({degree} times)"
    compute_at = [i for i, kind in enumerate(kinds) if kind == "compute"]
    post_at = [i for i, kind in enumerate(kinds) if kind == "post"]
    waits_before_first = sum(1 for kind in kinds[:compute_at[0]] if kind == "wait")
    if post_at[1] > compute_at[0]:
        return ("chunk 1 was posted only after the experts ran on chunk 0: post both chunks' rows before waiting "
                "for the first, so chunk 1 travels while chunk 0 is computed")
    if waits_before_first > 1:
        return ("you waited for chunk 1's rows before the experts ran on chunk 0: wait only for the chunk you "
                "compute next, or nothing overlaps")
    if not any(kind == "post" for kind in kinds[compute_at[0]:compute_at[1]]):
        return ("chunk 0's results were posted back only after chunk 1 was computed: send each chunk home right "
                "after computing it, so it travels during the next chunk's compute")
    return None


def check_pipeline(mod, comm, agree) -> None:
    P, rank = comm.size, comm.rank
    num_experts = len(EP_CASES[0][1][0])
    L = num_experts // P
    matrices = expert_matrices(num_experts, WIDTH)
    for case, (label, all_counts) in enumerate(EP_CASES):
        counts = torch.tensor(all_counts[rank])
        buffer = ep_buffer(case, rank, all_counts[rank])
        log: list = []
        hint = None
        try:
            out = call(mod, "pipelined_exchange", buffer.clone(), counts.clone(), RecordingComm(comm, log), L,
                       LocalExperts(matrices, rank * L, L, log), 2)
            expect_tensor(f"rank {rank}: {label}: pipelined_exchange's result", out, tuple(buffer.shape),
                          "[Σ counts, d] (this rank's rows, in buffer order)")
            _diagnose_rows(out, buffer, all_counts[rank], matrices, rank, L, label + ", 2 chunks")
            problem = schedule_hint(log, 2)
            if problem is not None:
                raise Hint(f"rank {rank}: {label}: the result is right, but {problem}")
        except Hint as error:
            hint = str(error)
        if not agree(hint):
            return _raise(hint)


CHECKS = {"expert_parallel": check_expert_parallel, "ted": check_ted, "pipeline": check_pipeline}


# ----------------------------------------------------------------------------------------------------
# The worker: one process of the mpirun job
# ----------------------------------------------------------------------------------------------------
def main(out_dir: str, jobs: list[str]) -> None:
    from fastmoe_edu.distributed.communicator import CollectiveTimeout
    from fastmoe_edu.distributed.mpi_engine import mpi_world

    torch.set_num_threads(1)
    world = mpi_world(timeout_s=3 * STUDENT_TIMEOUT_S, sleep_while_waiting=True)
    results: dict[str, str | None] = {}
    output = Path(out_dir) / f"rank{world.rank}.json"
    stuck = False

    def agree(hint: str | None) -> bool:
        """Every rank learns whether any rank failed; True = all passed, go on."""
        failed = torch.tensor([0.0 if hint is None else 1.0], dtype=DTYPE)
        return world.allreduce_(failed, op="max").item() == 0.0

    for job in jobs:
        exercise, package = job.split("=", 1)
        try:                                                 # fails alike on every rank: no agreement needed
            module = importlib.import_module(f"{package}.{MODULES[exercise]}")
        except Exception as error:                          # noqa: BLE001 (a syntax error in their file, ...)
            results[job] = f"could not import {package}.{MODULES[exercise]}: {type(error).__name__}: {error}"
            output.write_text(json.dumps(results))
            continue
        comm = world.split(color=0, key=world.rank, name="tensor" if exercise == "ted" else "expert")
        comm.timeout_s = STUDENT_TIMEOUT_S
        try:
            CHECKS[exercise](module, comm, agree)
            results[job] = None
        except Hint as error:
            hint = str(error)
            if "did not complete within" in hint:            # their collective timed out on the sub-communicator
                stuck = True
                function = hint.split("(", 1)[0]
                hint = (f"{function}() waited {STUDENT_TIMEOUT_S:g} s in a collective the other rank never joined: "
                        f"do all ranks call the same collectives in the same order, with matching send and receive "
                        f"counts?")
            results[job] = hint if hint.startswith("rank ") else f"rank {world.rank}: {hint}"
        except _OtherRankFailed:
            results[job] = None
        except CollectiveTimeout as error:                   # the checker's own agreement timed out
            results[job] = f"rank {world.rank}: a collective did not complete ({error})"
            output.write_text(json.dumps(results))
            stuck = True
            break                                            # the world itself is out of step: stop here
        output.write_text(json.dumps(results))
    sys.stdout.flush()
    if stuck:                                     # requests left pending on a sub-communicator: skip MPI's finalize
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
