"""Kept importable: :func:`load_skeleton` and :class:`ShardedWeights` live in :mod:`obdk.stream.shards` (also
``obdk.load_skeleton``), :class:`LayerPlacement` in :mod:`obdk.stream.placement`."""
from ..stream.placement import LayerPlacement  # noqa: F401
from ..stream.shards import ShardedWeights, load_skeleton  # noqa: F401

__all__ = ["LayerPlacement", "ShardedWeights", "load_skeleton"]
