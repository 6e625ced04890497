"""AdaHessian: Adam-style moments on a Hutchinson estimate of the Hessian diagonal.

`scale_by_hutchinson` is the primitive, `adahessian` the assembled optimizer, and
`value_grad_and_hessian_diag` the one-pass helper that returns the loss, the gradient and
the Hutchinson estimate from a single forward-over-reverse pass.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from secondorder._validation import (check_float_leaves, check_int, check_range,
                                     check_same_structure, require_extra_arg)
from secondorder.curvature.estimators import hutchinson_diag
from secondorder.dimension_numbers import LeafAxes, WeightDimensionNumbers, resolve_leaf_axes
from secondorder.transforms._refresh import (check_estimate_is_used, check_int_if_concrete,
                                             maybe_refresh, one_pass_hutchinson,
                                             statistics_dtype, tree_all_finite)

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
    nu: EMA of the squared, spatially averaged ``|z * Hz|``.
  """
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
  hessian_count: jax.Array
  nonfinite_count: jax.Array
  key: jax.Array
  mu: optax.Updates
  nu: optax.Updates


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


def spatial_axes(shape: tuple[int, ...], axes: LeafAxes | None) -> tuple[int, ...]:
  """The axes AdaHessian averages a leaf's Hessian-diagonal estimate over.

  A leaf is read as a convolution kernel ``[*spatial, in, out]`` (Flax's layout) when, once
  its batch (stacked-layer) axes are set aside, it has rank 4 or more: a 2-D or 3-D
  convolution. Its spatial axes are then every remaining axis but the last two. With
  dimension numbers the leaf must also read as ``(*spatial, in) x out``: one output axis,
  the last, everything else of the kernel on the reduction side (how a convolution is a
  matrix to Shampoo and K-FAC). Everything else, in particular rank-3 leaves (an attention
  kernel ``[d, heads, head_dim]``, a stack ``[L, d_in, d_out]``, a 1-D convolution), has
  no spatial axes.

  Args:
    shape: the leaf's shape.
    axes: the leaf's :class:`~secondorder.dimension_numbers.LeafAxes`, or None (no
      dimension numbers: no axis is a batch axis).

  Returns:
    The spatial axes, possibly empty.
  """
  if axes is None:
    return tuple(range(len(shape) - 2)) if len(shape) >= 4 else ()
  kernel = tuple(a for a in range(len(shape)) if a not in axes.batch)
  if len(kernel) < 4 or axes.output != (kernel[-1],):
    return ()
  return kernel[:-2]


def _average(d: jax.Array, spatial: tuple[int, ...], axes: LeafAxes | None,
             block_size: int | None) -> jax.Array:
  """Averages over the spatial axes; else over blocks of `block_size` entries of each
  layer (never across a batch axis); else returns `d`."""
  if spatial:
    return jnp.broadcast_to(jnp.mean(d, axis=spatial, keepdims=True), d.shape)
  if block_size is None:
    return d
  if axes is None or not axes.batch:
    return _block_average(d, block_size)
  mats = axes.to_matrices(d)
  flat = mats.reshape(mats.shape[0], -1)
  averaged = jax.vmap(lambda row: _block_average(row, block_size))(flat)
  return axes.from_matrices(averaged.reshape(mats.shape))


def _averaging_plan(spatial_averaging, weight_dimension_numbers, params
                    ) -> list[tuple[tuple[int, ...], LeafAxes | None]]:
  """Per leaf (in `jax.tree.leaves` order): its spatial axes and its dimension numbers.

  `spatial_averaging` is a bool, a pytree of bools that is a prefix of params, or a
  function of params returning one; a leaf with False has no spatial axes.
  """
  if callable(spatial_averaging):
    spatial_averaging = spatial_averaging(params)
  flags = jax.tree.leaves(jax.tree.map(
      lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), spatial_averaging, params))
  leaf_axes_list = resolve_leaf_axes(weight_dimension_numbers, params)
  return [(spatial_axes(np.shape(leaf), axes) if flag else (), axes)
          for flag, leaf, axes in zip(flags, jax.tree.leaves(params), leaf_axes_list)]


def _init_state(params, seed, stats_dtype) -> ScaleByHutchinsonState:
  """Zero moments (float32 or wider, or `stats_dtype`), zero counters, the probe key."""
  def zeros(x):
    return jnp.zeros(jnp.shape(x), statistics_dtype(jnp.result_type(x), stats_dtype))
  return ScaleByHutchinsonState(
      count=jnp.zeros([], jnp.int32),
      hessian_count=jnp.zeros([], jnp.int32),
      nonfinite_count=jnp.zeros([], jnp.int32),
      key=jax.random.PRNGKey(seed),
      mu=jax.tree.map(zeros, params),
      nu=jax.tree.map(zeros, params),
  )


def _averaged_estimate(raw, nu, plan, block_size):
  r"""D = avg(``|z * Hz|``) per leaf, in the dtype of `nu`, following the averaging plan."""
  leaves, treedef = jax.tree.flatten(raw)
  out = [_average(jnp.abs(r.astype(v.dtype)), spatial, axes, block_size)
         for r, v, (spatial, axes) in zip(leaves, jax.tree.leaves(nu), plan)]
  return jax.tree.unflatten(treedef, out)


def _fold_estimate(d, nu, hessian_count, nonfinite_count, b2):
  """nu <- b2 nu + (1 - b2) D^2 when D is finite; otherwise keeps nu and counts the skip."""
  finite = tree_all_finite(d)
  new_nu = optax.tree.update_moment_per_elem_norm(d, nu, b2, 2)
  nu = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_nu, nu)
  # Saturating counters: a wrapped hessian_count would turn the preconditioner off.
  return (nu, jnp.where(finite, optax.safe_increment(hessian_count), hessian_count),
          jnp.where(finite, nonfinite_count, optax.safe_increment(nonfinite_count)))


def _precondition(mu, nu, count, hessian_count, updates, b1, b2, eps, hessian_power):
  """The bias-corrected m / (sqrt(v)^k + eps), zero until a first finite estimate."""
  mu_hat = optax.tree.bias_correction(mu, b1, count)
  # max(n, 1): before any finite refresh nu is zero and the update is masked below.
  nu_hat = optax.tree.bias_correction(nu, b2, jnp.maximum(hessian_count, 1))
  have_curvature = hessian_count > 0

  def one(m, v, u):
    step = m / (jnp.power(jnp.sqrt(v), hessian_power) + eps)
    return jnp.where(have_curvature, step, 0).astype(jnp.result_type(u))

  return jax.tree.map(one, mu_hat, nu_hat, updates)


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
    weight_dimension_numbers: WeightDimensionNumbers = None,
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

  Which axes are spatial (see `spatial_axes`): a leaf is a convolution kernel
  ``[*spatial, in, out]`` when, without its batch axes, it has rank 4 or more (2-D and 3-D
  convolutions); the estimate is then averaged over the spatial axes, separately for each
  stacked layer and each (in, out) pair. Batch axes (the stacked layers of `nnx.scan` /
  `nn.scan`, declared by `weight_dimension_numbers`) are never averaged over, and neither
  is any axis of a rank-3 leaf, so attention kernels ``[d, heads, head_dim]`` and dense
  stacks ``[L, d_in, d_out]`` keep their per-entry estimate. A scanned stack of attention or
  convolution kernels (rank 4 or 5 with its layer axis) needs `weight_dimension_numbers` so
  that its layer axis is known; `secondorder.dimension_numbers_from_nnx` and
  `dimension_numbers_from_linen` derive them from the model.

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
    eps: added to the denominator, > 0 (a direction of exactly zero curvature, such as a
      parameter the loss is linear in, would otherwise take an infinite step).
    hessian_power: the power :math:`k` in [0, 1]; 0 gives momentum SGD, 1 AdaHessian.
    update_interval: compute the Hessian estimate every this many steps (int >= 1; an
      injected value below 1 is rejected at init, and read as 1 when traced).
    spatial_averaging: True averages :math:`|z \odot Hz|` over the spatial axes of
      convolution kernels as described above; False never does. A pytree of bools like
      params (or a function of params returning one) chooses per leaf.
    block_size: if set, leaves without spatial axes have :math:`D` averaged over
      consecutive blocks of this many entries (row-major order, within each stacked layer
      when the leaf has batch axes).
    seed: seed of the PRNG key for the probes.
    stats_dtype: dtype of `mu` and `nu`; default float32 (float64 for float64 params).
    weight_dimension_numbers: `optax.contrib.MuonDimensionNumbers` per leaf (a pytree like
      params, or a function of params returning one, or None): its batch axes are stacked
      layers, never averaged across. Under `optax.inject_hyperparams` pass the pytree (or
      name the argument in `static_args`): it reads any callable argument as a schedule.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of range, or dimension numbers that do not fit a
      leaf (naming its path, shape and spec).

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
  check_range("eps", eps, 0.0, low_inclusive=False)
  check_range("hessian_power", hessian_power, 0.0, 1.0)
  check_int_if_concrete("update_interval", update_interval, 1)
  if block_size is not None:
    check_int("block_size", block_size, minimum=1)
  check_int_if_concrete("seed", seed, 0)
  if not callable(spatial_averaging) and not all(
      isinstance(flag, (bool, np.bool_)) for flag in jax.tree.leaves(spatial_averaging)):
    raise ValueError(
        "spatial_averaging must be a bool, a pytree of bools like params or a function of "
        f"params returning one, got {spatial_averaging!r}.")

  def init_fn(params):
    check_float_leaves("scale_by_hutchinson", params)
    _averaging_plan(spatial_averaging, weight_dimension_numbers, params)  # validates
    return _init_state(params, seed, stats_dtype)

  def update_fn(updates, state, params=None, *, obj_fn=None, hessian_diag=None,
                refresh=None, **extra_args):
    del extra_args
    # Shapes are static: a broadcastable mismatch ((1,) for (3,)) is an error, not a free
    # broadcast.
    check_same_structure("updates", state.mu, updates, "the state")
    check_estimate_is_used("scale_by_hutchinson", hessian_diag, refresh)
    plan = _averaging_plan(spatial_averaging, weight_dimension_numbers, updates)
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
      d = _averaged_estimate(raw, nu, plan, block_size)
      return _fold_estimate(d, nu, hessian_count, nonfinite_count, b2)

    nu, hessian_count, nonfinite_count = maybe_refresh(
        refresh_fn, (state.nu, state.hessian_count, state.nonfinite_count), state.count,
        update_interval, refresh)
    count = optax.safe_increment(state.count)
    grads = jax.tree.map(lambda g, m: g.astype(m.dtype), updates, state.mu)
    mu = optax.tree.update_moment(grads, state.mu, b1, 1)
    new_updates = _precondition(mu, nu, count, hessian_count, updates, b1, b2, eps,
                                hessian_power)
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
    obj_fn: Callable[[Any], Any], params: Any, opt_state: Any, *, has_aux: bool = False,
) -> tuple:
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

  For a model with batch statistics, `obj_fn` may return `(loss, new_model_state)` with
  `has_aux=True` (`secondorder.closures.nnx_forward(...).train` /
  `linen_forward(...).train` composed with the loss): the one pass is then the training
  step's gradient pass, and the new state comes back as a fourth output.

  Args:
    obj_fn: params -> scalar loss on the current batch (or `(loss, aux)` with `has_aux`).
    params: the parameters.
    opt_state: the state of an optimizer that holds one `ScaleByHutchinsonState`.
    has_aux: whether `obj_fn` returns `(loss, aux)`.

  Returns:
    `(loss, grads, hessian_diag)`, the last a pytree like params; with `has_aux`,
    `(loss, grads, hessian_diag, aux)`.
  """
  hstate = _find_hutchinson_state(opt_state)
  _, probe_key = jax.random.split(hstate.key)
  value, grads, hdiag, aux = one_pass_hutchinson(obj_fn, params, probe_key, has_aux)
  return (value, grads, hdiag, aux) if has_aux else (value, grads, hdiag)


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
    weight_dimension_numbers: WeightDimensionNumbers = None,
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
          block_size=block_size, seed=seed, stats_dtype=stats_dtype,
          weight_dimension_numbers=weight_dimension_numbers),
      optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
