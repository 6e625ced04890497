"""Peer optimizers that need help to load on the installed JAX.

Google's Distributed Shampoo (`optax-shampoo` 0.0.6, the reference JAX implementation) does
not run on current JAX as published. `distributed_shampoo()` imports it with a load-time
patch (nothing in site-packages is edited):

  * the removed `jax.tree_map` / `jax.tree_flatten` / `jax.tree_unflatten` /
    `jax.tree_leaves` / `jax.tree_structure` aliases are restored;
  * `jax.experimental.pjit` gets its old `PartitionSpec` name back;
  * the module's `lax.while_loop` is wrapped so that the initial carry takes the dtypes its
    body returns (the published code starts a loop with Python `0` / `True` where the body
    returns int32 / float32 arrays, which current JAX rejects).

`pip install optax-shampoo==0.0.6` (in the `bench` extra) adds no other package.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

__all__ = ["distributed_shampoo"]

_MODULE = None


def distributed_shampoo():
  """The patched `optax_shampoo.distributed_shampoo` module (ImportError when absent)."""
  global _MODULE
  if _MODULE is not None:
    return _MODULE
  for old, new in (("tree_map", jax.tree.map), ("tree_flatten", jax.tree.flatten),
                   ("tree_unflatten", jax.tree.unflatten), ("tree_leaves", jax.tree.leaves),
                   ("tree_structure", jax.tree.structure)):
    if not hasattr(jax, old):
      setattr(jax, old, new)
  import jax.experimental.pjit as pjit_module
  if not hasattr(pjit_module, "PartitionSpec"):
    pjit_module.PartitionSpec = jax.sharding.PartitionSpec
  from optax_shampoo import distributed_shampoo as ds

  def while_loop(cond_fun, body_fun, init_val):
    out = jax.eval_shape(body_fun, init_val)
    init_val = jax.tree.map(lambda x, o: jnp.asarray(x, o.dtype), init_val, out)
    return jax.lax.while_loop(cond_fun, body_fun, init_val)

  lax_proxy = types.SimpleNamespace(**{k: getattr(jax.lax, k) for k in dir(jax.lax)
                                       if not k.startswith("__")})
  lax_proxy.while_loop = while_loop
  ds.lax = lax_proxy
  _MODULE = ds
  return ds
