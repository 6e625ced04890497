r"""Embeddings (`nn.Embed`, `nnx.Embed`): a diagonal A of token frequencies, and a tied head.

A table lookup `y = E[v]` with `E` of shape `[V, d]` is a dense layer whose input is the
one-hot vector of the token: the input factor is diagonal, its entries the frequencies of
the tokens in the batch, and is kept as the vector

.. math:: A = \mathrm{diag}(c) / N, \qquad c_v = \#\{\text{positions holding token } v\},

with S the per-token second moment of the output gradients, as for a dense layer.

A table also used as the output head through `attend` (`logits = q Eᵀ`, a tied embedding)
is one parameter with two uses. Read as the `[V, d]` matrix, each use is a Kronecker pair
`L_u ⊗ R_u` (vocabulary side ⊗ feature side): the lookups give `L = diag(c)/N`,
`R = S_lookup`; the head, a dense layer with kernel `Eᵀ`, gives `L = S_head` (its output
side, the logits) and `R = mean q qᵀ` (its input side). K-FAC-expand treats the uses as
extra positions of one layer; the two pairs are put on a common scale first (each
vocabulary-side factor divided by its mean eigenvalue t_u = tr L_u / V, which leaves
`L_u ⊗ R_u` unchanged), then averaged on the vocabulary side and summed on the feature
side:

.. math:: L = \frac1U \sum_u L_u / t_u, \qquad R = \sum_u t_u R_u,

which is exact whenever the uses' vocabulary-side factors are proportional, and is each
use's own pair when the other is absent. Both factors are then full matrices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from secondorder.capture import dense, padding, taps
from secondorder.capture.types import KfacLayer, LayerStats

KIND = "embed"     # table lookups only
ATTEND = "attend"  # a call of `attend` (discovery); a layer with one is TIED
TIED = "tied"      # lookups and/or `attend` on one table


def describe(x: jax.Array) -> tuple[tuple, int] | str:
  """The configuration of a lookup, or why it cannot be covered.

  Args:
    x: the integer token indices.

  Returns:
    `(("lookup",), 1)`, or a reason string.
  """
  if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
    return "an embedding looked up with non-integer inputs"
  return ("lookup",), 1


def describe_attend(query: jax.Array, features: int) -> tuple[tuple, int] | str:
  """The configuration of an `attend` call (the tied head), or why it cannot be covered.

  Args:
    query: the head's input, `[..., d]`.
    features: d, the table's width.

  Returns:
    `(("attend",), 1)`, or a reason string.
  """
  if jnp.ndim(query) < 1 or jnp.shape(query)[-1] != features:
    return f"attend called with a query of shape {jnp.shape(query)} (width {features} expected)"
  return ("attend",), 1


def slot_shapes(layer: KfacLayer) -> tuple[tuple[int, ...], ...]:
  """Zero slots of the taps: counts, S and uses of the lookups, then (tied) the head's
  input second moment, output second moment and uses."""
  stack = layer.factor_shape(0)[:-2]
  v, d = layer.axes.matrix_shape[1:]
  lookups = (stack + (v,), stack + (d, d), stack)
  return lookups + ((stack + (d, d), stack + (v, v), stack) if layer.kind == TIED else ())


def tap_lookup(described, slots, call, x, with_bias: bool, weights) -> jax.Array:
  """A lookup whose backward pass reports the token frequencies and Σ ĝĝᵀ.

  `weights(positions)`: the padding weights of the looked-up positions (None: all count)."""
  del described, with_bias
  counts_slot, s_slot, uses = slots[:3]
  tokens = x.reshape(-1)
  zeros = jnp.zeros(counts_slot.shape, counts_slot.dtype)
  w = weights(x.shape)
  if w is None:
    freq = zeros.at[tokens].add(1.0) / max(tokens.size, 1)
  else:
    w = w.astype(counts_slot.dtype)
    freq = zeros.at[tokens].add(w) / padding.positive(jnp.sum(w))
  y = taps.tap_value(call(x), freq, counts_slot, uses)
  return taps.tap_outputs(y, s_slot)


def tap_attend(described, slots, call, query, with_bias: bool, weights) -> jax.Array:
  """The tied head `q Eᵀ`: mean q qᵀ over its rows and Σ ĝĝᵀ over the logits."""
  del described, with_bias
  cols_slot, rows_slot, uses = slots[3:6]
  rows = lambda q: dense.input_rows((q.ndim - 1,), q)
  w = weights(dense.positions((query.ndim - 1,), query))
  query = taps.tap_inputs(query, cols_slot, uses, rows, False, w)
  return taps.tap_outputs(call(query), rows_slot)


def _mean_eigenvalue(m: jax.Array) -> jax.Array:
  return jnp.trace(m, axis1=-2, axis2=-1) / m.shape[-1]


def statistics(layer: KfacLayer, first: tuple, fisher: tuple, m: int) -> LayerStats:
  """The layer's statistics from the slots' cotangents.

  Args:
    layer: the embedding layer ("embed" or "tied").
    first: the slots' cotangents of the gradient pass (inputs: counts, the head's q qᵀ).
    fisher: the slots' cotangents of the Fisher pass (the output-gradient sums).
    m: M, the number of examples of the model's output.

  Returns:
    "embed": `LayerStats(a=frequencies [V], s=[d, d])`; "tied": the combined pair
    `LayerStats(a=L [V, V], s=R [d, d])`.
  """
  per_use = lambda u: jnp.maximum(u, 1)[..., None]
  freq = first[0] / per_use(first[2])
  s_lookup = m * fisher[1]
  if layer.kind == KIND:
    return LayerStats(a=freq, s=s_lookup)
  pairs = ((jnp.vectorize(jnp.diag, signature="(v)->(v,v)")(freq), s_lookup, first[2]),
           (m * fisher[4], first[3] / per_use(first[5])[..., None], first[5]))
  left: jax.Array | float = 0.0
  right: jax.Array | float = 0.0
  used: jax.Array | float = 0.0
  for l_u, r_u, uses in pairs:
    t = _mean_eigenvalue(l_u)
    on = (uses > 0) & (t > 0)
    t_safe = jnp.where(on, t, 1.0)[..., None, None]
    left = left + jnp.where(on[..., None, None], l_u / t_safe, 0.0)
    right = right + jnp.where(on[..., None, None], t_safe * r_u, 0.0)
    used = used + on
  return LayerStats(a=left / jnp.maximum(used, 1)[..., None, None], s=jnp.asarray(right))
