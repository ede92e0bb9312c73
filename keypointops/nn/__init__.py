"""Modules built on the ops (drop-in graph layers, pooling and gather modules)."""

__all__: list = []
