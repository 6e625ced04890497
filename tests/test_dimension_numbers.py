"""Dimension numbers: axes split, round trips and errors that name the leaf."""

import jax.numpy as jnp
import numpy as np
import pytest

from secondorder.dimension_numbers import MuonDimensionNumbers as DN
from secondorder.dimension_numbers import leaf_axes, resolve_leaf_axes


def test_stack_is_independent_matrices():
  x = np.arange(60.0).reshape(4, 3, 5)
  axes = leaf_axes(DN(1, 2), x.shape)
  assert (axes.batch, axes.reduction, axes.output) == ((0,), (1,), (2,))
  np.testing.assert_array_equal(axes.to_matrices(jnp.asarray(x)), x)


def test_empty_reduction_is_a_stack_of_vectors():
  x = np.arange(24.0).reshape(2, 4, 3)  # output axis 1, batch axes 0 and 2: 6 vectors of 4
  axes = leaf_axes(DN((), 1), x.shape)
  assert (axes.batch, axes.reduction, axes.output, axes.vectors) == ((0, 2), (), (1,), True)
  m = axes.to_matrices(jnp.asarray(x))
  assert m.shape == (6, 1, 4)
  np.testing.assert_array_equal(m[4, 0], x[1, :, 1])
  np.testing.assert_array_equal(axes.from_matrices(m), x)
  assert not leaf_axes(DN(1, 2), (2, 3, 4)).vectors
  with pytest.raises(ValueError, match="output_axis must be an int or a non-empty"):
    leaf_axes(DN(1, ()), (2, 3), "v")


def test_multi_axis_output_is_flattened_and_round_trips():
  x = np.arange(36.0).reshape(6, 2, 3)
  axes = leaf_axes(DN(0, (1, 2)), x.shape)
  m = axes.to_matrices(jnp.asarray(x))
  assert m.shape == (1, 6, 6)
  np.testing.assert_array_equal(m[0], x.reshape(6, 6))
  np.testing.assert_array_equal(axes.from_matrices(m), x)


def test_transposed_axes_round_trip():
  x = np.arange(24.0).reshape(2, 3, 4)
  axes = leaf_axes(DN(-1, 0), x.shape)
  m = axes.to_matrices(jnp.asarray(x))
  assert m.shape == (3, 4, 2)
  np.testing.assert_array_equal(m[1], x[:, 1, :].T)
  np.testing.assert_array_equal(axes.from_matrices(m), x)


def test_resolve_accepts_pytree_callable_and_none():
  params = {"a": jnp.zeros((4, 3, 5)), "b": jnp.zeros(3)}
  spec = {"a": DN(1, 2), "b": None}
  assert resolve_leaf_axes(None, params) == [None, None]
  got = resolve_leaf_axes(lambda p: spec, params)
  assert got[1] is None and got[0].batch == (0,)


@pytest.mark.parametrize("spec, match", [
    (DN(1, 3), "axis 3 does not exist"),
    (DN(1, 1), "overlap"),
    (DN((1, 1), 2), "repeated"),
    (DN(1.5, 2), "must be an int"),
])
def test_bad_spec_names_leaf_shape_and_spec(spec, match):
  params = {"w": jnp.zeros((4, 3, 5))}
  with pytest.raises(ValueError, match=match) as e:
    resolve_leaf_axes({"w": spec}, params)
  assert "['w']" in str(e.value) and "(4, 3, 5)" in str(e.value)


def test_structure_mismatch_is_reported():
  with pytest.raises(ValueError, match="structure of the params"):
    resolve_leaf_axes({"a": None}, {"a": jnp.zeros(2), "b": jnp.zeros(2)})
