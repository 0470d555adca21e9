"""The elastic supernet: ops (ops.py) -> blocks (blocks.py) -> Supernet (network.py)."""

from tofa_core.supernet.network import Supernet
from tofa_core.supernet.ofa_import import load_ofa_weights
from tofa_core.supernet.static import StaticNet

__all__ = ["StaticNet", "Supernet", "load_ofa_weights"]
