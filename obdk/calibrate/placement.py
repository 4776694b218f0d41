"""Kept importable: :func:`load_skeleton` and the layer placement live in :mod:`obdk.stream.placement`."""
from ..stream.placement import LayerPlacement, ShardedWeights, load_skeleton  # noqa: F401

__all__ = ["LayerPlacement", "ShardedWeights", "load_skeleton"]
