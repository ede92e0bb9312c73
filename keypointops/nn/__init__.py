"""Modules built on the ops (drop-in graph layers, pooling and gather modules)."""
from keypointops.nn.keypoint_gather import KeypointGather

__all__ = ["KeypointGather"]
