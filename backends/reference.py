"""The reference backend: the plain-PyTorch functions of ``fastmoe_edu.dispatch``, the two routing
functions of ``fastmoe_edu.routing`` and the experts' network (``fastmoe_edu.experts``), gathered under the names every backend
provides."""
from fastmoe_edu.dispatch import (  # noqa: F401  (re-exported: this module *is* the backend table)
    count_tokens_per_expert,
    exclusive_prefix_sum,
    gather_combine,
    grouped_matmul,
    prune_capacity,
    scatter_rows,
    stable_positions,
)
from fastmoe_edu.experts import expert_feed_forward  # noqa: F401
from fastmoe_edu.routing import sigmoid_top_k_route, softmax_top_k_route  # noqa: F401

NAME = "reference"


def available(device) -> tuple[bool, str]:
    """The reference runs wherever torch runs."""
    return True, ""
