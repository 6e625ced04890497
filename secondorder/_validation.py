"""Argument checks shared by every public function and transform.

Hyperparameters are checked only when they are concrete Python numbers:
`optax.inject_hyperparams` passes arrays, and a schedule is a callable.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp


def _is_concrete_number(value: Any) -> bool:
  return isinstance(value, numbers.Number) and not isinstance(value, bool)


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

  Arrays, tracers and callables (schedules) pass unchecked.
  """
  if not _is_concrete_number(value):
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


def check_same_structure(name: str, reference: Any, other: Any, reference_name: str = "params") -> None:
  """Raises naming the first leaf where `other` differs from `reference` in structure or shape."""
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
  oth_leaves, oth_def = jax.tree_util.tree_flatten_with_path(other)
  if ref_def != oth_def:
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
  expected = jax.tree_util.tree_flatten_with_path(jax.eval_shape(init_fn, updates))[0]
  got = jax.tree.leaves(state)
  shapes = [jnp.shape(x) for x in jax.tree.leaves(updates)]
  if len(expected) != len(got):
    raise ValueError(f"{method}: updates (leaf shapes {shapes}) do not match the params the "
                     f"state was initialized with (the state has a different structure).")
  for (path, e), g in zip(expected, got):
    if jnp.shape(e) != jnp.shape(g):
      raise ValueError(
          f"{method}: updates (leaf shapes {shapes}) do not match the params the state was "
          f"initialized with; state leaf {_path_str(path)} has shape {jnp.shape(g)}, these "
          f"updates need {jnp.shape(e)}.")
