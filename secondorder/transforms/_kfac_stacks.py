"""K-FAC's refresh: every factor of every layer decomposed in a few batched, shardable calls.

Factors of equal size (or within `pad_ratio` of each other) form a *stack*; each stack is
one batched call to `secondorder.linalg` (damped inverses by Cholesky, or symmetric
eigendecompositions), optionally sharded over devices along its stack axis. A layer stacked
by `nnx.scan` / `nn.scan` contributes its L factors as L members.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from secondorder import linalg
from secondorder.capture import KfacLayer


@dataclasses.dataclass(frozen=True)
class Stack:
  """Factors refreshed in one batched call, each padded to `size` with a decoupled diagonal
  block (1 for the damped inverses, -max|M| for the eigendecompositions).

  Attributes:
    size: the side every member is padded to.
    members: `(layer name, 0 for A / 1 for S, index in the layer's stack)` per member.
    dims: each member's own side.
  """
  size: int
  members: tuple[tuple[str, int, int], ...]
  dims: tuple[int, ...]


def plan_stacks(layers: tuple[KfacLayer, ...], pad_ratio: float | None) -> tuple[Stack, ...]:
  """Groups every layer's full-matrix A and S factors by size.

  A diagonal A (an embedding's) and the exact per-feature blocks of norm layers are not
  decomposed and have no member.

  A stack holds the factors no smaller than 1/pad_ratio of its largest (pad_ratio 1: equal
  sizes only; None: every factor alone), largest stacks first.

  Args:
    layers: the covered layers.
    pad_ratio: None or a number ≥ 1.

  Returns:
    The stacks.
  """
  entries = [(l.name, r, i, d) for r in (0, 1) for l in layers if r in l.matrix_factors
             for d in ((l.a_dim, l.s_dim)[r],) for i in range(l.num_stacked)]
  entries.sort(key=lambda e: -e[3])
  stacks: list[list[tuple]] = []
  current: list[tuple] = []
  for entry in entries:
    if current and (pad_ratio is None or entry[3] * pad_ratio < current[0][3]):
      stacks.append(current)
      current = []
    current.append(entry)
  if current:
    stacks.append(current)
  return tuple(Stack(size=group[0][3], members=tuple((n, r, i) for n, r, i, _ in group),
                     dims=tuple(d for *_, d in group)) for group in stacks)


def check_factor_sharding(sharding) -> None:
  """Raises unless `sharding` is None or a NamedSharding of the stack axis only."""
  if sharding is None:
    return
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise TypeError(
        "factor_sharding must be a jax.sharding.NamedSharding of the stack axis, e.g. "
        "NamedSharding(mesh, PartitionSpec(('data', 'model'))), or None; got "
        f"{type(sharding).__name__}.")
  if any(entry is not None for entry in tuple(sharding.spec)[1:]):
    raise ValueError(
        "factor_sharding shards the stack axis only: its PartitionSpec must name mesh axes "
        f"in its first entry and nothing after it, got {sharding.spec}.")


def _stack_shards(sharding) -> int:
  spec = sharding.spec
  if not spec or spec[0] is None:
    return 1
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  return math.prod(sharding.mesh.shape[n] for n in names)


def _stacked(mats: list[jax.Array], size: int, pad_diagonal: list[jax.Array]) -> jax.Array:
  """`[n, size, size]`: each matrix in the top-left corner, `pad_diagonal[i]` on the rest of
  its diagonal (so the padding is a decoupled block with known eigenvalues)."""
  out = []
  for m, fill in zip(mats, pad_diagonal):
    d = m.shape[0]
    if d < size:
      pad = jnp.zeros((size, size), m.dtype).at[:d, :d].set(m)
      idx = jnp.arange(d, size)
      m = pad.at[idx, idx].set(fill.astype(m.dtype))
    out.append(m)
  return jnp.stack(out)


def _spread(x: jax.Array, fill_matrix: jax.Array, sharding) -> jax.Array:
  """Pads the stack with copies of `fill_matrix` to a multiple of the shards and constrains
  its stack axis to `sharding` (nothing when the stack is a single matrix)."""
  if sharding is None or x.shape[0] < 2:
    return x
  extra = (-x.shape[0]) % _stack_shards(sharding)
  if extra:
    x = jnp.concatenate([x, jnp.broadcast_to(fill_matrix, (extra,) + x.shape[1:])], axis=0)
  return jax.lax.with_sharding_constraint(x, sharding)


def _gather(x: jax.Array, sharding) -> jax.Array:
  """The decomposed stack, replicated again (one all-gather) before it is unstacked."""
  if sharding is None or x.shape[0] < 2:
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def eigh_stacks(mats: dict, stacks: tuple[Stack, ...], dtype, sharding) -> dict:
  """Eigendecompositions of every factor: `{(name, role, i): (eigvals ≥ 0, eigvecs)}`.

  Args:
    mats: `{(name, role, i): factor [d, d]}`.
    stacks: the plan.
    dtype: the factors' dtype.
    sharding: None or the stack-axis sharding.

  Returns:
    Per member its clipped eigenvalues and eigenvectors.
  """
  out = {}
  for stack in stacks:
    group = [mats[m] for m in stack.members]
    # Padding on the diagonal at -max|M|: below every eigenvalue of the PSD factor and on
    # its scale, so its eigenvalues sort first and decouple cleanly.
    fills = [-jnp.maximum(jnp.max(jnp.abs(m)), jnp.finfo(dtype).tiny) for m in group]
    x = _spread(_stacked(group, stack.size, fills), -jnp.eye(stack.size, dtype=dtype), sharding)
    w, v = (_gather(y, sharding) for y in linalg.symmetric_eigh(x))
    for i, (m, d) in enumerate(zip(stack.members, stack.dims)):
      out[m] = (jnp.maximum(w[i, stack.size - d:], 0.0).astype(dtype),
                v[i, :d, stack.size - d:].astype(dtype))
  return out


def inverse_stacks(mats: dict, damping: dict, stacks: tuple[Stack, ...], dtype,
                   sharding) -> dict:
  """Damped inverses `(M + c I)⁻¹` of every factor: `{(name, role, i): inverse}`.

  Args:
    mats: `{(name, role, i): factor [d, d]}`.
    damping: `{(name, role, i): c}`.
    stacks: the plan.
    dtype: the factors' dtype.
    sharding: None or the stack-axis sharding.

  Returns:
    Per member its damped inverse (non-finite when the Cholesky failed).
  """
  out = {}
  for stack in stacks:
    group = [mats[m] for m in stack.members]
    eye = jnp.eye(stack.size, dtype=dtype)
    ones = [jnp.ones([], dtype)] * len(group)
    x = _spread(_stacked(group, stack.size, ones), eye, sharding)
    c = jnp.stack([damping[m] for m in stack.members]).astype(dtype)
    c = jnp.concatenate([c, jnp.ones((x.shape[0] - len(group),), dtype)])
    inv = _gather(linalg.damped_inverse(x, c, method="cholesky").astype(dtype), sharding)
    for i, (m, d) in enumerate(zip(stack.members, stack.dims)):
      out[m] = inv[i, :d, :d]
  return out
