"""`hessian_diag` and `fisher_diag`, the successors of `optax.second_order`'s functions.

Each is checked three ways: against optax's own deprecated function (optax 0.2.8 still ships
`optax.second_order`; the comparison is skipped where it is gone), against a reference built
differently (the diagonal of the dense `jax.hessian`, the square of a NumPy-raveled
gradient), and on a case whose answer is known in closed form.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import secondorder as so

BATCH, D_IN, HIDDEN, D_OUT = 6, 3, 4, 2


def _optax_second_order():
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      from optax import second_order  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip("optax no longer ships optax.second_order")
  return second_order


def _data():
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(D_IN, HIDDEN)), "b1": rng.normal(size=HIDDEN) * 0.1,
            "w2": rng.normal(size=(HIDDEN, D_OUT))}
  inputs = rng.normal(size=(BATCH, D_IN))
  targets = rng.normal(size=(BATCH, D_OUT))
  return jax.tree.map(jnp.asarray, params), jnp.asarray(inputs), jnp.asarray(targets)


def mlp_loss(params, inputs, targets):
  hidden = jnp.tanh(inputs @ params["w1"] + params["b1"])
  return 0.5 * jnp.mean(jnp.sum((hidden @ params["w2"] - targets) ** 2, axis=-1))


def test_hessian_diag_is_the_dense_hessians_diagonal_and_optaxs():
  with jax.enable_x64(True):
    params, inputs, targets = _data()
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    got = jax.jit(so.hessian_diag, static_argnums=0)(mlp_loss, params, inputs, targets)
    flat, unravel = ravel_pytree(params)
    dense = jax.hessian(lambda v: mlp_loss(unravel(v), inputs, targets))(flat)
    assert got.shape == flat.shape and got.dtype == jnp.float64
    np.testing.assert_allclose(got, np.diag(np.asarray(dense)), rtol=1e-10, atol=1e-12)
    # Not a diagonal matrix: the check compares more than a separable function's second
    # derivatives.
    assert np.abs(np.asarray(dense) - np.diag(np.diag(np.asarray(dense)))).max() > 1e-2
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      theirs = _optax_second_order().hessian_diag(mlp_loss, params, inputs, targets)
    np.testing.assert_allclose(got, theirs, rtol=1e-10, atol=1e-12)


def test_hessian_diag_of_a_separable_function_is_known():
  params = {"a": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array([[0.0, 1.0]])}
  scale = jnp.array([1.0, 2.0, 3.0])

  def loss(p, inputs, targets):   # diag: scale * cosh(a), exp(b) * inputs
    return (jnp.sum(scale * jnp.cosh(p["a"])) + inputs * jnp.sum(jnp.exp(p["b"])) + targets)

  got = so.hessian_diag(loss, params, 2.0, 0.0)
  want = np.concatenate([np.asarray(scale) * np.cosh([0.5, -1.0, 2.0]), 2.0 * np.exp([0.0, 1.0])])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_fisher_diag_is_the_squared_batch_gradient_and_optaxs():
  params, inputs, targets = _data()

  def nll(p, x, y):   # Gaussian negative log-likelihood up to a constant
    return mlp_loss(p, x, y)

  got = so.fisher_diag(nll, params, inputs, targets)
  grads = jax.grad(nll)(params, inputs, targets)
  # The reference ravels in NumPy, in the order of jax.tree.leaves (ravel_pytree's).
  want = np.concatenate([np.square(np.asarray(g)).reshape(-1) for g in jax.tree.leaves(grads)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    theirs = _optax_second_order().fisher_diag(nll, params, inputs, targets)
  np.testing.assert_allclose(got, theirs, rtol=1e-6)
  # It squares the mean gradient, not the mean of per-example squares.
  per_example = so.empirical_fisher_diag(
      lambda p, ex: nll(p, ex[0][None], ex[1][None]), params, (inputs, targets))
  assert not np.allclose(got, ravel_pytree(per_example)[0], rtol=1e-2)


def test_a_loss_that_is_not_callable_is_named():
  params, inputs, targets = _data()
  with pytest.raises(TypeError, match="hessian_diag: loss must be a callable"):
    so.hessian_diag(params, params, inputs, targets)
  with pytest.raises(TypeError, match="fisher_diag: negative_log_likelihood must be a callable"):
    so.fisher_diag(None, params, inputs, targets)
