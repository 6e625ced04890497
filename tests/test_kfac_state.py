"""K-FAC's capture on models with state and randomness, and on every kind of convolution.

- The BatchNorm + Dropout CNN of `tests/_real_models.py` in training mode (NNX and linen):
  the capture's one training forward leaves the batch statistics (and NNX's RNG counter)
  exactly where a plain `optax.adam` step on the same batch and key leaves them; its
  factors equal those of the same forward written out by hand (explicit patches, the
  batch's statistics, the model's own dropout mask, labels sampled with the same key); a
  few jitted K-FAC steps train.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import secondorder as so
from secondorder import capture
from secondorder.transforms.kfac import scale_by_kfac_factors
from tests import _real_models as rm

STEPS = 6
# The tests' programs run in milliseconds: compile them at XLA's lowest CPU level.
_LOW = {"xla_backend_optimization_level": 0}


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _numeric(tree):
  """The leaves of a model state as float arrays (NNX's RNG keys as their key data)."""
  return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x, np.float64) for x in jax.tree.leaves(tree)]


# --- The CNN written out by hand --------------------------------------------------------

def _patches(x):
  """3x3 SAME im2col by explicit slicing: `[B·H·W, 9·C]`, ordered (di, dj, c)."""
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = [xp[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)]
  return jnp.concatenate(cols, axis=-1).reshape(-1, 9 * x.shape[-1])


def _aug(rows):
  return jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)


def _hand_stats(p, x, scaled_mask, key):
  """Â and Ŝ of the conv and the head, and the BatchNorm's per-channel blocks, from the
  forward written with explicit patches, the batch's statistics and a given dropout mask, at
  labels sampled from its logits with `key`.

  Ŝ = B Σ_rows ĝ ĝᵀ with ĝ the gradient of the mean loss with respect to the layer's
  output (perturbed by `eps`), Â the mean of [a, 1][a, 1]ᵀ over the layer's input rows.
  """
  b = x.shape[0]
  rows = _patches(x)

  def forward(eps):
    h = rows @ p["conv"]["kernel"].reshape(-1, rm.CHANNELS) + p["conv"]["bias"] + eps["conv"]
    mean = h.mean(0)
    var = ((h - mean) ** 2).mean(0)
    x_hat = (h - mean) / jnp.sqrt(var + rm.BN_EPS)
    h = x_hat * p["bn"]["scale"] + p["bn"]["bias"] + eps["bn"]
    h = jnp.maximum(h, 0).reshape(b, *rm.IMAGE[:2], rm.CHANNELS) * scaled_mask
    pooled = h.mean(axis=(1, 2))
    return pooled @ p["head"]["kernel"] + p["head"]["bias"] + eps["head"], (pooled, x_hat)

  eps = {"conv": jnp.zeros((rows.shape[0], rm.CHANNELS)), "head": jnp.zeros((b, rm.CLASSES)),
         "bn": jnp.zeros((rows.shape[0], rm.CHANNELS))}
  logits, (pooled, x_hat) = forward(eps)
  labels = jax.random.categorical(key, logits, axis=-1)
  g = jax.grad(lambda e: _ce(forward(e)[0], labels))(eps)
  a = {"conv": _aug(rows), "head": _aug(pooled)}
  out = {k: capture.LayerStats(a=a[k].T @ a[k] / a[k].shape[0], s=b * g[k].T @ g[k])
         for k in a}
  # BatchNorm in training mode: per channel j, B Σ_rows [u_j, g_j][u_j, g_j]ᵀ with g the
  # gradient at its output and u = g ⊙ x̂ (x̂ standardised with the batch's statistics).
  per_row = jnp.stack([g["bn"] * x_hat, g["bn"]], axis=-1)                # [rows, C, 2]
  out["bn"] = capture.LayerStats(a=b * jnp.einsum("ncj,nck->cjk", per_row, per_row), s=None)
  return out


def _eval_loss(p, x, y):
  """The loss of the network without dropout (the batch's statistics), before the step."""
  return _ce(rm.cnn_reference(p, x, jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS))), y)


class _Nnx:
  """The NNX CNN: a K-FAC step through `nnx_capture` and a plain adam step, side by side."""

  def __init__(self):
    x, _ = rm.images(0)
    self.cap = capture.nnx_capture(_ce, likelihood="softmax")
    # Built under nnx.jit: one compiled program instead of one per initialiser op.
    self.model = nnx.jit(lambda: rm.NnxCNN(nnx.Rngs(0)))()
    tx = so.kfac(0.1, layers=self.cap.layers(self.model, x))
    self.optimizer = nnx.jit(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param))(self.model)

    def step(model, optimizer, x, y, key):
      graphdef, params, state = nnx.split(model, nnx.Param, ...)
      want_state = self._adam_step_state(graphdef, params, state, x, y)
      mask = nnx.merge(graphdef, params, state, copy=True).drop(
          jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS)))
      want = _hand_stats(params.to_pure_dict(), x, mask, key)
      _, grads, stats = self.cap(model, x, y, key=key)
      optimizer.update(model, grads, kfac_stats=stats)
      return (_eval_loss(params.to_pure_dict(), x, y), stats, want,
              nnx.state(model, nnx.Not(nnx.Param)), want_state)

    @functools.partial(jax.jit, compiler_options=_LOW)
    def pure_step(graph_state, x, y, key):
      model, optimizer = nnx.merge(*graph_state)
      out = step(model, optimizer, x, y, key)
      return nnx.split((model, optimizer))[1], out

    self._graphdef = nnx.split((self.model, self.optimizer))[0]
    self._step = pure_step

  @staticmethod
  def _adam_step_state(graphdef, params, state, x, y):
    """A plain training step in NNX's idiom: nnx.grad on the model, nnx.Optimizer."""
    model = nnx.merge(graphdef, params, state, copy=True)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: _ce(m(x), y))(model))
    return nnx.split(model, nnx.Param, ...)[2]

  def step(self, x, y, key):
    state, out = self._step((self._graphdef, nnx.state((self.model, self.optimizer))), x, y,
                            key)
    nnx.update((self.model, self.optimizer), state)
    return out


class _Linen:
  """The linen CNN: a K-FAC step through `linen_capture(state=, rngs=)` and a plain adam
  step (apply with mutable batch_stats), side by side."""

  def __init__(self):
    x, _ = rm.images(0)
    net = rm.LinenCNN()
    variables = jax.jit(net.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                  x)
    self.params, self.state = variables["params"], {"batch_stats": variables["batch_stats"]}
    cap = capture.linen_capture(net, _ce, likelihood="softmax")
    tx = so.kfac(0.1, layers=cap.layers(self.params, x, state=self.state,
                                        rngs={"dropout": jax.random.key(2)}))
    self.opt_state = jax.jit(tx.init)(self.params)

    @functools.partial(jax.jit, compiler_options=_LOW)
    def step(params, opt_state, state, x, y, key):
      dropout_key, label_key = jax.random.split(key)
      rngs = {"dropout": dropout_key}

      def adam_loss(p):
        logits, new = net.apply({"params": p, **state}, x, rngs=rngs, mutable=["batch_stats"])
        return _ce(logits, y), new

      _, want_state = jax.grad(adam_loss, has_aux=True)(params)
      ones = jnp.ones((x.shape[0], *rm.IMAGE[:2], rm.CHANNELS))
      mask = net.apply({"params": params, **state}, ones, rngs=rngs,
                       method=rm.LinenCNN.dropout)
      want = _hand_stats(params, x, mask, label_key)
      _, grads, stats, new_state = cap(params, x, y, key=label_key, state=state, rngs=rngs)
      updates, opt_state = tx.update(grads, opt_state, params, kfac_stats=stats)
      return (optax.apply_updates(params, updates), opt_state, new_state,
              _eval_loss(params, x, y), stats, want, dict(want_state))

    self._step = step

  def step(self, x, y, key):
    self.params, self.opt_state, self.state, *out = self._step(
        self.params, self.opt_state, self.state, x, y, key)
    loss, stats, want, want_state = out
    return loss, stats, want, self.state, want_state


def test_abstract_model_with_batch_statistics_is_read():
  """An NNX model built abstractly (`nnx.eval_shape`), BatchStat and RNG state included,
  gives the same layers as the built model, and nothing is computed."""
  x, _ = rm.images(0)
  cap = capture.nnx_capture(_ce, likelihood="softmax")
  built = cap.layers(nnx.jit(lambda: rm.NnxCNN(nnx.Rngs(0)))(), x)
  abstract = cap.layers(nnx.eval_shape(lambda: rm.NnxCNN(nnx.Rngs(0))), x)
  assert abstract == built
  assert [l.kind for l in abstract] == ["conv", "norm", "dense"] and not abstract.uncovered


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_kfac_trains_a_cnn_with_batchnorm_and_dropout(framework):
  """Every step: the new model state equals the plain adam step's, and the captured factors
  equal the hand-written forward's with the same batch statistics, mask and labels; the loss
  without dropout falls."""
  fw = _Nnx() if framework == "nnx" else _Linen()
  x, y = rm.images(1, batch=8)
  first_state = _numeric(nnx.state(fw.model, nnx.Not(nnx.Param)) if framework == "nnx"
                         else fw.state)
  losses = []
  for i in range(STEPS):
    loss, stats, want, state, want_state = fw.step(x, y, jax.random.key(10 + i))
    losses.append(float(loss))
    for got, ref in zip(_numeric(state), _numeric(want_state)):
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6, err_msg=f"step {i}")
    for name in ("conv", "head"):
      np.testing.assert_allclose(stats[name].a, want[name].a, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(stats[name].s, want[name].s, rtol=1e-4, atol=1e-7)
    # BatchNorm's scale and shift: the exact per-channel block, x̂ from the batch's
    # statistics as the training forward computed them.
    assert stats["bn"].s is None
    np.testing.assert_allclose(stats["bn"].a, want["bn"].a, rtol=1e-4,
                               atol=1e-5 * float(np.abs(want["bn"].a).max()))
  moved = [not np.array_equal(a, b) for a, b in zip(_numeric(state), first_state)]
  assert any(moved)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


# --- Grouped and depthwise convolutions, every padding mode -----------------------------

# (name, feature groups, output channels, window, padding, strides) on a [B, 5, 5, 4] input.
_BRANCHES = (
    ("depthwise_same", 4, 8, (3, 3), "SAME", 1),
    ("grouped_valid", 2, 4, (2, 2), "VALID", 2),
    ("grouped_explicit", 2, 4, (3, 2), ((1, 0), (2, 1)), 1),
    ("depthwise_circular", 4, 4, (3, 3), "CIRCULAR", 1),
)
_C_IN, _K = 4, 2


def _concat_positions(outs):
  """Every branch's `[B, H, W, K]` output as positions of one `[B, ΣHW, K]` output."""
  return jnp.concatenate([o.reshape(o.shape[0], -1, _K) for o in outs], axis=1)


class _NnxBranches(nnx.Module):
  """One conv per padding mode / grouping, each followed by a per-position dense head."""

  def __init__(self, rngs):
    f64 = dict(param_dtype=jnp.float64, rngs=rngs)
    self.convs = nnx.List([nnx.Conv(_C_IN, out, win, strides=st, padding=pad,
                                    feature_group_count=g, **f64)
                           for _, g, out, win, pad, st in _BRANCHES])
    self.heads = nnx.List([nnx.Linear(b[2], _K, **f64) for b in _BRANCHES])

  def __call__(self, x):
    return _concat_positions([h(c(x)) for c, h in zip(self.convs, self.heads)])


class _LinenBranches(nn.Module):

  @nn.compact
  def __call__(self, x):
    outs = [nn.Dense(_K, param_dtype=jnp.float64, name=f"head{i}")(
        nn.Conv(out, win, strides=st, padding=pad, feature_group_count=g,
                param_dtype=jnp.float64, name=f"conv{i}")(x))
            for i, (_, g, out, win, pad, st) in enumerate(_BRANCHES)]
    return _concat_positions(outs)


def _gauss(z, y):
  return 0.5 * jnp.sum((z - y) ** 2) / (z.shape[0] * z.shape[1])


def _group_blocks(params):
  """`{(branch, g): [R + 1, out/G]}`: group g's kernel columns as a matrix, bias last."""
  blocks = {}
  for i, (_, groups, out, _, _, _) in enumerate(_BRANCHES):
    kernel, bias = params[f"conv{i}"]["kernel"], params[f"conv{i}"]["bias"]
    og = out // groups
    for g in range(groups):
      cols = slice(g * og, (g + 1) * og)
      blocks[i, g] = jnp.concatenate([kernel[..., cols].reshape(-1, og), bias[None, cols]])
  return blocks


def _with_blocks(params, blocks):
  """`params` with every conv's kernel and bias rebuilt from its group blocks."""
  params = dict(params)
  for i, (_, groups, out, _, _, _) in enumerate(_BRANCHES):
    shape = params[f"conv{i}"]["kernel"].shape
    cols = [blocks[i, g] for g in range(groups)]
    kernel = jnp.concatenate([c[:-1].reshape(shape[:-1] + (out // groups,)) for c in cols], -1)
    params[f"conv{i}"] = {"kernel": kernel, "bias": jnp.concatenate([c[-1] for c in cols])}
  return params


def test_grouped_convolutions_in_every_padding_mode_match_the_dense_ggn():
  """Depthwise and grouped convolutions with SAME, VALID (strided), explicit and CIRCULAR
  padding, each followed by a per-position dense head (a linear net, Gaussian likelihood,
  every position an example): every group's Â_g ⊗ Ŝ_g equals its diagonal block of the
  exact GGN (1/M) Σ_m J_mᵀ J_m computed from Jacobians, in float64 to 1e-8 (linen; NNX
  finds the same blocks, and its statistics share the code after discovery); and K-FAC
  preconditions each group's block of the gradient with (Â_g ⊗ Ŝ_g + λ)⁻¹ (NumPy solve)."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, _C_IN), jnp.float64)
    lin = _LinenBranches()
    params = jax.jit(lin.init, compiler_options=_LOW)(jax.random.key(1), x)["params"]
    y = jnp.zeros_like(jax.eval_shape(lin.apply, {"params": params}, x))
    cap = capture.linen_capture(lin, _gauss, likelihood="gaussian", fisher="exact",
                                stats_dtype=jnp.float64)
    layers = cap.layers(params, x)
    assert [(l.groups, l.factor_shape(1)) for l in layers if l.kind == "conv"] == [
        (b[1], (b[1], 1, 1)) for b in _BRANCHES]
    assert layers.uncovered == ()
    net = nnx.eval_shape(lambda: _NnxBranches(nnx.Rngs(0)))
    blocks = lambda ls: [(l.groups, l.a_dim, l.s_dim, l.factor_shape(1)) for l in ls]
    assert blocks(capture.nnx_capture(_gauss, fisher="empirical").layers(net, x)) == blocks(
        [l for i in range(len(_BRANCHES)) for l in layers if l.name in (f"conv{i}", f"head{i}")])
    # The transform on the first two convolutions (the rest on its fallback): a smaller
    # program to compile, the same code path for every grouped layer.
    checked = ("conv0", "conv1")
    tx = scale_by_kfac_factors(layers=capture.KfacLayers(tuple(
        l for l in layers if l.name in checked)), damping=1e-2, damping_mode="exact",
                               update_interval=1, pad_ratio=1.0, stats_dtype=jnp.float64)

    @functools.partial(jax.jit, compiler_options=_LOW)
    def run(params):
      _, grads, stats = cap(params, x, y)
      updates = tx.update(grads, tx.init(params), params,
                          kfac_stats={k: stats[k] for k in checked})[0]
      z = lambda blocks: lin.apply({"params": _with_blocks(params, blocks)}, x)
      jac = jax.jacfwd(z)(_group_blocks(params))
      return grads, stats, updates, jac

    grads, stats, updates, jac = run(params)
    m = y.shape[0] * y.shape[1]
    for i, (name, groups, *_) in enumerate(_BRANCHES):
      st = stats[f"conv{i}"]
      a, s = np.asarray(st.a).reshape(groups, *st.a.shape[-2:]), np.asarray(st.s).reshape(
          groups, *st.s.shape[-2:])
      g_blocks, u_blocks = _group_blocks(grads), _group_blocks(updates)
      for g in range(groups):
        j = np.asarray(jac[i, g]).reshape(m * _K, -1)
        ggn = j.T @ j / m
        np.testing.assert_allclose(np.kron(a[g], s[g]), ggn, rtol=1e-8,
                                   atol=1e-8 * np.abs(ggn).max(), err_msg=f"{name} group {g}")
        if f"conv{i}" not in checked:
          continue
        want = np.linalg.solve(np.kron(a[g], s[g]) + 1e-2 * np.eye(ggn.shape[0]),
                               np.asarray(g_blocks[i, g]).reshape(-1))
        np.testing.assert_allclose(np.asarray(u_blocks[i, g]).reshape(-1), want, rtol=1e-8,
                                   atol=1e-10, err_msg=f"{name} group {g}")


def test_grouped_axes_of_a_stacked_kernel_are_each_layers_groups():
  """A scan-stacked depthwise kernel `[L, 3, 1, C·mult]`: matrix l·G + g is layer l's group
  g columns (explicit slicing), and `from_matrices` inverts `to_matrices`."""
  kernel = np.arange(2 * 3 * 1 * 6, dtype=np.float64).reshape(2, 3, 1, 6)
  layer = capture.KfacLayer("c", "conv", ("c", "kernel"), ("c", "bias"), kernel.shape,
                            so.dimension_numbers.MuonDimensionNumbers((1, 2), 3), groups=3)
  assert (layer.num_stacked, layer.a_dim, layer.s_dim) == (6, 4, 2)
  assert layer.factor_shape(4) == (2, 3, 4, 4) and layer.bias_shape == (2, 6)
  mats = np.asarray(layer.axes.to_matrices(jnp.asarray(kernel)))
  for l in range(2):
    for g in range(3):
      np.testing.assert_array_equal(mats[3 * l + g], kernel[l, :, 0, 2 * g:2 * g + 2])
  np.testing.assert_array_equal(layer.axes.from_matrices(jnp.asarray(mats)), kernel)


def test_what_the_capture_cannot_read_is_reported():
  """A masked convolution falls back with a warning naming it (strict=True raises); the
  arguments of a training-mode capture are checked and named."""
  class Masked(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 3, (3, 3), mask=jnp.ones((3, 3, 2, 3)), rngs=rngs)
      self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.conv(x).mean(axis=(1, 2)))

  net, x = nnx.eval_shape(lambda: Masked(nnx.Rngs(0))), jnp.ones((2, 4, 4, 2))
  with pytest.warns(UserWarning, match=r"conv/kernel \(layer conv is not covered: a masked"):
    layers = capture.nnx_capture(_ce, likelihood="softmax").layers(net, x)
  assert [l.name for l in layers] == ["head"]
  with pytest.raises(ValueError, match=r"conv/kernel.*strict=True"):
    capture.nnx_capture(_ce, likelihood="softmax", strict=True).layers(net, x)
  with pytest.raises(TypeError, match="state="):
    capture.nnx_capture(_ce, fisher="empirical")(net, x, jnp.zeros(2, jnp.int32), state={})
  lin = rm.LinenCNN()
  with pytest.raises(TypeError, match="mutable="):
    capture.linen_capture(lin, _ce, fisher="empirical", mutable=["batch_stats"])
  variables = jax.eval_shape(lin.init, {"params": jax.random.key(0),
                                        "dropout": jax.random.key(1)}, rm.images(0)[0])
  cap = capture.linen_capture(lin, _ce, fisher="empirical", rngs={"dropout": jax.random.key(2)})
  with pytest.raises(ValueError, match="state= must be a dict.*'params'"):
    cap.layers(variables["params"], rm.images(0)[0], state=variables)
  with pytest.raises(TypeError, match="rngs= was given both"):
    cap.layers(variables["params"], rm.images(0)[0], state={"batch_stats": variables[
        "batch_stats"]}, rngs={"dropout": jax.random.key(3)})
