"""secondorder: curvature-aware optimizers for JAX as composable optax transformations.

The public API is flat::

  import secondorder as so
  tx = so.sophia(3e-4)                      # or any primitive inside optax.chain
  hv = so.hvp(loss_fn, params, v)           # curvature products on pytrees
"""

from secondorder._version import __version__
from secondorder import capture
from secondorder import closures
from secondorder import curvature
from secondorder import dimension_numbers
from secondorder import linalg
from secondorder.capture import KfacLayers
from secondorder.capture import LayerStats
from secondorder.capture import linen_capture
from secondorder.capture import nnx_capture
from secondorder.capture import no_layers
from secondorder.capture import no_new_stats
from secondorder.capture import no_stats
from secondorder.dimension_numbers import MuonDimensionNumbers
from secondorder.dimension_numbers import dimension_numbers_from_linen
from secondorder.dimension_numbers import dimension_numbers_from_nnx
from secondorder.closures import Forward
from secondorder.closures import linen_forward
from secondorder.closures import nnx_forward
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
from secondorder.transforms.accumulate import EveryKAccumulateState
from secondorder.transforms.accumulate import EveryKGateState
from secondorder.transforms.accumulate import accumulated_adamw
from secondorder.transforms.accumulate import accumulated_sgd
from secondorder.transforms.accumulate import beta_tilde
from secondorder.transforms.accumulate import every_k_accumulate
from secondorder.transforms.accumulate import every_k_gate
from secondorder.transforms.accumulate import scale_by_adam_beta_tilde
from secondorder.transforms.hessian_free import ScaleByHessianFreeState
from secondorder.transforms.hessian_free import ScaleByNaturalGradientState
from secondorder.transforms.hessian_free import hessian_free
from secondorder.transforms.hessian_free import natural_gradient
from secondorder.transforms.hessian_free import scale_by_hessian_free
from secondorder.transforms.hessian_free import scale_by_natural_gradient
from secondorder.transforms.hutchinson import ScaleByHutchinsonState
from secondorder.transforms.hutchinson import adahessian
from secondorder.transforms.hutchinson import scale_by_hutchinson
from secondorder.transforms.hutchinson import value_grad_and_hessian_diag
from secondorder.transforms.ekfac import ScaleByEkfacState
from secondorder.transforms.ekfac import ekfac
from secondorder.transforms.ekfac import ekfac_bases
from secondorder.transforms.ekfac import scale_by_ekfac
from secondorder.transforms.kfac import ScaleByKfacState
from secondorder.transforms.kfac import kfac
from secondorder.transforms.kfac import scale_by_kfac_factors
from secondorder.transforms.kl_shampoo import ScaleByKlShampooState
from secondorder.transforms.kl_shampoo import kl_shampoo
from secondorder.transforms.kl_shampoo import scale_by_kl_shampoo
from secondorder.transforms.shampoo import ShampooState
from secondorder.transforms.shampoo import shampoo
from secondorder.transforms.shampoo import shampoo_preconditioner
from secondorder.transforms.soap import ScaleBySoapState
from secondorder.transforms.soap import scale_by_soap
from secondorder.transforms.soap import soap
from secondorder.transforms.sophia import SophiaClipState
from secondorder.transforms.sophia import gnb_estimator
from secondorder.transforms.sophia import hutchinson_estimator
from secondorder.transforms.sophia import sophia
from secondorder.transforms.sophia import sophia_clip
from secondorder.transforms.sophia import value_grad_and_gnb_estimate
from secondorder.transforms.sophia import value_grad_and_hutchinson_estimate


# Every public name imported above, so that a name added to the imports is exported (and
# documented: the API reference is generated from this list). Submodules stay attributes.
__all__ = tuple(sorted(
    _name for _name, _value in dict(globals()).items()
    if not _name.startswith("_") and not isinstance(_value, type(linalg))))
