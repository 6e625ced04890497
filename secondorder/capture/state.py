"""Models with state and randomness: the capture's forward pass is the training forward pass.

A model in training mode writes while it runs: BatchNorm its running statistics, Dropout
its RNG stream's counter (NNX) or nothing but a key it is given (linen). The capture runs
the model *once*, as a plain training step would, inside `jax.vjp`; everything the
curvature needs (the gradient's backward pass, the sampled or exact Fisher's extra
backward passes) reuses that one linearisation, so it sees the same batch statistics and
the same dropout mask as the gradient. What the forward wrote comes back beside its output:

* NNX: the forward runs on a fresh copy of the model (`nnx.merge(..., copy=True)`), so no
  variable is written at a foreign trace level; its non-parameter state is then written
  into the user's model with `nnx.update`, exactly where a plain training step
  (`nnx.grad` of a loss calling `model(x)`) would have left it.
* linen: the collections given as `state=` to the call are made mutable, and the call
  returns their new values as a fourth output, as `module.apply(..., mutable=...)` does;
  `rngs=` (e.g. `{"dropout": key}`) is passed to `apply`.

Discovery of the layers (`Capture.layers`) runs the same forward under `jax.eval_shape`
and writes nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

__all__ = ["nnx_training_copy", "nnx_written_state", "nnx_finish", "check_nnx_call",
           "linen_apply", "linen_finish", "check_linen_apply_kwargs"]


def nnx_training_copy(model: nnx.Module, params: Any) -> nnx.Module:
  """A fresh copy of `model` whose parameters are `params`, owned by the current trace.

  Args:
    model: the user's NNX model (never written).
    params: the `nnx.State` of its `nnx.Param`s (traced by the capture).

  Returns:
    A new module with the same graph, `params`, and copies of every other variable.
  """
  graphdef, _, *rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, params, *rest, copy=True)


def nnx_written_state(model: nnx.Module) -> nnx.State:
  """The copy's state after its forward pass: every variable that is not a parameter.

  The capture's zero slots are parameters (`interception.KfacSlot`), so they are left out
  and the result has the structure of the user's model's non-parameter state.

  Args:
    model: the capture's copy, after its forward pass.

  Returns:
    Its non-parameter `nnx.State` (batch statistics, RNG counters, ...).
  """
  return nnx.state(model, nnx.Not(nnx.Param))


def nnx_finish(model: nnx.Module, result: tuple, new_state: nnx.State) -> tuple:
  """Writes what the training forward wrote into the user's `model` (in place).

  Args:
    model: the user's NNX model.
    result: the capture's `(loss, grads, kfac_stats)`.
    new_state: `nnx_written_state` of the capture's copy.

  Returns:
    `result` unchanged.
  """
  nnx.update(model, new_state)
  return result


def check_nnx_call(state, rngs) -> None:
  """Rejects linen's `state=` / `rngs=` in an NNX capture's call (the model carries both).

  Raises:
    TypeError: naming the argument.
  """
  for name, value in (("state", state), ("rngs", rngs)):
    if value is not None:
      raise TypeError(
          f"nnx_capture: {name}= is for linen models; an NNX model carries its batch "
          "statistics and RNG streams itself, and the capture writes what the training "
          "forward changes back into it.")


def check_linen_apply_kwargs(apply_kwargs: Mapping[str, Any]) -> None:
  """Rejects `mutable=` among `linen_capture`'s apply arguments (it belongs to the call).

  Args:
    apply_kwargs: the keyword arguments `linen_capture` forwards to `model.apply`.

  Raises:
    TypeError: naming `mutable` and the call that replaces it.
  """
  if "mutable" in apply_kwargs:
    raise TypeError(
        "linen_capture: mutable= is not an apply argument of the capture; pass the "
        "collections the forward writes as state= to each call, e.g. "
        "cap(params, x, y, key=key, state={'batch_stats': batch_stats}, "
        "rngs={'dropout': dropout_key}), which returns their new values as a fourth output.")


def linen_apply(model, variables: dict, inputs, apply_kwargs: Mapping[str, Any],
                state: Mapping[str, Any] | None, rngs: Mapping[str, Any] | None,
                call: tuple[tuple, dict] = ((), {})):
  """`model.apply` in training mode: `(outputs, new_state)`, `new_state` None without state.

  Args:
    model: the linen module.
    variables: `{"params": ..., **collections passed unchanged}`.
    inputs: the batch's inputs.
    apply_kwargs: the capture's other `apply` arguments.
    state: the collections the forward may write (`{"batch_stats": ...}`), or None.
    rngs: the call's PRNG keys (`{"dropout": key}`), or None.
    call: the model's other positional and keyword arguments (after `inputs`).

  Returns:
    The outputs and the new values of `state`'s collections (a dict), or None.

  Raises:
    ValueError: when `state` is not a mapping of collections other than "params".
    TypeError: when `rngs` is given both here and to `linen_capture`.
  """
  kwargs = dict(apply_kwargs, **call[1])
  if rngs is not None:
    if "rngs" in kwargs:
      raise TypeError("rngs= was given both to linen_capture(...) and to the call; pass the "
                      "step's keys to the call only.")
    kwargs["rngs"] = rngs
  if state is None:
    return model.apply(variables, inputs, *call[0], **kwargs), None
  if not isinstance(state, Mapping) or "params" in state:
    got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
    raise ValueError("state= must be a dict of the collections the forward writes, other "
                     f"than 'params' (e.g. {{'batch_stats': ...}}); got {got}.")
  outputs, new_state = model.apply({**variables, **state}, inputs, *call[0],
                                   mutable=sorted(state), **kwargs)
  return outputs, dict(new_state)


def linen_finish(params, result: tuple, new_state: dict | None) -> tuple:
  """`(loss, grads, kfac_stats)`, with the new collections appended when `state=` was given.

  Args:
    params: the linen params (unused: linen is functional).
    result: the capture's `(loss, grads, kfac_stats)`.
    new_state: `linen_apply`'s new collections, or None.

  Returns:
    `result`, or `result + (new_state,)`.
  """
  del params
  return result if new_state is None else result + (new_state,)
