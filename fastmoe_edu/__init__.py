"""fastmoe_edu: learn how Mixture-of-Experts training systems work.

The readable reference lives in this package (routers.py, dispatch.py, experts.py, layer.py,
model.py, train.py); the optimized kernels in ``fastmoe_edu.backends`` (the repository's
``backends/`` folder); the MPI expert parallelism in ``fastmoe_edu.distributed``.
"""
from .layer import MoELayer, RoutingRecord
from .routers import ROUTERS

__all__ = ["MoELayer", "RoutingRecord", "ROUTERS"]
__version__ = "0.1.0"
