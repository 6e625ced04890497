"""Convolutions (`nn.Conv`, `nnx.Conv`): A over im2col patches, S over output positions.

The kernel `[*window, in, out]` is a `(∏window · in) x out` matrix; every output location
of every example is a row (the KFC approximation of Grosse & Martens 2016). Every padding
mode of Flax's Conv is covered: SAME, VALID, explicit, and CIRCULAR / REFLECT / CAUSAL
(the input padded as the layer pads it, then VALID patches).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

KIND = "conv"


def describe(module, x: jax.Array) -> tuple[tuple, int] | str:
  """The patch-extraction configuration of a Conv call, or why it cannot be covered.

  Args:
    module: the `nn.Conv` or `nnx.Conv` being called.
    x: its input, `[N, *spatial, in]`.

  Returns:
    `(hashable patch configuration, number of kernel input axes)`, or a reason string.
  """
  ks = module.kernel_size
  ks = (ks,) if isinstance(ks, int) else tuple(ks)
  nd = len(ks)

  def tup(v, default=1):
    if v is None:
      return (default,) * nd
    if isinstance(v, int):
      return (v,) * nd
    return tuple(v)

  if getattr(module, "feature_group_count", 1) != 1:
    return "a grouped convolution (feature_group_count > 1)"
  if getattr(module, "mask", None) is not None:
    return "a masked convolution"
  if jnp.ndim(x) != nd + 2:
    return f"a convolution input of rank {jnp.ndim(x)} (expected {nd + 2}: batch, spatial, features)"
  pad = module.padding
  pre_pad = None
  if isinstance(pad, str) and pad.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
    # As the layer itself does: pad the input explicitly, then take VALID patches.
    dil = tup(module.kernel_dilation)
    if pad.upper() == "CAUSAL":
      if nd != 1:
        return "CAUSAL padding of a convolution with more than one spatial axis"
      pre_pad = ("constant", ((dil[0] * (ks[0] - 1), 0),))
    else:
      sizes = [(k - 1) * d + 1 for k, d in zip(ks, dil)]
      pre_pad = ({"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad.upper()],
                 tuple(((k - 1) // 2, k // 2) for k in sizes))
    padding = "VALID"
  elif isinstance(pad, str):
    if pad.upper() not in ("SAME", "VALID"):
      return f"padding {pad!r}"
    padding = pad.upper()
  elif isinstance(pad, int):
    padding = ((pad, pad),) * nd
  else:
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
  cfg = dict(kernel_size=ks, strides=tup(module.strides), padding=padding,
             lhs_dilation=tup(module.input_dilation), rhs_dilation=tup(module.kernel_dilation),
             pre_pad=pre_pad)
  return tuple(sorted(cfg.items(), key=lambda kv: kv[0])), nd + 1


def input_rows(config: tuple, x: jax.Array) -> jax.Array:
  """im2col rows `[N, ∏window · in]`, ordered like the flattened kernel.

  Args:
    config: the patch configuration from `describe`.
    x: the layer's input.

  Returns:
    One row per example and output location.
  """
  cfg = dict(config)
  nd = len(cfg["kernel_size"])
  if cfg["pre_pad"] is not None:
    mode, pads = cfg["pre_pad"]
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),), mode=mode)
  spatial = "".join("HWDABCEFG"[i] for i in range(nd))
  dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  p = jax.lax.conv_general_dilated_patches(
      x, cfg["kernel_size"], cfg["strides"], cfg["padding"], lhs_dilation=cfg["lhs_dilation"],
      rhs_dilation=cfg["rhs_dilation"], dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)
  c = x.shape[-1]
  # The feature axis comes out channel-major (c, k1, k2, ...); the kernel is (k1, k2, ..., c).
  p = p.reshape(p.shape[:-1] + (c,) + tuple(cfg["kernel_size"]))
  p = jnp.moveaxis(p, nd + 1, -1)
  return p.reshape(-1, c * math.prod(cfg["kernel_size"]))
