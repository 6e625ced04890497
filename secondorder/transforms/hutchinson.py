"""AdaHessian: Adam-style moments on a Hutchinson estimate of the Hessian diagonal.

`scale_by_hutchinson` is the primitive, `adahessian` the assembled optimizer, and
`value_grad_and_hessian_diag` the one-pass helper that returns the loss, the gradient and
the Hutchinson estimate from a single forward-over-reverse pass.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secondorder._validation import (check_float_leaves, check_int, check_range,
                                     check_same_structure, require_extra_arg)
from secondorder.curvature.estimators import hutchinson_diag, rademacher_like
from secondorder.curvature.products import value_grad_hvp

_OBJ_FN_EXAMPLE = "obj_fn=lambda p: loss_fn(p, batch)"


class ScaleByHutchinsonState(NamedTuple):
  """State of `scale_by_hutchinson`.

  Attributes:
    count: steps taken (int32).
    hessian_count: curvature refreshes folded into `nu` (int32); the bias correction of
      `nu` uses it, so skipped refreshes do not dilute the estimate.
    nonfinite_count: refreshes skipped because the estimate held a NaN or an Inf (int32).
    key: PRNG key (raw uint32[2]) for the Rademacher probes.
    mu: EMA of the gradient.
    nu: EMA of the squared, spatially averaged |z * Hz|.
  """
  count: jax.Array
  hessian_count: jax.Array
  nonfinite_count: jax.Array
  key: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _stats_dtype(leaf_dtype, stats_dtype):
  if stats_dtype is not None:
    return jnp.dtype(stats_dtype)
  return jnp.promote_types(leaf_dtype, jnp.float32)


def _block_average(d: jax.Array, block_size: int) -> jax.Array:
  """Replaces each run of `block_size` consecutive entries (row-major) by its mean."""
  n = d.size
  if n == 0 or block_size == 1:
    return d
  num_blocks = -(-n // block_size)
  flat = jnp.pad(d.reshape(-1), (0, num_blocks * block_size - n))
  sums = flat.reshape(num_blocks, block_size).sum(axis=1)
  counts = jnp.full((num_blocks,), block_size, d.dtype)
  counts = counts.at[-1].set(n - (num_blocks - 1) * block_size)
  return jnp.repeat(sums / counts, block_size)[:n].reshape(d.shape)


def _average(d: jax.Array, spatial: bool, block_size: int | None) -> jax.Array:
  """Spatial averaging for HWIO conv kernels, else block averaging, else identity."""
  if spatial and d.ndim >= 3:
    # Flax kernels are (*spatial, in_features, out_features): average over the spatial axes.
    axes = tuple(range(d.ndim - 2))
    return jnp.broadcast_to(jnp.mean(d, axis=axes, keepdims=True), d.shape)
  if block_size is not None:
    return _block_average(d, block_size)
  return d


def _spatial_mask(spatial_averaging, params):
  """A bool per leaf of params; a mask that is a prefix of params is broadcast."""
  if callable(spatial_averaging):
    spatial_averaging = spatial_averaging(params)
  return jax.tree.map(
      lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), spatial_averaging, params)


def _check_int_if_concrete(name: str, value: Any, minimum: int) -> None:
  # optax.inject_hyperparams passes integer hyperparameters as arrays: check Python values only.
  if isinstance(value, numbers.Number):
    check_int(name, value, minimum=minimum)


def _every_step(update_interval) -> bool:
  """True for a concrete interval of 1: then no `lax.cond` is needed. (XLA:CPU also runs
  convolution gradients inside a conditional far slower than outside, jax-ml/jax#12868.)"""
  return isinstance(update_interval, numbers.Number) and update_interval == 1


def _maybe_refresh(refresh_fn: Callable, carry: tuple, count: jax.Array, update_interval,
                  refresh: bool | None) -> tuple:
  """`refresh_fn(*carry)` on refresh steps, else `carry`.

  `refresh=None` follows the schedule (steps where `count % update_interval == 0`, under
  `jax.lax.cond`; no conditional at all for an interval of 1). A Python bool decides on the
  host instead: the step is traced without a conditional, and the caller compiles one step
  for refresh steps and one for the others.
  """
  if refresh is not None:
    if not isinstance(refresh, (bool, np.bool_)):
      raise ValueError(
          "refresh must be None (follow update_interval) or a Python bool decided on the host "
          f"(a static argument of the jitted step), got {refresh!r}.")
    return refresh_fn(*carry) if refresh else carry
  if _every_step(update_interval):
    return refresh_fn(*carry)
  return jax.lax.cond(count % update_interval == 0, refresh_fn, lambda *a: a, *carry)


def _check_estimate_is_used(name: str, hessian_diag, refresh) -> None:
  """A ready estimate on a step the caller has declared plain would be dropped silently."""
  if hessian_diag is not None and isinstance(refresh, (bool, np.bool_)) and not refresh:
    raise ValueError(
        f"{name}: hessian_diag= was given with refresh=False, so it would be ignored. Pass "
        "it on refresh steps only (`refresh=True`), or leave refresh=None to let "
        "update_interval decide.")


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def scale_by_hutchinson(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    update_interval: int = 1,
    spatial_averaging: bool | Any | Callable[[Any], Any] = True,
    block_size: int | None = None,
    seed: int = 0,
    stats_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by the AdaHessian preconditioner (Hutchinson Hessian diagonal).

  With a fresh Rademacher probe :math:`z` (one independent key per leaf) on every refresh
  step, :math:`D = \mathrm{avg}(|z \odot H z|)` where `avg` averages over the spatial axes of
  convolution kernels (or over blocks of `block_size` entries). Then

  .. math::
    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
    v_n = \beta_2 v_{n-1} + (1-\beta_2) D^2 \ \text{(refresh steps only)},\\
    u_t = \frac{m_t / (1-\beta_1^t)}{\big(\sqrt{v_n / (1-\beta_2^n)}\big)^{k} + \epsilon},

  with :math:`t` the step and :math:`n` the number of refreshes so far. Refreshes happen on
  steps 0, `update_interval`, 2 `update_interval`, ...; between them the HVP is not computed
  (`jax.lax.cond`; with `update_interval=1` no conditional is built). With
  `update_interval > 1` the EMA of :math:`D^2` advances once per refresh, so its memory
  spans `update_interval / (1 - b2)` steps. A refresh whose estimate holds a NaN or an Inf is
  skipped (`nu` kept, `nonfinite_count` incremented); until a first finite estimate arrives
  the update is zero.

  The Hessian enters through `update(..., obj_fn=lambda p: loss(p, batch))`, the loss on the
  current batch. `update(..., refresh=True/False)` (a Python bool, static under `jit`)
  overrides the schedule for that call, so a training loop can compile a refresh step and a
  plain step and choose on the host; the plain step then needs no `obj_fn` and carries no
  conditional. Alternatively pass `hessian_diag=`, the raw estimate `z * Hz` computed by
  `value_grad_and_hessian_diag` (which also gives the loss and the gradient from the same
  pass); then `obj_fn` is not needed. With `refresh=False` an estimate would go unused,
  so passing one there is an error.

  Args:
    b1: decay of the gradient EMA, in [0, 1).
    b2: decay of the EMA of :math:`D^2`, in [0, 1).
    eps: added to the denominator, >= 0.
    hessian_power: the power :math:`k` in [0, 1]; 0 gives momentum SGD, 1 AdaHessian.
    update_interval: compute the Hessian estimate every this many steps (int >= 1).
    spatial_averaging: True averages :math:`|z \odot Hz|` over the spatial axes of every
      leaf with 3 or more dimensions (Flax conv kernels are `(*spatial, in, out)`); False
      never does. A pytree of bools like params (or a function of params returning one)
      chooses per leaf, e.g. to leave out the 3-D `DenseGeneral` kernels of Flax attention.
    block_size: if set, leaves that are not spatially averaged have :math:`D` averaged over
      consecutive blocks of this many entries (row-major order).
    seed: seed of the PRNG key for the probes.
    stats_dtype: dtype of `mu` and `nu`; default float32 (float64 for float64 params).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from secondorder.transforms.hutchinson import scale_by_hutchinson
    >>> loss = lambda p: jnp.sum(jnp.array([1., 10.]) * p ** 2)
    >>> tx = optax.chain(scale_by_hutchinson(), optax.scale_by_learning_rate(0.1))
    >>> params = jnp.array([1., 1.])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=loss)

  References:
    Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning",
    AAAI 2021, https://arxiv.org/abs/2006.00719
  """
  check_range("b1", b1, 0.0, 1.0, high_inclusive=False)
  check_range("b2", b2, 0.0, 1.0, high_inclusive=False)
  check_range("eps", eps, 0.0)
  check_range("hessian_power", hessian_power, 0.0, 1.0)
  _check_int_if_concrete("update_interval", update_interval, 1)
  if block_size is not None:
    check_int("block_size", block_size, minimum=1)
  _check_int_if_concrete("seed", seed, 0)
  if not callable(spatial_averaging) and not all(
      isinstance(flag, (bool, np.bool_)) for flag in jax.tree.leaves(spatial_averaging)):
    raise ValueError(
        "spatial_averaging must be a bool, a pytree of bools like params or a function of "
        f"params returning one, got {spatial_averaging!r}.")

  def init_fn(params):
    check_float_leaves("scale_by_hutchinson", params)

    def zeros(x):
      return jnp.zeros(jnp.shape(x), _stats_dtype(jnp.result_type(x), stats_dtype))
    return ScaleByHutchinsonState(
        count=jnp.zeros([], jnp.int32),
        hessian_count=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        key=jax.random.PRNGKey(seed),
        mu=jax.tree.map(zeros, params),
        nu=jax.tree.map(zeros, params),
    )

  def update_fn(updates, state, params=None, *, obj_fn=None, hessian_diag=None,
                refresh=None, **extra_args):
    del extra_args
    # Shapes are static: a broadcastable mismatch ((1,) for (3,)) is an error, not a free
    # broadcast.
    check_same_structure("updates", state.mu, updates, "the state")
    _check_estimate_is_used("scale_by_hutchinson", hessian_diag, refresh)
    mask = _spatial_mask(spatial_averaging, updates)
    key, probe_key = jax.random.split(state.key)

    def refresh_fn(nu, hessian_count, nonfinite_count):
      if hessian_diag is not None:
        raw = hessian_diag
      else:
        require_extra_arg("scale_by_hutchinson", "obj_fn", obj_fn, _OBJ_FN_EXAMPLE)
        if params is None:
          raise ValueError(
              "scale_by_hutchinson needs params in update(); call it as "
              f"`tx.update(grads, state, params, {_OBJ_FN_EXAMPLE})`.")
        raw = hutchinson_diag(obj_fn, params, probe_key)
      d = jax.tree.map(
          lambda r, s, v: _average(jnp.abs(r.astype(v.dtype)), s, block_size),
          raw, mask, nu)
      finite = _tree_all_finite(d)
      new_nu = optax.tree.update_moment_per_elem_norm(d, nu, b2, 2)
      nu = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_nu, nu)
      # Saturating counters: a wrapped hessian_count would turn have_curvature off.
      return (nu, jnp.where(finite, optax.safe_increment(hessian_count), hessian_count),
              jnp.where(finite, nonfinite_count, optax.safe_increment(nonfinite_count)))

    nu, hessian_count, nonfinite_count = _maybe_refresh(
        refresh_fn, (state.nu, state.hessian_count, state.nonfinite_count), state.count,
        update_interval, refresh)

    count = optax.safe_increment(state.count)
    grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates, state.mu)
    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    # max(n, 1): before any finite refresh nu is zero and the update is masked below.
    nu_hat = optax.tree.bias_correction(nu, b2, jnp.maximum(hessian_count, 1))
    have_curvature = hessian_count > 0

    def precondition(m, v, u):
      step = m / (jnp.power(jnp.sqrt(v), hessian_power) + eps)
      return jnp.where(have_curvature, step, 0).astype(jnp.result_type(u))

    new_updates = jax.tree.map(precondition, mu_hat, nu_hat, updates)
    return new_updates, ScaleByHutchinsonState(
        count=count, hessian_count=hessian_count, nonfinite_count=nonfinite_count,
        key=key, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find_hutchinson_state(opt_state) -> ScaleByHutchinsonState:
  found = optax.tree.get_all_with_path(opt_state, "ScaleByHutchinsonState")
  if len(found) != 1:
    raise ValueError(
        "value_grad_and_hessian_diag needs an optimizer state holding exactly one "
        f"ScaleByHutchinsonState (from scale_by_hutchinson or adahessian); found {len(found)}.")
  return found[0][1]


def value_grad_and_hessian_diag(
    obj_fn: Callable[[Any], jax.Array], params: Any, opt_state: Any,
) -> tuple[jax.Array, Any, Any]:
  r"""Loss, gradient and Hutchinson estimate :math:`z \odot Hz` from one pass.

  A forward-over-reverse `jvp(grad(obj_fn))` returns the gradient as its primal output, so
  one pass gives everything AdaHessian needs; computing the gradient and then calling
  `update(..., obj_fn=...)` pays for the gradient twice. The probe is the one that
  `scale_by_hutchinson` would draw at this step (taken from the key in `opt_state`), so the
  two ways give the same updates.

  Use it with `update_interval=1` (the probe is spent on every call):

  >>> import jax, jax.numpy as jnp
  >>> from secondorder.transforms.hutchinson import adahessian, value_grad_and_hessian_diag
  >>> loss = lambda p: jnp.sum(jnp.array([1., 10.]) * p ** 2)
  >>> tx = adahessian(0.15)
  >>> params = jnp.array([1., 1.])
  >>> state = tx.init(params)
  >>> value, grads, hdiag = value_grad_and_hessian_diag(loss, params, state)
  >>> updates, state = tx.update(grads, state, params, hessian_diag=hdiag)

  Args:
    obj_fn: params -> scalar loss on the current batch.
    params: the parameters.
    opt_state: the state of an optimizer that holds one `ScaleByHutchinsonState`.

  Returns:
    `(loss, grads, hessian_diag)`, the last a pytree like params.
  """
  hstate = _find_hutchinson_state(opt_state)
  _, probe_key = jax.random.split(hstate.key)
  # The probe hutchinson_diag(obj_fn, params, probe_key) draws (one sample).
  probe = rademacher_like(jax.random.split(probe_key, 1)[0], params)
  value, grads, hz = value_grad_hvp(obj_fn, params, probe)
  return value, grads, jax.tree.map(jnp.multiply, probe, hz)


def adahessian(
    learning_rate: optax.ScalarOrSchedule = 0.15,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-4,
    hessian_power: float = 1.0,
    update_interval: int = 1,
    spatial_averaging: bool | Any | Callable[[Any], Any] = True,
    block_size: int | None = None,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    seed: int = 0,
    stats_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaHessian with decoupled weight decay.

  .. math::
    \theta \leftarrow \theta - \eta\,(u_t + \lambda \theta)

  with :math:`u_t` from `scale_by_hutchinson` (see it for the rule and the arguments) and
  :math:`\lambda` = `weight_decay`, as in the reference implementation. Call `update` with
  `obj_fn=lambda p: loss(p, batch)` (or with `hessian_diag=` from
  `value_grad_and_hessian_diag`).

  Args:
    learning_rate: a float or an optax schedule (default 0.15, the reference's).
    weight_decay: decoupled weight decay rate, >= 0.
    weight_decay_mask: optional mask (pytree or function of params) of leaves to decay.
    (others): as in `scale_by_hutchinson`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from secondorder.transforms.hutchinson import adahessian
    >>> loss = lambda p: jnp.sum(jnp.array([1., 10.]) * p ** 2)
    >>> tx = adahessian(0.15, weight_decay=1e-4)
    >>> params = jnp.array([1., 1.])
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params, obj_fn=loss)

  References:
    Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning",
    AAAI 2021, https://arxiv.org/abs/2006.00719
  """
  check_range("learning_rate", learning_rate, 0.0)
  check_range("weight_decay", weight_decay, 0.0)
  return optax.chain(
      scale_by_hutchinson(
          b1=b1, b2=b2, eps=eps, hessian_power=hessian_power,
          update_interval=update_interval, spatial_averaging=spatial_averaging,
          block_size=block_size, seed=seed, stats_dtype=stats_dtype),
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
