"""Convolutions (`nn.Conv`, `nnx.Conv`): A over im2col patches, S over output positions.

The kernel `[*window, in, out]` is a `(∏window · in) x out` matrix; every output location
of every example is a row (the KFC approximation of Grosse & Martens 2016). Every padding
mode of Flax's Conv is covered: SAME, VALID, explicit, and CIRCULAR / REFLECT / CAUSAL
(the input padded as the layer pads it, then VALID patches).

A grouped convolution (`feature_group_count` G > 1; depthwise when G equals the input
channels) is G independent convolutions: group g maps input channels
`[g·in/G, (g+1)·in/G)` to output channels `[g·out/G, (g+1)·out/G)` with the kernel's
columns of those outputs. Its kernel `[*window, in/G, out]` is read as G matrices
`(∏window · in/G) x (out/G)` (`GroupedAxes`), each with its own pair of factors, stored
stacked `[G, d, d]` like the layers of a scanned stack:

  Â_g = mean over rows of [p_g, 1][p_g, 1]ᵀ     p_g: the patch of group g's input channels
  Ŝ_g = M Σ_rows ĝ_g ĝ_gᵀ                      ĝ_g: the gradient of group g's outputs

The Fisher's blocks between different groups are dropped, as those between layers are.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from secondorder.dimension_numbers import LeafAxes

KIND = "conv"


@dataclasses.dataclass(frozen=True)
class GroupedAxes(LeafAxes):
  """A grouped convolution's kernel read as G matrices per layer of its stack.

  The kernel's output axis is group-major (group g owns the columns
  `[g·out/G, (g+1)·out/G)`), so the matrices are `[B·G, R, O/G]`, layer-major.

  Attributes:
    groups: G, the layer's `feature_group_count`.

  Example::

    axes = GroupedAxes((3, 3, 1, 8), (), (0, 1, 2), (3,), groups=4)  # depthwise, 4 channels
    axes.matrix_shape                        # (4, 9, 2): four 9 x 2 matrices
  """
  groups: int = 1

  @property
  def matrix_shape(self) -> tuple[int, int, int]:
    """`(B·G, R, O/G)`: one matrix per layer and group."""
    b, r, o = super().matrix_shape
    return b * self.groups, r, o // self.groups

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """`x` of the kernel's shape as the stack `[B·G, R, O/G]` of its groups' matrices."""
    b, r, o = super().matrix_shape
    y = x.transpose(self._transpose).reshape(b, r, self.groups, o // self.groups)
    return y.transpose(0, 2, 1, 3).reshape(self.matrix_shape)

  def from_matrices(self, y: jax.Array) -> jax.Array:
    """The inverse of :meth:`to_matrices`."""
    b, r, o = super().matrix_shape
    y = y.reshape(b, self.groups, r, o // self.groups).transpose(0, 2, 1, 3)
    return LeafAxes.from_matrices(self, y.reshape(b, r, o))


def grouped_axes(axes: LeafAxes, groups: int) -> LeafAxes:
  """`axes` of a convolution kernel with `groups` feature groups (unchanged for one group).

  Args:
    axes: the kernel's batch (stack), reduction (window and input channels) and output axes.
    groups: the layer's `feature_group_count`.

  Returns:
    A `GroupedAxes` for G > 1, else `axes`.
  """
  if groups == 1:
    return axes
  return GroupedAxes(axes.shape, axes.batch, axes.reduction, axes.output, groups=groups)


def num_groups(config: tuple) -> int:
  """G, the feature groups of a convolution described by `describe`."""
  return dict(config)["groups"]


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

  groups = int(getattr(module, "feature_group_count", 1))
  if getattr(module, "mask", None) is not None:
    return "a masked convolution"
  if jnp.ndim(x) != nd + 2:
    return f"a convolution input of rank {jnp.ndim(x)} (expected {nd + 2}: batch, spatial, features)"
  pad = module.padding
  pre_pad: tuple[str, tuple[tuple[int, int], ...]] | None = None
  padding: str | tuple[tuple[int, ...], ...]
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
             pre_pad=pre_pad, groups=groups)
  return tuple(sorted(cfg.items(), key=lambda kv: kv[0])), nd + 1


def _patches(config: tuple, x: jax.Array) -> jax.Array:
  """im2col patches `[B, *out_spatial, in · ∏window]` (channel-major features)."""
  cfg = dict(config)
  nd = len(cfg["kernel_size"])
  if cfg["pre_pad"] is not None:
    mode, pads = cfg["pre_pad"]
    x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),), mode=mode)
  spatial = "".join("HWDABCEFG"[i] for i in range(nd))
  dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  return jax.lax.conv_general_dilated_patches(
      x, cfg["kernel_size"], cfg["strides"], cfg["padding"], lhs_dilation=cfg["lhs_dilation"],
      rhs_dilation=cfg["rhs_dilation"], dimension_numbers=dn,
      precision=jax.lax.Precision.HIGHEST)


def positions(config: tuple, x: jax.Array) -> tuple[int, ...]:
  """The shape of the row index of `input_rows`: batch, then the output's spatial axes."""
  return tuple(jax.eval_shape(lambda v: _patches(config, v), x).shape[:-1])


def input_rows(config: tuple, x: jax.Array) -> jax.Array:
  """im2col rows `[N, ∏window · in]` (`[N, G, ∏window · in/G]` for G groups), ordered like
  the flattened kernel (of each group).

  Args:
    config: the patch configuration from `describe`.
    x: the layer's input.

  Returns:
    One row per example and output location (per group), in the order of `positions`.
  """
  cfg = dict(config)
  p = _patches(config, x)
  c, g = x.shape[-1], cfg["groups"]
  # The feature axis comes out channel-major (c, k1, k2, ...); the kernel is (k1, k2, ..., c)
  # within each group of c/g channels.
  p = p.reshape((-1, g, c // g) + tuple(cfg["kernel_size"]))
  p = jnp.moveaxis(p, 2, -1).reshape(-1, g, c // g * math.prod(cfg["kernel_size"]))
  return p[:, 0] if g == 1 else p
