"""Curvature toolkit: products, estimators and spectra on pytree parameters.

Pure functions of a loss, logits or outputs function and the parameters; each runs under
`jax.jit` and `jax.vmap` and, except `hessian_diag` (optax.second_order's exact diagonal,
for small models), never forms a matrix whose side is the number of parameters.
"""

from secondorder.curvature.cg import CGResult
from secondorder.curvature.cg import conjugate_gradient
from secondorder.curvature.estimators import empirical_fisher_diag
from secondorder.curvature.estimators import fisher_diag
from secondorder.curvature.estimators import gnb_diag
from secondorder.curvature.estimators import hessian_diag
from secondorder.curvature.estimators import hutchinson_diag
from secondorder.curvature.estimators import value_grad_and_gnb_diag
from secondorder.curvature.losses import softmax_cross_entropy
from secondorder.curvature.losses import squared_error
from secondorder.curvature.products import fisher_operator
from secondorder.curvature.products import fisher_vp
from secondorder.curvature.products import gauss_newton_operator
from secondorder.curvature.products import gnvp
from secondorder.curvature.products import hessian_operator
from secondorder.curvature.products import hvp
from secondorder.curvature.products import jvp
from secondorder.curvature.products import value_grad_hvp
from secondorder.curvature.products import vjp
from secondorder.curvature.spectrum import Eigenpairs
from secondorder.curvature.spectrum import NewtonDecrement
from secondorder.curvature.spectrum import directional_sharpness
from secondorder.curvature.spectrum import hutchinson_trace
from secondorder.curvature.spectrum import newton_decrement
from secondorder.curvature.spectrum import top_eigenvalues
