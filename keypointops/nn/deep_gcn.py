"""``DeepGCNLayer``: the skip-connection block of DeepGCNs / DeeperGCN, as PyTorch Geometric's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Module
from torch.utils.checkpoint import checkpoint

from keypointops._checks import check_choice

__all__ = ["DeepGCNLayer"]

BLOCKS = ("res+", "res", "dense", "plain")


class DeepGCNLayer(torch.nn.Module):
    r"""One DeepGCN layer: a graph convolution wrapped in normalisation, activation, dropout and a skip.

    * ``"res+"`` (DeeperGCN's pre-activation residual): ``x + conv(dropout(act(norm(x))))``
    * ``"res"``: ``dropout(x + act(norm(conv(x))))``
    * ``"dense"``: ``dropout(cat([x, act(norm(conv(x)))], -1))``
    * ``"plain"``: ``dropout(act(norm(conv(x))))``

    **Matches** ``torch_geometric.nn.DeepGCNLayer`` (2.8): the constructor (``conv``, ``norm``,
    ``act``, ``block``, ``dropout``, ``ckpt_grad``), the submodule names (``conv``, ``norm``,
    ``act``: a stack of PyG layers loads its state dict with ``strict=True``), the forward call
    ``layer(x, *args, **kwargs)`` (the extra arguments, e.g. an ``edge_index`` or a
    :class:`keypointops.Graph`, go to ``conv``), ``F.dropout`` at the same place and gradient
    checkpointing of ``conv`` with ``ckpt_grad`` (``use_reentrant=True``, as PyG).  ``conv`` may be any
    module, e.g. :class:`keypointops.nn.GENConv`.

    **Differs**: a bad ``block`` or ``dropout`` raises ``ValueError`` (PyG asserts on ``block``
    only), and ``reset_parameters`` skips a ``norm`` or ``conv`` that is ``None``.
    """

    def __init__(self, conv: Module | None = None, norm: Module | None = None, act: Module | None = None,
                 block: str = "res+", dropout: float = 0.0, ckpt_grad: bool = False):
        super().__init__()
        block = block.lower() if isinstance(block, str) else block   # any case, as PyG
        check_choice("DeepGCNLayer", "block", block, BLOCKS)
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"DeepGCNLayer: dropout must be a probability in [0, 1], got {dropout!r}")
        self.conv = conv
        self.norm = norm
        self.act = act
        self.block = block
        self.dropout = dropout
        self.ckpt_grad = ckpt_grad

    def reset_parameters(self) -> None:
        for module in (self.conv, self.norm):
            if module is not None:
                module.reset_parameters()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.block == "res+":
            h = x
            if self.norm is not None:
                h = self.norm(h)
            if self.act is not None:
                h = self.act(h)
            h = F.dropout(h, p=self.dropout, training=self.training)
            return x + self._conv(h, *args, **kwargs)

        h = self._conv(x, *args, **kwargs)
        if self.norm is not None:
            h = self.norm(h)
        if self.act is not None:
            h = self.act(h)
        if self.block == "res":
            h = x + h
        elif self.block == "dense":
            h = torch.cat([x, h], dim=-1)
        return F.dropout(h, p=self.dropout, training=self.training)

    def _conv(self, h: Tensor, *args, **kwargs) -> Tensor:
        if self.ckpt_grad and h.requires_grad:
            return checkpoint(self.conv, h, *args, use_reentrant=True, **kwargs)
        return self.conv(h, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(block={self.block})"
