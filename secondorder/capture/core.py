"""The capture itself: discover the covered layers, then loss, gradients and statistics."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from secondorder._validation import check_choice
from secondorder.capture import interception, likelihoods, padding, registry, state as model_state
from secondorder.capture.likelihoods import FISHERS, LIKELIHOODS
from secondorder.capture.types import KfacLayer, KfacLayers, param_path
from secondorder.dimension_numbers import MuonDimensionNumbers

__all__ = ["Capture", "linen_capture", "nnx_capture"]


def _call(call_args, call_kwargs) -> tuple[tuple, dict]:
  """The model's other call arguments, checked: `(tuple of positional, dict of keyword)`."""
  if not isinstance(call_args, (tuple, list)):
    raise TypeError("call_args must be a tuple of the model's positional arguments after "
                    f"the inputs, got {type(call_args).__name__}.")
  if call_kwargs is not None and not isinstance(call_kwargs, dict):
    raise TypeError("call_kwargs must be a dict of the model's keyword arguments, got "
                    f"{type(call_kwargs).__name__}.")
  return tuple(call_args), dict(call_kwargs or {})


def _group_calls(calls: Sequence[interception.Call]) -> dict[str, list[interception.Call]]:
  groups: dict[str, list[interception.Call]] = {}
  for c in calls:
    groups.setdefault(c.name, []).append(c)
  return groups


def _why_not(calls: list[interception.Call], shapes: dict) -> str | None:
  """Why the calls of one layer cannot form a K-FAC block, or None when they can."""
  first = calls[0]
  for c in calls:
    if c.problem:
      return c.problem
  layouts = {c.kind: (c.kernel_shape, c.config, c.bias) for c in calls}
  if any(layouts[c.kind] != (c.kernel_shape, c.config, c.bias) for c in calls) or (
      len(layouts) > 1 and (set(layouts) != {"embed", "attend"}
                            or len({k for k, _, _ in layouts.values()}) > 1)):
    return "a layer called with different input layouts"
  if first.kernel not in shapes:
    return f"its kernel {'/'.join(first.kernel)} is not a parameter of the model"
  stack = _stack_shape(shapes[first.kernel], first.kernel_shape)
  if stack is None:
    return (f"its kernel has shape {shapes[first.kernel]} in the parameters but "
            f"{first.kernel_shape} inside the call")
  emitted = tuple(first.kernel_shape[a] for a in first.axes[1])
  if first.bias is not None and (
      first.bias not in shapes or shapes[first.bias] != stack + emitted):
    return f"its bias {'/'.join(first.bias)} does not match the kernel"
  return None


def _stack_shape(param_shape: tuple, call_shape: tuple) -> tuple | None:
  """The leading stack axes of a kernel whose calls see `call_shape` (`()` when unstacked).

  A layer stacked by `nnx.vmap` / `nnx.scan` / `nn.scan` / `nn.vmap` holds `[L, *call_shape]`
  and every call sees one slice; None when the shapes do not relate that way.
  """
  k = len(param_shape) - len(call_shape)
  if k < 0 or tuple(param_shape[k:]) != tuple(call_shape):
    return None
  return tuple(param_shape[:k])


def layers_from_calls(calls: Sequence[interception.Call], params) -> KfacLayers:
  """The covered layers of the discovered calls, and every other parameter's path.

  A layer called several times in one forward pass (a shared layer, a layer applied at
  every position) is one block: its uses are extra examples (K-FAC-expand).

  Args:
    calls: what discovery recorded.
    params: the parameters the gradients refer to.

  Returns:
    The `KfacLayers`.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  shapes = {param_path(p): tuple(jnp.shape(v)) for p, v in leaves}
  covered, why = [], {}
  for name, group in _group_calls(calls).items():
    reason = _why_not(group, shapes)
    if reason is not None:
      for path in (group[0].kernel, group[0].bias):
        if path is not None:
          why["/".join(path)] = f"layer {name} is not covered: {reason}"
      continue
    c = group[0]
    k = len(shapes[c.kernel]) - len(c.kernel_shape)
    spec = MuonDimensionNumbers(tuple(k + a for a in c.axes[0]),
                                tuple(k + a for a in c.axes[1]))
    kind = "tied" if any(g.kind == "attend" for g in group) else c.kind
    covered.append(KfacLayer(name, kind, c.kernel, c.bias, shapes[c.kernel], spec, c.groups))
  owned = {l.kernel for l in covered} | {l.bias for l in covered if l.bias is not None}
  uncovered = tuple("/".join(param_path(p)) for p, _ in leaves if param_path(p) not in owned)
  reasons = tuple((p, why.get(p, "not inside a covered layer kind")) for p in uncovered)
  return KfacLayers(tuple(covered), uncovered, reasons,
                    tuple(("/".join(p), s) for p, s in shapes.items()))


def check_coverage(layers: KfacLayers, strict: bool) -> None:
  """Warns (or with `strict` raises ValueError) naming every kernel-like parameter that falls
  back to the diagonal method instead of a Kronecker block."""
  kernels = layers.fallback_kernels()
  if not kernels:
    return
  why = dict(layers.reasons)
  listing = "; ".join(f"{p} ({why.get(p, 'not covered')})" for p in kernels)
  message = (f"K-FAC covers {100 * layers.covered_fraction:.1f}% of the parameters; these "
             f"parameters with two or more axes fall back to the diagonal method: {listing}. "
             "print(cap.layers(...)) shows the full coverage.")
  if strict:
    raise ValueError(message + " (strict=True)")
  warnings.warn(message, stacklevel=3)


def _zero_slots(layers: Sequence[KfacLayer], dtype, bases: dict | None = None) -> dict:
  """Per covered layer (keyed by its module path) the zero slots of its kind's taps; a
  dense layer named in `bases` gets three more: its `(Q_A, Q_S)` and the projected
  moment's zero slot (`taps.tap_projected`)."""
  out = {}
  for l in layers:
    slots = tuple(jnp.zeros(shape, dtype) for shape in registry.BLOCKS[l.kind].slot_shapes(l))
    if bases and l.name in bases:
      q_a, q_s = bases[l.name]
      slots += (jnp.asarray(q_a, dtype), jnp.asarray(q_s, dtype),
                jnp.zeros(l.factor_shape(0)[:-2] + (l.a_dim, l.s_dim), dtype))
    out[l.kernel[:-1]] = slots
  return out


def check_bases(bases, layers: Sequence[KfacLayer]) -> dict:
  """`bases` checked against the covered layers: `{name: (Q_A, Q_S)}` of dense layers only,
  each `Q` shaped as the layer's factor (`KfacLayer.factor_shape`)."""
  if bases is None:
    return {}
  if not isinstance(bases, dict):
    raise TypeError("bases must be a dict {layer name: (Q_A, Q_S)} (ekfac_bases(opt_state)), "
                    f"got {type(bases).__name__}.")
  by_name = {l.name: l for l in layers}
  for name, pair in bases.items():
    layer = by_name.get(name)
    if layer is None or layer.kind != "dense":
      raise ValueError(
          f"bases names {name!r}, which is not a covered dense layer of the model (its dense "
          f"layers: {sorted(n for n, l in by_name.items() if l.kind == 'dense')}).")
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
      raise ValueError(f"bases[{name!r}] must be the pair (Q_A, Q_S), got {type(pair).__name__}.")
    for what, q, side in (("Q_A", pair[0], layer.a_dim), ("Q_S", pair[1], layer.s_dim)):
      if tuple(jnp.shape(q)) != layer.factor_shape(side):
        raise ValueError(f"bases[{name!r}] {what} has shape {tuple(jnp.shape(q))}, expected "
                         f"{layer.factor_shape(side)}.")
  return bases


class Capture:
  """Loss, gradients and K-FAC statistics in one call; built by `linen_capture`/`nnx_capture`.

  `cap(model_or_params, inputs, targets, key=None)` returns `(loss, grads, kfac_stats)`;
  `cap.layers(model_or_params, inputs)` returns the static `KfacLayers` the transform is
  built with.

  Per covered layer, with M the number of examples of the output (`likelihoods`)::

    Â = (1/R) Σ_uses aᵀa / N      (R uses of the layer in the forward pass, N rows each)
    Ŝ = M Σ_uses Σ_rows ĝ ĝᵀ      (ĝ the back-propagated gradient of the mean loss)
  """

  def __init__(self, forward, params_of, loss_fn, likelihood, fisher, stats_dtype,
               strict=False, finish=model_state.linen_finish, logits=None):
    check_choice("fisher", fisher, FISHERS)
    if fisher != "empirical" and likelihood is None:
      raise ValueError(f"fisher={fisher!r} needs likelihood= one of {list(LIKELIHOODS)}.")
    if likelihood is not None:
      check_choice("likelihood", likelihood, LIKELIHOODS)
    if logits is not None and not callable(logits):
      raise TypeError(f"logits must be a callable (the model's output -> its logits, e.g. "
                      f"lambda out: out[0]), got {type(logits).__name__}.")
    # (model_or_params, params, slots, recorder, inputs, state, rngs, (args, kwargs))
    #   -> (outputs, new_state)
    self._forward = forward
    self.logits = logits
    self._finish = finish        # (model_or_params, result, new_state) -> what the call returns
    self._params_of = params_of
    self.loss_fn = loss_fn
    self.likelihood = likelihood
    self.fisher = fisher
    self.stats_dtype = stats_dtype
    self.strict = strict

  def _run(self, model_or_params, params, slots, rec, inputs, state, rngs, call):
    """The model's forward on `inputs` and the call's other arguments: (logits, new state)."""
    outputs, new_state = self._forward(model_or_params, params, slots, rec, inputs, state,
                                       rngs, call)
    return (outputs if self.logits is None else self.logits(outputs)), new_state

  def layers(self, model_or_params, inputs, *, state=None, rngs=None, call_args=(),
             call_kwargs=None) -> KfacLayers:
    """The covered layers (and uncovered parameter paths) of the model on these inputs.

    Args:
      model_or_params: the NNX model, or the linen params.
      inputs: a batch of inputs (only shapes are used).
      state, rngs: linen only, as in the call (the collections the training forward
        writes, and its PRNG keys); nothing is written.
      call_args, call_kwargs: the model's other call arguments, as in the call.

    Returns:
      The `KfacLayers` to build `scale_by_kfac_factors` / `kfac` with.
    """
    layers, _ = self._discover(model_or_params, inputs, state, rngs,
                               _call(call_args, call_kwargs))
    check_coverage(layers, self.strict)
    return layers

  def _discover(self, model_or_params, inputs, state, rngs, call):
    """The `KfacLayers`, and the shape of the model's output.

    An NNX model goes through `jax.eval_shape` whole (every variable an argument), so a
    model built abstractly (`nnx.eval_shape`), batch statistics and RNG state included,
    can be read.
    """
    params = self._params_of(model_or_params)
    rec = interception.Recorder()
    if isinstance(model_or_params, nnx.Module):
      graphdef, variables = nnx.split(model_or_params)

      def run(variables, x):
        model = nnx.merge(graphdef, variables)
        return self._run(model, self._params_of(model), {}, rec, x, state, rngs, call)

      out, _ = jax.eval_shape(run, variables, inputs)
    else:
      out, _ = jax.eval_shape(
          lambda p, x, s, r: self._run(model_or_params, p, {}, rec, x, s, r, call),
          params, inputs, state, rngs)
    return layers_from_calls(rec.calls, params), out

  def _output_cotangents(self, out, vjp_fn, slot_ct, key, weights, m):
    """The slots' cotangents carrying Ŝ: from the data labels, sampled labels, or exactly.

    With padding `weights` (M' = `m` real examples), the sampled and exact cotangents are
    those of the masked mean loss (zero at padded positions, the rest scaled by M / M')."""
    if self.fisher == "empirical":
      return slot_ct
    scale = (1.0 if weights is None else
             (likelihoods.num_examples(out) / padding.positive(m) * weights)[..., None])
    if self.fisher == "sampled":
      y_hat = likelihoods.sample(self.likelihood, key, out)
      dsampled = jax.grad(lambda z: likelihoods.nll(self.likelihood, z, y_hat))(out)
      return vjp_fn((dsampled * scale).astype(out.dtype))[1]
    cots = likelihoods.sqrt_fisher_cotangents(self.likelihood, out)
    per = jax.vmap(lambda c: vjp_fn((c * scale).astype(out.dtype))[1])(cots)
    return jax.tree.map(lambda v: v.sum(0), per)

  def __call__(self, model_or_params, inputs, targets, *, key: jax.Array | None = None,
               state=None, rngs=None, mask: jax.Array | None = None, call_args=(),
               call_kwargs=None, bases: dict | None = None):
    """Loss, gradients and per-layer statistics of one batch, from one training forward.

    The model runs once, in training mode; the gradient and the Fisher's backward passes
    share that forward, so they see the same batch statistics and dropout mask
    (`secondorder.capture.state`).

    Args:
      model_or_params: the NNX model, or the linen params.
      inputs: the batch's inputs.
      targets: the batch's targets, passed to `loss_fn`.
      key: PRNG key for fisher="sampled".
      state: linen only: the collections the forward writes (`{"batch_stats": ...}`).
      rngs: linen only: the forward's PRNG keys (`{"dropout": key}`).
      mask: a padding mask of the output's example shape (`[B, T]` for outputs
        `[B, T, C]`), True (or 1) at real tokens: the statistics are those of the loss
        averaged over the M' real tokens (`secondorder.capture.padding`). `loss_fn` must
        then average over the real tokens too; the capture does not pass it the mask.
      call_args: the model's other positional arguments, after `inputs` (a decoder's
        positions, cache and attention mask): the model runs as
        `model(inputs, *call_args, **call_kwargs)`.
      call_kwargs: the model's keyword arguments (`deterministic=False`).
      bases: EK-FAC's eigenbases `{layer name: (Q_A, Q_S)}` of dense layers
        (`secondorder.transforms.ekfac.ekfac_bases(opt_state)`): each such layer's
        statistics are then `ProjectedLayerStats` whose `e` is `M Σ_n (Q_Aᵀ G_n Q_S)²` over
        the examples n (the first axis of the layer's input; an example's gradient sums its
        positions), from the same Fisher pass as Ŝ.

    Returns:
      `(loss, grads, kfac_stats)`; for linen with `state`, `(loss, grads, kfac_stats,
      new_state)`. An NNX model's batch statistics and RNG counters are updated in place,
      as a plain training step updates them.
    """
    if self.fisher == "sampled" and key is None:
      raise ValueError("fisher='sampled' needs a PRNG key: call cap(model, x, y, key=key).")
    call = _call(call_args, call_kwargs)
    layers, out_shape = self._discover(model_or_params, inputs, state, rngs, call)
    covered = layers.layers
    bases = check_bases(bases, covered)
    params = self._params_of(model_or_params)
    weights = None if mask is None else padding.example_weights(mask, out_shape)

    def fwd(p, slots):
      return self._run(model_or_params, p, slots,
                       interception.Recorder(capture=True, mask=weights),
                       inputs, state, rngs, call)

    out, vjp_fn, new_state = jax.vjp(fwd, params,
                                     _zero_slots(covered, self.stats_dtype, bases),
                                     has_aux=True)
    loss, dout = jax.value_and_grad(self.loss_fn)(out, targets)
    grads, slot_ct = vjp_fn(dout)
    m = likelihoods.num_examples(out) if weights is None else jnp.sum(weights)
    s_ct = self._output_cotangents(out, vjp_fn, slot_ct, key, weights, m)
    stats = {}
    for layer in covered:
      key = layer.kernel[:-1]
      stats[layer.name] = registry.BLOCKS[layer.kind].statistics(layer, slot_ct[key],
                                                                     s_ct[key], m)
    return self._finish(model_or_params, (loss, grads, stats), new_state)


def linen_capture(model: nn.Module, loss_fn: Callable[[Any, Any], jax.Array], *,
                  likelihood: str | None = None, fisher: str = "sampled",
                  variables: dict | None = None, stats_dtype=jnp.float32,
                  strict: bool = False, logits: Callable[[Any], jax.Array] | None = None,
                  **apply_kwargs) -> Capture:
  """K-FAC capture for a linen module: `cap(params, inputs, targets, key=)`.

  Args:
    model: the linen module (unmodified).
    loss_fn: `(outputs, targets) -> scalar`, the mean over the examples.
    likelihood: "softmax", "bernoulli" or "gaussian"; required unless fisher="empirical".
    fisher: "sampled" (true Fisher, default), "empirical" or "exact".
    variables: other collections passed to `apply` unchanged (e.g. {"batch_stats": ...}
      of a model in evaluation mode). Collections the forward writes (BatchNorm's
      "batch_stats" in training mode) go to each call as `state=` instead.
    stats_dtype: dtype of the statistics.
    strict: raise (instead of warning) when `layers()` finds a parameter with two or more
      axes outside every Kronecker block.
    logits: `model output -> logits`, for a model that returns more than its logits
      (`lambda out: out[0]` for `(logits, extras)`); the loss and the Fisher see the logits.
    **apply_kwargs: forwarded to `model.apply` (e.g. `train=True`; not `mutable`, and
      `rngs` only when every call uses the same keys).

  Returns:
    The `Capture`. `params` is the "params" collection (the dict inside {"params": ...});
    the gradients and the layer paths refer to it. `cap(params, x, y, key=, state=,
    rngs=)` runs the training forward once: with `state` it returns `(loss, grads, stats,
    new_state)`, `new_state` what `model.apply(..., mutable=list(state))` returns.

  Example::

    cap = linen_capture(model, loss_fn, likelihood="softmax")
    layers = cap.layers(params, x)
    loss, grads, stats = jax.jit(cap)(params, x, y, key=key)

    # BatchNorm and Dropout in training mode:
    layers = cap.layers(params, x, state={"batch_stats": bs}, rngs={"dropout": key})
    loss, grads, stats, new = cap(params, x, y, key=key, state={"batch_stats": bs},
                                  rngs={"dropout": dropout_key})
    bs = new["batch_stats"]
  """
  extra = dict(variables or {})
  model_state.check_linen_apply_kwargs(apply_kwargs)

  def forward(obj, params, slots, rec, inputs, state, rngs, call):
    del obj
    params = interception.linen_place_slots(params, slots)
    with interception.recording(rec), interception.linen_intercept():
      return model_state.linen_apply(model, {"params": params, **extra}, inputs,
                                     apply_kwargs, state, rngs, call)

  return Capture(forward, lambda p: p, loss_fn, likelihood, fisher, stats_dtype, strict,
                 finish=model_state.linen_finish, logits=logits)


def nnx_capture(loss_fn: Callable[[Any, Any], jax.Array], *, likelihood: str | None = None,
                fisher: str = "sampled", stats_dtype=jnp.float32,
                strict: bool = False, logits: Callable[[Any], jax.Array] | None = None
                ) -> Capture:
  """K-FAC capture for an NNX module: `cap(model, inputs, targets, key=)`.

  The gradients come back as the `nnx.State` of the model's `nnx.Param`s (what
  `nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, kfac_stats=stats)` takes);
  the layer paths refer to that state. The model runs once in its current mode on a copy;
  what that training forward writes (BatchNorm's batch statistics, the RNG counters
  Dropout advances) is written back into `model`, as a plain training step would, and the
  Fisher's backward passes reuse its dropout mask. `layers()` writes nothing.

  Args:
    loss_fn: `(outputs, targets) -> scalar`, the mean over the examples.
    likelihood: "softmax", "bernoulli" or "gaussian"; required unless fisher="empirical".
    fisher: "sampled" (true Fisher, default), "empirical" or "exact".
    stats_dtype: dtype of the statistics.
    strict: raise (instead of warning) when `layers()` finds a parameter with two or more
      axes outside every Kronecker block.
    logits: `model output -> logits`, for a model that returns more than its logits
      (`lambda out: out[0]` for `(logits, cache)`); the loss and the Fisher see the logits.

  Returns:
    The `Capture`.

  Example::

    cap = nnx_capture(loss_fn, likelihood="softmax")
    loss, grads, stats = nnx.jit(lambda m, x, y, k: cap(m, x, y, key=k))(model, x, y, key)

    # A decoder called as model(tokens, positions, cache, mask) returning (logits, cache):
    cap = nnx_capture(loss_fn, likelihood="softmax", logits=lambda out: out[0])
    layers = cap.layers(model, tokens, call_args=(positions, None, mask))
    loss, grads, stats = cap(model, tokens, targets, key=key,
                             call_args=(positions, None, mask))
  """

  def params_of(model):
    return nnx.state(model, nnx.Param)

  def forward(model, params, slots, rec, inputs, state, rngs, call):
    model_state.check_nnx_call(state, rngs)
    m = model_state.nnx_training_copy(model, params)
    interception.nnx_place_slots(m, slots)
    with interception.recording(rec), interception.nnx_intercept(m):
      outputs = m(inputs, *call[0], **call[1])
    return outputs, model_state.nnx_written_state(m)

  return Capture(forward, params_of, loss_fn, likelihood, fisher, stats_dtype, strict,
                 finish=model_state.nnx_finish, logits=logits)
