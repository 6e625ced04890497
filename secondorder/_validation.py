"""Argument checks shared by every public function and transform.

Hyperparameters are checked when they are concrete: Python numbers, and the concrete scalar
arrays `optax.inject_hyperparams` passes at init. Traced values (inside `jit`) and schedules
(callables) pass unchecked.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_concrete_number(value: Any) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


def concrete_scalar(value: Any) -> Any:
  """`value` as a Python number when it is one, or a concrete (not traced) scalar array;
  None for tracers, schedules and anything else."""
  if _is_concrete_number(value):
    return value
  if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.size(value) == 1:
    if isinstance(value, jax.core.Tracer):
      return None
    return np.asarray(value).reshape(()).item()
  return None


def check_count(name: str, value: Any, minimum: int = 1) -> None:
  """Raises unless `value` is an integer >= `minimum`: a Python int, or a concrete integer
  array (`optax.inject_hyperparams` at init). A traced value passes (the transforms read it
  as at least `minimum`, see their docstrings)."""
  if callable(value):
    return
  concrete = concrete_scalar(value)
  if concrete is None:
    if not isinstance(value, (jax.Array, np.ndarray)):
      check_int(name, value, minimum=minimum)
    return
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    if not (jnp.issubdtype(jnp.result_type(value), jnp.integer) or float(concrete).is_integer()):
      raise ValueError(f"{name} must be an integer, got {value!r}.")
    if concrete < minimum:
      raise ValueError(f"{name} must be an integer >= {minimum}, got {concrete!r}.")
    return
  check_int(name, value, minimum=minimum)


def check_int(name: str, value: Any, *, minimum: int | None = None) -> None:
  """Raises unless `value` is a Python int (not bool) >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
  """Raises if a concrete number lies outside [low, high] (bounds as given).

  Concrete scalar arrays are checked like numbers; tracers and callables (schedules) pass
  unchecked.
  """
  value = concrete_scalar(value)
  if value is None:
    return
  lo_bad = low is not None and (value < low if low_inclusive else value <= low)
  hi_bad = high is not None and (value > high if high_inclusive else value >= high)
  if lo_bad or hi_bad or value != value:  # value != value: NaN
    lo = "-inf" if low is None else f"{low}"
    hi = "inf" if high is None else f"{high}"
    interval = ("[" if low_inclusive else "(") + f"{lo}, {hi}" + ("]" if high_inclusive else ")")
    raise ValueError(f"{name} must lie in {interval}, got {value!r}.")


def check_choice(name: str, value: Any, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)!r}, got {value!r}.")


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def _same_treedef(a: Any, b: Any) -> bool:
  """Whether two tree structures are equal (typed Any: jaxlib ships no stub for PyTreeDef,
  so a type checker cannot read its `==`)."""
  return a == b


def check_tree_structure(method: str, updates: Any, reference: Any,
                         reference_name: str = "params") -> None:
  """Raises a ValueError naming the first differing path unless `updates` has the tree
  structure (dict keys included) of `reference`; None as `reference` checks nothing.

  Tree structures are static, so this runs at trace time only: under `jit` it costs
  nothing at run time.
  """
  if reference is None:
    return
  ref_def = jax.tree.structure(reference)
  upd_def = jax.tree.structure(updates)
  if _same_treedef(ref_def, upd_def):
    return
  ref_paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
  upd_paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0]]
  for a, b in zip(ref_paths, upd_paths):
    if a != b:
      raise ValueError(
          f"{method}: the updates must have the tree structure of the {reference_name} the "
          f"state was initialized with; first difference: {reference_name} has leaf {a} "
          f"where the updates have {b}.")
  if len(ref_paths) != len(upd_paths):
    longer, name = ((ref_paths, reference_name) if len(ref_paths) > len(upd_paths)
                    else (upd_paths, "the updates"))
    raise ValueError(
        f"{method}: the updates must have the tree structure of the {reference_name} the "
        f"state was initialized with: {reference_name} has {len(ref_paths)} leaves, the "
        f"updates {len(upd_paths)}; first difference: {longer[min(len(ref_paths), len(upd_paths))]}"
        f" is only in {name}.")
  raise ValueError(
      f"{method}: the updates must have the tree structure of the {reference_name} the state "
      f"was initialized with (the same leaf paths, different node types): {reference_name} "
      f"{ref_def}, updates {upd_def}.")


def check_same_structure(name: str, reference: Any, other: Any, reference_name: str = "params") -> None:
  """Raises naming the first leaf where `other` differs from `reference` in structure or shape."""
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
  oth_leaves, oth_def = jax.tree_util.tree_flatten_with_path(other)
  if not _same_treedef(ref_def, oth_def):
    ref_paths = [_path_str(p) for p, _ in ref_leaves]
    oth_paths = [_path_str(p) for p, _ in oth_leaves]
    for a, b in zip(ref_paths, oth_paths):
      if a != b:
        raise ValueError(
            f"{name} must have the same tree structure as {reference_name}; first difference: "
            f"{reference_name} has leaf {a} where {name} has {b}.")
    raise ValueError(
        f"{name} must have the same tree structure as {reference_name}: {reference_name} has "
        f"{len(ref_paths)} leaves, {name} has {len(oth_paths)}.")
  for (path, a), (_, b) in zip(ref_leaves, oth_leaves):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
          f"{name} must match the leaf shapes of {reference_name}; leaf {_path_str(path)} has "
          f"shape {jnp.shape(b)} in {name} but {jnp.shape(a)} in {reference_name}.")


def require_extra_arg(method: str, keyword: str, value: Any, example: str) -> Any:
  """Returns `value`, raising a ValueError that shows the call to make when it is None."""
  if value is None:
    raise ValueError(
        f"{method} needs the keyword argument `{keyword}` in update(); call it as "
        f"`tx.update(grads, state, params, {example})`.")
  return value


def check_float_leaves(method: str, params: Any, *, complex_ok: bool = True) -> None:
  """Raises a TypeError naming the first leaf of `params` that is not floating point (or
  complex, when `complex_ok` is False)."""
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(f"{method} needs floating-point params; leaf {_path_str(path)} has "
                      f"dtype {dtype}.")
    if not complex_ok and jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(f"{method} does not support complex params (the imaginary part would "
                      f"be dropped); leaf {_path_str(path)} has dtype {dtype}.")


def check_state_shapes(method: str, init_fn: Any, updates: Any, state: Any) -> None:
  """Raises unless `state` has the leaf shapes `init_fn(updates)` would give it.

  For states whose layout is not params-shaped (blocked or factored statistics): a gradient
  that merely broadcasts against the params the state was built for is an error. Only
  shapes are traced (`jax.eval_shape`), so this costs nothing at run time.
  """
  expected_state = jax.eval_shape(init_fn, updates)
  expected = jax.tree_util.tree_flatten_with_path(expected_state)[0]
  got = jax.tree.leaves(state)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(updates)]
  if not _same_treedef(jax.tree.structure(expected_state), jax.tree.structure(state)):
    # A state field laid out like the params (a graft's moments) records their keys.
    got_paths = [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    for (path, _), g in zip(expected, got_paths):
      if _path_str(path) != g:
        raise ValueError(
            f"{method}: updates do not have the tree structure of the params the state was "
            f"initialized with: the state has {g} where these updates need "
            f"{_path_str(path)}.")
  if len(expected) != len(got):
    raise ValueError(f"{method}: updates (leaf shapes {shapes}) do not match the params the "
                     f"state was initialized with (the state has a different structure).")
  for (path, e), g in zip(expected, got):
    if jnp.shape(e) != jnp.shape(g):
      raise ValueError(
          f"{method}: updates (leaf shapes {shapes}) do not match the params the state was "
          f"initialized with; state leaf {_path_str(path)} has shape {jnp.shape(g)}, these "
          f"updates need {jnp.shape(e)}.")
