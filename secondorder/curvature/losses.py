"""Output-space losses whose Hessian H_ℓ = ∂²ℓ/∂z² has a closed form.

`gnvp` applies H_ℓ of these losses without differentiating them twice. Each loss is a
callable `outputs -> scalar` (so it can also be used as the loss itself) and a pytree (so
it can cross a `jax.jit` boundary with its labels or targets as data).

Conventions: outputs z have shape [..., D] (D classes or output features) and every leading
axis indexes examples; with reduction="mean" the loss is the mean over those B examples.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from secondorder._validation import check_choice


def _num_examples(shape: tuple[int, ...]) -> int:
  """B: the number of examples in outputs of this shape (all axes but the last)."""
  if len(shape) <= 1:
    return shape[0] if len(shape) == 1 else 1
  return math.prod(shape[:-1])


def _compute_dtype(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)


class OutputLoss:
  """Base class: a scalar loss of the outputs with a closed-form Hessian-vector product."""

  reduction: str

  def __call__(self, outputs: jax.Array) -> jax.Array:
    raise NotImplementedError

  def hessian_vp(self, outputs: jax.Array, u: jax.Array) -> jax.Array:
    """H_ℓ u at `outputs`, for a tangent `u` of the same shape."""
    raise NotImplementedError

  def _scale(self, shape) -> float:
    return 1.0 / _num_examples(shape) if self.reduction == "mean" else 1.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(OutputLoss):
  """ℓ(z) = (1/B) Σ_b −log softmax(z_b)[y_b]; H_ℓ = (1/B) blockdiag_b(diag(p_b) − p_b p_bᵀ).

  `labels` are integers of shape [...] or probabilities of shape [..., C]; they only enter
  the loss value, never H_ℓ (which depends on the logits alone), so they may be None when
  only curvature products are needed.
  """

  labels: jax.Array | None = None
  reduction: str = dataclasses.field(default="mean", metadata=dict(static=True))

  def __call__(self, logits: jax.Array) -> jax.Array:
    if self.labels is None:
      raise ValueError("softmax_cross_entropy needs labels to compute the loss value; "
                       "pass softmax_cross_entropy(labels).")
    logp = jax.nn.log_softmax(logits.astype(_compute_dtype(logits)), axis=-1)
    labels = jnp.asarray(self.labels)
    if labels.shape == logits.shape:
      per_example = -jnp.sum(labels * logp, axis=-1)
    elif labels.shape == logits.shape[:-1]:
      per_example = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    else:
      raise ValueError(f"labels must have shape {logits.shape[:-1]} (integers) or "
                       f"{logits.shape} (probabilities); got {labels.shape}.")
    total = jnp.sum(per_example) * self._scale(logits.shape)
    return total.astype(logits.dtype)

  def hessian_vp(self, logits: jax.Array, u: jax.Array) -> jax.Array:
    dtype = _compute_dtype(logits)
    p = jax.nn.softmax(logits.astype(dtype), axis=-1)
    u32 = u.astype(dtype)
    hu = p * u32 - p * jnp.sum(p * u32, axis=-1, keepdims=True)
    return (hu * self._scale(logits.shape)).astype(u.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SquaredError(OutputLoss):
  """ℓ(z) = (1/B) Σ_b ½‖z_b − y_b‖²; H_ℓ = I / B (I with reduction="sum").

  Outputs [..., D]: every leading axis indexes examples; 1-D outputs [B] are B scalar
  examples. `targets` only enter the loss value and may be None for curvature products.
  """

  targets: jax.Array | None = None
  reduction: str = dataclasses.field(default="mean", metadata=dict(static=True))

  def __call__(self, outputs: jax.Array) -> jax.Array:
    if self.targets is None:
      raise ValueError("squared_error needs targets to compute the loss value; "
                       "pass squared_error(targets).")
    diff = outputs.astype(_compute_dtype(outputs)) - jnp.asarray(self.targets)
    total = 0.5 * jnp.sum(diff * diff) * self._scale(outputs.shape)
    return total.astype(outputs.dtype)

  def hessian_vp(self, outputs: jax.Array, u: jax.Array) -> jax.Array:
    return (u * self._scale(outputs.shape)).astype(u.dtype)


def softmax_cross_entropy(labels: jax.Array | None = None, *, reduction: str = "mean"
                          ) -> SoftmaxCrossEntropy:
  """Softmax cross-entropy on logits [..., C] with a closed-form output Hessian.

  Args:
    labels: integer labels [...] or probabilities [..., C]; None if only `gnvp` is needed.
    reduction: "mean" over the examples (all leading axes) or "sum".

  Example:
    >>> gv = gnvp(logits_fn, softmax_cross_entropy(y), params, v)
  """
  check_choice("reduction", reduction, ("mean", "sum"))
  return SoftmaxCrossEntropy(labels, reduction)


def squared_error(targets: jax.Array | None = None, *, reduction: str = "mean") -> SquaredError:
  """Squared error ½‖z − y‖² (mean over examples by default) with H_ℓ = I / B.

  Args:
    targets: regression targets shaped like the outputs; None if only `gnvp` is needed.
    reduction: "mean" over the examples (all leading axes) or "sum".
  """
  check_choice("reduction", reduction, ("mean", "sum"))
  return SquaredError(targets, reduction)
