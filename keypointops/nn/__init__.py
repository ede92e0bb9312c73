"""Modules built on the ops (drop-in graph layers, pooling and gather modules)."""
from keypointops.nn.part_pool import PartPool

__all__ = ["PartPool"]
