"""What a capture describes and returns: covered layers, their statistics, parameter paths."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax

from secondorder.capture import conv
from secondorder.dimension_numbers import LeafAxes, MuonDimensionNumbers, leaf_axes

__all__ = ["LayerStats", "ProjectedLayerStats", "KfacLayer", "KfacLayers", "no_layers", "no_stats", "param_path"]


class LayerStats(NamedTuple):
  """The factor contributions of one batch for one layer.

  Attributes:
    a: Â, `[in (+1 with bias), in (+1)]`, the second moment of the layer inputs (with a
      leading layer axis `[L, ...]` for a stack of L layers); for an embedding the vector
      of token frequencies `[vocabulary]`; for a norm layer the per-feature Fisher blocks
      `[features, k, k]` (`KfacLayer.stat_shapes`).
    s: Ŝ, `[out, out]`, the per-example second moment of the output gradients (likewise);
      None for a norm layer.
  """
  a: jax.Array
  s: jax.Array | None


class ProjectedLayerStats(NamedTuple):
  """A dense layer's `LayerStats` with EK-FAC's projected moment, from a capture run with
  `bases=` (`secondorder.transforms.ekfac.ekfac_bases`).

  Attributes:
    a, s: as `LayerStats`.
    e: `M Σ_n (Q_Aᵀ G_n Q_S)²`, `[in (+1), out]` (with the stack axes first for a stack),
      G_n the example n's gradient (the sum over its positions) and Q_A, Q_S the bases
      handed to the capture.
  """
  a: jax.Array
  s: jax.Array
  e: jax.Array


@dataclasses.dataclass(frozen=True)
class KfacLayer:
  """Static description of one covered layer (or stack of layers).

  The kernel is read through dimension numbers (`secondorder.dimension_numbers`): its
  reduction axes (the input side) are flattened into the rows of a matrix, its output axes
  into the columns, and any other axis is a stack of independent layers, each with its own
  pair of factors.

  Attributes:
    name: the layer's path in the model, "/"-joined (e.g. "layers/0", "Dense_0").
    kind: "dense", "conv", "embed" (table lookups: A diagonal), "tied" (an embedding also
      used as the output head through `attend`: both uses in one Kronecker pair) or "norm"
      (a scale-and-shift layer: the exact per-feature Fisher block).
    kernel: path of the kernel in the params tree (tuple of str keys).
    bias: path of the bias, or None.
    kernel_shape: the kernel's shape.
    dimension_numbers: `MuonDimensionNumbers(reduction_axis, output_axis)` of the kernel;
      None means every axis but the last on the input side and the last on the output side
      (a dense `[in, out]` kernel, or a convolution's `[*window, in, out]`).
    groups: G, a grouped convolution's `feature_group_count`: each group is its own block,
      its factors stacked `[*stack, G, d, d]` (`secondorder.capture.conv.GroupedAxes`).

  Example::

    KfacLayer("attn/query", "dense", ("attn", "query", "kernel"), None, (8, 2, 4),
              MuonDimensionNumbers(0, (1, 2)))   # an [8, 8] matrix: A 8 x 8, S 8 x 8
  """
  name: str
  kind: str
  kernel: tuple[str, ...]
  bias: tuple[str, ...] | None
  kernel_shape: tuple[int, ...]
  dimension_numbers: MuonDimensionNumbers | None = None
  groups: int = 1

  @property
  def axes(self) -> LeafAxes:
    """The kernel's batch (stack), reduction and output axes (and groups, `conv.GroupedAxes`)."""
    spec = self.dimension_numbers
    if spec is None:
      n = len(self.kernel_shape)
      spec = MuonDimensionNumbers(tuple(range(n - 1)), n - 1)
    return conv.grouped_axes(leaf_axes(spec, self.kernel_shape, "/".join(self.kernel)),
                             self.groups)

  @property
  def num_stacked(self) -> int:
    """L, the number of independent blocks in the stack (1 for a single layer; L·G for a
    stack of L grouped convolutions with G groups)."""
    return self.axes.matrix_shape[0]

  @property
  def stacked(self) -> bool:
    """Whether the kernel has a stack axis (its factors then carry a leading `[L]`)."""
    return bool(self.axes.batch)

  @property
  def a_dim(self) -> int:
    """Side of A: the flattened input axes, plus one for the bias."""
    return self.axes.matrix_shape[1] + (self.bias is not None)

  @property
  def s_dim(self) -> int:
    """Side of S: the flattened output axes."""
    return self.axes.matrix_shape[2]

  @property
  def a_diagonal(self) -> bool:
    """Whether A is diagonal and stored as a vector (an embedding's one-hot inputs)."""
    return self.kind == "embed"

  @property
  def exact_diagonal(self) -> bool:
    """Whether the block is the exact per-feature Fisher of a scale-and-shift (norm) layer."""
    return self.kind == "norm"

  @property
  def matrix_factors(self) -> tuple[int, ...]:
    """The factors held as full matrices and decomposed at a refresh (0: A, 1: S)."""
    if self.exact_diagonal:
      return ()
    return (1,) if self.a_diagonal else (0, 1)

  def stat_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """The shapes of `LayerStats.a` and `.s` (None: no S) for this layer.

    Kronecker blocks: `[*stack, a_dim, a_dim]` and `[*stack, s_dim, s_dim]`; an embedding's
    diagonal A is the vector `[*stack, a_dim]`; a norm layer's exact block is
    `[*stack, features, k, k]` (k = 2 for scale and shift, 1 for a scale alone) and no S.
    """
    stack = self.factor_shape(0)[:-2]
    if self.exact_diagonal:
      return stack + (self.s_dim, self.a_dim, self.a_dim), None
    if self.a_diagonal:
      return stack + (self.a_dim,), self.factor_shape(self.s_dim)
    return self.factor_shape(self.a_dim), self.factor_shape(self.s_dim)

  @property
  def bias_shape(self) -> tuple[int, ...]:
    """The bias's shape: the kernel's stack axes then its output axes."""
    ax = self.axes
    return tuple(self.kernel_shape[a] for a in ax.batch + ax.output)

  def factor_shape(self, side: int) -> tuple[int, ...]:
    """`(side, side)`, or `(*stack axes, side, side)` for a stack (e.g. `(L, side, side)`);
    a grouped convolution's G comes after the stack axes (`(G, side, side)`)."""
    groups = (self.groups,) if self.groups > 1 else ()
    return tuple(self.kernel_shape[a] for a in self.axes.batch) + groups + (side, side)


@dataclasses.dataclass(frozen=True)
class KfacLayers:
  """The covered layers of a model, the parameters left to the fallback, and why.

  `print(layers)` (or `layers.summary()`) shows which parameter is in which kind of block,
  which fall back and why, and the covered fraction of the parameters.

  Attributes:
    layers: the covered layers.
    uncovered: "/"-joined paths of every parameter outside them.
    reasons: `(path, why)` for every uncovered parameter (empty when built by hand).
    shapes: `(path, shape)` of every parameter (empty when built by hand).
  """
  layers: tuple[KfacLayer, ...] = ()
  uncovered: tuple[str, ...] = ()
  reasons: tuple[tuple[str, str], ...] = ()
  shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

  def __iter__(self):
    return iter(self.layers)

  def __len__(self):
    return len(self.layers)

  @property
  def covered_fraction(self) -> float:
    """The fraction of the parameters (counted in scalars) in Kronecker or exact blocks."""
    total = sum(math.prod(shape) for _, shape in self.shapes)
    if not total:
      return 0.0 if self.uncovered else 1.0
    uncovered = set(self.uncovered)
    return sum(math.prod(shape) for path, shape in self.shapes
               if path not in uncovered) / total

  def only(self, *kinds: str) -> "KfacLayers":
    """These layers with only the blocks of the given kinds kept; the others' parameters
    move to the fallback (to compare coverages, e.g. `layers.only("dense", "conv")`).

    Args:
      *kinds: the `KfacLayer.kind` values to keep.

    Returns:
      A new `KfacLayers`.
    """
    kept = tuple(l for l in self.layers if l.kind in kinds)
    dropped = [l for l in self.layers if l.kind not in kinds]
    moved = tuple("/".join(p) for l in dropped for p in (l.kernel, l.bias) if p is not None)
    why = f"its {'/'.join(sorted({l.kind for l in dropped}))} block is left out (only {kinds})"
    return dataclasses.replace(self, layers=kept, uncovered=self.uncovered + moved,
                               reasons=self.reasons + tuple((p, why) for p in moved))

  def fallback_kernels(self) -> tuple[str, ...]:
    """Uncovered parameters with two or more axes (kernel-like: usually worth covering).

    The stack axes of scanned layers are not counted: a LayerNorm scale `[L, d]` beside
    layers stacked `[L, ...]` under the same top-level module is a vector per layer. A
    table with a leading axis of 1 (a position embedding `[1, N, D]`, added to every
    example) is broadcast, not a kernel: no layer keeps a kernel axis of size 1.
    """
    stacks = {(l.kernel[0], l.factor_shape(0)[:-2]) for l in self.layers if l.stacked}
    shapes = dict(self.shapes)

    def own_shape(path):
      shape = tuple(shapes.get(path, ()))
      for root, stack in stacks:
        if path.split("/")[0] == root and shape[:len(stack)] == stack:
          return shape[len(stack):]
      return shape

    def kernel_like(path):
      shape = own_shape(path)
      return len(shape) >= 2 and not (len(shape) >= 3 and shape[0] == 1)

    return tuple(p for p in self.uncovered if kernel_like(p))

  def summary(self) -> str:
    """A readable table: every parameter, its kind of block, and the covered fraction.

    Returns:
      The table as text, one parameter per line.
    """
    shapes, why = dict(self.shapes), dict(self.reasons)
    total = sum(math.prod(s) for s in shapes.values())
    lines = [f"K-FAC coverage: {100 * self.covered_fraction:.1f}% of {total} parameters in "
             f"Kronecker or exact-diagonal blocks ({len(self.layers)} blocks, "
             f"{len(self.uncovered)} parameters on the fallback)"]
    for l in self.layers:
      stack = f", {l.num_stacked // l.groups} stacked" if l.stacked else ""
      stack += f", {l.groups} groups" if l.groups > 1 else ""
      bias = f" + {'/'.join(l.bias)} {l.bias_shape}" if l.bias is not None else ""
      if l.exact_diagonal:
        label, blocks = "diagonal ", f"{l.s_dim} exact {l.a_dim}x{l.a_dim} blocks"
      else:
        a = f"A diagonal {l.a_dim}" if l.a_diagonal else f"A {l.a_dim}x{l.a_dim}"
        label, blocks = "kronecker", f"{a}, S {l.s_dim}x{l.s_dim}"
      lines.append(f"  {label}  {'/'.join(l.kernel)} {l.kernel_shape}{bias}: {l.kind}, "
                   f"{blocks}{stack}")
    for p in self.uncovered:
      reason = why.get(p, "not inside a covered layer")
      lines.append(f"  fallback   {p} {shapes.get(p, '')}: {reason}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.summary()


def no_layers() -> KfacLayers:
  """The layer description of a parameter pytree with no covered layer.

  `scale_by_kfac_factors(layers=no_layers())` preconditions every parameter with the
  fallback; feed it `kfac_stats=no_stats()`.

  Returns:
    An empty `KfacLayers`.
  """
  return KfacLayers()


@jax.tree_util.register_pytree_node_class
class NoNewStats:
  """`kfac_stats` of a step that ran no capture: the factors keep their running values.

  A pytree with no leaves, so it passes through `jax.jit`, `optax.MultiSteps` and
  `optax.inject_hyperparams` like any other extra argument. Made by `no_new_stats()`.
  """

  def tree_flatten(self):
    return (), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux, children
    return cls()

  def __repr__(self) -> str:
    return "NoNewStats()"


def no_new_stats() -> NoNewStats:
  """`kfac_stats` for a step that computes its gradient without a capture.

  The statistics cost about 2.6 gradient passes (sampled Fisher); a training loop that
  captures them only every k-th step and takes a plain `jax.value_and_grad` in between
  passes `kfac_stats=no_new_stats()` on the other steps. The running factors, their
  weight and the refresh schedule stay as they are; the step is preconditioned with the
  current factors. The transform's state keeps one structure either way (two compiled
  step functions, one with the capture and one without).

  Returns:
    A `NoNewStats`.

  Example::

    def step(model, opt, x, y, key, with_stats: bool):   # jit with static with_stats
      if with_stats:
        loss, grads, stats = cap(model, x, y, key=key)
      else:
        loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(x), y))(model)
        stats = capture.no_new_stats()
      opt.update(model, grads, kfac_stats=stats)
  """
  return NoNewStats()


def no_stats() -> dict[str, LayerStats]:
  """The (empty) statistics matching `no_layers()`.

  Returns:
    An empty dict.
  """
  return {}


def _key_str(k) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def param_path(path) -> tuple[str, ...]:
  """A jax key path as a tuple of strings (an NNX Variable's trailing `.value` dropped).

  Args:
    path: a key path from `jax.tree_util.tree_flatten_with_path`.

  Returns:
    The keys as strings, e.g. `("Dense_0", "kernel")`.
  """
  keys = tuple(_key_str(k) for k in path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
    keys = keys[:-1]
  return keys
