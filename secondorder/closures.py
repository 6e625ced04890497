"""Curvature closures for models with state (BatchNorm) and randomness (Dropout).

The curvature methods take functions of the parameters: `obj_fn` (params -> loss on the
batch, AdaHessian and Sophia-H), `logits_fn` (params -> logits, Sophia-G and the Fisher
products). For a model in training mode those functions are not pure: BatchNorm writes its
running statistics and Dropout draws a fresh mask on every call. Written naively (merging
an NNX model's stored state inside the traced function) the write happens at the wrong
trace level and raises `Cannot mutate BatchStat from a different trace level`; written
with a copy, the statistics silently never update.

`nnx_forward` and `linen_forward` build both sides of a training step from a split model:

* `train(params) -> (output, new_state)`: the gradient pass. The model runs in training
  mode once, its new state (running statistics, advanced RNG counters) comes back as an
  output, exactly as in a plain training step.
* `frozen(params) -> output`: the curvature pass. It runs the same forward from the same
  state, so it normalises with the same batch statistics and draws the same dropout mask as
  `train`, and it writes nothing: whatever the model would write is dropped.

Both are pure functions of the parameters: they can be differentiated, passed to
`tx.update(..., obj_fn=...)` (even inside `jax.lax.cond` on a refresh schedule), and
jitted without leaking tracers. A training step (NNX)::

  graphdef, params, state = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, state, opt_state, x, y):
    fwd = so.nnx_forward(graphdef, state, x)
    loss = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    train_loss = lambda p: (lambda out, s: (loss(out), s))(*fwd.train(p))
    (value, new_state), grads = jax.value_and_grad(train_loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   obj_fn=lambda p: loss(fwd.frozen(p)),  # Sophia-H, AdaHessian
                                   logits_fn=fwd.frozen)                  # Sophia-G
    return optax.apply_updates(params, updates), new_state, opt_state, value

The one-pass helpers (`value_grad_and_hessian_diag`, `value_grad_and_hutchinson_estimate`)
take `train_loss` itself with `has_aux=True`: their single pass is the gradient pass and
returns the new state as its fourth output.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax

__all__ = ["Forward", "nnx_forward", "linen_forward"]


class Forward(NamedTuple):
  """The two passes of a training step over a model with state.

  Attributes:
    train: `params -> (output, new_state)`, the gradient pass; `new_state` has the structure
      of the state the closures were built from.
    frozen: `params -> output`, the curvature pass: the same forward (same batch statistics,
      same dropout mask), its writes dropped.
  """
  train: Callable[[Any], tuple[Any, Any]]
  frozen: Callable[[Any], Any]


def _selected(logits: Callable[[Any], Any] | None, where: str) -> Callable[[Any], Any]:
  """The logits selector, checked (the identity when None)."""
  if logits is None:
    return lambda output: output
  if not callable(logits):
    raise TypeError(f"{where}: logits must be a callable (the model's output -> its "
                    f"logits, e.g. lambda out: out[0]), got {type(logits).__name__}.")
  return logits


def _frozen(train: Callable[[Any], tuple[Any, Any]]) -> Callable[[Any], Any]:
  """`train` without its state output."""
  def frozen(params):
    output, _ = train(params)
    return output
  return frozen


def nnx_forward(graphdef: Any, state: Any, *args: Any,
                logits: Callable[[Any], Any] | None = None, **kwargs: Any) -> Forward:
  r"""The gradient and curvature passes of a Flax NNX model in training mode.

  With `graphdef, params, state = nnx.split(model, nnx.Param, ...)`, each pass rebuilds the
  model from `(graphdef, params, state)` as a fresh copy inside the traced function and
  calls `model(*args, **kwargs)`:

  .. math::
    \mathrm{train}(\theta) = (f(\theta; s, x),\ s'), \qquad
    \mathrm{frozen}(\theta) = f(\theta; s, x),

  where :math:`s` is the stored state (batch statistics, RNG counters) and :math:`s'` what
  the forward writes. Both passes start from the same :math:`s`, so Dropout draws the same
  mask (its key comes from the stream's counter in :math:`s`) and BatchNorm normalises with
  the same batch statistics; only `train` returns the writes.

  Args:
    graphdef: the model's graph definition from `nnx.split(model, nnx.Param, ...)`.
    state: the non-parameter state from the same split (`nnx.State`).
    *args: positional arguments of the model's call (the batch's inputs, then any others:
      a decoder's positions, cache and attention mask).
    logits: `model output -> logits` for a model that returns more than its logits
      (`lambda out: out[0]` for `(logits, cache)`); both passes return the selection.
    **kwargs: keyword arguments of the model's call.

  Returns:
    A :class:`Forward`; `train(params)` returns `(output, new_state)` with `new_state` split
    the same way as `state`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from secondorder.closures import nnx_forward
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.lin = nnx.Linear(3, 2, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(2, rngs=rngs)
    ...     self.drop = nnx.Dropout(0.5, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.drop(self.bn(self.lin(x)))
    >>> graphdef, params, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
    >>> fwd = nnx_forward(graphdef, state, jnp.ones((4, 3)))
    >>> out, new_state = jax.jit(fwd.train)(params)
    >>> bool(jnp.all(jax.jit(fwd.frozen)(params) == out))
    True
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  select = _selected(logits, "nnx_forward")

  def train(params):
    model = nnx.merge(graphdef, params, state, copy=True)
    output = select(model(*args, **kwargs))
    _, _, new_state = nnx.split(model, nnx.Param, ...)
    return output, new_state

  return Forward(train=train, frozen=_frozen(train))


def linen_forward(apply_fn: Callable[..., Any], state: Mapping[str, Any], *args: Any,
                  rngs: Mapping[str, jax.Array] | None = None,
                  logits: Callable[[Any], Any] | None = None, **kwargs: Any) -> Forward:
  r"""The gradient and curvature passes of a Flax linen model in training mode.

  Each pass calls `apply_fn({"params": params, **state}, *args, rngs=rngs,
  mutable=list(state), **kwargs)`: the collections of `state` (e.g. `batch_stats`) are the
  ones the forward may write.

  .. math::
    \mathrm{train}(\theta) = (f(\theta; s, x),\ s'), \qquad
    \mathrm{frozen}(\theta) = f(\theta; s, x).

  Both passes receive the same `rngs`, so Dropout draws the same mask; only `train`
  returns the new collections. Pass a fresh dropout key every step (e.g.
  `jax.random.fold_in(key, step)`).

  Args:
    apply_fn: the model's `apply` (`module.apply`).
    state: the variables other than `params` (`{"batch_stats": ...}`; may be empty).
    *args: positional arguments of the model's call.
    rngs: the PRNG keys of the call (`{"dropout": key}`), or None.
    logits: `model output -> logits` for a model that returns more than its logits
      (`lambda out: out[0]` for `(logits, extras)`); both passes return the selection.
    **kwargs: keyword arguments of the model's call (`train=True`).

  Returns:
    A :class:`Forward`; `train(params)` returns `(output, new_state)` with `new_state` a
    dict with the collections of `state`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from secondorder.closures import linen_forward
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.BatchNorm(use_running_average=False)(nn.Dense(2)(x))
    ...     return nn.Dropout(0.5, deterministic=False)(x)
    >>> x, net = jnp.ones((4, 3)), Net()
    >>> variables = net.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    >>> params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    >>> fwd = linen_forward(net.apply, state, x, rngs={"dropout": jax.random.key(2)})
    >>> out, new_state = fwd.train(params)
    >>> bool(jnp.all(fwd.frozen(params) == out))
    True
  """
  state = dict(state)
  if "params" in state:
    raise ValueError("linen_forward: state must hold the variables other than 'params' "
                     f"(got collections {sorted(state)}); pass params to train/frozen.")
  mutable = sorted(state)
  select = _selected(logits, "linen_forward")

  def train(params):
    variables = {"params": params, **state}
    if not mutable:
      return select(apply_fn(variables, *args, rngs=rngs, **kwargs)), {}
    output, new_state = apply_fn(variables, *args, rngs=rngs, mutable=mutable, **kwargs)
    return select(output), dict(new_state)

  return Forward(train=train, frozen=_frozen(train))
