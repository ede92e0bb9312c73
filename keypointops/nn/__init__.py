"""Modules built on the ops (drop-in graph layers, pooling and gather modules)."""
from keypointops.nn.window_graph_conv import WindowGraphConv3D

__all__ = ["WindowGraphConv3D"]
