"""Per-layer K-FAC statistics from unmodified Flax models (NNX and linen).

One call returns the loss, the gradients and, for every covered layer, the two Kronecker
factor contributions of the current batch::

  Â = (1/R) Σ_uses aᵀ a / N            a: layer inputs, one row per example and position
  Ŝ = M Σ_uses Σ_rows ĝ ĝᵀ             ĝ: back-propagated gradients of the mean loss

The loss is the *mean* over the M examples of the model's output (every position along all
axes but the last: a batch `[B, C]` has M = B, a token batch `[B, T, C]` has M = B·T), so
the back-propagated ĝ of one example carries 1/M and Ŝ is the mean over examples of the
per-example output-gradient products, summed over the layer's positions (T spatial
locations of a convolution, the tokens a dense layer is applied to). The same M scales the
sampled, exact and empirical Fisher alike. A bias is handled by appending a constant 1 to
`a`. A layer used R times in one forward pass (weight sharing) treats its uses as extra
positions (K-FAC-expand, Eschenhagen et al. 2023). The layer's Fisher block is
approximated by Â ⊗ Ŝ; for a convolution this is the KFC approximation (Grosse & Martens
2016).

The statistics are already reduced (the factors are [in+1, in+1] and [out, out]), so the
`kfac_stats` extra argument stays small whatever the batch size.

Covered layers: the classes of one table (`secondorder.capture.registry`, which the
dimension numbers read too) and their subclasses: `nn.Dense`, `nn.DenseGeneral`,
`nn.Einsum`, `nn.Conv`, `nn.Embed`, the norms, and their NNX twins (`nnx.Linear`,
`nnx.LinearGeneral`, so `nnx.MultiHeadAttention`'s projections, `nnx.Einsum`, `nnx.Conv`,
`nnx.Embed`, ...). A multi-axis kernel `[d1..dk, e1..em]` is the matrix `(∏d) x (∏e)`; an
Einsum kernel is read by its equation (`secondorder.capture.einsum`: the letters it
contracts with the input on one side, those it emits on the other). A subclass that
overrides `__call__` is tapped at the base call its override makes; one whose override
never calls the base falls back, naming the subclass. Convolutions: any
padding mode; a grouped or depthwise one (`feature_group_count` G) is G blocks, its factors
stacked `[G, d, d]`; a masked one falls back. The statistics reach the
capture through identity functions on each layer's input and output whose backward pass
reports them (`secondorder.capture.taps`), so `jax.checkpoint` / `nn.remat` / `nnx.remat`
around a layer are transparent. Every parameter outside a covered layer is listed in
`KfacLayers.uncovered` and preconditioned by the transform's fallback.

A model whose call takes more than its inputs, or returns more than its logits, is
captured as it is: `cap(model, tokens, targets, key=key, call_args=(positions, cache,
mask))` with `nnx_capture(..., logits=lambda out: out[0])`.

Which Fisher (`fisher=`):
  * ``"sampled"`` (default): the true Fisher, output gradients of the negative
    log-likelihood at labels sampled from the model's predictive distribution; costs one
    backward pass more than `jax.value_and_grad`.
  * ``"empirical"``: output gradients of the user's loss at the data labels; free (the same
    backward pass as the gradient). This is a different matrix from the Fisher; its scale
    matches the others when the loss is the mean over the same M examples.
  * ``"exact"``: the expectation over labels in closed form (S = E_ŷ[g gᵀ], the
    Gauss-Newton matrix for these likelihoods); one backward pass per output unit.

Likelihoods (`likelihood=`), each the negative log-likelihood summed over the last axis
and averaged over the M examples:
  * ``"softmax"``: categorical over the last axis (integer labels).
  * ``"bernoulli"``: independent sigmoid units (targets in [0, 1]).
  * ``"gaussian"``: unit-variance Gaussian, ½‖z − y‖² per example.

Example (NNX)::

  cap = capture.nnx_capture(loss_fn, likelihood="softmax")   # loss_fn(logits, labels)
  layers = cap.layers(model, x)                                # static, once
  tx = so.kfac(0.1, layers=layers)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y, key):
    loss, grads, stats = cap(model, x, y, key=key)
    opt.update(model, grads, kfac_stats=stats)
    return loss

Example (linen)::

  cap = capture.linen_capture(model, loss_fn, likelihood="bernoulli")
  layers = cap.layers(params, x)
  loss, grads, stats = jax.jit(cap)(params, x, y, key=key)

Models in training mode (BatchNorm, Dropout): the capture runs the training forward once
and the Fisher's backward passes reuse it (same batch statistics, same dropout mask). An
NNX model's new batch statistics and RNG counters are written into it; a linen call takes
the written collections and the step's keys, and returns the new collections::

  loss, grads, stats, new = cap(params, x, y, key=key, state={"batch_stats": bs},
                                rngs={"dropout": dropout_key})

For a parameter pytree with no Flax model (every parameter on the fallback), build the
transform with `layers=no_layers()` and pass `kfac_stats=no_stats()`. A step that runs no
capture (statistics every k-th step only) passes `kfac_stats=no_new_stats()`.
"""

from secondorder.capture.core import Capture, layers_from_calls, linen_capture, nnx_capture
from secondorder.capture.likelihoods import FISHERS, LIKELIHOODS
from secondorder.capture.types import (KfacLayer, KfacLayers, LayerStats, NoNewStats,
                                       ProjectedLayerStats, no_layers, no_new_stats, no_stats, param_path)

__all__ = [
    "LayerStats",
    "ProjectedLayerStats",
    "KfacLayer",
    "KfacLayers",
    "Capture",
    "linen_capture",
    "nnx_capture",
    "NoNewStats",
    "no_layers",
    "no_new_stats",
    "no_stats",
    "param_path",
    "LIKELIHOODS",
    "FISHERS",
]
