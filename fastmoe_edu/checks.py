"""The one test of a numeric option's value that the layer's, the routers' and the experts' checks share."""
from __future__ import annotations

import math


def is_finite_number(value) -> bool:
    """A real number that is neither a bool, nor nan (which every comparison lets through), nor ±inf."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
