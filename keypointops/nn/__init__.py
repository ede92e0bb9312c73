"""Modules built on the ops (drop-in graph layers, pooling and gather modules)."""
from keypointops.nn.deep_gcn import DeepGCNLayer
from keypointops.nn.gen_conv import GENConv, MessageNorm, MsgPassAggregation
from keypointops.nn.keypoint_gather import KeypointGather
from keypointops.nn.msg3d import MSG3DWindow
from keypointops.nn.part_pool import PartPool
from keypointops.nn.window_graph_conv import WindowGraphConv3D

__all__ = ["DeepGCNLayer", "GENConv", "KeypointGather", "MSG3DWindow", "MessageNorm", "MsgPassAggregation",
           "PartPool", "WindowGraphConv3D"]
