"""The shared contract, applied to every public transform and alias.

Adding a method to the library adds one `Case` to CASES (see tests/contract.py for the
fields). Plain optax optimizers are included as baselines: they show the checks themselves
are right.
"""

from __future__ import annotations

import optax
import pytest

from tests import contract as C
from tests.contract import Case

CASES: list[Case] = [
    # Baselines.
    Case("optax_adam", lambda learning_rate: optax.adam(learning_rate),
         lr={"quadratic": 0.05, "matrix_quadratic": 0.05, "mixed_pytree": 0.05, "rosenbrock": 0.05}),
    Case("optax_sgd_momentum", lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
         lr={"quadratic": 0.02, "matrix_quadratic": 0.02, "mixed_pytree": 0.02, "rosenbrock": 1e-3},
         steps={"quadratic": 200, "matrix_quadratic": 200, "mixed_pytree": 200, "rosenbrock": 2000}),
]


def _params(cases):
  return [pytest.param(c, id=c.name, marks=getattr(c, "marks", ())) for c in cases]


@pytest.mark.parametrize("check", list(C.CHECKS))
@pytest.mark.parametrize("case", _params(CASES))
def test_contract(case: Case, check: str):
  C.CHECKS[check](case)


@pytest.mark.parametrize(
    "case,problem",
    [pytest.param(c, p, id=f"{c.name}-{p}") for c in CASES for p in c.problems])
def test_converges(case: Case, problem: str):
  C.check_converges(case, problem)
