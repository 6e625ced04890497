"""Running an optax transform with its statistics in (at least) float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _promote(tree):
  return jax.tree.map(
      lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` on float leaves promoted to at least float32 (its statistics then stay float32
  for bfloat16/float16 params, where g**2 overflows); updates cast back to their dtype."""
  tx = optax.with_extra_args_support(tx)  # unknown extra args are dropped, not passed on

  def update_fn(updates, state, params=None, **extra_args):
    out, state = tx.update(_promote(updates), state, _promote(params), **extra_args)
    return jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates), state

  return optax.GradientTransformationExtraArgs(lambda params: tx.init(_promote(params)),
                                               update_fn)
