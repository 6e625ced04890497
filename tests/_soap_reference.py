"""SOAP for one array, transcribed step by step in NumPy float64 (the test's reference).

The order of operations is the one of the authors' implementation of "SOAP: Improving and
Stabilizing Shampoo using Adam" (Vyas et al., 2024):

1. The first call only collects statistics: every preconditioned axis i gets its factor
   ``H_i <- beta H_i + (1 - beta) G_(i) G_(i)^T`` and its basis ``Q_i`` from an
   eigendecomposition (eigenvalues in descending order); the update is zero.
2. Every later call (k = 1, 2, ...) rotates the gradient, ``G' = G x_1 Q_1 ... x_r Q_r``
   (each axis contracted with ``Q_i``, i.e. ``Q_L^T G Q_R`` for a matrix), runs Adam there
   with the moments kept in the rotated coordinates, ``N' = m / (sqrt(v) + eps)``, and returns
   ``sqrt(1 - b2^k) / (1 - b1^k) * N`` with ``N`` the rotation of ``N'`` back.
3. Then the factors take the gradient of this step, and when ``k`` is a multiple of the
   precondition frequency every basis is refreshed: its columns are sorted by the estimated
   eigenvalues ``diag(Q^T H Q)`` (descending; the second moment's entries along that axis are
   permuted the same way), and ``Q <- qr(H Q_sorted)``. The first moment is carried over to
   the new basis (rotated back with the old basis, forward with the new one).

One-sided SOAP, as the authors' code does it: an axis longer than ``max_precond_dim`` gets
no factor (an empty entry in its list of factors) and its rotation is the identity (the
projection moves the axis past unchanged); the eigendecomposition, the sort by estimated
eigenvalues, the permutation of the second moment and the QR skip it, while the array's other
axes are rotated as usual. Every axis of a 1-D array keeps the identity too (the code's
default ``precondition_1d=False``), so a vector, or an array with every axis too long, is
Adam with the first step skipped.
"""

from __future__ import annotations

import numpy as np


def _unfold_outer(g: np.ndarray, axis: int) -> np.ndarray:
  x = np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1)
  return x @ x.T


def _rotate(x: np.ndarray, bases: list, back: bool) -> np.ndarray:
  """Contracts every axis i with ``Q_i`` (forward: ``x_i -> Q_i^T x_i``; back: ``Q_i x_i``)."""
  for axis, q in enumerate(bases):
    if q is None:
      continue
    q = q if back else q.T
    x = np.moveaxis(np.tensordot(q, x, axes=([1], [axis])), 0, axis)
  return x


class SoapReference:
  """One array's SOAP state; ``step(g)`` returns the update direction (before -lr)."""

  def __init__(self, shape, *, b1=0.95, b2=0.95, shampoo_beta=None, eps=1e-8,
               precondition_frequency=10, max_precond_dim=10000):
    self.b1, self.b2, self.eps = b1, b2, eps
    self.beta = b2 if shampoo_beta is None else shampoo_beta
    self.frequency = precondition_frequency
    one_d = len(shape) <= 1
    self.factors = [None if (one_d or d > max_precond_dim) else np.zeros((d, d))
                    for d in shape]
    self.bases = None
    self.m = np.zeros(shape)
    self.v = np.zeros(shape)
    self.k = 0

  def _accumulate(self, g: np.ndarray) -> None:
    for i, h in enumerate(self.factors):
      if h is not None:
        self.factors[i] = self.beta * h + (1 - self.beta) * _unfold_outer(g, i)

  def _eigenbases(self) -> list:
    out = []
    for h in self.factors:
      if h is None:
        out.append(None)
        continue
      _, vecs = np.linalg.eigh(h)
      out.append(vecs[:, ::-1])  # descending eigenvalues
    return out

  def _power_qr(self) -> None:
    for i, (h, q) in enumerate(zip(self.factors, self.bases)):
      if h is None:
        continue
      estimates = np.einsum("ij,ik,kj->j", q, h, q)
      order = np.argsort(-estimates, kind="stable")
      self.v = np.take(self.v, order, axis=i)
      self.bases[i] = np.linalg.qr(h @ q[:, order])[0]

  def step(self, g) -> np.ndarray:
    g = np.asarray(g, np.float64)
    if self.bases is None:
      self._accumulate(g)
      self.bases = self._eigenbases()
      return np.zeros_like(g)
    self.k += 1
    rotated = _rotate(g, self.bases, back=False)
    self.m = self.b1 * self.m + (1 - self.b1) * rotated
    self.v = self.b2 * self.v + (1 - self.b2) * rotated ** 2
    direction = _rotate(self.m / (np.sqrt(self.v) + self.eps), self.bases, back=True)
    scale = np.sqrt(1 - self.b2 ** self.k) / (1 - self.b1 ** self.k)
    m_plain = _rotate(self.m, self.bases, back=True)
    self._accumulate(g)
    if self.k % self.frequency == 0:
      self._power_qr()
    self.m = _rotate(m_plain, self.bases, back=False)
    return scale * direction


def run(grads, **kwargs) -> list[np.ndarray]:
  """The updates of a fresh `SoapReference` on the sequence ``grads``."""
  ref = SoapReference(np.shape(grads[0]), **kwargs)
  return [ref.step(g) for g in grads]
