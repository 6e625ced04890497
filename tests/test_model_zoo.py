"""Every method on real-model shapes (`tests/_model_zoo.py`): a Gemma-like NNX decoder
(Einsum attention with grouped-query key/value, a subclassed scaled embedding tied to the
head, qk-norm, a four-argument call returning a tuple), a linen ResNet with BatchNorm in
training mode, and a linen ViT with `nn.scan` over `nn.remat` blocks and a free position
table, called as the models are written (no wrapper module).

For each model: K-FAC covers at least 95% of the parameters and warns about nothing, the
dimension numbers are derived without error (and agree with the capture on every covered
kernel), and every method lowers the training loss within 20 jitted steps.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import secondorder as so
from secondorder import capture
from secondorder.dimension_numbers import MuonDimensionNumbers
from tests import _model_zoo as zoo

STEPS = 20
_LOW = {"xla_backend_optimization_level": 0}


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _is_spec(x):
  return x is None or isinstance(x, MuonDimensionNumbers)


def _muon_dims(dims):
  """The derived dimension numbers with stacks of vectors left to Muon's Adam (None)."""
  return jax.tree.map(lambda d: None if d is None or d.reduction_axis == () else d, dims,
                      is_leaf=_is_spec)


class Gemma:
  """The NNX decoder as (graphdef, params, state), run as `model(tokens, positions, None,
  mask)` with the logits picked out of `(logits, cache)`."""
  logits = staticmethod(lambda out: out[0])

  def __init__(self):
    model = zoo.Gemma(nnx.Rngs(0))
    self.graphdef, self.params, self.state = nnx.split(model, nnx.Param, ...)
    self.tokens, self.positions, self.mask, self.y = zoo.gemma_batch(0)
    self.call_args = (self.positions, None, self.mask)
    self.cap = capture.nnx_capture(_ce, likelihood="softmax", logits=self.logits)
    self.layers = self.cap.layers(model, self.tokens, call_args=self.call_args)
    self.dims = so.dimension_numbers_from_nnx(model)

  def forward(self, params, state):
    return so.nnx_forward(self.graphdef, state, self.tokens, *self.call_args,
                          logits=self.logits)

  def kfac_grads(self, params, state, key):
    model = nnx.merge(self.graphdef, params, state, copy=True)
    loss, grads, stats = self.cap(model, self.tokens, self.y, key=key,
                                  call_args=self.call_args)
    return loss, grads, stats, nnx.split(model, nnx.Param, ...)[2]


class ResNet:
  """The linen ResNet with its batch statistics written by every training step."""

  def __init__(self):
    self.net = zoo.ResNet()
    self.x, self.y = zoo.image_batch(0)
    variables = self.net.init(jax.random.key(0), self.x)
    self.params, self.state = variables["params"], {"batch_stats": variables["batch_stats"]}
    self.cap = capture.linen_capture(self.net, _ce, likelihood="softmax")
    self.layers = self.cap.layers(self.params, self.x, state=self.state)
    self.dims = so.dimension_numbers_from_linen(self.net, variables, self.x)

  def forward(self, params, state):
    return so.linen_forward(self.net.apply, state, self.x)

  def kfac_grads(self, params, state, key):
    return self.cap(params, self.x, self.y, key=key, state=state)


class ViT:
  """The linen ViT, its logits picked out of `(logits, extras)`."""
  logits = staticmethod(lambda out: out[0])

  def __init__(self):
    self.net = zoo.ViT()
    self.x, self.y = zoo.image_batch(1)
    variables = self.net.init(jax.random.key(0), self.x)
    self.params, self.state = variables["params"], {}
    self.cap = capture.linen_capture(self.net, _ce, likelihood="softmax", logits=self.logits)
    self.layers = self.cap.layers(self.params, self.x)
    self.dims = so.dimension_numbers_from_linen(self.net, variables, self.x)

  def forward(self, params, state):
    return so.linen_forward(self.net.apply, state, self.x, logits=self.logits)

  def kfac_grads(self, params, state, key):
    loss, grads, stats = self.cap(params, self.x, self.y, key=key)
    return loss, grads, stats, state


def methods(problem, kfac_lr=0.1, adahessian_lr=0.05):
  """Every method, with learning rates that train these tiny models."""
  dims = problem.dims
  return {
      "adamw": optax.adamw(3e-3),
      "kfac": so.kfac(kfac_lr, layers=problem.layers, update_interval=2),
      "soap": so.soap(3e-3, weight_dimension_numbers=dims, precondition_frequency=2),
      "shampoo": so.shampoo(3e-3, update_interval=2, start_preconditioning_step=2,
                            weight_dimension_numbers=dims),
      "muon": optax.contrib.muon(0.02, adam_learning_rate=3e-3,
                                 muon_weight_dimension_numbers=_muon_dims(dims)),
      "adahessian": so.adahessian(adahessian_lr, weight_dimension_numbers=dims),
      "sophia_h": so.sophia(3e-3, update_interval=2),
      "sophia_g": so.sophia(3e-3, estimator="gnb", update_interval=2),
      "hessian_free": so.hessian_free(cg_max_iterations=5),
      "accumulation": so.accumulated_adamw(3e-3, k=2),
  }


def _step(name, tx, problem, params, state, opt_state, key):
  """One training step; the gradient pass writes the model state once."""
  y = problem.y
  if name == "kfac":
    loss, grads, stats, state = problem.kfac_grads(params, state, key)
    updates, opt_state = tx.update(grads, opt_state, params, kfac_stats=stats)
    return optax.apply_updates(params, updates), state, opt_state, loss
  fwd = problem.forward(params, state)
  train_loss = lambda p: (lambda out, s: (_ce(out, y), s))(*fwd.train(p))
  if name == "adahessian":
    loss, grads, hdiag, new_state = so.value_grad_and_hessian_diag(
        train_loss, params, opt_state, has_aux=True)
    updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hdiag)
  else:
    (loss, new_state), grads = jax.value_and_grad(train_loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   obj_fn=lambda p: _ce(fwd.frozen(p), y),
                                   logits_fn=fwd.frozen, loss_fn=so.softmax_cross_entropy(y))
  return optax.apply_updates(params, updates), new_state, opt_state, loss


def train(problem, name, tx, steps=STEPS):
  """`steps` jitted steps of one method on the problem's batch: the loss before each step
  and the loss after the last."""
  def body(carry, key):
    params, state, opt_state = carry
    params, state, opt_state, loss = _step(name, tx, problem, params, state, opt_state, key)
    return (params, state, opt_state), loss

  def run(params, state):
    keys = jax.random.split(jax.random.key(3), steps)
    (params, state, _), losses = jax.lax.scan(body, (params, state, tx.init(params)), keys)
    fwd = problem.forward(params, state)
    return losses, _ce(fwd.frozen(params), problem.y)

  losses, final = jax.jit(run, compiler_options=_LOW)(problem.params, problem.state)
  return np.asarray(losses), float(final)


PROBLEMS = {"gemma": Gemma, "resnet": ResNet, "vit": ViT}


@pytest.fixture(scope="module", params=list(PROBLEMS))
def problem(request):
  with warnings.catch_warnings():
    warnings.simplefilter("error")     # no coverage warning, no plain reading surprise
    return PROBLEMS[request.param]()


def _axes(d):
  return tuple(tuple(np.atleast_1d(a)) for a in (d.reduction_axis, d.output_axis))


def test_kfac_covers_the_model_and_the_dimension_numbers_agree(problem):
  layers = problem.layers
  assert layers.covered_fraction >= 0.95, layers.summary()
  assert layers.fallback_kernels() == ()
  flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                   if getattr(k, "name", None) != "value"): d
          for path, d in jax.tree_util.tree_flatten_with_path(
              problem.dims, is_leaf=_is_spec)[0]}
  for l in layers:
    if l.kind in ("norm",):
      continue
    got = flat["/".join(l.kernel)]
    want = l.dimension_numbers
    assert got is not None and _axes(got) == _axes(want), (l.name, got, want)


METHODS = ("adamw", "kfac", "soap", "shampoo", "muon", "adahessian", "sophia_h", "sophia_g",
           "hessian_free", "accumulation")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_lowers_the_loss(problem, name):
  tx = methods(problem)[name]
  losses, final = train(problem, name, tx)
  assert np.all(np.isfinite(losses)) and np.isfinite(final), (name, losses)
  assert final < losses[0], (name, losses[0], final)


def test_call_arguments_and_logits_selector_match_a_wrapper_module():
  """`call_args` and `logits=` give the loss, gradients and statistics that a hand-written
  one-input wrapper returning the logits gives (the wrapper's paths carry its prefix); the
  forward closures pick the same logits."""
  model = zoo.Gemma(nnx.Rngs(0))
  tokens, positions, mask, y = zoo.gemma_batch(1)

  class Wrapper(nnx.Module):
    def __init__(self, inner):
      self.inner = inner

    def __call__(self, t):
      return self.inner(t, positions, None, mask)[0]

  key = jax.random.key(0)
  cap = capture.nnx_capture(_ce, likelihood="softmax", logits=lambda out: out[0])
  loss, grads, stats = cap(model, tokens, y, key=key, call_args=(positions, None),
                           call_kwargs={"attention_mask": mask})
  ref_loss, ref_grads, ref_stats = capture.nnx_capture(_ce, likelihood="softmax")(
      Wrapper(model), tokens, y, key=key)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads.to_pure_dict(), ref_grads.to_pure_dict()["inner"])
  assert set(ref_stats) == {"inner/" + k for k in stats}
  for k, st in stats.items():
    for a, b in zip(st, ref_stats["inner/" + k]):
      if a is not None or b is not None:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  graphdef, params, state = nnx.split(model, nnx.Param, ...)
  fwd = so.nnx_forward(graphdef, state, tokens, positions, None, mask,
                       logits=lambda out: out[0])
  np.testing.assert_allclose(fwd.frozen(params), model(tokens, positions, None, mask)[0],
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(TypeError, match="logits must be a callable"):
    capture.nnx_capture(_ce, likelihood="softmax", logits="first")
  with pytest.raises(TypeError, match="call_args must be a tuple"):
    cap.layers(model, tokens, call_args=positions)


def race(lrs_adamw=(0.01, 0.03, 0.1, 0.3), lrs_kfac=(0.03, 0.1, 0.3, 1.0)):
  """K-FAC against AdamW on the Gemma-like decoder, each tuned over four learning rates:
  AdamW's best training loss after STEPS steps, and the first step at which each K-FAC run
  reaches it. `python -m tests.test_model_zoo` prints the table."""
  problem = Gemma()
  curves = {}
  for lr in lrs_adamw:
    losses, final = train(problem, "adamw", optax.adamw(lr))
    curves[("adamw", lr)] = np.append(losses, final)
  target = min(c[-1] for (m, _), c in curves.items() if m == "adamw")
  for lr in lrs_kfac:
    losses, final = train(problem, "kfac", so.kfac(lr, layers=problem.layers,
                                                   update_interval=2))
    curves[("kfac", lr)] = np.append(losses, final)
  rows = ["| method | learning rate | loss after 20 steps | steps to AdamW's best 20-step loss |",
          "|---|---|---|---|"]
  for (m, lr), c in curves.items():
    reached = np.nonzero(c <= target)[0]
    steps = f"{reached[0]}" if reached.size else "not reached"
    rows.append(f"| {m} | {lr:g} | {c[-1]:.4f} | {steps} |")
  return target, "\n".join(rows)


if __name__ == "__main__":
  best, table = race()
  print(f"AdamW's best loss after {STEPS} steps: {best:.4f}\n{table}")


def _state_bytes(tx, params):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params))
             if hasattr(x, "dtype"))


def test_recommended_convolution_settings_keep_soap_and_shampoo_within_3x_adamw():
  """On ResNet-18's shape (abstract, nothing allocated): convolutions read as
  (kh·kw·in) x out make SOAP's factors 9x AdamW's state; the documented setting
  (max_precond_dim=1024: one-sided above it) keeps it under 3x, and Shampoo's defaults
  (blocks of 128) already are."""
  net = zoo.ResNet(stage_sizes=(2, 2, 2, 2), num_filters=64, stem=(7, 7), classes=10)
  x = jnp.ones((8, 32, 32, 3))
  variables = jax.eval_shape(net.init, jax.random.key(0), x)
  params = variables["params"]
  dims = so.dimension_numbers_from_linen(net, variables, x)
  adamw = _state_bytes(optax.adamw(1e-3), params)
  assert _state_bytes(so.soap(1e-3, weight_dimension_numbers=dims), params) > 8 * adamw
  assert _state_bytes(so.soap(1e-3, weight_dimension_numbers=dims, max_precond_dim=1024),
                      params) < 3 * adamw
  assert _state_bytes(so.shampoo(1e-3, weight_dimension_numbers=dims), params) < 3 * adamw
