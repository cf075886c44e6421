"""Exercise 9 · DeepSpeed-TED's duplicate token dropping (tutorial/03_multinode.py, "Tensor × expert × data
parallelism, duplicate token dropping and pipelining").

Model answer. The tp ranks of one tensor group hold the *same* T tokens (tensor parallelism gave them
identical activations). Without dropping, each of them dispatches all T tokens: tp copies of the same
all-to-all traffic. With it, every tp rank dispatches only its 1/tp share, and the group all-gathers the
combined outputs. ``comm`` is the tensor group's Communicator (``comm.allgatherv(rows, shares)``).
"""
from __future__ import annotations

import torch


def token_share(num_tokens: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """[start, stop) of the tokens tp rank ``tp_rank`` dispatches: consecutive, as equal as possible,
    the first ``num_tokens % tp_size`` ranks one token more (a rank may get none).

        share_r = ⌊T / tp⌋ + (1 if r < T mod tp else 0),   start_r = Σ_{r' < r} share_r'

    Returns:
        (start, stop), ints.
    """
    base, extra = divmod(num_tokens, tp_size)
    start = tp_rank * base + min(tp_rank, extra)                             # Σ of the earlier shares
    return start, start + base + (1 if tp_rank < extra else 0)


def ted_forward(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, comm,
                dispatch_and_combine) -> torch.Tensor:
    """The MoE layer with duplicate token dropping, on one tp rank:

        my share [start, stop) of x, expert_ids, weights    (token_share)
        y_share = dispatch_and_combine(x_share, ids_share, weights_share)     only my tokens travel
        y       = all-gather of the tp ranks' y_share, in rank order          comm.allgatherv(y_share, shares)

    Args:
        x: [T, d], identical on every tp rank (so are expert_ids [T, k] and weights [T, k]).
        comm: the tensor group's Communicator.
        dispatch_and_combine: ``f(x [n, d], ids [n, k], weights [n, k]) -> [n, d]``: the rest of the layer.
    Returns:
        y [T, d], the same on every tp rank.
    """
    num_tokens = x.shape[0]
    start, stop = token_share(num_tokens, comm.size, comm.rank)
    y_share = dispatch_and_combine(x[start:stop], expert_ids[start:stop], weights[start:stop])
    shares = [hi - lo for lo, hi in (token_share(num_tokens, comm.size, r) for r in range(comm.size))]
    return comm.allgatherv(y_share, shares)                                  # rank order = token order


def gather_backward(grad_y: torch.Tensor, comm) -> torch.Tensor:
    """The backward of the all-gather in :func:`ted_forward`: ∂L/∂y_share from ∂L/∂y [T, d].

    Every tp rank runs the same computation after the all-gather, so each already holds the full,
    identical ∂L/∂y: ∂L/∂y_share = (∂L/∂y)[start:stop], nothing summed (a reduce-scatter would count
    the gradient tp times).

    Returns:
        [stop − start, d].
    """
    start, stop = token_share(grad_y.shape[0], comm.size, comm.rank)
    return grad_y[start:stop]


def split_backward(grad_share: torch.Tensor, comm, num_tokens: int) -> torch.Tensor:
    """The backward of taking my share of x: ∂L/∂x [T, d] from this rank's ∂L/∂x_share.

    x is the same tensor on every tp rank, and each rank used a different share of it, so the full
    gradient is the tp ranks' share gradients put side by side: an all-gather in rank order.

    Returns:
        [T, d], the same on every tp rank.
    """
    shares = [hi - lo for lo, hi in (token_share(num_tokens, comm.size, r) for r in range(comm.size))]
    return comm.allgatherv(grad_share, shares)
