"""What the diagonal curvature methods share: the refresh schedule and its bookkeeping.

AdaHessian (`scale_by_hutchinson`) and Sophia (`sophia_clip`) both fold a curvature
estimate into an EMA on refresh steps only (every `update_interval` steps, or on the steps a
host loop declares with `refresh=True`), skip estimates that hold a NaN or an Inf, and keep
their statistics in float32 unless told otherwise. The helpers here are those steps.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from secondorder._validation import check_count
from secondorder.curvature.estimators import rademacher_like
from secondorder.curvature.products import value_grad_hvp

__all__ = ["statistics_dtype", "check_int_if_concrete", "every_step", "maybe_refresh",
           "check_estimate_is_used", "tree_all_finite", "one_pass_hutchinson"]


def statistics_dtype(leaf_dtype, requested) -> jnp.dtype:
  """The dtype of a statistic of a leaf: `requested`, else at least float32."""
  if requested is not None:
    return jnp.dtype(requested)
  return jnp.promote_types(leaf_dtype, jnp.float32)


def check_int_if_concrete(name: str, value: Any, minimum: int) -> None:
  """Checks an integer hyperparameter: a Python int, or a concrete array
  (`optax.inject_hyperparams` at init); a traced value passes."""
  check_count(name, value, minimum=minimum)


def every_step(update_interval) -> bool:
  """True for a concrete interval of 1: then no `lax.cond` is needed. (XLA:CPU also runs
  convolution gradients inside a conditional far slower than outside, jax-ml/jax#12868.)"""
  return isinstance(update_interval, numbers.Number) and update_interval == 1


def maybe_refresh(refresh_fn: Callable, carry: tuple, count: jax.Array, update_interval,
                  refresh: bool | None) -> tuple:
  """`refresh_fn(*carry)` on refresh steps, else `carry`.

  `refresh=None` follows the schedule (steps where `count % update_interval == 0`, under
  `jax.lax.cond`; no conditional at all for an interval of 1). A Python bool decides on the
  host instead: the step is traced without a conditional, and the caller compiles one step
  for refresh steps and one for the others.

  Args:
    refresh_fn: `*carry -> carry`, the refresh.
    carry: the statistics the refresh updates.
    count: the step counter (int32 scalar).
    update_interval: refresh every this many steps (int or traced int; a traced value
      below 1 is read as 1).
    refresh: None, or a Python bool chosen on the host.

  Returns:
    The refreshed carry on refresh steps, `carry` otherwise.
  """
  if refresh is not None:
    if not isinstance(refresh, (bool, np.bool_)):
      raise ValueError(
          "refresh must be None (follow update_interval) or a Python bool decided on the host "
          f"(a static argument of the jitted step), got {refresh!r}.")
    return refresh_fn(*carry) if refresh else carry
  if every_step(update_interval):
    return refresh_fn(*carry)
  interval = jnp.maximum(jnp.asarray(update_interval, jnp.int32), 1)
  return jax.lax.cond(count % interval == 0, refresh_fn, lambda *a: a, *carry)


def check_estimate_is_used(name: str, hessian_diag, refresh) -> None:
  """Raises if a ready estimate is given on a step the caller has declared plain (it would
  be dropped silently)."""
  if hessian_diag is not None and isinstance(refresh, (bool, np.bool_)) and not refresh:
    raise ValueError(
        f"{name}: hessian_diag= was given with refresh=False, so it would be ignored. Pass "
        "it on refresh steps only (`refresh=True`), or leave refresh=None to let "
        "update_interval decide.")


def tree_all_finite(tree) -> jax.Array:
  """A boolean scalar: every entry of every leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def one_pass_hutchinson(obj_fn: Callable, params: Any, key: jax.Array, has_aux: bool
                        ) -> tuple[jax.Array, Any, Any, Any]:
  r"""`(loss, grads, z * Hz, aux)` from one forward-over-reverse pass.

  The probe :math:`z` is the one `hutchinson_diag(obj_fn, params, key)` draws with one
  sample, so a one-pass refresh and the `obj_fn=` path give the same estimate.

  Args:
    obj_fn: `params -> loss`, or `params -> (loss, aux)` with `has_aux=True` (for example
      the new batch statistics of the gradient pass).
    params: the parameters.
    key: the key `hutchinson_diag` would receive at this step.
    has_aux: whether `obj_fn` returns `(loss, aux)`.

  Returns:
    The loss, the gradient, the raw estimate :math:`z \odot Hz` and `aux` (None without
    `has_aux`).
  """
  probe = rademacher_like(jax.random.split(key, 1)[0], params)
  if not has_aux:
    value, grads, hz = value_grad_hvp(obj_fn, params, probe)
    return value, grads, jax.tree.map(jnp.multiply, probe, hz), None

  def value_and_grad(p):
    (value, aux), grads = jax.value_and_grad(obj_fn, has_aux=True)(p)
    return (value, grads), aux

  (value, grads), (_, hz), aux = jax.jvp(value_and_grad, (params,), (probe,), has_aux=True)
  return value, grads, jax.tree.map(jnp.multiply, probe, hz), aux
