"""Random pytrees (shapes, dtypes, ranks 0-4, empty dimensions) at every transform's init/update.

For every public transform and alias: `init` accepts the tree, two `update` calls return
updates with the params' structure, shapes and dtypes, all finite, and a state whose
structure and dtypes do not change between calls.

Two fixed trees cover every feature in every case (ranks 0-4 with and without empty
dimensions, each dtype, dicts, lists in dicts, 3-D leaves that the stacked-layer cases read
as `[L, m, n]`), and two random ones from hypothesis add variety. Each example costs fresh
compiles (new shapes; the CG-based cases compile their `lax.while_loop` at every update):
these four cost what six random examples did (about 125 s of CPU for the 21 cases), and
the six, derandomized, never drew a non-empty 3-D or 4-D leaf.

Not jitted: every example has new shapes, so a jit would only add a compile per call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests import contract as C
from tests.test_contract import CASES

METHOD_CASES = C.generic_method_cases(CASES)

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

_shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4).map(tuple)
class _Spec:
  """One leaf to build: shape, dtype, PRNG seed (a plain object, so never a pytree node)."""

  def __init__(self, shape, dtype, seed):
    self.shape, self.dtype, self.seed = shape, dtype, seed

  def __repr__(self):
    return f"_Spec({self.shape}, {jnp.dtype(self.dtype).name}, {self.seed})"


_leaves = st.builds(_Spec, _shapes, st.sampled_from(_DTYPES), st.integers(0, 2**16))
_trees = st.one_of(
    st.dictionaries(st.sampled_from("abcdef"), _leaves, min_size=1, max_size=4),
    st.lists(_leaves, min_size=1, max_size=3).map(tuple),
    st.dictionaries(st.sampled_from("xy"), st.lists(_leaves, min_size=1, max_size=2),
                    min_size=1, max_size=2),
)


def _build(spec):
  """params and two gradients from a tree of (shape, dtype, seed) specs."""
  is_spec = lambda x: isinstance(x, _Spec)

  def leaf(s, scale, salt):
    shape, dtype, seed = s.shape, s.dtype, s.seed
    return (scale * jax.random.normal(jax.random.key(seed + salt), shape)).astype(dtype)

  params = jax.tree.map(lambda s: leaf(s, 1.0, 0), spec, is_leaf=is_spec)
  g1 = jax.tree.map(lambda s: leaf(s, 0.5, 1), spec, is_leaf=is_spec)
  g2 = jax.tree.map(lambda s: leaf(s, 0.5, 2), spec, is_leaf=is_spec)
  return params, g1, g2


def _loss(p):
  return sum(0.5 * jnp.sum(jnp.arange(1, x.size + 1, dtype=jnp.float32).reshape(x.shape)
                           * x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(p))


def _logits(p):
  s = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(p))
  return s * jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


_F32, _BF16, _F16 = jnp.float32, jnp.bfloat16, jnp.float16
# Every rank 0-4 non-empty, each dtype; the 3-D leaf is a stack of 3 layers [L, m, n].
_EVERY_RANK = {"a": _Spec((), _F32, 1), "b": _Spec((3,), _BF16, 2), "c": _Spec((2, 3), _F16, 3),
               "d": _Spec((3, 2, 2), _F32, 4), "e": _Spec((2, 1, 3, 2), _BF16, 5)}
# Empty dimensions (a 1-D leaf, layers of empty matrices) beside non-empty leaves, in lists.
_EMPTY_AND_NESTED = {"x": [_Spec((0,), _F32, 6), _Spec((2, 0, 3), _F16, 7)],
                     "y": [_Spec((1, 3, 1), _BF16, 8), _Spec((2, 2), _F32, 9)]}


# Labels for the 4 rows of `_logits` (the Gauss-Newton cases' `loss_fn`).
_PROBLEM = C.Problem("random", None, _loss, 0.0, 1.0, logits_fn=_logits,
                     labels=np.array([0, 1, 2, 1]))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in METHOD_CASES])
def test_random_pytrees(case):
  tx = case.make(0.05)

  @settings(max_examples=2, deadline=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
  @given(_trees)
  @example(_EVERY_RANK)
  @example(_EMPTY_AND_NESTED)
  def run(spec):
    params, g1, g2 = _build(spec)
    state = tx.init(params)
    u1, state1 = tx.update(g1, state, params, **case.extra_args(_PROBLEM, params))
    u2, state2 = tx.update(g2, state1, params, **case.extra_args(_PROBLEM, params))
    for u in (u1, u2):
      assert jax.tree.structure(u) == jax.tree.structure(params)
      for x, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
        assert x.shape == p.shape and x.dtype == p.dtype, (x.shape, x.dtype, p.shape, p.dtype)
        assert bool(jnp.all(jnp.isfinite(x)))
    assert jax.tree.structure(state) == jax.tree.structure(state2)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
      assert jnp.asarray(a).dtype == jnp.asarray(b).dtype and np.shape(a) == np.shape(b)
      if jnp.issubdtype(jnp.asarray(b).dtype, jnp.inexact):
        assert bool(jnp.all(jnp.isfinite(b)))

  run()
