"""One tiny classifier and every secondorder transform set up to train it.

Shared by the sharding worker (run on a simulated 8-device mesh) and the checkpoint
tests, so both exercise each method exactly the way a training loop calls it: the
gradient plus the curvature extra argument the method reads (`obj_fn`, `logits_fn`,
`kfac_stats`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

IN_FEATURES = 8
HIDDEN = 32
CLASSES = 4
BATCH = 16


class MLP(nn.Module):
  """Two dense layers; the hidden width is the dimension sharded over `model`."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(HIDDEN, name="hidden")(x)
    x = jnp.tanh(x)
    return nn.Dense(CLASSES, name="out")(x)


MODEL = MLP()


@jax.jit
def _init_params(key):
  return MODEL.init(key, jnp.zeros((1, IN_FEATURES), jnp.float32))["params"]


def init_params(seed: int = 0):
  return _init_params(jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0, static_argnames="batch_size")
def make_batches(num_steps: int, seed: int = 1, batch_size: int = BATCH):
  """`num_steps` batches of `batch_size`; the two halves of every batch come from different
  inputs.

  The first half has inputs of scale 1 and the second of scale 3, so curvature
  statistics of one half differ clearly from those of the whole batch.
  """
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (num_steps, batch_size, IN_FEATURES), jnp.float32)
  x = x * jnp.where(jnp.arange(batch_size) < batch_size // 2, 1.0, 3.0)[None, :, None]
  y = jax.random.randint(ky, (num_steps, batch_size), 0, CLASSES)
  return {"x": x, "y": y}


def logits_fn(params, batch):
  return MODEL.apply({"params": params}, batch["x"])


def loss_fn(params, batch):
  logits = logits_fn(params, batch)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _grads(params, batch, key):
  del key
  return jax.grad(loss_fn)(params, batch), {}


@dataclasses.dataclass(frozen=True)
class Setup:
  """A transform, how a training step feeds it, and where its curvature statistics live.

  `grads_and_args(params, batch, key)` runs inside the jitted step and returns the
  gradients and the extra keyword arguments of `update`; with `reads_state` it is called
  `grads_and_args(params, batch, key, opt_state=state)` with the optimizer state before
  the step (EK-FAC's capture measures its moments in the state's bases): call it through
  the module's `grads_and_args`. `statistics(state)` returns the part of the state
  estimated from the batch (Hessian-diagonal EMA, Kronecker factors, Shampoo
  statistics), or None for methods without one. `batch_size`: the examples per step.
  """
  name: str
  make: Callable[[], Any]
  grads_and_args: Callable[..., tuple[Any, dict]] = _grads
  statistics: Callable[[Any], Any] | None = None
  make_for_mesh: Callable[[Any], Any] | None = None
  reads_state: bool = False
  batch_size: int = BATCH

  def make_on(self, mesh=None):
    """The transform for `mesh` (None: one device); most methods ignore the mesh."""
    return self.make() if self.make_for_mesh is None else self.make_for_mesh(mesh)


def grads_and_args(setup, params, batch, key, opt_state):
  """`setup.grads_and_args(params, batch, key)`, handed `opt_state=` when the setup reads it
  (`reads_state`)."""
  if getattr(setup, "reads_state", False):
    return setup.grads_and_args(params, batch, key, opt_state=opt_state)
  return setup.grads_and_args(params, batch, key)


def find_state(state, cls_name: str):
  """The first sub-state (NamedTuple) of class `cls_name` inside a chained state."""
  found = []

  def visit(node):
    if type(node).__name__ == cls_name:
      found.append(node)
      return
    if isinstance(node, (tuple, list)):
      for child in node:
        visit(child)

  visit(state)
  if not found:
    raise LookupError(f"no {cls_name} inside the optimizer state")
  return found[0]


def _with_obj_fn(params, batch, key):
  grads, _ = _grads(params, batch, key)
  return grads, {"obj_fn": lambda p: loss_fn(p, batch)}


def _with_logits_fn(params, batch, key):
  grads, _ = _grads(params, batch, key)
  return grads, {"logits_fn": lambda p: logits_fn(p, batch)}


def _ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _module(name: str):
  """The library's module `name`: a broken import fails the tests, never skips them."""
  return importlib.import_module(name)


def available_setups() -> dict[str, Setup]:
  """Every method whose module is present, keyed by name."""
  setups = {"adam": Setup("adam", lambda: optax.adam(1e-2))}

  hutch = _module("secondorder.transforms.hutchinson")
  if hutch is not None:
    setups["adahessian"] = Setup(
        "adahessian", lambda: hutch.adahessian(1e-2), _with_obj_fn,
        lambda s: find_state(s, "ScaleByHutchinsonState").nu)

  sophia = _module("secondorder.transforms.sophia")
  if sophia is not None:
    setups["sophia_h"] = Setup(
        "sophia_h", lambda: sophia.sophia(1e-2, update_interval=5, estimator="hutchinson"),
        _with_obj_fn, lambda s: find_state(s, "SophiaClipState").hessian)
    setups["sophia_g"] = Setup(
        "sophia_g", lambda: sophia.sophia(1e-2, update_interval=5, estimator="gnb"),
        _with_logits_fn, lambda s: find_state(s, "SophiaClipState").hessian)

  shampoo = _module("secondorder.transforms.shampoo")
  if shampoo is not None:
    # Blocks of 8: the hidden kernel [8, 32] becomes four 8x8 blocks, the output kernel
    # [32, 4] four 8x4 blocks, so each group of factors is a stack to spread over devices.
    setups["shampoo"] = Setup(
        "shampoo", lambda: shampoo.shampoo(1e-2, block_size=8, update_interval=5),
        statistics=lambda s: find_state(s, "ShampooState").stats)
    # Statistics every other step inside a lax.cond (on the odd steps, step 1 included:
    # they are congruent to the start step 9), roots every four steps from step 9.
    setups["shampoo_sparse_stats"] = Setup(
        "shampoo_sparse_stats",
        lambda: shampoo.shampoo(1e-2, block_size=8, update_interval=4, statistics_interval=2,
                                start_preconditioning_step=9),
        statistics=lambda s: find_state(s, "ShampooState").stats)

  kfac = _module("secondorder.transforms.kfac")
  capture = _module("secondorder.capture")
  if kfac is not None and capture is not None:
    cap = capture.linen_capture(MODEL, _ce, likelihood="softmax")

    def kfac_grads(params, batch, key):
      _, grads, stats = cap(params, batch["x"], batch["y"], key=key)
      return grads, {"kfac_stats": stats}

    def make_kfac():
      layers = cap.layers(init_params(), jnp.zeros((BATCH, IN_FEATURES), jnp.float32))
      return kfac.kfac(1e-2, layers=layers, update_interval=5)

    kfac_statistics = lambda s: (find_state(s, "ScaleByKfacState").a,
                                 find_state(s, "ScaleByKfacState").s)
    setups["kfac"] = Setup("kfac", make_kfac, kfac_grads, kfac_statistics)

    def make_kfac_spread(mesh):
      # pad_ratio 3: two stacks, A_out [33, 33] with S_hidden [32, 32] and A_hidden [9, 9]
      # with S_out [4, 4]; on a mesh each stack axis is split over every device, so each
      # decomposes its share. (On CPU the stack of side 33 is decomposed one matrix at a
      # time, secondorder.linalg.CPU_ONE_AT_A_TIME; the [2, 9, 9] stack stays one call.)
      from jax.sharding import NamedSharding, PartitionSpec
      layers = cap.layers(init_params(), jnp.zeros((BATCH, IN_FEATURES), jnp.float32))
      sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(mesh.axis_names))
      return kfac.kfac(1e-2, layers=layers, update_interval=5, pad_ratio=3.0,
                       factor_sharding=sharding)

    setups["kfac_spread"] = Setup("kfac_spread", lambda: make_kfac_spread(None), kfac_grads,
                                  kfac_statistics, make_for_mesh=make_kfac_spread)

  ekfac = _module("secondorder.transforms.ekfac")
  if ekfac is not None and capture is not None:
    cap = capture.linen_capture(MODEL, _ce, likelihood="softmax")

    def ekfac_grads(params, batch, key, *, opt_state):
      # The projected moments are measured in the eigenbases of the state before the step.
      _, grads, stats = cap(params, batch["x"], batch["y"], key=key,
                            bases=ekfac.ekfac_bases(opt_state))
      return grads, {"kfac_stats": stats}

    def make_ekfac():
      layers = cap.layers(init_params(), jnp.zeros((BATCH, IN_FEATURES), jnp.float32))
      return ekfac.ekfac(1e-2, layers=layers, update_interval=5)

    def ekfac_statistics(s):
      st = find_state(s, "ScaleByEkfacState")
      return st.a, st.s, st.moments

    # Batches of 64: with 16 examples the factors A_out [33, 33] and S_hidden [32, 32] of
    # the first refresh have rank 16, and inside their null spaces eigh's basis is set by
    # rounding, different on every mesh. K-FAC's step does not depend on that choice (its
    # divisor is constant there); EK-FAC's measured diagonal does, and the parameters of
    # a mesh ended 2.6e-2 (8x1) and 5.0e-2 (2x4) from one device's (damping 1e-2), 1e-6
    # with full-rank factors.
    setups["ekfac"] = Setup("ekfac", make_ekfac, ekfac_grads, ekfac_statistics,
                            reads_state=True, batch_size=64)

  accumulate = _module("secondorder.transforms.accumulate")
  if accumulate is not None:
    setups["every_k_adamw"] = Setup(
        "every_k_adamw", lambda: accumulate.accumulated_adamw(1e-2, k=4))
  return setups
