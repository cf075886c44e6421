"""Run under ``torchrun``: every public method of the Communicator, torch engine, on the world and on splits.

    torchrun --nproc-per-node=4 tests/torch_scripts/check_communicator.py results.json

Every rank computes locally what each call must return and compares bitwise (``torch.equal``).
Output (rank 0): ``{"world_size": P, "checks": {"<communicator>/<check>": true|false}}``, where a
check passes only if it passed on every rank.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastmoe_edu.distributed.torch_engine import torch_world

DTYPES = (torch.float64, torch.int64, torch.bfloat16, torch.int16)   # int16: gloo lacks it, sent as float16


def rows_count(source: int, destination: int, round_: int) -> int:
    """How many rows global rank ``source`` sends to ``destination``: 0..3, zero for some pairs."""
    return (3 * source + 2 * destination + round_) % 4


def block(source: int, destination: int, round_: int, dtype: torch.dtype) -> torch.Tensor:
    """The rows ``source`` sends to ``destination``: ``[n, 2, 3]``, every element tells where it came from."""
    n = rows_count(source, destination, round_)
    codes = torch.arange(n * 6, dtype=torch.float64).reshape(n, 2, 3) / 8 + 10 * source + destination
    if dtype != torch.float64:                                    # small integers: exact in bfloat16 too
        codes = (torch.arange(n * 6).reshape(n, 2, 3) % 7) * 16 + 4 * source + destination
    return codes.to(dtype)


def exchange(members: list[int], me: int, round_: int, dtype: torch.dtype):
    """(rows to send, send_rows, recv_rows, the rows that must arrive) for this rank of ``members``."""
    outgoing = [block(members[me], peer, round_, dtype) for peer in members]
    incoming = [block(peer, members[me], round_, dtype) for peer in members]
    return (torch.cat(outgoing), [len(b) for b in outgoing], [len(b) for b in incoming], torch.cat(incoming))


def check_communicator(comm, members: list[int], world, results: dict) -> None:
    """All public methods on ``comm``, whose ranks are the global ranks ``members`` (in rank order)."""
    me, size, here = comm.rank, comm.size, dist.get_rank()

    def record(check: str, passed: bool) -> None:
        results[f"{comm.name}/{check}"] = bool(passed)

    record("rank and size", size == len(members) and members[me] == here)
    record("members in rank order", comm.allgather(torch.tensor([here])).tolist() == members)
    record("ranks on this node", comm.ranks_on_this_node() == size)        # one machine
    record("transfer path", "gloo" in comm.transfer_path("cpu") and comm.engine == "torch")
    record("shares the stats", comm.stats is world.stats)

    for dtype in DTYPES:
        rows, send_rows, recv_rows, expected = exchange(members, me, 0, dtype)
        pairwise = comm.alltoallv(rows, send_rows, recv_rows, method="pairwise")
        collective = comm.alltoallv(rows, send_rows, recv_rows, method="alltoallv")
        record(f"alltoallv pairwise {dtype}", torch.equal(pairwise, expected))
        record(f"alltoallv collective {dtype}", torch.equal(collective, expected))
        record(f"alltoallv methods bitwise equal {dtype}",
               torch.equal(pairwise.view(torch.uint8), collective.view(torch.uint8)))

    first, second = exchange(members, me, 1, torch.float64), exchange(members, me, 2, torch.float64)
    pending = [comm.ialltoallv(*first[:3]), comm.ialltoallv(*second[:3])]      # both posted, then waited
    record("ialltoallv twice", all(torch.equal(p.wait(), want[3]) for p, want in zip(pending, (first, second))))

    counts = torch.tensor([100 * here + 10 * peer + j for peer in members for j in range(2)])
    expected = torch.tensor([100 * peer + 10 * here + j for peer in members for j in range(2)])
    record("alltoall", torch.equal(comm.alltoall(counts), expected))

    for dtype in (torch.float64, torch.int64):
        def values(rank):
            return torch.tensor([rank + 1, -3 * rank, (rank * 7) % 5], dtype=dtype)
        everyone = torch.stack([values(rank) for rank in members])
        record(f"allreduce sum {dtype}", torch.equal(comm.allreduce_(values(here)), everyone.sum(0)))
        record(f"allreduce max {dtype}", torch.equal(comm.allreduce_(values(here), op="max"), everyone.max(0).values))
    firsts = [torch.tensor([rank + 1.0, -2.0 * rank], dtype=torch.float64) for rank in members]
    seconds = [torch.arange(5, dtype=torch.float64) * rank for rank in members]
    pending = [comm.iallreduce_(firsts[me].clone()), comm.iallreduce_(seconds[me].clone())]   # both posted
    pending[0].test()                                                                        # never blocks
    record("iallreduce twice", torch.equal(pending[0].wait(), sum(firsts))
           and torch.equal(pending[1].wait(), sum(seconds)))
    mean = comm.allreduce_(torch.full((2,), float(here)), average=True)
    record("allreduce average", torch.allclose(mean, torch.full((2,), sum(members) / size)))

    root = size - 1                                               # non-zero whenever size > 1
    for dtype in (torch.float64, torch.int16):
        tensor = (torch.arange(6).reshape(2, 3) + 10 * here).to(dtype)
        expected = (torch.arange(6).reshape(2, 3) + 10 * members[root]).to(dtype)
        record(f"broadcast from rank {root} {dtype}", torch.equal(comm.broadcast_(tensor, root), expected))

    shares = [(2 * rank) % 3 for rank in range(size)]            # rank 0 gives 0 rows
    for dtype in (torch.float64, torch.int16):
        def piece(rank):
            return (torch.arange(shares[rank] * 2).reshape(-1, 2) + 10 * members[rank]).to(dtype)
        gathered = comm.allgatherv(piece(me), shares)
        record(f"allgatherv uneven {dtype}", torch.equal(gathered, torch.cat([piece(r) for r in range(size)])))
    nothing = comm.allgatherv(torch.empty(0, 3), [0] * size)
    record("allgatherv all empty", nothing.shape == (0, 3))

    comm.barrier()
    record("counters", all(f"{comm.name}/{op}" in comm.stats.counters
                           for op in ("pairwise", "alltoallv", "ialltoallv", "wait", "alltoall", "barrier")))
    record("iallreduce counter", size == 1 or f"{comm.name}/iallreduce" in comm.stats.counters)


def main(output: str) -> None:
    world = torch_world()
    here, size = dist.get_rank(), world.size
    # The splits, and which global ranks each one must hold, in its rank order (computed here).
    halves = world.split(here // 2, here, "halves")                   # {0,1} {2,3}; P=2: the whole world
    parity = world.split(here % 2, -here, "parity")                   # {2,0} {3,1}: reversed by the key
    threes = world.split(int(here >= 3), here, "threes")              # {0,1,2} {3}: uneven sizes
    again = halves.split(0, -halves.rank, "again")                    # a split of a split, reversed
    singles = parity.split(parity.rank, 0, "singles")                 # one rank each
    expected = {
        world: list(range(size)),
        halves: [r for r in range(size) if r // 2 == here // 2],
        parity: sorted((r for r in range(size) if r % 2 == here % 2), reverse=True),
        threes: [r for r in range(size) if (r >= 3) == (here >= 3)],
        again: sorted((r for r in range(size) if r // 2 == here // 2), reverse=True),
        singles: [here],
    }
    results = {}
    for comm, members in expected.items():
        check_communicator(comm, members, world, results)
    names = sorted(results)                                           # the same on every rank
    failed = world.allreduce_(torch.tensor([int(not results[name]) for name in names]), op="max")
    if here == 0:
        checks = {name: not bool(bad) for name, bad in zip(names, failed.tolist())}
        Path(output).write_text(json.dumps({"world_size": size, "checks": checks}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
