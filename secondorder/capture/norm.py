r"""Scale-and-shift layers (`LayerNorm`, `RMSNorm`, `GroupNorm`, and `BatchNorm` in training
mode, of linen and NNX): the exact Fisher per feature.

A norm layer's output is `y = x̂ ⊙ γ + β` with x̂ the normalised input. Its parameters are
not a Kronecker pair: per feature j the per-row gradients are `u_j = ĝ_j x̂_j` (of γ) and
`ĝ_j` (of β), and the block of the Fisher over (γ_j, β_j) is, every row an example as for
the other layers (K-FAC-expand over positions),

.. math:: F_j = M \sum_\text{rows} \begin{pmatrix} u_j^2 & u_j \hat g_j \\
          u_j \hat g_j & \hat g_j^2 \end{pmatrix}

(a 1×1 block for a scale alone): the exact per-feature diagonal of the Fisher, kept whole
and inverted directly (`[features, 2, 2]`), never a Kronecker pair. x̂ is recomputed from
the layer's input with its own configuration (mean or not, variance, epsilon, axes, and for
a GroupNorm its channel groups).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from secondorder.capture import taps
from secondorder.capture.types import KfacLayer, LayerStats

KIND = "norm"


def _axes(axes, ndim: int) -> tuple[int, ...]:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


def _unsupported(module, kwargs: dict) -> str | None:
  """Why a norm layer's call cannot be covered whatever its kind, or None."""
  if not getattr(module, "use_scale", True):
    return "a norm layer without a scale (its shift alone is left to the fallback)"
  if kwargs.get("mask") is not None:
    return "a norm layer called with a mask"
  if getattr(module, "axis_name", None) is not None:
    return "a norm layer reducing over a device axis (axis_name)"
  return None


def describe(module, x: jax.Array, use_mean: bool, kwargs: dict) -> tuple[tuple, int] | str:
  """The normalisation's configuration, or why the call cannot be covered.

  Args:
    module: the `LayerNorm` / `RMSNorm` being called (linen or NNX).
    x: its input.
    use_mean: whether the layer subtracts the mean (LayerNorm) or not (RMSNorm).
    kwargs: the call's keyword arguments.

  Returns:
    `(hashable configuration, 0)` (a scale has no input side), or a reason string.
  """
  reason = _unsupported(module, kwargs)
  if reason:
    return reason
  if jnp.ndim(x) < 1:
    return "a scalar input"
  cfg = dict(reduction=_axes(module.reduction_axes, jnp.ndim(x)),
             features=_axes(module.feature_axes, jnp.ndim(x)), epsilon=float(module.epsilon),
             use_mean=use_mean, fast=bool(getattr(module, "use_fast_variance", True)))
  return tuple(sorted(cfg.items())), 0


def _reduction_axes(module, ndim: int) -> tuple[int, ...]:
  """A GroupNorm's reduction axes: its own, or Flax's default (all but the batch axis)."""
  axes = module.reduction_axes
  if axes is None:
    axes = tuple(range(1, ndim - 1)) + (ndim - 1,)
  return _axes(axes, ndim)


def describe_group(module, x: jax.Array, kwargs: dict) -> tuple[tuple, int] | str:
  """A `GroupNorm`'s configuration, or why the call cannot be covered.

  Args:
    module: the `GroupNorm` being called (linen or NNX).
    x: its input, channels last.
    kwargs: the call's keyword arguments.

  Returns:
    `(hashable configuration, 0)`, or a reason string.
  """
  reason = _unsupported(module, kwargs)
  if reason:
    return reason
  if jnp.ndim(x) < 2:
    return "a GroupNorm input of rank < 2"
  ndim, channels = jnp.ndim(x), jnp.shape(x)[-1]
  reduction = _reduction_axes(module, ndim)
  if reduction[-1] != ndim - 1:
    return "a GroupNorm whose reduction axes leave out the channel axis"
  groups = (channels // module.group_size if module.group_size is not None
            else module.num_groups)
  cfg = dict(reduction=reduction[:-1], features=(ndim - 1,), epsilon=float(module.epsilon),
             use_mean=True, fast=bool(getattr(module, "use_fast_variance", True)),
             groups=int(groups))
  return tuple(sorted(cfg.items())), 0


def describe_batch(module, x: jax.Array, args: tuple, kwargs: dict) -> tuple[tuple, int] | str:
  """A `BatchNorm`'s configuration in training mode, or why the call cannot be covered.

  In training mode x̂ is `x` standardised with the batch's own statistics, over every axis
  but the feature axes, which the capture recomputes; in evaluation mode (running
  averages) the layer is left to the fallback.

  Args:
    module: the `BatchNorm` being called (linen or NNX).
    x: its input.
    args: the call's positional arguments after `x` (`use_running_average`).
    kwargs: the call's keyword arguments.

  Returns:
    `(hashable configuration, 0)`, or a reason string.
  """
  running = kwargs.get("use_running_average", args[0] if args else None)
  if running is None:
    running = module.use_running_average
  if running is None or bool(running):
    return ("a BatchNorm in evaluation mode (running averages): its scale and shift are "
            "left to the fallback")
  reason = _unsupported(module, kwargs)
  if reason:
    return reason
  if jnp.ndim(x) < 2:
    return "a BatchNorm input of rank < 2"
  ndim = jnp.ndim(x)
  features = _axes(module.axis, ndim)
  cfg = dict(reduction=tuple(a for a in range(ndim) if a not in features), features=features,
             epsilon=float(module.epsilon), use_mean=True,
             fast=bool(getattr(module, "use_fast_variance", True)))
  return tuple(sorted(cfg.items())), 0


def normalized(config: tuple, x: jax.Array) -> jax.Array:
  """x̂: `x` normalised as the layer does, before its scale and shift.

  Args:
    config: from `describe`.
    x: the layer's input.

  Returns:
    x̂, computed in at least float32, in `x`'s shape.
  """
  cfg = dict(config)
  x = jax.lax.stop_gradient(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = cfg["reduction"]
  groups = cfg.get("groups")
  if groups:   # GroupNorm: the statistics of each channel group, over `axes` and the group
    shape = x.shape
    x = x.reshape(shape[:-1] + (groups, shape[-1] // groups))
    return _standardize(x, axes + (x.ndim - 1,), cfg).reshape(shape)
  return _standardize(x, axes, cfg)


def _standardize(x: jax.Array, axes: tuple[int, ...], cfg: dict) -> jax.Array:
  """`(x − mean) / sqrt(var + ε)` over `axes` (or `x / sqrt(mean x² + ε)` without a mean)."""
  mean: jax.Array | float
  if cfg["use_mean"]:
    mean = x.mean(axes, keepdims=True)
    if cfg["fast"]:
      var = jnp.maximum(0.0, jnp.square(x).mean(axes, keepdims=True) - jnp.square(mean))
    else:
      var = jnp.square(x - mean).mean(axes, keepdims=True)
  else:
    mean, var = 0.0, jnp.square(x).mean(axes, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + cfg["epsilon"])


def slot_shapes(layer: KfacLayer) -> tuple[tuple[int, ...], ...]:
  """One zero slot: the per-feature blocks `[*stack, features, k, k]`."""
  return (layer.stat_shapes()[0],)


def tap(described, slots, call, x, with_bias: bool, weights) -> jax.Array:
  """The layer's output, whose backward pass reports the per-feature blocks.

  Its block sums the rows' own gradients, which the masked loss already weights (a padded
  position carries gradient only through what the real tokens read from it), so a padding
  mask (`weights`) changes nothing here."""
  del weights
  cfg = dict(described[0])
  y = call(x)
  x_hat = normalized(described[0], x).astype(y.dtype)
  return taps.tap_scale_shift(y, x_hat, slots[0], cfg["features"], with_bias)


def statistics(layer: KfacLayer, first: tuple, fisher: tuple, m: int) -> LayerStats:
  """`LayerStats(a=M Σ_rows blocks, s=None)` from the Fisher pass's cotangents."""
  del layer, first
  return LayerStats(a=m * fisher[0], s=None)
