"""scale_by_ekfac / ekfac and the capture's projected moments against dense NumPy references
(float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from secondorder import capture
from secondorder.transforms.ekfac import ekfac, ekfac_bases, scale_by_ekfac
from tests import _ekfac_reference as ref


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(5, param_dtype=jnp.float64, name="Dense_0")(x))
    return nn.Dense(3, param_dtype=jnp.float64, name="Dense_1")(x)


class ScannedSeq(nn.Module):
  """A sequence model: a Dense at every position, then two scanned Dense layers."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(4, param_dtype=jnp.float64, name="embed_in")(x))

    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(4, param_dtype=jnp.float64)(h)), None

    x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="blocks")(x, None)
    return nn.Dense(3, param_dtype=jnp.float64, name="head")(x)


def ce(z, y):
  return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def _setup(model, x_shape, labels_shape, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], x_shape, jnp.float64)
  y = jax.random.randint(keys[1], labels_shape, 0, 3)
  params = model.init(keys[2], x)["params"]
  cap = capture.linen_capture(model, ce, fisher="empirical", stats_dtype=jnp.float64)
  return x, y, params, cap


def _two_steps(model, x_shape, labels_shape, same_batch, damping=1e-3):
  """Step 1 sets the bases; step 2 (no refresh) divides by the moments measured in them."""
  x, y, params, cap = _setup(model, x_shape, labels_shape)
  x2, y2, _, _ = _setup(model, x_shape, labels_shape, seed=1)
  if same_batch:
    x2, y2 = x, y
  tx = scale_by_ekfac(layers=cap.layers(params, x), damping=damping, decay=0.9,
                      update_interval=100, stats_dtype="float64")
  s0 = tx.init(params)
  _, g1, st1 = cap(params, x, y, bases=ekfac_bases(s0))
  _, s1 = tx.update(g1, s0, params, kfac_stats=st1)
  _, g2, st2 = cap(params, x2, y2, bases=ekfac_bases(s1))
  u2, s2 = tx.update(g2, s1, params, kfac_stats=st2)
  return (x, y), (x2, y2), params, (g2, u2), (s1, s2)


def test_preconditioner_matches_dense_numpy_construction():
  with jax.enable_x64(True):
    (x, y), (x2, y2), params, (g2, u2), (s1, s2) = _two_steps(MLP(), (7, 4), (7,), False)
    assert int(s2.num_refreshes) == 1 and float(s2.moment_weight) > 0
    p = jax.tree.map(np.asarray, params)
    rows1 = ref.mlp_rows(p, np.asarray(x), np.asarray(y))
    rows2 = ref.mlp_rows(p, np.asarray(x2), np.asarray(y2))
    for name, (a1, g1), (a2, gg2) in zip(sorted(p), rows1, rows2):
      q = ref.kron_basis(*ref.factors(a1, g1))
      per_example = np.einsum("ni,nj->nij", a2, gg2)
      d = ref.projected_diagonal(q, per_example, len(a2))
      grad = per_example.sum(0)
      np.testing.assert_allclose(
          grad, np.concatenate([g2[name]["kernel"], g2[name]["bias"][None]]), atol=1e-12)
      want = ref.precondition(q, d, grad, 1e-3)
      got = np.concatenate([u2[name]["kernel"], u2[name]["bias"][None]])
      np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


@pytest.mark.parametrize("model,x_shape,labels_shape", [
    (MLP(), (7, 4), (7,)),
    (ScannedSeq(), (3, 5, 2), (3, 5)),
], ids=["mlp", "scanned_sequence"])
def test_diagonal_is_the_empirical_fisher_diagonal_in_the_eigenbasis(model, x_shape,
                                                                     labels_shape):
  """E = diag(Qᵀ F Q) for the exact empirical Fisher F (the data labels) of each dense
  block, F = M Σ_n g_n g_nᵀ over examples (sequences) n, g_n the example's part of the mean
  loss's gradient (by vmap of grad, not the capture); K-FAC's ασᵀ is not that diagonal."""
  with jax.enable_x64(True):
    (x, y), _, params, _, (s1, s2) = _two_steps(model, x_shape, labels_shape, True)
    m = int(np.prod(labels_shape))

    def example_loss(p, xn, yn):   # example n's part of the mean loss
      z = model.apply({"params": p}, xn[None])[0]
      return optax.softmax_cross_entropy_with_integer_labels(z, yn).sum() / m

    per = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
    checked = 0
    for name in s2.moments:
      node = per
      for key in name.split("/"):
        node = node[key]
      kern, bias = node["kernel"], node["bias"]       # [N, (L,) in, out], [N, (L,) out]
      stacked = kern.ndim == 4
      kern = kern if stacked else kern[:, None]
      bias = bias if stacked else bias[:, None]
      g_n = np.asarray(jnp.concatenate([kern, bias[:, :, None]], axis=2))   # [N, L, in+1, out]
      e = np.asarray(s2.moments[name] / s2.moment_weight).reshape(g_n.shape[1:])
      qa = np.asarray(s2.a_eigvecs[name]).reshape(g_n.shape[1:2] + (g_n.shape[2],) * 2)
      qs = np.asarray(s2.s_eigvecs[name]).reshape(g_n.shape[1:2] + (g_n.shape[3],) * 2)
      alpha = np.asarray(s2.a_eigvals[name]).reshape(g_n.shape[1:3])
      sigma = np.asarray(s2.s_eigvals[name]).reshape(g_n.shape[1], g_n.shape[3])
      for l in range(g_n.shape[1]):
        flat = g_n[:, l].reshape(len(g_n), -1)
        fisher = m * flat.T @ flat                      # dense F of the block
        q = np.kron(qa[l], qs[l])
        want = np.diag(q.T @ fisher @ q).reshape(e.shape[1:])
        np.testing.assert_allclose(e[l], want, rtol=1e-9, atol=1e-12 * want.max())
        kfac_diag = alpha[l][:, None] * sigma[l][None, :]
        assert np.abs(kfac_diag - want).max() > 1e-2 * want.max(), name
        checked += 1
    assert checked == (2 if isinstance(model, MLP) else 4)


def test_first_step_is_kfac_exact_step_and_refresh_restarts_moments():
  """At a refresh the moments restart (weight 0) and the step divides by K-FAC's ασᵀ: the
  same update as scale_by_kfac_factors(damping_mode="exact")."""
  from secondorder.transforms.kfac import scale_by_kfac_factors
  with jax.enable_x64(True):
    x, y, params, cap = _setup(MLP(), (7, 4), (7,))
    layers = cap.layers(params, x)
    kw = dict(layers=layers, damping=1e-2, decay=0.9, update_interval=2,
              stats_dtype="float64")
    tx, ref_tx = scale_by_ekfac(**kw), scale_by_kfac_factors(damping_mode="exact", **kw)
    s, rs = tx.init(params), ref_tx.init(params)
    weights = []
    for step in range(3):
      _, g, st = cap(params, x, y, bases=ekfac_bases(s))
      u, s = tx.update(g, s, params, kfac_stats=st)
      ru, rs = ref_tx.update(g, rs, params, kfac_stats=st)
      weights.append(float(s.moment_weight))
      if step in (0, 2):      # refresh steps
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                     u, ru)
      else:                   # a measured diagonal: not K-FAC's step
        diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                                u, ru)))
        assert diff > 1e-6
    assert weights[0] == 0.0 and weights[1] > 0 and weights[2] == 0.0
    assert int(s.num_refreshes) == 2


def test_alias_is_the_documented_chain():
  with jax.enable_x64(True):
    x, y, params, cap = _setup(MLP(), (7, 4), (7,))
    layers = cap.layers(params, x)
    alias = ekfac(0.1, layers=layers, damping=1e-2, weight_decay=1e-3, kl_clip=1e-2,
                  stats_dtype="float64")
    chain = optax.chain(
        scale_by_ekfac(layers=layers, damping=1e-2, update_interval=5, kl_clip=1e-2,
                       learning_rate=0.1, fallback_scale=0.01, stats_dtype="float64"),
        optax.add_decayed_weights(1e-3), optax.scale_by_learning_rate(0.1))
    sa, sc = alias.init(params), chain.init(params)
    for _ in range(2):
      _, g, st = cap(params, x, y, bases=ekfac_bases(sa))
      ua, sa = alias.update(g, sa, params, kfac_stats=st)
      uc, sc = chain.update(g, sc, params, kfac_stats=st)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), ua, uc)
      params = optax.apply_updates(params, ua)


def test_non_finite_moments_skip_the_batch():
  with jax.enable_x64(True):
    x, y, params, cap = _setup(MLP(), (7, 4), (7,))
    tx = scale_by_ekfac(layers=cap.layers(params, x), update_interval=100,
                        stats_dtype="float64")
    s = tx.init(params)
    _, g, st = cap(params, x, y, bases=ekfac_bases(s))
    _, s = tx.update(g, s, params, kfac_stats=st)
    _, g, st = cap(params, x, y, bases=ekfac_bases(s))
    st = dict(st)
    st["Dense_1"] = st["Dense_1"]._replace(e=st["Dense_1"].e.at[0, 0].set(jnp.nan))
    _, s2 = tx.update(g, s, params, kfac_stats=st)
    assert int(s2.num_skipped) == 1 and float(s2.moment_weight) == 0.0
    jax.tree.map(np.testing.assert_array_equal, (s2.a, s2.s, s2.factor_weight),
                 (s.a, s.s, s.factor_weight))


@jax.enable_x64(True)
def test_bad_inputs_name_the_argument():
  x, y, params, cap = _setup(MLP(), (7, 4), (7,))
  layers = cap.layers(params, x)
  for kw, word in ((dict(damping=0.0), "damping"), (dict(decay=1.0), "decay"),
                   (dict(update_interval=0), "update_interval"),
                   (dict(kl_clip=1e-2), "learning_rate"), (dict(fallback_scale=-1.0),
                                                           "fallback_scale")):
    with pytest.raises(ValueError, match=word):
      scale_by_ekfac(layers=layers, **kw)
  with pytest.raises(ValueError, match="weight_decay"):
    ekfac(0.1, layers=layers, weight_decay=-1.0)
  tx = scale_by_ekfac(layers=layers)
  s = tx.init(params)
  _, g, st = cap(params, x, y)                      # no bases: no projected moments
  with pytest.raises(ValueError, match="bases=ekfac_bases"):
    tx.update(g, s, params, kfac_stats=st)
  with pytest.raises(ValueError, match="not a covered dense layer"):
    cap(params, x, y, bases={"nope": (jnp.eye(5), jnp.eye(5))})
  with pytest.raises(ValueError, match="Q_S has shape"):
    cap(params, x, y, bases={"Dense_0": (jnp.eye(5), jnp.eye(4))})
  with pytest.raises(TypeError, match="bases must be a dict"):
    cap(params, x, y, bases=[1])
  with pytest.raises(ValueError, match="exactly one ScaleByEkfacState"):
    ekfac_bases(optax.adam(0.1).init(params))


def test_nnx_capture_projects_per_sequence_gradients_into_any_bases():
  """The capture's protocol for NNX: for given orthogonal bases (not the optimizer's), e of
  an `nnx.Linear` on sequences `[B, T, d]` is M Σ_b (Q_Aᵀ g_b Q_S)², g_b the sequence's part
  of the mean loss's gradient (vmap of grad)."""
  from flax import nnx
  with jax.enable_x64(True):
    model = nnx.Sequential(nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
                           nnx.tanh,
                           nnx.Linear(4, 3, param_dtype=jnp.float64, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(2), (3, 5, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(3), (3, 5), 0, 3)
    cap = capture.nnx_capture(ce, fisher="empirical", stats_dtype=jnp.float64)
    layers = cap.layers(model, x)
    rng = np.random.default_rng(0)
    orth = lambda d: np.linalg.qr(rng.normal(size=(d, d)))[0]
    bases = {l.name: (orth(l.a_dim), orth(l.s_dim)) for l in layers}
    _, _, stats = cap(model, x, y, bases=bases)
    m = 15
    graphdef, params = nnx.split(model, nnx.Param)

    def sequence_loss(p, xb, yb):
      z = nnx.merge(graphdef, p)(xb[None])[0]
      return optax.softmax_cross_entropy_with_integer_labels(z, yb).sum() / m

    per = jax.vmap(jax.grad(sequence_loss), in_axes=(None, 0, 0))(params, x, y)
    per = nnx.to_pure_dict(per)
    for layer in layers:
      node = per
      for key in layer.kernel[:-1]:
        node = node[key if key in node else int(key)]
      g = np.concatenate([node["kernel"], node["bias"][:, None]], axis=1)
      qa, qs = bases[layer.name]
      want = m * np.sum((np.swapaxes(qa, 0, 1)[None] @ g @ qs) ** 2, axis=0)
      np.testing.assert_allclose(stats[layer.name].e, want, rtol=1e-10,
                                 atol=1e-13 * want.max())
