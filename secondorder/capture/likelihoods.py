"""The likelihoods a K-FAC capture samples from, and their closed-form Fisher square roots.

Every likelihood reads the model's output `z` as one example per position along all axes
but the last (a batch `[B, C]`, or a sequence batch `[B, T, C]` whose B·T tokens are the
examples) and sums the negative log-likelihood over the last axis. The loss whose Fisher
the capture estimates is the *mean* over those M examples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LIKELIHOODS = ("softmax", "bernoulli", "gaussian")
FISHERS = ("sampled", "empirical", "exact")


def num_examples(z: jax.Array) -> int:
  """M: the number of examples in an output `z` (every position along all axes but the last)."""
  return math.prod(z.shape[:-1]) if z.ndim > 1 else 1


def nll(likelihood: str, z: jax.Array, y: jax.Array) -> jax.Array:
  r"""Negative log-likelihood, summed over the last axis and averaged over the M examples.

  Args:
    likelihood: "softmax" (integer labels), "bernoulli" (targets in [0, 1]) or "gaussian"
      (unit variance, ½‖z − y‖²).
    z: the model's outputs.
    y: labels or targets.

  Returns:
    :math:`\frac1M \sum_m -\log p(y_m | z_m)`.
  """
  if likelihood == "softmax":
    logp = jax.nn.log_softmax(z, axis=-1)
    per = -jnp.take_along_axis(logp, y[..., None].astype(jnp.int32), axis=-1)
  elif likelihood == "bernoulli":
    per = jnp.logaddexp(0.0, z) - y * z          # softplus(z) - y z = -log p(y|z)
  else:
    per = 0.5 * jnp.square(z - y)
  return jnp.sum(per) / num_examples(z)


def sample(likelihood: str, key: jax.Array, z: jax.Array) -> jax.Array:
  """Labels drawn from the model's predictive distribution at `z` (no gradient through z)."""
  z = jax.lax.stop_gradient(z)
  if likelihood == "softmax":
    return jax.random.categorical(key, z, axis=-1)
  if likelihood == "bernoulli":
    return jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype)
  return z + jax.random.normal(key, z.shape, z.dtype)


def sqrt_fisher_cotangents(likelihood: str, z: jax.Array) -> jax.Array:
  r"""Cotangents `[K, *z.shape]` whose outer products sum to the expected one.

  For the mean loss of `nll`, :math:`\sum_k c_k c_k^\top = E_{\hat y}[\nabla_z \ell\,
  \nabla_z \ell^\top]`, block-diagonal over examples: each example's block is its output
  Hessian :math:`H_m` divided by :math:`M^2`. For the softmax,
  :math:`H = \mathrm{diag}(p) - p p^\top = L L^\top` with column k of L
  :math:`\sqrt{p_k}(e_k - p)`; for the Bernoulli, :math:`\mathrm{diag}(\sigma(1-\sigma))`;
  for the Gaussian, I.

  Args:
    likelihood: one of `LIKELIHOODS`.
    z: the model's outputs.

  Returns:
    The K cotangents stacked on a new leading axis (K = classes for the softmax, the number
    of output units per example otherwise).
  """
  z = jax.lax.stop_gradient(z).astype(jnp.float32 if z.dtype != jnp.float64 else z.dtype)
  m = num_examples(z)
  if likelihood == "softmax":
    c = z.shape[-1]
    p = jax.nn.softmax(z, axis=-1)
    sp = jnp.sqrt(p)
    eye = jnp.eye(c, dtype=z.dtype)
    cols = sp[..., :, None] * (eye - p[..., None, :])   # [..., k, j]: sqrt(p_k)(δ_kj - p_j)
    return jnp.moveaxis(cols, -2, 0) / m               # [C, ..., C]
  if likelihood == "bernoulli":
    s = jax.nn.sigmoid(z)
    d = jnp.sqrt(s * (1.0 - s))
  else:
    d = jnp.ones_like(z)
  # One cotangent per output unit k, active at unit k of every example (block-diagonal).
  k = z.shape[-1]
  eye = jnp.eye(k, dtype=z.dtype).reshape((k,) + (1,) * (z.ndim - 1) + (k,))
  return eye * d[None] / m
