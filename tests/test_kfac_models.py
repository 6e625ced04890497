"""K-FAC on the layers of real models, each block against a dense reference in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from secondorder import capture
from secondorder.transforms.kfac import scale_by_kfac_factors

B = 5


def _gauss(z, y):
  return 0.5 * jnp.sum((z - y) ** 2) / z.shape[0]


def _ggn_blocks(outputs, weights):
  """(1/B) Σ_b J_bᵀ J_b per weight matrix, J_b = ∂z_b/∂vec(W) (row-major): the exact GGN."""
  out = {}
  for name, w0 in weights.items():
    jac = jax.jacfwd(lambda w, name=name: outputs(name, w))(w0)       # [B, K, R, O]
    jac = jac.reshape(jac.shape[0], jac.shape[1], -1)
    out[name] = np.einsum("bki,bkj->ij", jac, jac) / jac.shape[0]
  return out


def _assert_kron(stats, ggn, rtol=1e-8):
  for name, ref in ggn.items():
    kron = np.kron(np.asarray(stats[name].a), np.asarray(stats[name].s))
    np.testing.assert_allclose(kron, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# ----------------------------------------------------------------------------- multi-axis dense


class LinenGeneral(nn.Module):
  """[B, 2, 3] -> DenseGeneral over both axes into (2, 2) -> DenseGeneral over both into 3."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((2, 2), axis=(-2, -1), param_dtype=jnp.float64)(x)
    return nn.DenseGeneral(3, axis=(-2, -1), param_dtype=jnp.float64)(h)


class NnxGeneral(nnx.Module):

  def __init__(self, rngs):
    self.first = nnx.LinearGeneral((2, 3), (2, 2), axis=(-2, -1), param_dtype=jnp.float64,
                                   rngs=rngs)
    self.second = nnx.LinearGeneral((2, 2), 3, axis=(-2, -1), param_dtype=jnp.float64,
                                    rngs=rngs)

  def __call__(self, x):
    return self.second(self.first(x))


def _with_bias_row(kernel, bias, rows):
  return jnp.concatenate([kernel.reshape(rows, -1), bias.reshape(1, -1)], axis=0)


def test_multi_axis_dense_blocks_equal_exact_ggn():
  """A deep linear net of multi-axis dense layers: Â ⊗ Ŝ is its exact GGN block (linen, NNX)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, 2, 3), jnp.float64)
    y = jnp.zeros((B, 3), jnp.float64)
    lin = LinenGeneral()
    params = lin.init(jax.random.key(1), x)["params"]
    cap = capture.linen_capture(lin, _gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
    layers = cap.layers(params, x)
    assert [(l.name, l.kernel_shape, l.a_dim, l.s_dim) for l in layers] == [
        ("DenseGeneral_0", (2, 3, 2, 2), 7, 4), ("DenseGeneral_1", (2, 2, 3), 5, 3)]
    _, _, stats = jax.jit(cap)(params, x, y)
    rows = {"DenseGeneral_0": 6, "DenseGeneral_1": 4}
    weights = {n: _with_bias_row(params[n]["kernel"], params[n]["bias"], r)
               for n, r in rows.items()}

    def outputs(name, w):
      p = dict(params)
      shape = params[name]["kernel"].shape
      p[name] = {"kernel": w[:-1].reshape(shape), "bias": w[-1].reshape(params[name]["bias"].shape)}
      return lin.apply({"params": p}, x)

    ggn = _ggn_blocks(outputs, weights)
    _assert_kron(stats, ggn)

    net = NnxGeneral(nnx.Rngs(0))
    net.first.kernel.value = params["DenseGeneral_0"]["kernel"]
    net.first.bias.value = params["DenseGeneral_0"]["bias"]
    net.second.kernel.value = params["DenseGeneral_1"]["kernel"]
    net.second.bias.value = params["DenseGeneral_1"]["bias"]
    cap_n = capture.nnx_capture(_gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
    assert [l.name for l in cap_n.layers(net, x)] == ["first", "second"]
    _, _, st_n = nnx.jit(cap_n)(net, x, y)
    _assert_kron({"first": st_n["first"], "second": st_n["second"]},
                 {"first": ggn["DenseGeneral_0"], "second": ggn["DenseGeneral_1"]})


def test_multi_axis_update_is_the_matrix_update():
  """The transform preconditions a [2, 3, 2, 2] kernel as the 6 x 4 matrix it is (NumPy)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (B, 2, 3), jnp.float64)
    lin = LinenGeneral()
    params = lin.init(jax.random.key(1), x)["params"]
    cap = capture.linen_capture(lin, _gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
    y = jax.random.normal(jax.random.key(2), (B, 3), jnp.float64)
    _, grads, stats = jax.jit(cap)(params, x, y)
    lam = 1e-2
    tx = scale_by_kfac_factors(layers=cap.layers(params, x), damping=lam, damping_mode="exact",
                               stats_dtype=jnp.float64)
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params, kfac_stats=stats)
    for name, rows in (("DenseGeneral_0", 6), ("DenseGeneral_1", 4)):
      g = np.asarray(_with_bias_row(grads[name]["kernel"], grads[name]["bias"], rows))
      alpha, qa = np.linalg.eigh(np.asarray(stats[name].a))
      sigma, qs = np.linalg.eigh(np.asarray(stats[name].s))
      alpha, sigma = np.maximum(alpha, 0), np.maximum(sigma, 0)
      ref = qa @ ((qa.T @ g @ qs) / (np.outer(alpha, sigma) + lam)) @ qs.T
      got = np.asarray(_with_bias_row(upd[name]["kernel"], upd[name]["bias"], rows))
      assert upd[name]["kernel"].shape == grads[name]["kernel"].shape
      np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())
