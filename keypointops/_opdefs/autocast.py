"""The autocast policy of every op, in one place.

Under ``torch.autocast`` (for the device of the op's main tensor) each public op casts its inputs
before its checks and its backend run, as follows; outside autocast nothing is cast (mismatched
dtypes raise as usual).

- The main tensor sets the compute dtype: ``features`` (keypoint_gather, part_pool) or ``x``
  (msg_pass, window_graph_conv), in the dtype autocast left it (e.g. bfloat16 from a conv) --
  like autocast's ``promote`` class, nothing is cast down.
- The other data inputs follow it: ``heatmaps`` and ``groups`` (part_pool), ``adj``
  (window_graph_conv).  A learnable ``t`` (msg_pass) goes to the accumulation dtype of the compute
  dtype (float32 for float16/bfloat16), as the kernels take it.
- Coordinates and masks are never cast: ``keypoints`` and ``valid`` (keypoint_gather) stay as given
  (float32 keeps sub-pixel positions exact on large maps).
- Every backend (the compiled CPU and CUDA kernels, Triton, the reference) computes in a
  float16/bfloat16 compute dtype with float32 accumulation and returns the compute dtype, so the
  policy does not depend on the backend.  The reference runs with autocast off (:func:`disabled`):
  it accumulates in float32 tensors, whose matmuls and einsums autocast would cast down again.

The casts are ordinary differentiable ``Tensor.to`` calls, so every gradient comes back in the
dtype of the tensor it belongs to.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def compute_dtype(main) -> torch.dtype | None:
    """The dtype an op with main tensor ``main`` computes in under autocast (``main``'s own), or
    None when nothing is to be cast (autocast off for ``main``'s device, or ``main`` not a floating
    point Tensor: the op's checks then report it)."""
    if not isinstance(main, Tensor) or not main.is_floating_point():
        return None
    try:
        enabled = torch.is_autocast_enabled(main.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta): nothing to cast
        return None
    if not enabled:
        return None
    return main.dtype


def cast(tensor, dtype: torch.dtype | None):
    """``tensor`` in ``dtype`` (a floating point Tensor; anything else, or dtype None, unchanged)."""
    if dtype is None or not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def disabled(main):
    """A context with autocast off for ``main``'s device (a no-op where it is not on), for the
    reference backend's float32 accumulation."""
    if compute_dtype(main) is None:
        return contextlib.nullcontext()
    return torch.autocast(main.device.type, enabled=False)
