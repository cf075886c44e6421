"""fastmoe_edu: learn how Mixture-of-Experts training systems work.

The readable reference lives in this package (routers.py, dispatch.py, experts.py, layer.py,
model.py, train.py); the optimized kernels in ``fastmoe_edu.backends`` (the repository's
``backends/`` folder); the MPI expert parallelism in ``fastmoe_edu.distributed``.
"""
from .layer import MoELayer, RoutingRecord
from .options import LayerOptions
from .routers import ROUTERS
from .soft_moe import SoftMoELayer    # registers router="soft_moe" with MoELayer

__all__ = ["MoELayer", "SoftMoELayer", "LayerOptions", "RoutingRecord", "ROUTERS"]
__version__ = "0.1.0"
