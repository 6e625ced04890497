"""The block plan of the Kronecker-factored methods: blocks, stacks, root buckets, layers.

Shampoo and SOAP keep one square factor per dimension of every block of every parameter.
This module decides, from the parameters' shapes alone, which factors exist and where they
live, and moves arrays between a leaf's layout and the batched block stacks:

* **Layers.** A leaf with dimension numbers (`secondorder.dimension_numbers.LeafAxes`) is
  read as ``[B, R, O]``: B independent layers (the batch axes of a scan-stacked parameter),
  each an R x O matrix. A leaf without them (``None``) is one layer of its own shape.
* **Merging.** With ``merge_small_dims``, a layer's size-1 dimensions are dropped and
  adjacent small ones merged while their product stays <= ``block_size``
  (`merge_small_dims`), so ``[3, 3, 16, 32]`` becomes ``(9, 16, 32)``.
* **Blocking.** A (merged) dimension above ``block_size`` is cut into pieces of
  ``block_size`` and one remainder (`split_dim`); the blocks of one shape form a `Combo`.
* **Diagonal path.** A leaf whose layers are vectors or scalars (unless
  ``precondition_1d``), that is empty, or has a merged dimension above ``max_dim`` gets no
  factor (`LeafPlan.diagonal`). With ``one_sided``, a dimension above ``max_dim`` instead
  stays whole without a factor (the identity) and only a leaf with no smaller dimension is
  diagonal. A stack of vectors (dimension numbers with an empty reduction side) has vector
  layers: each layer is read as a 1-D leaf of its own, never with a factor over the
  layer axis.
* **Stacks.** Every factor of side s and root exponent p, of every block of every layer of
  every leaf, is one slot of the stack of group (s, p): the state holds one ``[n, s, s]``
  array per group (`Plan.groups`, `Plan.group_sizes`), so a scanned model with L layers has
  exactly the stacks, and the batched calls, of the unrolled one. A combo's factors along
  block dimension i occupy ``Combo.slots[i] = (group, offset)``, ``layers * num``
  consecutive entries, layer-major.
* **Root buckets.** Groups whose roots are computed in one batched call (`RootBucket`),
  padded block-diagonally to a shared side (`pad_factors`) when ``bucket_ratio`` is set;
  `bucket_stack` / `split_bucket` build such a call's input and read back its output,
  `inverse_roots` runs the calls of a whole plan. Batched decompositions of matrices of side
  >= ``secondorder.linalg.CPU_ONE_AT_A_TIME`` run one matrix at a time on CPU (the guard lives
  in `secondorder.linalg`).
* **Sharding.** The stacks are ordinary arrays ``[n, s, s]``: propagation, or a
  ``jax.lax.with_sharding_constraint`` on their leading axis, spreads their factors (and
  the batched calls on them) over a mesh.

Typical use inside a transform::

    plan = make_plan(shapes, axes, block_size=128, max_dim=4096)
    blocks = [None if lp.diagonal else leaf_blocks(g, lp) for lp, g in zip(plan.leaves, grads)]
    stats = factor_stats_per_group(plan, blocks)        # one [n, s, s] per group
    ... roots = inverse_roots(plan, stats, ...) ...
    out = leaf_from_blocks([contract_blocks(b, roots_of(...)) for ...], lp)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from secondorder import linalg
from secondorder.dimension_numbers import LeafAxes

__all__ = ["Piece", "Combo", "LeafPlan", "RootBucket", "Plan", "merge_small_dims",
           "split_dim", "bucket_side", "root_buckets", "make_plan", "leaf_layers",
           "leaf_blocks", "leaf_from_blocks", "to_blocks", "from_blocks", "pad_factors",
           "factor_stats", "factor_stats_per_group", "contract_blocks", "block_norms",
           "combo_factors", "bucket_stack", "bucket_exponents", "split_bucket",
           "inverse_roots"]

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Piece:
  """A run of equal blocks along one dimension.

  Attributes:
    start: offset of the run along the dimension.
    count: number of blocks in the run.
    size: size of each block.
  """

  start: int
  count: int
  size: int


@dataclasses.dataclass(frozen=True)
class Combo:
  """Blocks of one shape: one `Piece` per dimension, ``num`` blocks per layer.

  Attributes:
    index: the piece index per dimension.
    pieces: the piece per dimension.
    slots: per dimension, ``(group, offset)`` of the first of the ``layers * num`` factors
      this combo keeps in that group's stack; None for a dimension without a factor (a
      one-sided plan's dimension above ``max_dim``).
  """

  index: tuple[int, ...]
  pieces: tuple[Piece, ...]
  slots: tuple[tuple[int, int] | None, ...]

  @property
  def num(self) -> int:
    """Blocks of this shape in one layer."""
    return math.prod(p.count for p in self.pieces)

  @property
  def block(self) -> tuple[int, ...]:
    """The block shape."""
    return tuple(p.size for p in self.pieces)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """How one leaf is blocked.

  Attributes:
    shape: the leaf's shape.
    diagonal: True when the leaf has no factor (diagonal path).
    merged: one layer's shape after merging (empty for a diagonal leaf).
    root: the exponent p of this leaf's inverse roots.
    pieces_per_dim: number of pieces per merged dimension.
    combos: the block shapes, in `itertools.product` order of the pieces.
    axes: the leaf's dimension numbers, or None (the leaf is one layer of its own shape).
    layers: B, the number of independent layers (1 without dimension numbers).
  """

  shape: tuple[int, ...]
  diagonal: bool
  merged: tuple[int, ...] = ()
  root: float = 0.0
  pieces_per_dim: tuple[int, ...] = ()
  combos: tuple[Combo, ...] = ()
  axes: LeafAxes | None = None
  layers: int = 1

  def factors(self, combo: Combo) -> int:
    """Factors per dimension of ``combo`` over all layers: ``layers * combo.num``."""
    return self.layers * combo.num


@dataclasses.dataclass(frozen=True)
class RootBucket:
  """Groups whose roots are computed in one batched call, every factor padded to ``side``.

  Attributes:
    side: the side every member's factors are padded to.
    members: group indices, in order.
    root: the exponent p shared by the members; None when they differ (one per factor).
  """

  side: int
  members: tuple[int, ...]
  root: float | None


@dataclasses.dataclass(frozen=True)
class Plan:
  """The factor layout of a whole pytree.

  Attributes:
    leaves: one `LeafPlan` per leaf, in `jax.tree.leaves` order.
    groups: ``(factor side, root p)`` per stack, sorted.
    group_sizes: number of factors per stack.
    root_buckets: the batched root calls.
  """

  leaves: tuple[LeafPlan, ...]
  groups: tuple[tuple[int, float], ...]
  group_sizes: tuple[int, ...]
  root_buckets: tuple[RootBucket, ...] = ()


def merge_small_dims(shape: Sequence[int], max_size: int) -> tuple[int, ...]:
  """Drops size-1 dimensions and merges adjacent ones while their product stays <= max_size.

  Args:
    shape: a shape.
    max_size: the largest merged dimension.

  Returns:
    The merged shape: ``[3, 3, 16, 32]`` with 128 gives ``(9, 16, 32)``; ``[1, 10]`` gives
    ``(10,)``.
  """
  merged: list[int] = []
  for d in shape:
    if d == 1:
      continue
    if merged and merged[-1] * d <= max_size:
      merged[-1] *= d
    else:
      merged.append(d)
  return tuple(merged)


def split_dim(d: int, block_size: int) -> tuple[Piece, ...]:
  """A dimension of size ``d`` cut into blocks of ``block_size`` and one smaller remainder.

  Args:
    d: the dimension's size.
    block_size: the largest block.

  Returns:
    One or two `Piece`s: ``split_dim(300, 128)`` is two blocks of 128 then one of 44.
  """
  if d <= block_size:
    return (Piece(0, 1, d),)
  full, rem = divmod(d, block_size)
  pieces = [Piece(0, full, block_size)]
  if rem:
    pieces.append(Piece(full * block_size, 1, rem))
  return tuple(pieces)


def bucket_side(size: int, largest: int, ratio: float | None) -> int:
  """The smallest of largest, largest/ratio, largest/ratio², ... (rounded up) that is >= size.

  Args:
    size: a factor's side.
    largest: the largest factor side of the plan.
    ratio: the ratio between rungs, or None (every size its own side).

  Returns:
    The side ``size`` is padded to.
  """
  if ratio is None:
    return size
  side = largest
  while True:
    smaller = math.ceil(side / ratio)
    if smaller < size or smaller == side:
      return side
    side = smaller


def root_buckets(groups: Sequence[tuple[int, float]], ratio: float | None,
                 mixed_roots: bool) -> tuple[RootBucket, ...]:
  """Groups the stacks into batched root calls.

  Args:
    groups: ``(side, p)`` per stack.
    ratio: `bucket_side`'s ratio; None keeps one call per stack.
    mixed_roots: whether one call may mix exponents p (eigh can, Newton cannot).

  Returns:
    The buckets, sorted by their first member.
  """
  if not groups:
    return ()
  largest = max(size for size, _ in groups)
  buckets: dict[tuple[int, float | None], list[int]] = {}
  for g, (size, p) in enumerate(groups):
    key = (bucket_side(size, largest, ratio), None if mixed_roots else p)
    buckets.setdefault(key, []).append(g)
  out = []
  for members in sorted(buckets.values()):
    roots = {groups[g][1] for g in members}
    # No padding beyond the largest member (none at all for a bucket of one size).
    out.append(RootBucket(side=max(groups[g][0] for g in members), members=tuple(members),
                          root=roots.pop() if len(roots) == 1 else None))
  return tuple(out)


def _layer_shape(shape: tuple[int, ...], axes: LeafAxes | None) -> tuple[tuple[int, ...], int]:
  """One layer's shape and the number of layers (a stack of vectors has vector layers)."""
  if axes is None:
    return shape, 1
  b, r, o = axes.matrix_shape
  return ((o,) if axes.vectors else (r, o)), b


@functools.lru_cache(maxsize=256)
def make_plan(shapes: tuple[tuple[int, ...], ...],
              axes: tuple[LeafAxes | None, ...] | None = None, *,
              block_size: int, merge: bool = True, max_dim: int,
              precondition_1d: bool = False, exponent_override: float | None = None,
              bucket_ratio: float | None = None, mixed_roots: bool = True,
              one_sided: bool = False) -> Plan:
  """The block plan of leaves of ``shapes`` (cached: call it at every trace).

  Args:
    shapes: the leaves' shapes, in leaf order.
    axes: per leaf, its `LeafAxes` or None; None for all leaves when omitted.
    block_size: the largest factor side (larger dimensions are blocked).
    merge: drop size-1 dimensions and merge small adjacent ones (`merge_small_dims`).
    max_dim: a leaf with a larger merged dimension goes to the diagonal path (unless
      ``one_sided``).
    precondition_1d: give vector (and scalar) layers a factor instead of the diagonal path.
    exponent_override: the root exponent p for every factor; default 2 x the number of
      the layer's merged dimensions that have a factor.
    bucket_ratio: see `root_buckets`.
    mixed_roots: see `root_buckets`.
    one_sided: a merged dimension above ``max_dim`` is kept whole, without a factor (its
      `Combo.slots` entry is None: the identity), while the leaf's other dimensions keep
      theirs; only a leaf with no dimension at or below ``max_dim`` goes to the diagonal
      path. Off, the plan is exactly the two-sided one.

  Returns:
    The `Plan`, its groups sorted by (side, p) so the state layout does not depend on leaf
    order details.

  Example:
    >>> plan = make_plan(((300, 70),), block_size=128, max_dim=4096)
    >>> plan.groups, plan.group_sizes
    (((44, 4.0), (70, 4.0), (128, 4.0)), (1, 3, 2))
  """
  if axes is None:
    axes = (None,) * len(shapes)
  group_index: dict[tuple[int, float], int] = {}
  group_sizes: list[int] = []
  pending = []
  for shape, leaf_axes in zip(shapes, axes):
    size = math.prod(shape)
    layer, layers = _layer_shape(shape, leaf_axes)
    merged = merge_small_dims(layer, block_size) if merge else tuple(layer)
    if size > 0 and not merged:
      merged = (1,)  # a scalar, or all dimensions 1
    # Vectors and scalars (by their own rank, not after merging) go diagonal unless asked.
    whole = tuple(d > max_dim for d in merged) if one_sided else (False,) * len(merged)
    diagonal = (size == 0 or (len(layer) <= 1 and not precondition_1d)
                or (all(whole) if one_sided else max(merged) > max_dim))
    if diagonal:
      pending.append(LeafPlan(shape=shape, diagonal=True, axes=leaf_axes, layers=layers))
      continue
    root = (float(exponent_override) if exponent_override is not None
            else 2.0 * (len(merged) - sum(whole)))
    per_dim = [(Piece(0, 1, d),) if keep else split_dim(d, block_size)
               for d, keep in zip(merged, whole)]
    combos = []
    for index in itertools.product(*(range(len(p)) for p in per_dim)):
      pieces = tuple(per_dim[i][j] for i, j in enumerate(index))
      num = layers * math.prod(p.count for p in pieces)
      slots: list[tuple[int, int] | None] = []
      for piece, keep in zip(pieces, whole):
        if keep:
          slots.append(None)
          continue
        key = (piece.size, root)
        if key not in group_index:
          group_index[key] = len(group_sizes)
          group_sizes.append(0)
        g = group_index[key]
        slots.append((g, group_sizes[g]))
        group_sizes[g] += num
      combos.append(Combo(index=index, pieces=pieces, slots=tuple(slots)))
    pending.append(LeafPlan(shape=shape, diagonal=False, merged=merged, root=root,
                            pieces_per_dim=tuple(len(p) for p in per_dim),
                            combos=tuple(combos), axes=leaf_axes, layers=layers))
  order = sorted(group_index, key=lambda k: k)
  remap = {group_index[k]: i for i, k in enumerate(order)}
  leaves = []
  for lp in pending:
    if lp.diagonal:
      leaves.append(lp)
      continue
    remapped = tuple(dataclasses.replace(c, slots=tuple(
        None if slot is None else (remap[slot[0]], slot[1]) for slot in c.slots))
                     for c in lp.combos)
    leaves.append(dataclasses.replace(lp, combos=remapped))
  return Plan(leaves=tuple(leaves), groups=tuple(order),
              group_sizes=tuple(group_sizes[group_index[k]] for k in order),
              root_buckets=root_buckets(order, bucket_ratio, mixed_roots))


# ----------------------------------------------------------------------------- blocks


def leaf_layers(x: jax.Array, lp: LeafPlan) -> jax.Array:
  """A leaf as its stack of merged layers, ``[layers, *lp.merged]``.

  Args:
    x: an array of the leaf's shape.
    lp: the leaf's plan (not diagonal).

  Returns:
    ``x`` read through the leaf's dimension numbers (if any) and reshaped.
  """
  if lp.axes is not None:
    x = lp.axes.to_matrices(x)
  return x.reshape((lp.layers,) + lp.merged)


def to_blocks(x: jax.Array, combo: Combo) -> jax.Array:
  """The blocks of ``x`` that ``combo`` covers, stacked layer-major.

  Args:
    x: a stack of merged layers ``[layers, *merged]``.
    combo: the block shape to take.

  Returns:
    ``[layers * combo.num, *combo.block]``.
  """
  layers = x.shape[0]
  starts = [0] + [p.start for p in combo.pieces]
  limits = [layers] + [p.start + p.count * p.size for p in combo.pieces]
  sub = jax.lax.slice(x, starts, limits)
  k = len(combo.pieces)
  sub = sub.reshape([layers] + [v for p in combo.pieces for v in (p.count, p.size)])
  sub = sub.transpose([0] + list(range(1, 2 * k + 1, 2)) + list(range(2, 2 * k + 1, 2)))
  return sub.reshape((layers * combo.num,) + combo.block)


def from_blocks(parts: Sequence[jax.Array], lp: LeafPlan) -> jax.Array:
  """The inverse of `to_blocks` over all combos of a leaf.

  Args:
    parts: one ``[layers * num, *block]`` array per combo of ``lp``.
    lp: the leaf's plan.

  Returns:
    The stack of merged layers ``[layers, *lp.merged]``.
  """
  k = len(lp.merged)
  pieces = {}
  for combo, blocks in zip(lp.combos, parts):
    counts = [p.count for p in combo.pieces]
    sub = blocks.reshape([lp.layers] + counts + list(combo.block))
    perm = [0] + [v for i in range(k) for v in (1 + i, 1 + k + i)]
    sub = sub.transpose(perm).reshape([lp.layers] + [p.count * p.size for p in combo.pieces])
    pieces[combo.index] = sub

  def assemble(prefix: tuple[int, ...]) -> jax.Array:
    if len(prefix) == k:
      return pieces[prefix]
    parts = [assemble(prefix + (j,)) for j in range(lp.pieces_per_dim[len(prefix)])]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1 + len(prefix))

  return assemble(())


def leaf_blocks(x: jax.Array, lp: LeafPlan) -> list[jax.Array]:
  """A leaf cut into its blocks: one ``[layers * num, *block]`` stack per combo.

  Args:
    x: an array of the leaf's shape.
    lp: the leaf's plan (not diagonal).

  Returns:
    The block stacks, in ``lp.combos`` order.
  """
  layers = leaf_layers(x, lp)
  return [to_blocks(layers, c) for c in lp.combos]


def leaf_from_blocks(parts: Sequence[jax.Array], lp: LeafPlan) -> jax.Array:
  """The inverse of `leaf_blocks`: an array of the leaf's shape.

  Args:
    parts: one block stack per combo of ``lp``.
    lp: the leaf's plan.

  Returns:
    The leaf-shaped array.
  """
  layers = from_blocks(parts, lp)
  if lp.axes is None:
    return layers.reshape(lp.shape)
  return lp.axes.from_matrices(layers.reshape(lp.axes.matrix_shape))


# ----------------------------------------------------------------------------- block math


def factor_stats(blocks: jax.Array, dim: int) -> jax.Array:
  r"""Every block's mode-``dim`` Gram matrix :math:`G_{(i)} G_{(i)}^\top`.

  Args:
    blocks: ``[n, *block]``.
    dim: the block dimension i (0-based, not counting the stack axis).

  Returns:
    ``[n, s, s]`` with s the block's size along ``dim``: the contraction over every other
    block axis.
  """
  x = jnp.moveaxis(blocks, dim + 1, 1)
  x = x.reshape(x.shape[0], x.shape[1], -1)
  return jnp.matmul(x, jnp.swapaxes(x, 1, 2), precision=_HIGHEST)


def factor_stats_per_group(plan: Plan, blocks: Sequence[Sequence[jax.Array] | None]
                           ) -> tuple[jax.Array, ...]:
  """Every factor's new Gram matrix, gathered into one ``[n, s, s]`` stack per group.

  Args:
    plan: the plan.
    blocks: per leaf, its `leaf_blocks` (None for a diagonal leaf).

  Returns:
    One stack per `Plan.groups` entry, each factor at its slot.
  """
  contribs: list[list[jax.Array]] = [[] for _ in plan.groups]
  for lp, leaf in zip(plan.leaves, blocks):
    if lp.diagonal:
      continue
    assert leaf is not None  # a leaf that is not diagonal has blocks
    for combo, b in zip(lp.combos, leaf):
      for dim, slot in enumerate(combo.slots):
        if slot is not None:
          contribs[slot[0]].append(factor_stats(b, dim))
  return tuple(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
               for parts in contribs)


def combo_factors(stacks: Sequence[jax.Array], lp: LeafPlan, combo: Combo
                  ) -> list[jax.Array | None]:
  """The per-dimension factors of one combo, read from the group stacks.

  Args:
    stacks: one ``[n, s, s]`` array per group (statistics, roots, eigenbases...).
    lp: the leaf's plan.
    combo: one of its combos.

  Returns:
    Per block dimension, ``[lp.factors(combo), s, s]``, in the order of `to_blocks`; None
    for a dimension without a factor.
  """
  n = lp.factors(combo)
  return [None if slot is None else stacks[slot[0]][slot[1]:slot[1] + n]
          for slot in combo.slots]


def contract_blocks(blocks: jax.Array, mats: Sequence[jax.Array | None]) -> jax.Array:
  r"""Contracts every block axis i with its matrix: :math:`x_{a\ldots} M^{(i)}_{ab}`.

  For symmetric matrices (roots) this is :math:`G \times_1 M_1 \cdots \times_k M_k`; for an
  orthogonal basis Q it rotates into the basis (:math:`Q^\top G Q` for a matrix).

  Args:
    blocks: ``[n, *block]``.
    mats: per block axis, ``[n, s, s]``, or None (the identity: the axis is left as it is).

  Returns:
    ``[n, *block']`` with block axis i of size ``mats[i].shape[-1]``.
  """
  x = blocks
  for m in mats:
    # Contract axis 1; the new axis goes last, so after all the axes have been visited
    # the original order is back.
    if m is None:
      x = jnp.moveaxis(x, 1, -1)
    else:
      x = jnp.einsum("na...,nab->n...b", x, m, precision=_HIGHEST)
  return x


def block_norms(blocks: jax.Array) -> jax.Array:
  """The Frobenius norm of every block of ``[n, *block]``: ``[n]``."""
  return jnp.sqrt(jnp.sum(jnp.square(blocks), axis=tuple(range(1, blocks.ndim))))


# ----------------------------------------------------------------------------- batched roots


def pad_factors(x: jax.Array, side: int, fill: bool) -> jax.Array:
  """Pads a stack of factors ``[n, s, s]`` to ``[n, side, side]`` block-diagonally.

  The padded matrix has the factor's eigenvalues plus extra ones (zero, or with ``fill``
  the largest diagonal entry, which lies between λ_max/s and λ_max so that an iteration's
  conditioning stays that of the factor), and λ_max is unchanged. So the leading s x s
  block of its inverse root is the factor's root, damping included, and the leading block
  of its eigenvectors spans the factor's.

  Args:
    x: ``[n, s, s]``.
    side: the padded side (>= s).
    fill: fill the new diagonal with each factor's largest diagonal entry instead of 0.

  Returns:
    ``[n, side, side]``.
  """
  s = x.shape[-1]
  if s == side:
    return x
  out = jnp.pad(x, ((0, 0), (0, side - s), (0, side - s)))
  if fill:
    top = jnp.max(jnp.diagonal(x, axis1=1, axis2=2), axis=1)
    out = out + top[:, None, None] * np.diag((np.arange(side) >= s).astype(x.dtype))
  return out


def bucket_stack(plan: Plan, bucket: RootBucket, stacks: Sequence[jax.Array],
                 fill: bool) -> jax.Array:
  """One batched call's input: the bucket's group stacks padded to its side, concatenated.

  Args:
    plan: the plan.
    bucket: one of ``plan.root_buckets``.
    stacks: one ``[n, s, s]`` per group.
    fill: see `pad_factors`.

  Returns:
    ``[sum of the members' sizes, side, side]``.
  """
  mats = [pad_factors(stacks[g], bucket.side, fill) for g in bucket.members]
  return mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=0)


def bucket_exponents(plan: Plan, bucket: RootBucket) -> float | np.ndarray:
  """The root exponent p of a bucket: one number, or one per factor (float32) if mixed."""
  if bucket.root is not None:
    return bucket.root
  return np.concatenate([np.full(plan.group_sizes[g], plan.groups[g][1], np.float32)
                         for g in bucket.members])


def split_bucket(plan: Plan, bucket: RootBucket, batched: jax.Array
                 ) -> list[tuple[int, slice]]:
  """Where each member's factors lie in a batched call's output.

  Args:
    plan: the plan.
    bucket: the bucket.
    batched: the call's output ``[n, side, side]`` (or any array with that leading axis).

  Returns:
    Per member, ``(group, rows)``: ``batched[rows, :s, :s]`` are that group's factors.
  """
  del batched
  out, offset = [], 0
  for g in bucket.members:
    n = plan.group_sizes[g]
    out.append((g, slice(offset, offset + n)))
    offset += n
  return out


def inverse_roots(plan: Plan, stats: Sequence[jax.Array], previous: Sequence[jax.Array], *,
                  eps: float, method: str, max_iters: int, tolerance: float
                  ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """The damped inverse p-th root of every factor, one batched call per root bucket.

  A root whose error (residual, infinite when not finite) exceeds ``tolerance`` is not
  installed: the factor keeps its previous root.

  Args:
    plan: the plan.
    stats: one ``[n, s, s]`` stack per group (already bias-corrected).
    previous: the roots in use, stacked like ``stats``.
    eps: damping relative to each factor's largest eigenvalue.
    method: "eigh" or "newton" (`secondorder.linalg.inverse_pth_root`).
    max_iters: Newton iterations at most.
    tolerance: the largest accepted error.

  Returns:
    ``(roots, failures)``: the new roots stacked like ``previous`` (in its dtypes) and the
    number of rejected roots (int32).
  """
  out, failures = list(previous), jnp.zeros([], jnp.int32)
  for bucket in plan.root_buckets:
    # One batched root per bucket: its groups' factors padded to one side, each with its
    # own root p (eigh) or all with the bucket's (Newton).
    a = bucket_stack(plan, bucket, stats, fill=method == "newton")
    res = linalg.inverse_pth_root(a, bucket_exponents(plan, bucket), eps=eps, method=method,
                                  max_iters=max_iters)
    ok = res.error <= tolerance  # the error is infinite for a non-finite root
    failures = failures + jnp.sum(~ok).astype(jnp.int32)
    for g, rows in split_bucket(plan, bucket, res.root):
      size = plan.groups[g][0]
      root = res.root[rows, :size, :size].astype(out[g].dtype)
      out[g] = jnp.where(ok[rows, None, None], root, out[g])
  return tuple(out), failures
