"""Hessian-free (truncated) Newton and the natural gradient, by conjugate gradient.

`scale_by_hessian_free` is Martens' Hessian-free optimizer: every step solves the damped
Newton system (C + λI) d = −g approximately by conjugate gradient over curvature-vector
products (Gauss-Newton, Hessian or Fisher), never forming C, and adapts λ by the
Levenberg-Marquardt rule. `scale_by_natural_gradient` solves (F + λI) d = g on the true
Fisher and scales the step to a KL budget. `hessian_free` and `natural_gradient` are the
assembled optimizers.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from secondorder._validation import (check_choice, check_float_leaves, check_int,
                                     check_range, check_same_structure, require_extra_arg)
from secondorder.curvature.cg import CGResult, conjugate_gradient, tree_vdot
from secondorder.curvature.products import (fisher_operator, gauss_newton_operator,
                                            hessian_operator)

__all__ = ["ScaleByHessianFreeState", "ScaleByNaturalGradientState", "scale_by_hessian_free",
           "hessian_free", "scale_by_natural_gradient", "natural_gradient", "STATIC_ARGS",
           "CURVATURES", "PRECONDITIONERS"]

CURVATURES = ("gauss_newton", "hessian", "fisher")
PRECONDITIONERS = ("none", "squared_gradient", "empirical_fisher")

# Arguments that fix the shape of the CG loop's buffers; name them in
# `optax.inject_hyperparams(hessian_free, static_args=STATIC_ARGS)` (strings, bools and None
# are static there anyway).
STATIC_ARGS = ("cg_max_iterations",)

_LOGITS_EXAMPLE = "logits_fn=lambda p: model.apply(p, x)"
_LOSS_EXAMPLE = "loss_fn=so.softmax_cross_entropy(y)"
_OBJ_EXAMPLE = "obj_fn=lambda p: loss(p, batch)"
_FISHER_DIAG_EXAMPLE = "fisher_diag=so.empirical_fisher_diag(example_loss, params, batch)"


class ScaleByHessianFreeState(NamedTuple):
  """State of `scale_by_hessian_free`.

  Attributes:
    count: steps taken (int32).
    damping: the current Levenberg-Marquardt damping λ.
    rho: the reduction ratio ρ = (L(θ + d) − L(θ)) / q(d) of the last step (0 before the
      first step and after a skipped one).
    loss: L(θ) at the last step, from the closure.
    cg_iterations: conjugate-gradient iterations of the last step (int32).
    nonfinite_count: steps skipped because the gradient, the curvature, the CG solution,
      the model or the loss at the candidate was NaN or Inf (int32).
    direction: the last solution p = −d (params-shaped), CG's warm start.
  """
  count: jax.Array
  damping: jax.Array
  rho: jax.Array
  loss: jax.Array
  cg_iterations: jax.Array
  nonfinite_count: jax.Array
  direction: optax.Updates


class ScaleByNaturalGradientState(NamedTuple):
  """State of `scale_by_natural_gradient`.

  Attributes:
    count: steps taken (int32).
    step_size: η of the last step.
    kl: the realised KL estimate ½ η² dᵀFd of the last step.
    newton_decrement: sqrt(gᵀ(F + λI)⁻¹g) at the last step (F in the role of the Hessian).
    sharpness: the directional sharpness dᵀFd / ‖d‖² of the last direction.
    cg_iterations: conjugate-gradient iterations of the last step (int32).
    nonfinite_count: steps skipped because the gradient, the Fisher products or the CG
      solution were NaN or Inf (int32).
    direction: the last direction d = (F + λI)⁻¹ g (params-shaped), CG's warm start.
  """
  count: jax.Array
  step_size: jax.Array
  kl: jax.Array
  newton_decrement: jax.Array
  sharpness: jax.Array
  cg_iterations: jax.Array
  nonfinite_count: jax.Array
  direction: optax.Updates


# ----------------------------------------------------------------------------------------
# Shared steps
# ----------------------------------------------------------------------------------------


def _stats_dtype(dtype) -> jnp.dtype:
  """float32, or float64 for float64 inputs: CG runs at least in single precision."""
  return jnp.promote_types(dtype, jnp.float32)


def _scalar_dtype(params) -> jnp.dtype:
  """The dtype of the scalar state entries: the widest of the params and float32.

  Each leaf is widened to at least float32 before the comparison, so trees mixing bfloat16
  and float16 leaves (neither promotes to the other) get float32 rather than an error.
  """
  dtypes = [_stats_dtype(jnp.result_type(p)) for p in jax.tree.leaves(params)]
  return functools.reduce(jnp.promote_types, dtypes, jnp.dtype(jnp.float32))


def _zeros_like_stats(params) -> optax.Updates:
  """A params-shaped tree of zeros in each leaf's statistics dtype."""
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _stats_dtype(jnp.result_type(p))),
                      params)


def _check_update_inputs(method: str, updates, state, params) -> None:
  """Raises for missing params or gradients that do not match the state."""
  if params is None:
    raise ValueError(f"{method} needs params in update(): `tx.update(grads, state, params, "
                     f"...)`.")
  check_same_structure("updates", state.direction, updates, "the state")


def _in_param_dtypes(operator: Callable, params) -> Callable:
  """Wraps an operator so that it takes and returns trees in the statistics dtypes while
  the products run in the params' dtypes."""

  def matvec(v):
    out = operator(jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), v, params))
    return jax.tree.map(lambda y, x: y.astype(x.dtype), out, v)

  return matvec


def _damped(operator: Callable, damping: jax.Array) -> Callable:
  """v -> (A + λI) v."""
  return lambda v: jax.tree.map(lambda a, x: a + (damping * x).astype(x.dtype), operator(v), v)


def _scalar_output(fn: Callable, name: str) -> Callable:
  """Wraps a loss so that a non-scalar output raises a ValueError naming `name`."""

  def wrapped(x):
    out = fn(x)
    shape = jnp.shape(out)
    if shape != ():
      raise ValueError(f"{name} must return a scalar loss; it returned shape {shape}. Reduce "
                       f"over the batch (a mean), e.g. {name}=so.softmax_cross_entropy(y).")
    return out

  return wrapped


def _all_finite(*trees) -> jax.Array:
  """True when every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _warm_start(direction, decay) -> optax.Updates:
  """Martens' ζ: CG starts from the previous solution times the decay."""
  return jax.tree.map(lambda d: (decay * d).astype(d.dtype), direction)


def _solve(operator: Callable, grads, damping, warm_start, preconditioner, *,
           max_iterations: int, tol, progress_tol) -> CGResult:
  """CG on (C + λI) p = g from the warm start (C an operator on statistics-dtype trees),
  with Martens' look-back of max(10, ⌊i/10⌋) iterations for the progress rule."""
  return conjugate_gradient(
      _damped(operator, damping), grads, warm_start, max_iterations=max_iterations, tol=tol,
      preconditioner=preconditioner, progress_tol=progress_tol)


def _keep_if(ok: jax.Array, new, old):
  """`new` where `ok`, else `old`, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _as_updates(p, updates):
  """p cast to the dtypes of the incoming updates."""
  return jax.tree.map(lambda x, u: x.astype(jnp.result_type(u)), p, updates)


# ----------------------------------------------------------------------------------------
# Hessian-free
# ----------------------------------------------------------------------------------------


def _objective_and_curvature(curvature: str, params, obj_fn, logits_fn, loss_fn):
  """The objective L (params -> scalar) for ρ and the curvature operator C at params.

  "gauss_newton": L = loss_fn ∘ logits_fn, C = Jᵀ H_ℓ J (`gauss_newton_operator`);
  "hessian": L = obj_fn, C = ∇²L (`hessian_operator`); "fisher": L = loss_fn ∘ logits_fn,
  C the true categorical Fisher of the logits (`fisher_operator`).
  """
  method = f"scale_by_hessian_free(curvature={curvature!r})"
  if curvature == "hessian":
    obj_fn = _scalar_output(require_extra_arg(method, "obj_fn", obj_fn, _OBJ_EXAMPLE),
                            "obj_fn")
    return obj_fn, hessian_operator(obj_fn, params)
  logits_fn = require_extra_arg(method, "logits_fn", logits_fn, f"{_LOGITS_EXAMPLE}, "
                                f"{_LOSS_EXAMPLE}")
  loss_fn = require_extra_arg(method, "loss_fn", loss_fn, f"{_LOGITS_EXAMPLE}, {_LOSS_EXAMPLE}")
  scalar_loss = _scalar_output(loss_fn, "loss_fn")
  objective = lambda p: scalar_loss(logits_fn(p))
  if curvature == "gauss_newton":
    return objective, gauss_newton_operator(logits_fn, loss_fn, params)
  return objective, fisher_operator(logits_fn, params)


def _preconditioner(kind: str, power, grads, damping, fisher_diag):
  """Martens' diagonal M = (diag + λ)^power, or None for "none".

  "empirical_fisher": the diagonal is the given `fisher_diag` (the mean of the squared
  per-example gradients); "squared_gradient": the batch gradient squared, a cheaper stand-in.
  """
  if kind == "none":
    return None
  if kind == "empirical_fisher":
    fisher_diag = require_extra_arg("scale_by_hessian_free(preconditioner='empirical_fisher')",
                                    "fisher_diag", fisher_diag, _FISHER_DIAG_EXAMPLE)
    check_same_structure("fisher_diag", grads, fisher_diag, "the gradients")
    diag = jax.tree.map(lambda f, g: f.astype(g.dtype), fisher_diag, grads)
  else:
    diag = jax.tree.map(jnp.square, grads)
  return jax.tree.map(lambda d: jnp.power(d + damping, power).astype(d.dtype), diag)


def _reduction_ratio(loss, candidate_loss, model_reduction) -> jax.Array:
  """ρ = (L(θ + d) − L(θ)) / q(d); 0 when the model predicts no decrease (q(d) >= 0), so
  that λ grows until C + λI is positive definite along the directions CG explores."""
  predicted = model_reduction < 0
  return jnp.where(predicted, (candidate_loss - loss) / jnp.where(predicted, model_reduction,
                                                                  -1.0), 0.0)


def _levenberg_marquardt(damping, rho, adapt: bool, increase, decrease, ok, informative):
  """λ ← increase·λ when ρ < ¼ (or the step failed), λ ← decrease·λ when ρ > ¾.

  `informative` is False at a stationary point (g = 0), where the step is zero whatever λ,
  and when the predicted decrease is below the loss's rounding (a few ulps of L(θ)), where ρ
  is rounding noise that would otherwise raise λ step after step until it overflows: λ is
  kept. A step that predicts no decrease although g ≠ 0 (CG met negative curvature at once)
  has ρ = 0 and raises λ.
  """
  if not adapt:
    return damping
  raised = damping * increase
  lowered = damping * decrease
  adapted = jnp.where(rho < 0.25, raised, jnp.where(rho > 0.75, lowered, damping))
  adapted = jnp.where(informative, adapted, damping)
  return jnp.where(ok, adapted, raised).astype(damping.dtype)


def _accepted(ok: jax.Array, reject_increase: bool, loss, candidate_loss) -> jax.Array:
  """Whether the step is taken: it is finite and, with `reject_increase`, the loss at the
  candidate is not above L(θ) (a rejected step keeps θ; its ρ < 0 raises λ)."""
  if not reject_increase:
    return ok
  return ok & ~(candidate_loss > loss)


def scale_by_hessian_free(
    curvature: str = "gauss_newton",
    initial_damping: float = 1.0,
    adapt_damping: bool = True,
    damping_increase: float = 1.5,
    damping_decrease: float = 2.0 / 3.0,
    warm_start_decay: float = 0.95,
    cg_max_iterations: int = 50,
    cg_tol: float = 1e-6,
    progress_tol: float | None = 5e-4,
    preconditioner: str = "none",
    preconditioner_power: float = 0.75,
    reject_increase: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Hessian-free Newton: (C + λI) p = g by conjugate gradient, λ by Levenberg-Marquardt.

  Each step, at parameters θ with gradient g (the incoming updates):

  .. math::
    p \approx (C + \lambda I)^{-1} g \quad\text{(CG from } \zeta\,p_{t-1}\text{)},\qquad
    d = -p,\qquad q(d) = g^\top d + \tfrac12 d^\top C d,\\
    \rho = \frac{L(\theta + d) - L(\theta)}{q(d)},\qquad
    \lambda \leftarrow \begin{cases} \tfrac32\lambda & \rho < \tfrac14\\
    \tfrac23\lambda & \rho > \tfrac34\\ \lambda & \text{otherwise,}\end{cases}

  and the transform returns p (so `optax.scale_by_learning_rate(1.0)` after it takes the
  step d). C is never formed: CG uses products C v only,

  * `curvature="gauss_newton"` (default): C = Jᵀ H_ℓ J of the outputs `logits_fn(θ)` and the
    output loss `loss_fn`, positive semi-definite for a convex `loss_fn`; L = loss_fn ∘
    logits_fn. Needs `update(..., logits_fn=..., loss_fn=...)`.
  * `curvature="hessian"`: C = ∇²L with L = `obj_fn` (Newton-CG; for convex or small
    problems: a direction of negative curvature ends CG early, and a step whose model
    predicts no decrease counts as ρ = 0, so λ grows until C + λI is positive definite
    where CG looks). Needs `update(..., obj_fn=...)`.
  * `curvature="fisher"`: C the true Fisher of the categorical distribution over the last
    axis of `logits_fn(θ)` (equal to the Gauss-Newton matrix for softmax cross-entropy);
    L = loss_fn ∘ logits_fn. Needs `logits_fn=` and `loss_fn=`.

  CG (`secondorder.curvature.cg.conjugate_gradient`) stops after `cg_max_iterations`, when
  the residual falls below `cg_tol`·‖g‖, or by Martens' relative-progress rule on the
  damped model :math:`\phi(p) = \tfrac12 p^\top(C + \lambda I)p - g^\top p` (`progress_tol`
  = ε, look-back k = max(10, ⌊i/10⌋)). With `preconditioner` set, CG is
  preconditioned by :math:`M = (\mathrm{diag} + \lambda)^{0.75}`: "empirical_fisher" takes
  the diagonal of the empirical Fisher from `update(..., fisher_diag=...)`
  (`so.empirical_fisher_diag`), "squared_gradient" uses g ⊙ g instead.

  q(d) is the undamped model; ρ is computed for the full step d, whatever learning rate
  follows. With `reject_increase=True` a step that raises the loss (L(θ + d) > L(θ), so
  ρ < 0) is not taken: the update is zero, θ stays, λ grows by the ρ < ¼ rule and CG's warm
  start is the rejected solution (the trust-region practice of accepting only a decrease);
  the state's `rho` shows it. A step whose gradient, CG solution, model or candidate loss is not finite is
  skipped: the update is zero (NaN in the entries whose gradient is NaN or Inf, so that a
  non-finite gradient is not hidden; `optax.apply_if_finite` skips such steps before they
  reach this transform), `nonfinite_count` counts it, λ is raised and the warm start keeps
  the last finite solution. Everything runs under `jax.jit` in one `lax.while_loop`; the loss
  at the candidate costs one extra forward pass of the closure.

  Args:
    curvature: "gauss_newton", "hessian" or "fisher".
    initial_damping: λ at the first step, >= 0.
    adapt_damping: adapt λ by the Levenberg-Marquardt rule above (else λ stays fixed).
    damping_increase: the factor λ grows by when ρ < ¼ (Martens: 3/2), >= 1.
    damping_decrease: the factor λ shrinks by when ρ > ¾ (Martens: 2/3), in (0, 1].
    warm_start_decay: ζ, the fraction of the last solution CG starts from, in [0, 1].
    cg_max_iterations: the most CG iterations per step (static int >= 1).
    cg_tol: CG's relative residual tolerance, >= 0.
    progress_tol: ε of the relative-progress stopping rule; None turns it off.
    preconditioner: "none", "empirical_fisher" or "squared_gradient".
    preconditioner_power: the exponent of M (Martens: 0.75), >= 0.
    reject_increase: keep θ when the step would raise the loss (see above).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ScaleByHessianFreeState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, secondorder as so
    >>> x = jnp.ones((8, 3)); y = jnp.arange(8) % 2
    >>> logits_fn = lambda p: x @ p
    >>> loss_fn = so.softmax_cross_entropy(y)
    >>> tx = optax.chain(so.scale_by_hessian_free(), optax.scale_by_learning_rate(1.0))
    >>> params = jnp.zeros((3, 2)); state = tx.init(params)
    >>> grads = jax.grad(lambda p: loss_fn(logits_fn(p)))(params)
    >>> updates, state = tx.update(grads, state, params, logits_fn=logits_fn, loss_fn=loss_fn)

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010;
    Martens & Sutskever, "Training deep and recurrent networks with Hessian-free
    optimization", 2012; Schraudolph, "Fast curvature matrix-vector products for
    second-order gradient descent", 2002.
  """
  check_choice("curvature", curvature, CURVATURES)
  check_choice("preconditioner", preconditioner, PRECONDITIONERS)
  if not isinstance(reject_increase, bool):
    raise TypeError(f"reject_increase must be True or False, got {reject_increase!r}")
  check_range("initial_damping", initial_damping, 0.0)
  check_range("damping_increase", damping_increase, 1.0)
  check_range("damping_decrease", damping_decrease, 0.0, 1.0, low_inclusive=False)
  check_range("warm_start_decay", warm_start_decay, 0.0, 1.0)
  check_int("cg_max_iterations", cg_max_iterations, minimum=1)
  check_range("cg_tol", cg_tol, 0.0)
  if progress_tol is not None:
    check_range("progress_tol", progress_tol, 0.0)
  check_range("preconditioner_power", preconditioner_power, 0.0)

  def init_fn(params):
    check_float_leaves("scale_by_hessian_free", params, complex_ok=False)
    dtype = _scalar_dtype(params)
    return ScaleByHessianFreeState(
        count=jnp.zeros([], jnp.int32),
        damping=jnp.asarray(initial_damping, dtype),
        rho=jnp.zeros([], dtype),
        loss=jnp.zeros([], dtype),
        cg_iterations=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32),
        direction=_zeros_like_stats(params))

  def update_fn(updates, state, params=None, *, obj_fn=None, logits_fn=None, loss_fn=None,
                fisher_diag=None, **extra_args):
    del extra_args
    _check_update_inputs("scale_by_hessian_free", updates, state, params)
    objective, operator = _objective_and_curvature(curvature, params, obj_fn, logits_fn,
                                                   loss_fn)
    operator = _in_param_dtypes(operator, params)
    grads = jax.tree.map(lambda g, d: g.astype(d.dtype), updates, state.direction)
    damping = state.damping
    loss = objective(params).astype(damping.dtype)
    solution = _solve(
        operator, grads, damping, _warm_start(state.direction, warm_start_decay),
        _preconditioner(preconditioner, preconditioner_power, grads, damping, fisher_diag),
        max_iterations=cg_max_iterations, tol=cg_tol, progress_tol=progress_tol)
    p = solution.x
    # q(d) at d = −p, undamped: φ(p) − ½λ‖p‖².
    model = (solution.model_value - 0.5 * damping * tree_vdot(p, p)).astype(damping.dtype)
    candidate = jax.tree.map(lambda w, s: (w - s.astype(w.dtype)), params, p)
    candidate_loss = objective(candidate).astype(damping.dtype)
    # The gradient too: CG can stop at once on an Inf residual with a finite (warm-start)
    # solution, which would take a step that ignores the fault.
    ok = _all_finite(p, model, candidate_loss, grads)
    rho = jnp.where(ok, _reduction_ratio(loss, candidate_loss, model), 0.0).astype(
        damping.dtype)
    # A predicted decrease below 64 ulps of the loss cannot be measured by L(θ + d) − L(θ).
    resolvable = ((model >= 0)
                  | (-model > 64 * jnp.finfo(damping.dtype).eps * jnp.abs(loss)))
    new_damping = _levenberg_marquardt(damping, rho, adapt_damping, damping_increase,
                                       damping_decrease, ok,
                                       (tree_vdot(grads, grads) > 0) & resolvable)
    direction = _keep_if(ok, p, state.direction)
    # A skipped or rejected step is zero, except where the gradient itself is NaN or Inf:
    # 0·g keeps that fault in the update (like optax.adam), so that it is never hidden.
    taken = _accepted(ok, reject_increase, loss, candidate_loss)
    step = jax.tree.map(lambda x, g: jnp.where(taken, x, 0 * g), p, grads)
    return _as_updates(step, updates), ScaleByHessianFreeState(
        count=optax.safe_increment(state.count),
        damping=new_damping,
        rho=rho,
        loss=loss,
        cg_iterations=solution.iterations,
        nonfinite_count=jnp.where(ok, state.nonfinite_count,
                                  optax.safe_increment(state.nonfinite_count)),
        direction=direction)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hessian_free(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    curvature: str = "gauss_newton",
    initial_damping: float = 1.0,
    adapt_damping: bool = True,
    warm_start_decay: float = 0.95,
    cg_max_iterations: int = 50,
    cg_tol: float = 1e-6,
    progress_tol: float | None = 5e-4,
    preconditioner: str = "none",
    reject_increase: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Martens' Hessian-free optimizer: the damped truncated-Newton step, times a learning rate.

  .. math::
    \theta \leftarrow \theta - \eta\, p,\qquad p \approx (C + \lambda I)^{-1} g,

  with p from `scale_by_hessian_free` (see it for the curvatures, CG's stopping rules, the
  preconditioner and the Levenberg-Marquardt adaptation of λ). Keep η = 1 (the default):
  λ is adapted for the full step, so η < 1 only shortens steps that the damping already
  sizes. Weight decay belongs in the loss, where the curvature sees it.

  Args:
    learning_rate: η, a float or an optax schedule (default 1).
    (others): as in `scale_by_hessian_free`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, secondorder as so
    >>> a = jnp.array([[3., 1.], [1., 2.]]); b = jnp.array([1., -1.])
    >>> obj_fn = lambda p: 0.5 * p @ a @ p - b @ p
    >>> tx = so.hessian_free(curvature="hessian", initial_damping=0.0)
    >>> params = jnp.zeros(2); state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(obj_fn)(params), state, params, obj_fn=obj_fn)
    >>> params = params + updates              # the Newton step: a⁻¹ b

  References:
    Martens, "Deep learning via Hessian-free optimization", ICML 2010.
  """
  check_range("learning_rate", learning_rate, 0.0)
  return optax.chain(
      scale_by_hessian_free(
          curvature=curvature, initial_damping=initial_damping, adapt_damping=adapt_damping,
          warm_start_decay=warm_start_decay, cg_max_iterations=cg_max_iterations,
          cg_tol=cg_tol, progress_tol=progress_tol, preconditioner=preconditioner,
          reject_increase=reject_increase),
      optax.scale_by_learning_rate(learning_rate))


# ----------------------------------------------------------------------------------------
# Natural gradient
# ----------------------------------------------------------------------------------------


def _kl_budget_at(kl_budget, count) -> jax.Array:
  """δ at this step: the number, or the schedule evaluated at the step count."""
  return kl_budget(count) if callable(kl_budget) else jnp.asarray(kl_budget)


def _kl_step_size(direction_curvature, kl_budget, max_learning_rate) -> jax.Array:
  """η = min(sqrt(2δ / dᵀFd), η_max), so that ½η²dᵀFd = δ unless the cap binds."""
  positive = direction_curvature > 0
  eta = jnp.sqrt(2.0 * kl_budget / jnp.where(positive, direction_curvature, 1.0))
  return jnp.where(positive, jnp.minimum(eta, max_learning_rate), max_learning_rate)


def scale_by_natural_gradient(
    kl_budget: optax.ScalarOrSchedule = 1e-3,
    max_learning_rate: float = 1.0,
    damping: float = 1e-3,
    warm_start_decay: float = 0.0,
    cg_max_iterations: int = 20,
    cg_tol: float = 1e-6,
    progress_tol: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The natural gradient under a KL budget: (F + λI) d = g by CG, step ½η²dᵀFd = δ.

  .. math::
    d \approx (F + \lambda I)^{-1} g,\qquad
    \eta = \min\!\Big(\sqrt{\tfrac{2\delta}{d^\top F d}},\ \eta_{\max}\Big),\qquad
    u = \eta\, d,

  with F the true Fisher of the categorical distribution over the last axis of
  `logits_fn(θ)` (labels drawn from the model, computed exactly: `fisher_operator`), so the
  step θ − u changes the model's predictions by KL ≈ ½ uᵀFu = δ (the "normalized natural
  gradient"; for d = F⁻¹g, η = sqrt(2δ / gᵀF⁻¹g)). The transform returns u: follow it with
  `optax.scale(-1.0)` (as `natural_gradient` does). The state records the realised KL
  estimate ½η²dᵀFd (δ unless η_max binds), the Newton decrement sqrt(gᵀd) of the damped
  Fisher and the directional sharpness dᵀFd / ‖d‖². dᵀFd comes from the products CG
  already made, so a step costs one linearisation of `logits_fn` and one product per CG
  iteration (plus one for a warm start). A step whose gradient, Fisher products or solution
  are not finite is skipped (zero update, NaN in the entries of a NaN or Inf gradient, so that it
  is not hidden; `nonfinite_count` incremented, warm start kept).

  Args:
    kl_budget: δ > 0, a float or a schedule of the step count.
    max_learning_rate: η_max, the cap on η (> 0).
    damping: λ >= 0 added to F.
    warm_start_decay: the fraction of the last direction CG starts from, in [0, 1].
    cg_max_iterations: the most CG iterations per step (static int >= 1).
    cg_tol: CG's relative residual tolerance, >= 0.
    progress_tol: ε of Martens' relative-progress rule; None (default) turns it off.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` needs `logits_fn=`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, secondorder as so
    >>> x = jnp.ones((8, 3)); y = jnp.arange(8) % 2
    >>> logits_fn = lambda p: x @ p
    >>> tx = optax.chain(so.scale_by_natural_gradient(kl_budget=1e-2), optax.scale(-1.0))
    >>> params = jnp.zeros((3, 2)); state = tx.init(params)
    >>> grads = jax.grad(lambda p: so.softmax_cross_entropy(y)(logits_fn(p)))(params)
    >>> updates, state = tx.update(grads, state, params, logits_fn=logits_fn)
    >>> kl = optax.tree.get(state, "kl")

  References:
    Amari, "Natural gradient works efficiently in learning", 1998; Martens, "New insights
    and perspectives on the natural gradient method", JMLR 2020; Schulman et al., "Trust
    region policy optimization", 2015 (the KL-scaled step).
  """
  if not callable(kl_budget):
    check_range("kl_budget", kl_budget, 0.0)
  check_range("max_learning_rate", max_learning_rate, 0.0, low_inclusive=False)
  check_range("damping", damping, 0.0)
  check_range("warm_start_decay", warm_start_decay, 0.0, 1.0)
  check_int("cg_max_iterations", cg_max_iterations, minimum=1)
  check_range("cg_tol", cg_tol, 0.0)
  if progress_tol is not None:
    check_range("progress_tol", progress_tol, 0.0)

  def init_fn(params):
    check_float_leaves("scale_by_natural_gradient", params, complex_ok=False)
    dtype = _scalar_dtype(params)
    zero = jnp.zeros([], dtype)
    return ScaleByNaturalGradientState(
        count=jnp.zeros([], jnp.int32), step_size=zero, kl=zero, newton_decrement=zero,
        sharpness=zero, cg_iterations=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32), direction=_zeros_like_stats(params))

  def update_fn(updates, state, params=None, *, logits_fn=None, **extra_args):
    del extra_args
    _check_update_inputs("scale_by_natural_gradient", updates, state, params)
    logits_fn = require_extra_arg("scale_by_natural_gradient", "logits_fn", logits_fn,
                                  _LOGITS_EXAMPLE)
    operator = _in_param_dtypes(fisher_operator(logits_fn, params), params)
    grads = jax.tree.map(lambda g, d: g.astype(d.dtype), updates, state.direction)
    dtype = state.kl.dtype
    lam = jnp.asarray(damping, dtype)
    solution = _solve(operator, grads, lam, _warm_start(state.direction, warm_start_decay),
                      None, max_iterations=cg_max_iterations, tol=cg_tol,
                      progress_tol=progress_tol)
    d = solution.x
    dd = tree_vdot(d, d).astype(dtype)
    dfd = (tree_vdot(d, solution.ax) - lam * dd).astype(dtype)
    eta = _kl_step_size(dfd, _kl_budget_at(kl_budget, state.count).astype(dtype),
                        jnp.asarray(max_learning_rate, dtype))
    ok = _all_finite(d, dfd, grads)  # grads: as in scale_by_hessian_free
    stats = (eta, 0.5 * eta ** 2 * dfd,
             jnp.sqrt(jnp.maximum(tree_vdot(grads, d), 0.0)).astype(dtype),
             dfd / jnp.where(dd > 0, dd, 1.0))
    eta, kl, decrement, sharpness = (jnp.where(ok, s, 0.0).astype(dtype) for s in stats)
    # As in scale_by_hessian_free: a non-finite gradient shows in the skipped step (0·g).
    step = jax.tree.map(lambda x, g: jnp.where(ok, eta * x, 0 * g), d, grads)
    return _as_updates(step, updates), ScaleByNaturalGradientState(
        count=optax.safe_increment(state.count), step_size=eta, kl=kl,
        newton_decrement=decrement, sharpness=sharpness, cg_iterations=solution.iterations,
        nonfinite_count=jnp.where(ok, state.nonfinite_count,
                                  optax.safe_increment(state.nonfinite_count)),
        direction=_keep_if(ok, d, state.direction))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def natural_gradient(
    kl_budget: optax.ScalarOrSchedule,
    max_learning_rate: float = 1.0,
    damping: float = 1e-3,
    warm_start_decay: float = 0.0,
    cg_max_iterations: int = 20,
    cg_tol: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
  r"""Natural-gradient descent with a KL budget per step.

  .. math::
    \theta \leftarrow \theta - \eta\,d,\qquad d \approx (F + \lambda I)^{-1} g,\qquad
    \eta = \min\big(\sqrt{2\delta / d^\top F d},\ \eta_{\max}\big),

  `scale_by_natural_gradient` followed by `optax.scale(-1.0)`; see it for the Fisher, the
  state (realised KL, Newton decrement, directional sharpness) and the costs. δ plays the
  role of the learning rate: each step moves the predictions by about δ nats of KL.
  `update` needs `logits_fn=` (params -> logits of the batch, classes on the last axis).

  Args:
    kl_budget: δ > 0, a float or a schedule of the step count.
    (others): as in `scale_by_natural_gradient`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, secondorder as so
    >>> x = jnp.ones((8, 3)); y = jnp.arange(8) % 2
    >>> logits_fn = lambda p: x @ p
    >>> tx = so.natural_gradient(kl_budget=1e-2)
    >>> params = jnp.zeros((3, 2)); state = tx.init(params)
    >>> grads = jax.grad(lambda p: so.softmax_cross_entropy(y)(logits_fn(p)))(params)
    >>> updates, state = tx.update(grads, state, params, logits_fn=logits_fn)

  References:
    Amari, "Natural gradient works efficiently in learning", 1998; Martens, "New insights
    and perspectives on the natural gradient method", JMLR 2020.
  """
  return optax.chain(
      scale_by_natural_gradient(
          kl_budget=kl_budget, max_learning_rate=max_learning_rate, damping=damping,
          warm_start_decay=warm_start_decay, cg_max_iterations=cg_max_iterations,
          cg_tol=cg_tol),
      optax.scale(-1.0))
