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

from secondorder._validation import (check_choice, check_count, check_float_leaves,
                                     check_range, check_same_structure, require_extra_arg)
from secondorder.curvature.cg import CGResult, conjugate_gradient, tree_norm, tree_vdot
from secondorder.curvature.products import (fisher_operator, gauss_newton_operator,
                                            hessian_operator)

__all__ = ["ScaleByHessianFreeState", "ScaleByNaturalGradientState", "scale_by_hessian_free",
           "hessian_free", "scale_by_natural_gradient", "natural_gradient", "STATIC_ARGS",
           "CURVATURES", "PRECONDITIONERS"]

CURVATURES = ("gauss_newton", "hessian", "fisher")
PRECONDITIONERS = ("none", "squared_gradient", "empirical_fisher")

# Arguments that must be static under `optax.inject_hyperparams`: none (strings, bools and
# None are static there anyway; a traced `cg_max_iterations` is CG's traced loop bound).
# Kept so that `static_args=STATIC_ARGS` stays valid.
STATIC_ARGS = ()

# The documented bounds of the adapted damping λ (`min_damping`, `max_damping`), and the
# value an increase from λ = 0 goes to (clipped into the bounds): `initial_damping=0` gives
# exact Newton / Gauss-Newton steps until a step fails, then the adaptation starts from
# there at a mean loss's scale.
MIN_DAMPING = 1e-8
MAX_DAMPING = 1e8
DAMPING_FROM_ZERO = 1.0

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
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
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
  count: jax.Array  # type: ignore[assignment]  # a field named like tuple.count
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


def _check_damping_bounds(initial_damping, min_damping, max_damping) -> None:
  """0 < λ_min <= λ_max, and λ₀ = 0 or in [λ_min, λ_max] (concrete numbers only)."""
  check_range("min_damping", min_damping, 0.0, low_inclusive=False)
  check_range("max_damping", max_damping, 0.0, low_inclusive=False)
  check_range("initial_damping", initial_damping, 0.0)
  concrete = [isinstance(v, (int, float)) for v in (initial_damping, min_damping, max_damping)]
  if concrete[1] and concrete[2] and max_damping < min_damping:
    raise ValueError(f"max_damping must be >= min_damping = {min_damping!r}, got "
                     f"{max_damping!r}.")
  if all(concrete) and initial_damping != 0 and not (
      min_damping <= initial_damping <= max_damping):
    raise ValueError(f"initial_damping must be 0 or lie in [min_damping, max_damping] = "
                     f"[{min_damping!r}, {max_damping!r}], got {initial_damping!r}.")


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
  _check_logits(method, logits_fn, params)
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
  that λ grows until C + λI is positive definite along the directions CG explores. A ratio
  beyond the dtype's range (q(d) underflowing) is clipped to it: ρ in the state is finite."""
  predicted = model_reduction < 0
  rho = jnp.where(predicted, (candidate_loss - loss) / jnp.where(predicted, model_reduction,
                                                                 -1.0), 0.0)
  big = jnp.finfo(jnp.result_type(rho)).max
  return jnp.clip(rho, -big, big)


def _levenberg_marquardt(damping, rho, adapt: bool, increase, decrease, bounds, ok,
                         informative):
  """λ ← increase·λ when ρ < ¼ (or the step failed), λ ← decrease·λ when ρ > ¾, within
  `bounds` = (λ_min, λ_max).

  λ = 0 (`initial_damping=0`) stays 0 while the steps succeed; its first increase goes to
  `DAMPING_FROM_ZERO` (clipped into the bounds), from where the rule can act.
  `informative` is False at a stationary point (g = 0), where the step is zero whatever λ,
  and when the predicted decrease is below the loss's rounding (a few ulps of L(θ)), where ρ
  is rounding noise that would otherwise raise λ step after step: λ is kept. A step that
  predicts no decrease although g ≠ 0 (CG met negative curvature at once) has ρ = 0 and
  raises λ.
  """
  if not adapt:
    return damping
  low, high = (jnp.asarray(b, damping.dtype) for b in bounds)
  raised = jnp.clip(jnp.where(damping > 0, damping * increase, DAMPING_FROM_ZERO), low, high)
  lowered = jnp.where(damping > 0, jnp.clip(damping * decrease, low, high), damping)
  adapted = jnp.where(rho < 0.25, raised, jnp.where(rho > 0.75, lowered, damping))
  adapted = jnp.where(informative, adapted, damping)
  return jnp.where(ok, adapted, raised).astype(damping.dtype)


def _accepted(ok: jax.Array, min_rho, loss, candidate_loss, model) -> jax.Array:
  """Whether the step is taken: it is finite and, unless `min_rho` is None, its loss rises
  by no more than ρ_min·q(d), that is ρ >= ρ_min (a step the model predicts no decrease for,
  q(d) >= 0, may not raise the loss at all). A rejected step keeps θ; its ρ < ¼ raises λ."""
  if min_rho is None:
    return ok
  allowed = jnp.where(model < 0, min_rho * model, 0.0)
  return ok & (candidate_loss - loss <= allowed)


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
    min_rho: float | jax.Array | None = 0.0,
    min_damping: float = MIN_DAMPING,
    max_damping: float = MAX_DAMPING,
) -> optax.GradientTransformationExtraArgs:
  r"""Hessian-free Newton: (C + λI) p = g by conjugate gradient, λ by Levenberg-Marquardt.

  Each step, at parameters θ with gradient g (the incoming updates):

  .. math::
    p \approx (C + \lambda I)^{-1} g \quad\text{(CG from } \zeta\,p_{t-1}\text{)},\qquad
    d = -p,\qquad q(d) = g^\top d + \tfrac12 d^\top C d,\\
    \rho = \frac{L(\theta + d) - L(\theta)}{q(d)},\qquad
    \lambda \leftarrow \operatorname{clip}_{[\lambda_{\min}, \lambda_{\max}]}
    \begin{cases} \tfrac32\lambda & \rho < \tfrac14\\
    \tfrac23\lambda & \rho > \tfrac34\\ \lambda & \text{otherwise,}\end{cases}

  and the transform returns p (so `optax.scale_by_learning_rate(1.0)` after it takes the
  step d), or 0 when ρ < ρ_min (the step is rejected). C is never formed: CG uses products C v only,

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
  follows. λ stays in [`min_damping`, `max_damping`] (default [1e-8, 1e8]), so the state
  stays finite however long the rule pushes one way; `initial_damping=0` (exact Newton or
  Gauss-Newton steps) stays 0 while steps succeed, and its first increase goes to
  `DAMPING_FROM_ZERO` = 1 (clipped into the bounds).

  A step with ρ < `min_rho` is rejected: the update is zero, θ stays, λ grows by the ρ < ¼
  rule and CG's warm start is the rejected solution. The default ρ_min = 0 rejects a step
  that raises the loss (L(θ + d) > L(θ)), the trust-region practice of accepting only a
  decrease: it stops a run that has converged from taking one step along a nearly flat
  direction of C that multiplies the loss by orders of magnitude, and on mini-batches it
  keeps steps that overfit their batch from raising its loss (measured in
  docs/methods/hessian_free.md). ρ_min < 0 allows a rise of up to −ρ_min times the
  predicted decrease; `min_rho=None` takes every finite step (Martens' rule).
  `reject_increase=True` raises ρ_min to at least 0 (the default already is).
  The state's `rho` shows a rejected step. A step whose gradient, CG solution, model or
  candidate loss is not finite is skipped: the update is zero (NaN in the entries whose
  gradient is NaN or Inf, so that a non-finite gradient is not hidden;
  `optax.apply_if_finite` skips such steps before they reach this transform),
  `nonfinite_count` counts it, λ is raised and the warm start keeps the last finite
  solution. CG runs on g/‖g‖ with an overflow-safe norm, so a float32 gradient whose sum of
  squares overflows is solved, not stopped at iteration 0. Everything runs under `jax.jit`
  in one `lax.while_loop`; the loss at the candidate costs one extra forward pass of the
  closure.

  Args:
    curvature: "gauss_newton", "hessian" or "fisher".
    initial_damping: λ at the first step: 0, or in [`min_damping`, `max_damping`].
    adapt_damping: adapt λ by the Levenberg-Marquardt rule above (else λ stays fixed).
    damping_increase: the factor λ grows by when ρ < ¼ (Martens: 3/2), >= 1.
    damping_decrease: the factor λ shrinks by when ρ > ¾ (Martens: 2/3), in (0, 1].
    warm_start_decay: ζ, the fraction of the last solution CG starts from, in [0, 1].
    cg_max_iterations: the most CG iterations per step, an int >= 1 (may be injected by
      `optax.inject_hyperparams`: a traced count below 1 is clamped to 1).
    cg_tol: CG's relative residual tolerance, >= 0.
    progress_tol: ε of the relative-progress stopping rule; None turns it off.
    preconditioner: "none", "empirical_fisher" or "squared_gradient".
    preconditioner_power: the exponent of M (Martens: 0.75), >= 0.
    reject_increase: keep θ when the step would raise the loss at all: ρ_min at least 0
      (what the default ρ_min already does; kept for configurations that lower ρ_min).
    min_rho: ρ_min < 1, the least reduction ratio a step needs to be taken (default 0: no
      step that raises the loss); None takes every finite step (unless `reject_increase`).
    min_damping: λ_min > 0, the floor of the adapted λ (default 1e-8).
    max_damping: λ_max >= λ_min, the ceiling of the adapted λ (default 1e8).

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
  check_range("damping_increase", damping_increase, 1.0)
  check_range("damping_decrease", damping_decrease, 0.0, 1.0, low_inclusive=False)
  check_range("warm_start_decay", warm_start_decay, 0.0, 1.0)
  check_count("cg_max_iterations", cg_max_iterations)
  check_range("cg_tol", cg_tol, 0.0)
  if progress_tol is not None:
    check_range("progress_tol", progress_tol, 0.0)
  check_range("preconditioner_power", preconditioner_power, 0.0)
  _check_damping_bounds(initial_damping, min_damping, max_damping)
  if min_rho is not None:
    check_range("min_rho", min_rho, None, 1.0, high_inclusive=False)
  # The ratio a step needs: at least 0 with reject_increase, None takes every finite step.
  least_rho: float | jax.Array | None = min_rho
  if reject_increase:
    least_rho = 0.0 if min_rho is None else jnp.maximum(min_rho, 0.0)

  def init_fn(params):
    check_float_leaves("scale_by_hessian_free", params, complex_ok=False)
    dtype = _scalar_dtype(params)
    # Every leaf its own buffer (no array shared between fields), so the state can be donated.
    return ScaleByHessianFreeState(
        count=jnp.zeros([], jnp.int32),
        damping=jnp.array(initial_damping, dtype),  # a copy: an injected λ₀ is an array
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
    # q(d) at d = −p, undamped: φ(p) − ½λ‖p‖² (‖p‖ overflow-safe, squared last).
    p_norm = tree_norm(p)
    model = (solution.model_value - (0.5 * damping * p_norm) * p_norm).astype(damping.dtype)
    candidate = jax.tree.map(lambda w, s: (w - s.astype(w.dtype)), params, p)
    candidate_loss = objective(candidate).astype(damping.dtype)
    # The gradient too, so that a NaN or Inf gradient is counted whatever CG returns; and
    # the loss difference that decides acceptance (an overflow there is no decision).
    ok = _all_finite(p, model, candidate_loss, grads, candidate_loss - loss)
    rho = jnp.where(ok, _reduction_ratio(loss, candidate_loss, model), 0.0).astype(
        damping.dtype)
    # A predicted decrease below 64 ulps of the loss cannot be measured by L(θ + d) − L(θ).
    resolvable = ((model >= 0)
                  | (-model > 64 * jnp.finfo(damping.dtype).eps * jnp.abs(loss)))
    new_damping = _levenberg_marquardt(damping, rho, adapt_damping, damping_increase,
                                       damping_decrease, (min_damping, max_damping), ok,
                                       (tree_norm(grads) > 0) & resolvable)
    direction = _keep_if(ok, p, state.direction)
    # A skipped or rejected step is zero, except where the gradient itself is NaN or Inf:
    # 0·g keeps that fault in the update (like optax.adam), so that it is never hidden.
    taken = _accepted(ok, least_rho, loss, candidate_loss, model)
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
    min_rho: float | jax.Array | None = 0.0,
    min_damping: float = MIN_DAMPING,
    max_damping: float = MAX_DAMPING,
) -> optax.GradientTransformationExtraArgs:
  r"""Martens' Hessian-free optimizer: the damped truncated-Newton step, times a learning rate.

  .. math::
    \theta \leftarrow \theta - \eta\, p,\qquad p \approx (C + \lambda I)^{-1} g,

  with p from `scale_by_hessian_free` (see it for the curvatures, CG's stopping rules, the
  preconditioner and the Levenberg-Marquardt adaptation of λ). Keep η = 1 (the default):
  λ is adapted for the full step, so η < 1 only shortens steps that the damping already
  sizes. Weight decay belongs in the loss, where the curvature sees it. By default a step
  that raises the loss (ρ < 0) is rejected and λ stays in [1e-8, 1e8] (see
  `scale_by_hessian_free`).

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
          reject_increase=reject_increase, min_rho=min_rho, min_damping=min_damping,
          max_damping=max_damping),
      optax.scale_by_learning_rate(learning_rate))


# ----------------------------------------------------------------------------------------
# Natural gradient
# ----------------------------------------------------------------------------------------


def _kl_budget_at(kl_budget, count) -> jax.Array:
  """δ at this step: the number, or the schedule evaluated at the step count."""
  return kl_budget(count) if callable(kl_budget) else jnp.asarray(kl_budget)


def _kl_step_size(unit_curvature, d_norm, kl_budget, max_learning_rate) -> jax.Array:
  """η = min(sqrt(2δ / dᵀFd), η_max), so that ½η²dᵀFd = δ unless the cap binds.

  From d̂ᵀFd̂ (d̂ = d/‖d‖) and ‖d‖: η = sqrt(2δ / d̂ᵀFd̂) / ‖d‖, so that dᵀFd overflowing
  (a float32 gradient of 1e19 and above) does not decide η.
  """
  positive = unit_curvature > 0
  eta = jnp.sqrt(2.0 * kl_budget / jnp.where(positive, unit_curvature, 1.0)) / d_norm
  return jnp.where(positive, jnp.minimum(eta, max_learning_rate), max_learning_rate)


def _check_logits(method: str, logits_fn: Callable, params) -> None:
  """Raises unless `logits_fn(params)` has a class axis (the last), by its shape alone."""
  shape = jax.eval_shape(logits_fn, params).shape
  if len(shape) == 0:
    raise ValueError(
        f"{method}: logits_fn must return logits with the classes on the last axis, shape "
        f"[..., classes] (e.g. [batch, classes]); it returned a scalar (shape ()). For one "
        f"binary output z pass the 2-class logits jnp.stack([jnp.zeros_like(z), z], -1).")


def _unit(tree):
  """(tree / ‖tree‖, ‖tree‖), ‖·‖ overflow-safe; a zero or non-finite norm divides by 1."""
  norm = tree_norm(tree)
  safe = jnp.where((norm > 0) & jnp.isfinite(norm), norm, jnp.ones_like(norm))
  return jax.tree.map(lambda x: (x / safe).astype(x.dtype), tree), safe


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
    cg_max_iterations: the most CG iterations per step, an int >= 1 (may be injected: a
      traced count below 1 is clamped to 1).
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
    check_range("kl_budget", kl_budget, 0.0, low_inclusive=False)
  check_range("max_learning_rate", max_learning_rate, 0.0, low_inclusive=False)
  check_range("damping", damping, 0.0)
  check_range("warm_start_decay", warm_start_decay, 0.0, 1.0)
  check_count("cg_max_iterations", cg_max_iterations)
  check_range("cg_tol", cg_tol, 0.0)
  if progress_tol is not None:
    check_range("progress_tol", progress_tol, 0.0)

  def init_fn(params):
    check_float_leaves("scale_by_natural_gradient", params, complex_ok=False)
    dtype = _scalar_dtype(params)
    zero = lambda: jnp.zeros([], dtype)  # every field its own buffer (the state can be donated)
    return ScaleByNaturalGradientState(
        count=jnp.zeros([], jnp.int32), step_size=zero(), kl=zero(), newton_decrement=zero(),
        sharpness=zero(), cg_iterations=jnp.zeros([], jnp.int32),
        nonfinite_count=jnp.zeros([], jnp.int32), direction=_zeros_like_stats(params))

  def update_fn(updates, state, params=None, *, logits_fn=None, **extra_args):
    del extra_args
    _check_update_inputs("scale_by_natural_gradient", updates, state, params)
    logits_fn = require_extra_arg("scale_by_natural_gradient", "logits_fn", logits_fn,
                                  _LOGITS_EXAMPLE)
    _check_logits("scale_by_natural_gradient", logits_fn, params)
    operator = _in_param_dtypes(fisher_operator(logits_fn, params), params)
    grads = jax.tree.map(lambda g, d: g.astype(d.dtype), updates, state.direction)
    dtype = state.kl.dtype
    lam = jnp.asarray(damping, dtype)
    solution = _solve(operator, grads, lam, _warm_start(state.direction, warm_start_decay),
                      None, max_iterations=cg_max_iterations, tol=cg_tol,
                      progress_tol=progress_tol)
    d = solution.x
    # On the unit direction d̂ = d/‖d‖ (norms overflow-safe): c = d̂ᵀFd̂ = d̂ᵀ(F + λI)d̂ − λ‖d̂‖².
    d_hat, d_norm = _unit(d)
    ax_hat = jax.tree.map(lambda y: (y / d_norm).astype(y.dtype), solution.ax)
    dd_hat = tree_vdot(d_hat, d_hat).astype(dtype)
    c = (tree_vdot(d_hat, ax_hat) - lam * dd_hat).astype(dtype)
    d_norm = d_norm.astype(dtype)
    eta = _kl_step_size(c, d_norm, _kl_budget_at(kl_budget, state.count).astype(dtype),
                        jnp.asarray(max_learning_rate, dtype))
    ok = _all_finite(d, c, grads)  # grads: as in scale_by_hessian_free
    g_hat, g_norm = _unit(grads)
    gd_hat = jnp.maximum(tree_vdot(g_hat, d_hat), 0.0).astype(dtype)
    stats = (eta, 0.5 * (eta * d_norm) ** 2 * c,
             jnp.sqrt(g_norm.astype(dtype)) * jnp.sqrt(d_norm) * jnp.sqrt(gd_hat),
             c / jnp.where(dd_hat > 0, dd_hat, 1.0))
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
