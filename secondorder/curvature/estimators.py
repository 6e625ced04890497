"""Estimators of curvature diagonals: stochastic and matrix-free, or exact for small models.

- `hutchinson_diag`: diag(H) of a scalar loss from Rademacher probes, E[z ⊙ H z] = diag(H).
- `gnb_diag`: Sophia-G's Gauss-Newton-Bartlett estimate of diag(G) for softmax
  cross-entropy, from one backward pass with labels sampled from the model.
- `empirical_fisher_diag`: the diagonal of the empirical Fisher (data labels), from
  per-example gradients.
- `hessian_diag`, `fisher_diag`: optax.second_order's exact Hessian diagonal (one
  Hessian-vector product per parameter) and squared batch gradient, as flat vectors with
  optax's arguments `(loss, params, inputs, targets)`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from secondorder._validation import check_int
from secondorder.curvature import products as _products

PyTree = Any


def _rademacher(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """Independent ±1 entries, each from one random bit (32 signs per generated word).

  Same distribution as `jax.random.rademacher`, at a small fraction of the cost of drawing
  one uniform float per entry (which otherwise dominates a Hutchinson probe on CPU).
  """
  size = math.prod(shape)
  if size == 0:
    return jnp.zeros(shape, dtype)
  words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  bits = bits.reshape(-1)[:size].reshape(shape)
  return (2 * bits.astype(jnp.int8) - 1).astype(dtype)


def rademacher_like(key: jax.Array, params: PyTree) -> PyTree:
  """One independent Rademacher (±1) probe per leaf, in each leaf's dtype."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  probes = [_rademacher(k, jnp.shape(p), jnp.result_type(p)) for k, p in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, probes)


def sample_mean(fn: Callable[[jax.Array], PyTree], key: jax.Array, num_samples: int,
                batch_size: int | None) -> PyTree:
  """Mean of `fn(k)` over `num_samples` keys split from `key`, accumulated in float32+.

  A `lax.scan` keeps a running sum, so memory stays at `batch_size` samples (one when
  None) however many samples are drawn; `batch_size` samples are vectorised per step.
  """
  if batch_size is not None:
    check_int("batch_size", batch_size, minimum=1)
  if num_samples == 1:
    return fn(jax.random.split(key, 1)[0])
  chunk = min(batch_size or 1, num_samples)
  keys = jax.random.split(key, num_samples)
  shapes = jax.eval_shape(fn, keys[0])
  acc_dtype = lambda s: jnp.promote_types(s.dtype, jnp.float32)

  def chunk_sum(ks):
    out = jax.vmap(fn)(ks)
    return jax.tree.map(lambda x: jnp.sum(x.astype(acc_dtype(x)), axis=0), out)

  def body(total, ks):
    return jax.tree.map(jnp.add, total, chunk_sum(ks)), None

  steps, rest = divmod(num_samples, chunk)
  total = jax.tree.map(lambda s: jnp.zeros(s.shape, acc_dtype(s)), shapes)
  total, _ = jax.lax.scan(body, total, keys[:steps * chunk].reshape(steps, chunk))
  if rest:
    total = jax.tree.map(jnp.add, total, chunk_sum(keys[steps * chunk:]))
  return jax.tree.map(lambda t, s: (t / num_samples).astype(s.dtype), total, shapes)


def hutchinson_diag(
    f: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    num_samples: int = 1,
    *,
    batch_size: int | None = None,
    mode: str = "forward_over_reverse",
) -> PyTree:
  """Hutchinson estimate of the Hessian diagonal of a scalar function.

    diag(H) ≈ (1/S) Σ_s z_s ⊙ (H z_s),   z_s Rademacher (independent ±1 entries),

  unbiased since E[z zᵀ] = I; exact with one probe when H is diagonal. Each leaf gets its
  own probe. One probe is one `hvp` (in the given `mode`); with several, ∇f is
  linearised once (forward-over-reverse) and H is applied S times.

  Args:
    f: `params -> scalar` (the loss on the current batch).
    params: the point θ.
    key: a PRNG key.
    num_samples: the number of probes S (>= 1).
    batch_size: how many probes to evaluate at once (None: one at a time).
    mode: the `hvp` mode of a single probe; "reverse_over_forward" is about 5% faster on
      CPU but cannot differentiate through `jax.custom_vjp` functions.

  Returns:
    A pytree like `params` holding the estimate of diag(H).

  Example:
    >>> d = hutchinson_diag(lambda p: loss(p, batch), params, jax.random.key(0))

  Reference: Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1990;
  Yao et al., "ADAHESSIAN", AAAI 2021.
  """
  check_int("num_samples", num_samples, minimum=1)
  if batch_size is not None:
    check_int("batch_size", batch_size, minimum=1)
  if num_samples == 1:
    z = rademacher_like(jax.random.split(key, 1)[0], params)
    hz = _products.hvp(f, params, z, mode=mode)
    return jax.tree.map(jnp.multiply, z, hz)
  matvec = _products.hessian_operator(f, params)

  def one(k):
    z = rademacher_like(k, params)
    return jax.tree.map(jnp.multiply, z, matvec(z))

  return sample_mean(one, key, num_samples, batch_size)


def gnb_diag(logits_fn: Callable[[PyTree], jax.Array], params: PyTree, key: jax.Array) -> PyTree:
  """Gauss-Newton-Bartlett estimate of diag(G) for softmax cross-entropy (Sophia-G).

  With logits z_b (shape [..., C], all leading axes flattened into B examples), sample
  ŷ_b ∼ softmax(z_b) and take ĝ = ∇_θ (1/B) Σ_b CE(z_b, ŷ_b); the estimate is

    ĥ = B · ĝ ⊙ ĝ,

  whose expectation over ŷ is diag of the Gauss-Newton matrix of the mean cross-entropy,
  G = (1/B) Σ_b J_bᵀ (diag(p_b) − p_b p_bᵀ) J_b, up to cross-example terms of zero mean
  (Bartlett's identity). It costs one forward and one backward pass: ĝ is a single
  vector-Jacobian product with the cotangent (softmax(z) − onehot(ŷ)) / B.

  Args:
    logits_fn: `params -> logits` of shape [..., classes] on the current batch.
    params: the point θ.
    key: a PRNG key for the sampled labels.

  Returns:
    A pytree like `params`.

  Example:
    >>> h = gnb_diag(lambda p: model.apply(p, x), params, jax.random.key(0))

  Reference: Liu et al., "Sophia: A scalable stochastic second-order optimizer for language
  model pre-training", ICLR 2024, Algorithm 2.
  """
  logits, pullback = jax.vjp(logits_fn, params)
  batch, cotangent = _gnb_cotangent(logits, key, "gnb_diag")
  (g,) = pullback(cotangent)
  return jax.tree.map(lambda x: batch * x * x, g)


def _gnb_cotangent(logits: jax.Array, key: jax.Array, caller: str) -> tuple[int, jax.Array]:
  """(B, ∂/∂z of (1/B) Σ_b CE(z_b, ŷ_b)) with ŷ_b ∼ softmax(z_b)."""
  if not hasattr(logits, "shape") or jnp.ndim(logits) < 1:
    raise ValueError(f"{caller} needs logits_fn to return an array of logits [..., classes]; "
                     f"it returned {getattr(logits, 'shape', type(logits).__name__)}.")
  num_classes = logits.shape[-1]
  batch = logits.size // num_classes
  z = logits.reshape(batch, num_classes).astype(jnp.promote_types(logits.dtype, jnp.float32))
  sampled = jax.random.categorical(key, z, axis=-1)
  cotangent = (jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(sampled, num_classes, dtype=z.dtype))
  return batch, (cotangent / batch).reshape(logits.shape).astype(logits.dtype)


def value_grad_and_gnb_diag(
    logits_fn: Callable[[PyTree], jax.Array],
    loss_fn: Callable[[jax.Array], jax.Array],
    params: PyTree,
    key: jax.Array,
) -> tuple[jax.Array, PyTree, PyTree]:
  """The loss, its gradient and `gnb_diag` from one forward pass.

  Both gradients pull a cotangent of the same logits back through the network: the loss's
  ∂L/∂z and the sampled-label cotangent of `gnb_diag`. One `jax.vjp` of `logits_fn` serves
  both (the two pullbacks run batched), so a Sophia-G refresh step costs one forward pass
  and a double-width backward pass instead of a gradient plus a separate estimate.

  Args:
    logits_fn: `params -> logits` [..., classes] on the current batch.
    loss_fn: `logits -> scalar`, the training loss of these logits (labels closed over),
      so that the loss is `loss_fn(logits_fn(params))`.
    params: the point θ.
    key: the PRNG key of the sampled labels (`gnb_diag(logits_fn, params, key)` gives the
      same estimate).

  Returns:
    `(loss, grads, estimate)`, the last two pytrees like `params`.
  """
  logits, pullback = jax.vjp(logits_fn, params)
  out = jax.eval_shape(loss_fn, logits)
  if getattr(out, "shape", None) != ():
    raise ValueError("value_grad_and_gnb_diag needs loss_fn: logits -> scalar loss, it "
                     f"returned {getattr(out, 'shape', type(out).__name__)}.")
  loss, dloss = jax.value_and_grad(loss_fn)(logits)
  batch, cotangent = _gnb_cotangent(logits, key, "value_grad_and_gnb_diag")
  (both,) = jax.vmap(pullback)(jnp.stack([dloss.astype(logits.dtype), cotangent]))
  grads = jax.tree.map(lambda x: x[0], both)
  estimate = jax.tree.map(lambda x: batch * x[1] * x[1], both)
  return loss, grads, estimate


def empirical_fisher_diag(
    example_loss_fn: Callable[[PyTree, Any], jax.Array],
    params: PyTree,
    batch: Any,
) -> PyTree:
  """Diagonal of the empirical Fisher, (1/B) Σ_b ∇ℓ_b ⊙ ∇ℓ_b, from per-example gradients.

  This is the *empirical* Fisher: the gradients ∇ℓ_b = ∇_θ ℓ(θ; x_b, y_b) use the data labels
  y_b, not labels sampled from the model, so it is not the Fisher information (compare
  `fisher_vp`, `gnb_diag`) and not a curvature matrix in general. The per-example gradients
  come from `jax.vmap` over the batch; normalisation is the mean over the B examples.

  Args:
    example_loss_fn: `(params, example) -> scalar`, the loss of a single example.
    params: the point θ.
    batch: a pytree whose leaves all have the leading batch axis B (e.g. `(x, y)`).

  Returns:
    A pytree like `params`.

  Example:
    >>> def example_loss(p, ex):
    ...   x, y = ex
    ...   return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x[None]), y[None])[0]
    >>> d = empirical_fisher_diag(example_loss, params, (x, y))

  Reference: Kunstner, Balles & Hennig, "Limitations of the empirical Fisher approximation
  for natural gradient descent", NeurIPS 2019.
  """
  per_example = jax.vmap(jax.grad(example_loss_fn), in_axes=(None, 0))(params, batch)

  def mean_sq(g):
    acc = jnp.promote_types(g.dtype, jnp.float32)
    return jnp.mean(jnp.square(g.astype(acc)), axis=0).astype(g.dtype)

  return jax.tree.map(mean_sq, per_example)


def _check_loss(name: str, loss: Any, caller: str) -> None:
  if not callable(loss):
    raise TypeError(f"{caller}: {name} must be a callable (params, inputs, targets) -> scalar, "
                    f"got {type(loss).__name__}.")


def hessian_diag(
    loss: Callable[[PyTree, Any, Any], jax.Array],
    params: PyTree,
    inputs: Any,
    targets: Any,
) -> jax.Array:
  """The exact Hessian diagonal of `loss(params, inputs, targets)`, as a flat vector.

    diag(H)_i = e_iᵀ H e_i,   H = ∇²_θ loss(θ, inputs, targets),

  from one Hessian-vector product per parameter (∇ loss is linearised once, then applied
  to every basis vector e_i of the raveled parameters): n products for n parameters, so it
  is meant for small models and for checking an estimator. For large models use the
  matrix-free estimate `hutchinson_diag`.

  The arguments, the result and its meaning are those of the deprecated
  `optax.second_order.hessian_diag`.

  Args:
    loss: `(params, inputs, targets) -> scalar`.
    params: the point θ (any pytree of arrays).
    inputs: the inputs passed to `loss`.
    targets: the targets passed to `loss`.

  Returns:
    A vector of the size of `jax.flatten_util.ravel_pytree(params)[0]`, in its order and
    dtype: the diagonal of the Hessian with respect to the raveled parameters.

  Example:
    >>> d = hessian_diag(lambda p, x, y: jnp.mean((x @ p - y) ** 2), w, x, y)
  """
  _check_loss("loss", loss, "hessian_diag")
  flat, unravel = ravel_pytree(params)
  matvec = _products.hessian_operator(lambda p: loss(p, inputs, targets), params)

  def entry(basis: jax.Array) -> jax.Array:
    return jnp.vdot(basis, ravel_pytree(matvec(unravel(basis)))[0])

  return jax.vmap(entry)(jnp.eye(flat.size, dtype=flat.dtype))


def fisher_diag(
    negative_log_likelihood: Callable[[PyTree, Any, Any], jax.Array],
    params: PyTree,
    inputs: Any,
    targets: Any,
) -> jax.Array:
  """The square of the batch gradient of the negative log-likelihood, as a flat vector.

    g ⊙ g,   g = ∇_θ nll(θ, inputs, targets) raveled,

  the diagonal of the rank-one "observed Fisher" g gᵀ of the whole batch taken as one
  example, from one gradient pass. With the data's labels as `targets` it is neither the
  Fisher information (over labels drawn from the model: `fisher_vp` multiplies by it,
  `gnb_diag` estimates its diagonal) nor the mean of per-example squared gradients
  (`empirical_fisher_diag`): it squares the batch's gradient.

  The arguments, the result and its meaning are those of the deprecated
  `optax.second_order.fisher_diag`.

  Args:
    negative_log_likelihood: `(params, inputs, targets) -> scalar`.
    params: the point θ (any pytree of arrays).
    inputs: the inputs passed to `negative_log_likelihood`.
    targets: the targets passed to `negative_log_likelihood`.

  Returns:
    A vector of the size of `jax.flatten_util.ravel_pytree(params)[0]`, in its order.

  Example:
    >>> d = fisher_diag(nll, params, x, y)
  """
  _check_loss("negative_log_likelihood", negative_log_likelihood, "fisher_diag")
  grads = jax.grad(negative_log_likelihood)(params, inputs, targets)
  return jnp.square(ravel_pytree(grads)[0])
