"""fastmoe_edu: learn how Mixture-of-Experts training systems work.

The readable reference lives in this package (README's reading map: routing.py, routers.py,
dispatch.py, experts.py, layer.py; then options.py, router_zoo.py, soft_moe.py, model.py, train.py);
the optimized kernels in ``fastmoe_edu.backends`` (the repository's ``backends/`` folder); the
expert parallelism in ``fastmoe_edu.distributed``.
"""
from . import router_zoo              # first: its routers enter ROUTERS before options.py reads the table
from .layer import MoELayer, RoutingRecord
from .options import LayerOptions
from .routers import ROUTERS
from .soft_moe import SoftMoELayer    # registers router="soft_moe" with MoELayer

__all__ = ["MoELayer", "SoftMoELayer", "LayerOptions", "RoutingRecord", "ROUTERS"]
__version__ = "0.1.0"
