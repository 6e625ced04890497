"""The shared contract, applied to every public transform and alias.

Adding a method to the library adds one `Case` to CASES (see tests/contract.py for the
fields). Plain optax optimizers are included as baselines: they show the checks themselves
are right.
"""

from __future__ import annotations

import optax
import pytest

from secondorder import capture
from secondorder.transforms.accumulate import (accumulated_adamw, accumulated_sgd,
                                               every_k_accumulate, every_k_gate,
                                               scale_by_adam_beta_tilde)
from secondorder.transforms.ekfac import ekfac, scale_by_ekfac
from secondorder.transforms.hessian_free import STATIC_ARGS as HESSIAN_FREE_STATIC_ARGS
from secondorder.transforms.hessian_free import (hessian_free, natural_gradient,
                                                 scale_by_hessian_free,
                                                 scale_by_natural_gradient)
from secondorder.transforms.hutchinson import adahessian, scale_by_hutchinson
from secondorder.transforms.kfac import kfac, scale_by_kfac_factors
from secondorder.transforms.kl_shampoo import STATIC_ARGS as KL_SHAMPOO_STATIC_ARGS
from secondorder.transforms.kl_shampoo import kl_shampoo, scale_by_kl_shampoo
from secondorder.transforms.shampoo import STATIC_ARGS as SHAMPOO_STATIC_ARGS
from secondorder.transforms.shampoo import shampoo, shampoo_preconditioner
from secondorder.transforms.soap import STATIC_ARGS as SOAP_STATIC_ARGS
from secondorder.transforms.soap import scale_by_soap, soap
from secondorder.transforms.sophia import sophia, sophia_clip
from tests import contract as C
from tests.contract import Case


def _with_lr(primitive):
  """A primitive followed by the learning rate, as a `make(learning_rate)` factory."""
  return lambda learning_rate: optax.chain(primitive(), optax.scale_by_learning_rate(learning_rate))


def _no_kfac_stats(problem, params):
  del problem, params
  return {"kfac_stats": capture.no_stats()}


_REG = C.REGRESSION_PROBLEMS
_KFAC_MASK_SKIP = {
    check: "layers= names fixed parameter paths of the whole model; under optax.masked the "
           "transform sees a partial tree, so build the layers for the masked-in model"
    for check in ("masked", "multi_transform")}
_SOPHIA_STEPS = {**C.DEFAULT_STEPS, "quadratic": 400, "matrix_quadratic": 400,
                 "mixed_pytree": 400, "rosenbrock": 2000}


def _cosine(peak, steps, rosenbrock):
  """Cosine decays from `peak` over `steps` on the three quadratics; `rosenbrock` as given."""
  sched = optax.cosine_decay_schedule(peak, steps)
  return {"quadratic": sched, "matrix_quadratic": sched, "mixed_pytree": sched,
          "rosenbrock": rosenbrock}

_ADAHESSIAN_LR = {"quadratic": 0.3, "matrix_quadratic": 0.3, "mixed_pytree": 0.3, "rosenbrock": 1.0}
_ADAHESSIAN_STEPS = {**C.DEFAULT_STEPS, "rosenbrock": 2000}

CASES: list[Case] = [
    # Baselines.
    Case("optax_adam", lambda learning_rate: optax.adam(learning_rate),
         lr={"quadratic": 0.05, "matrix_quadratic": 0.05, "mixed_pytree": 0.05, "rosenbrock": 0.05}),
    Case("optax_adam_logits", lambda learning_rate: optax.adam(learning_rate),
         extra_args=C.logits_fn_args, lr=0.1, problems=C.CLASSIFICATION_PROBLEMS,
         check_problem="mixed_classifier"),
    # AdaHessian.
    Case("scale_by_hutchinson", _with_lr(scale_by_hutchinson), extra_args=C.obj_fn_args,
         lr=_ADAHESSIAN_LR, steps=_ADAHESSIAN_STEPS, primitive=(scale_by_hutchinson, dict(b1=0.9, b2=0.999, eps=1e-4, hessian_power=1.0))),
    Case("adahessian", lambda learning_rate: adahessian(learning_rate), extra_args=C.obj_fn_args,
         lr=_ADAHESSIAN_LR, steps=_ADAHESSIAN_STEPS),
    # AdaHessian with dimension numbers: 3-D leaves are stacks of layers.
    Case("adahessian_stacked",
         lambda learning_rate: adahessian(
             learning_rate, weight_dimension_numbers=C.stacked_dimension_numbers),
         extra_args=C.obj_fn_args, lr=0.3, problems=("stacked_layers",),
         steps={"stacked_layers": 400},   # the checks: mixed_pytree's [2, 2, 2] leaf
         # Under inject_hyperparams a callable is a schedule: the alias gets the pytree.
         alias=(adahessian, dict(learning_rate=0.3, weight_dimension_numbers=(
             C.stacked_dimension_numbers(C.get_problem("mixed_pytree").params))))),
    # Sophia. Its clipped steps oscillate at a constant rate near a minimum: a cosine decay
    # (as in the paper) shows convergence on the quadratics.
    Case("sophia_clip_hutchinson", _with_lr(sophia_clip), extra_args=C.obj_fn_args, lr=0.05,
         steps=_SOPHIA_STEPS, converge_lr=_cosine(0.2, 400, rosenbrock=0.05),
         primitive=(sophia_clip, dict(b1=0.965, b2=0.99, gamma=0.01, eps=1e-12))),
    Case("sophia_clip_gnb", _with_lr(lambda: sophia_clip(estimator="gnb")),
         extra_args=C.logits_fn_args, lr=0.05, problems=C.CLASSIFICATION_PROBLEMS,
         check_problem="mixed_classifier"),
    Case("sophia", lambda learning_rate: sophia(learning_rate, weight_decay=0.0),
         extra_args=C.obj_fn_args, lr=0.05, steps=_SOPHIA_STEPS,
         converge_lr=_cosine(0.2, 400, rosenbrock=0.05),
         alias=(sophia, dict(learning_rate=0.05, weight_decay=0.0))),
    Case("sophia_gnb", lambda learning_rate: sophia(learning_rate, estimator="gnb", weight_decay=0.0),
         extra_args=C.logits_fn_args, lr=0.05, problems=C.CLASSIFICATION_PROBLEMS,
         check_problem="mixed_classifier"),
    # Shampoo. The primitive alone has no momentum and an RMSProp graft on vectors.
    Case("shampoo_preconditioner", _with_lr(lambda: shampoo_preconditioner(update_interval=2)),
         lr={"quadratic": 0.05, "matrix_quadratic": 0.1, "mixed_pytree": 0.1, "rosenbrock": 0.03},
         steps={**C.DEFAULT_STEPS, "mixed_pytree": 400, "rosenbrock": 3000},
         converge_lr={"mixed_pytree": optax.cosine_decay_schedule(0.1, 400),
                      "rosenbrock": optax.cosine_decay_schedule(0.03, 3000)},
         primitive=(shampoo_preconditioner, dict(beta2=0.999, eps=1e-6), SHAMPOO_STATIC_ARGS)),
    # The alias with padded root buckets, so that the contract covers that path too, and 3-D
    # leaves read as stacks of layers (mixed_pytree's [2, 2, 2] under every check); the
    # alias itself under inject_hyperparams.
    Case("shampoo", lambda learning_rate: shampoo(
             learning_rate, update_interval=2, root_bucket_ratio=4.0,
             weight_dimension_numbers=C.stacked_dimension_numbers),
         lr={"quadratic": 0.1, "matrix_quadratic": 0.1, "mixed_pytree": 0.1, "rosenbrock": 0.2,
             "stacked_layers": 0.1},
         problems=C.REGRESSION_PROBLEMS + ("stacked_layers",),
         steps={**C.DEFAULT_STEPS, "rosenbrock": 2000, "stacked_layers": 300},
         alias=(shampoo, dict(learning_rate=0.1, update_interval=2))),
    # SOAP: the first step only collects statistics; bases refreshed every other step.
    # Adam's usual b2 (the paper's 0.95 keeps a constant rate oscillating near a minimum).
    Case("scale_by_soap",
         _with_lr(lambda: scale_by_soap(b1=0.9, b2=0.999, precondition_frequency=2)),
         lr=0.05,
         primitive=(scale_by_soap, dict(b1=0.9, b2=0.99, eps=1e-8, precondition_frequency=2,
                                        block_size=4), SOAP_STATIC_ARGS)),
    # The alias reads 3-D leaves as stacked layers, and runs under inject_hyperparams itself.
    Case("soap", lambda learning_rate: soap(
             learning_rate, b1=0.9, b2=0.999, weight_decay=0.0, precondition_frequency=2,
             weight_dimension_numbers=C.stacked_dimension_numbers),
         lr=0.05, alias=(soap, dict(learning_rate=0.05, precondition_frequency=2))),
    # KL-Shampoo: the first step only collects statistics; bases refreshed every other step.
    Case("scale_by_kl_shampoo",
         _with_lr(lambda: scale_by_kl_shampoo(b1=0.9, b2=0.999, precondition_frequency=2)),
         lr=0.05, steps={**C.DEFAULT_STEPS, "mixed_pytree": 400},
         # The default estimates start at the gradient's scale: Adam-sized steps.
         converge_lr={"mixed_pytree": optax.cosine_decay_schedule(0.1, 400),
                      "matrix_quadratic": 0.5},
         primitive=(scale_by_kl_shampoo, dict(b1=0.9, b2=0.99, eps=1e-8,
                                              precondition_frequency=2, block_size=4),
                    KL_SHAMPOO_STATIC_ARGS)),
    # The alias reads 3-D leaves as stacked layers, and runs under inject_hyperparams itself.
    Case("kl_shampoo", lambda learning_rate: kl_shampoo(
             learning_rate, b1=0.9, b2=0.999, weight_decay=0.0, precondition_frequency=2,
             weight_dimension_numbers=C.stacked_dimension_numbers),
         lr=0.05, converge_lr={"matrix_quadratic": 0.5, "mixed_pytree": 0.2},
         alias=(kl_shampoo, dict(learning_rate=0.05, precondition_frequency=2))),
    # K-FAC on plain pytrees: every parameter on the diagonal fallback (RMS scaling, no
    # momentum in the primitive).
    Case("scale_by_kfac_factors",
         _with_lr(lambda: scale_by_kfac_factors(layers=capture.no_layers())),
         extra_args=_no_kfac_stats, lr=0.05,
         steps={**C.DEFAULT_STEPS, "quadratic": 600, "matrix_quadratic": 600,
                "mixed_pytree": 600, "rosenbrock": 3000},
         converge_lr=_cosine(0.05, 600, rosenbrock=optax.cosine_decay_schedule(0.03, 3000))),
    Case("kfac", lambda learning_rate: kfac(learning_rate, layers=capture.no_layers()),
         extra_args=_no_kfac_stats, lr=0.02, lr_is_last=False),
    # K-FAC with a covered layer: a linen Dense softmax regression and its capture.
    Case("kfac_dense", lambda learning_rate: kfac(learning_rate, layers=C.dense_layers()),
         extra_args=C.kfac_capture_args, lr=0.1, problems=("dense_softmax",),
         check_problem="dense_softmax", lr_is_last=False, skip=_KFAC_MASK_SKIP,
         alias=(kfac, dict(learning_rate=0.1, layers=C.dense_layers()))),
    Case("scale_by_kfac_factors_dense",
         _with_lr(lambda: scale_by_kfac_factors(layers=C.dense_layers())),
         extra_args=C.kfac_capture_args, lr=0.3, problems=("dense_softmax",),
         check_problem="dense_softmax", skip=_KFAC_MASK_SKIP),
    # EK-FAC: on plain pytrees every parameter is on the fallback, as K-FAC's; with the
    # covered Dense layer the capture returns the projected moments (contract.ekfac_capture_args).
    Case("scale_by_ekfac",
         _with_lr(lambda: scale_by_ekfac(layers=capture.no_layers())),
         extra_args=_no_kfac_stats, lr=0.05,
         steps={**C.DEFAULT_STEPS, "quadratic": 600, "matrix_quadratic": 600,
                "mixed_pytree": 600, "rosenbrock": 3000},
         converge_lr=_cosine(0.05, 600, rosenbrock=optax.cosine_decay_schedule(0.03, 3000))),
    Case("ekfac", lambda learning_rate: ekfac(learning_rate, layers=capture.no_layers()),
         extra_args=_no_kfac_stats, lr=0.05, lr_is_last=False,
         steps={**C.DEFAULT_STEPS, "quadratic": 600, "matrix_quadratic": 600,
                "mixed_pytree": 600, "rosenbrock": 3000},
         converge_lr=_cosine(0.05, 600, rosenbrock=optax.cosine_decay_schedule(0.03, 3000))),
    Case("ekfac_dense", lambda learning_rate: ekfac(learning_rate, layers=C.dense_layers()),
         extra_args=C.ekfac_capture_args, lr=0.1, problems=("dense_softmax",),
         check_problem="dense_softmax", lr_is_last=False, skip=_KFAC_MASK_SKIP,
         alias=(ekfac, dict(learning_rate=0.1, layers=C.dense_layers()))),
    # Hessian-free: Newton-CG (the Hessian of obj_fn) on the regression problems, the
    # Gauss-Newton matrix of softmax cross-entropy on the classifiers. Natural gradient:
    # the KL budget is the learning rate of the alias (steps scale as its square root).
    Case("scale_by_hessian_free", _with_lr(lambda: scale_by_hessian_free(curvature="hessian")),
         extra_args=C.obj_fn_args, lr=1.0, problems=("matrix_quadratic", "rosenbrock"),
         steps={"matrix_quadratic": 5, "rosenbrock": 100},
         primitive=(scale_by_hessian_free,
                    dict(curvature="hessian", initial_damping=0.5, warm_start_decay=0.9,
                         cg_max_iterations=10), HESSIAN_FREE_STATIC_ARGS)),
    Case("hessian_free", lambda learning_rate: hessian_free(learning_rate),
         extra_args=C.gauss_newton_args, lr=1.0, problems=("mixed_classifier",),
         steps=20, check_problem="mixed_classifier"),
    # Each step compiles a CG loop (several times an Adam step's compile): the primitive
    # case keeps the checks that differ from the alias's (the alias is the primitive and
    # optax.scale(-1) on the same problem).
    Case("scale_by_natural_gradient",
         _with_lr(lambda: scale_by_natural_gradient(kl_budget=0.05)),
         extra_args=C.logits_fn_args, lr=1.0, problems=(), check_problem="mixed_classifier",
         primitive=(scale_by_natural_gradient, dict(kl_budget=0.05, damping=1e-2),
                    HESSIAN_FREE_STATIC_ARGS),
         skip={check: "the natural_gradient case runs it on the same primitive and problem"
               for check in ("dtype_bf16", "dtype_f64", "multisteps", "apply_if_finite",
                             "masked", "multi_transform", "map_params")}),
    # damping 1e-2 (default 1e-3): at 1e-3 the CG solve on the check problem is so
    # ill-conditioned in float32 that two compilations of the same step (inside
    # MultiSteps or not) differ by 5e-5 relative, from rounding alone.
    Case("natural_gradient",
         lambda learning_rate: natural_gradient(learning_rate, damping=1e-2),
         extra_args=C.logits_fn_args, lr=0.05, lr_is_last=False,
         problems=C.CLASSIFICATION_PROBLEMS, steps=30, check_problem="mixed_classifier"),
    # Gradient accumulation inside the moments (an update every k = 2 calls). Their
    # schedules count real updates, not calls.
    Case("every_k_accumulate",
         lambda learning_rate: optax.chain(every_k_accumulate(2),
                                           every_k_gate(2, optax.scale_by_learning_rate(learning_rate))),
         lr={"quadratic": 0.1, "matrix_quadratic": 0.1, "mixed_pytree": 0.1, "rosenbrock": 0.2},
         lr_is_last=False, steps={**{k: 2 * v for k, v in C.DEFAULT_STEPS.items()}, "rosenbrock": 2000}),
    # The beta-tilde variant: Adam with β̃ = 1 − (1 − β)/k, gated to every k-th call.
    Case("scale_by_adam_beta_tilde",
         lambda learning_rate: optax.chain(
             scale_by_adam_beta_tilde(2),
             every_k_gate(2, optax.scale_by_learning_rate(learning_rate))),
         lr={"quadratic": 0.1, "matrix_quadratic": 0.1, "mixed_pytree": 0.1, "rosenbrock": 0.2},
         lr_is_last=False, steps={**{k: 2 * v for k, v in C.DEFAULT_STEPS.items()}, "rosenbrock": 2000}),
    Case("accumulated_adamw", lambda learning_rate: accumulated_adamw(learning_rate, 2, weight_decay=0.0),
         lr={"quadratic": 0.1, "matrix_quadratic": 0.1, "mixed_pytree": 0.1, "rosenbrock": 0.2},
         lr_is_last=False, steps={**{k: 2 * v for k, v in C.DEFAULT_STEPS.items()}, "rosenbrock": 2000}),
    Case("accumulated_sgd", lambda learning_rate: accumulated_sgd(learning_rate, 2, momentum=0.9),
         lr={"quadratic": 0.02, "matrix_quadratic": 0.02, "mixed_pytree": 0.02, "rosenbrock": 1e-3},
         lr_is_last=False,
         steps={"quadratic": 400, "matrix_quadratic": 400, "mixed_pytree": 400, "rosenbrock": 4000}),
]


def _params(cases):
  return [pytest.param(c, id=c.name) for c in cases]


@pytest.mark.parametrize("check", list(C.CHECKS))
@pytest.mark.parametrize("case", _params(CASES))
def test_contract(case: Case, check: str, request):
  if check in case.skip:
    pytest.skip(case.skip[check])
  if check in case.xfail:
    request.node.add_marker(pytest.mark.xfail(strict=True, reason=case.xfail[check]))
  C.CHECKS[check](case)


@pytest.mark.parametrize(
    "case,problem",
    [pytest.param(c, p, id=f"{c.name}-{p}") for c in CASES for p in c.problems])
def test_converges(case: Case, problem: str):
  C.check_converges(case, problem)
