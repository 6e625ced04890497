"""Einsum layers (`nnx.Einsum`, `nn.Einsum`): a kernel that contracts some input axes and
emits some output axes is one dense layer.

An equation `x, W -> y` is read letter by letter. A letter of the kernel W is

* a *reduction* axis when it is in `x` and not in `y` (contracted with the input),
* an *output* axis when it is in `y` and not in `x` (emitted into the output).

Every other letter of `x` must reach `y` unchanged: those are positions (batch, sequence,
heads the kernel does not touch), extra rows of the layer as for a dense layer applied at
every token. The kernel is then the matrix `(∏ reduction) x (∏ output)`, its reduction axes
in kernel order and its output axes in the order `y` holds them (the order in which a bias
is added), and K-FAC's pair is exact as for `DenseGeneral`: A the second moment of the
input rows (the contracted axes of `x`, in kernel order), S that of the output gradients
(the emitted axes of `y`).

Multi-head projections read this way: `BTD,DNH->BTNH` (query, key, value: D x N·H),
`BTNH,NHD->BTD` (output: N·H x D), a grouped-query key/value pair `BSD,CDKH->CBSKH`
(D x C·K·H). A leading kernel axis that picks q, k or v (`BTD,SNDH->SBTNH`, S = 3) is an
output axis: q, k and v read the same input, so they share A, and reading S as output
features keeps the correlations between their output gradients that three independent
blocks (one A each, equal) would drop; both readings have the same A, so this one is the
exact Fisher block wherever the independent one is, and more where it is not.

What the pair cannot express falls back, with the equation in the reason: a kernel letter
also in `x` and `y` (a batch axis of the kernel: one matrix per index), a kernel letter in
neither (summed over), an input letter summed away without the kernel, a letter repeated
within an operand (a trace), an ellipsis in the kernel, or a kernel that contracts nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from secondorder.capture import dense, taps

KIND = "einsum"


def _expand(equation: str, x_ndim: int | None) -> tuple[str, str, str] | str:
  """`(x letters, kernel letters, y letters)` with an ellipsis of `x` spelled out."""
  eq = equation.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    return f"an einsum equation {equation!r} that is not explicit with two operands"
  lhs, out = eq.split("->")
  xs, ks = lhs.split(",")
  if "..." in ks:
    return f"an einsum equation {equation!r} with an ellipsis in the kernel"
  if "..." in xs:
    if x_ndim is None:
      return f"an einsum equation {equation!r} with an ellipsis (the input's rank is unknown)"
    n = x_ndim - (len(xs) - 3)
    used = set(xs + ks + out)
    free = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used]
    if n < 0 or n > len(free):
      return f"an einsum equation {equation!r} that does not fit an input of rank {x_ndim}"
    fill = "".join(free[:n])
    xs, out = xs.replace("...", fill), out.replace("...", fill)
  return xs, ks, out


def kernel_axes(equation: str, kernel_ndim: int, x_ndim: int | None = None,
                batch_ok: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]] | str:
  """The kernel's reduction axes (kernel order) and output axes (the order `y` holds them),
  or why the equation is not one Kronecker pair (the equation quoted).

  With `batch_ok` (the dimension numbers' reading), a kernel letter also in `x` and `y` is
  a batch axis (one matrix per index) instead of a reason."""
  parsed = _expand(equation, x_ndim)
  if isinstance(parsed, str):
    return parsed
  xs, ks, out = parsed
  where = f"the einsum equation {equation!r}"
  if len(ks) != kernel_ndim:
    return f"{where} names {len(ks)} kernel axes for a kernel of rank {kernel_ndim}"
  for s in (xs, ks, out):
    if len(set(s)) != len(s):
      return f"{where} repeats a letter within an operand"
  for c in ks:
    if c in xs and c in out and not batch_ok:
      return (f"{where} keeps kernel axis {c!r} in both the input and the output (a batch "
              "axis of the kernel)")
    if c not in xs and c not in out:
      return f"{where} sums kernel axis {c!r} alone"
  for c in xs:
    if c not in ks and c not in out:
      return f"{where} sums input axis {c!r} without the kernel"
  reduction = tuple(i for i, c in enumerate(ks) if c in xs and c not in out)
  if not reduction:
    return f"{where} contracts no input axis"
  output = tuple(sorted((i for i, c in enumerate(ks) if c in out and c not in xs),
                        key=lambda i: out.index(ks[i])))
  return reduction, output


def describe(equation: str, x: jax.Array, kernel_ndim: int):
  """The configuration of a call (contracted axes of `x`, emitted axes of `y`) and the
  kernel's `(reduction, output)` axes, or why the call cannot be covered.

  Returns:
    `((x_axes, y_axes), (reduction, output))` or a reason string.
  """
  if jnp.ndim(x) < 2:
    return "an unbatched input (rank < 2)"
  axes = kernel_axes(equation, kernel_ndim, jnp.ndim(x))
  if isinstance(axes, str):
    return axes
  expanded = _expand(equation, jnp.ndim(x))
  if isinstance(expanded, str):
    return expanded
  xs, ks, out = expanded
  reduction, output = axes
  x_axes = tuple(xs.index(ks[i]) for i in reduction)
  y_axes = tuple(out.index(ks[i]) for i in output)
  return (x_axes, y_axes), axes


def input_rows(config, x: jax.Array) -> jax.Array:
  """`[N, ∏ reduction]`: the contracted axes of `x` last, in kernel order, flattened."""
  return dense.input_rows(config[0], x)


def positions(config, x: jax.Array) -> tuple[int, ...]:
  """The shape of the row index of `input_rows` (every axis of `x` not contracted)."""
  return dense.positions(config[0], x)


def _emitted_last(y_axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(a for a in range(ndim) if a not in y_axes) + tuple(y_axes)


def tap(described, slots, call, x, with_bias: bool, weights) -> jax.Array:
  """An einsum call tapped for Â (the input rows) and Ŝ (the emitted output axes).

  The output is viewed with its emitted axes last (a transpose, undone after the tap), so
  the output tap reads the same rows as for a dense layer."""
  config = described[0]
  slot_a, slot_s, uses = slots[:3]
  w = weights(positions(config, x))
  x = taps.tap_inputs(x, slot_a, uses, lambda v: input_rows(config, v), with_bias, w)
  y = call(x)
  perm = _emitted_last(config[1], y.ndim)
  inverse = tuple(perm.index(a) for a in range(y.ndim))
  return taps.tap_outputs(y.transpose(perm), slot_s).transpose(inverse)
