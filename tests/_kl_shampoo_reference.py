"""KL-Shampoo written out in NumPy for one block, step by step, with dense matrices.

A transcription of the algorithm of Lin et al. (ICLR 2026) in the order of the authors'
implementation, independent of the library's block plan and contractions: the other
factors' inverses enter as an explicit Kronecker product, and the direction as a dense
matrix acting on the flattened momentum. Axes without a factor (a dimension above
max_precond_dim) are the identity. Leaves without factors take Adam's bias-corrected step.

The eigenvalue estimates start either at a constant (`init_factor`, the authors' 0.1) or,
with `init_factor=None`, unset (zero) until a call's statistics set them: each factor of a
block with k factors takes (||G||^2 / N)^(1/k), the mean eigenvalue of its contribution
(computed with the other factors' inverses at the identity) to the power 1/k.
"""

from __future__ import annotations

import functools

import numpy as np


def _kron(mats):
  return functools.reduce(np.kron, mats, np.ones((1, 1)))


def _unfold(g: np.ndarray, i: int) -> np.ndarray:
  """The mode-i unfolding: axis i as rows, the other axes (in order) flattened as columns."""
  return np.moveaxis(g, i, 0).reshape(g.shape[i], -1)


class Block:
  """One block's state: factors H_i, bases Q_i, eigenvalue estimates d_i, momentum m."""

  def __init__(self, shape, factored, init_factor):
    self.shape = tuple(shape)
    self.factored = tuple(factored)
    self.init_factor = init_factor
    start = 0.0 if init_factor is None else init_factor
    self.h = [np.zeros((s, s)) if f else None for s, f in zip(shape, factored)]
    self.q = [np.eye(s) if f else None for s, f in zip(shape, factored)]
    self.d = [np.full(s, start) if f else None for s, f in zip(shape, factored)]
    self.m = np.zeros(shape)
    self.count = 0

  def _r(self, i, cap):
    """d_i^{-1/2}, capped at max(10, min(side, cap)); ones for an axis without a factor."""
    if not self.factored[i]:
      return np.ones(self.shape[i])
    r = np.where(self.d[i] > 0, 1.0 / np.sqrt(np.maximum(self.d[i], 1e-300)), 0.0)
    if cap is not None:
      r = np.minimum(r, max(10.0, min(self.shape[i], cap)))
    return r

  def _q(self, i):
    return self.q[i] if self.factored[i] else np.eye(self.shape[i])

  def step(self, g, *, b1, beta, eps, frequency, cap):
    """One call: the direction, then the statistics, then the basis refresh."""
    k = len(self.shape)
    first = self.count == 0
    r = [self._r(i, cap) for i in range(k)]
    # Estimates still to be set (init_factor None): all zero.
    unset = [self.init_factor is None and f and not np.any(self.d[i] > 0)
             for i, f in enumerate(self.factored)]
    # Direction from the state before this step: vec(U) = Q diag(p / (1 + eps p)) Q^T vec(M)
    # with Q = Q_1 (x) ... (x) Q_k and p = r_1 (x) ... (x) r_k (row-major flattening).
    if first:
      u = np.zeros(self.shape)
    else:
      self.m = b1 * self.m + (1 - b1) * g
      qk = _kron([self._q(i) for i in range(k)])
      p = _kron([x[:, None] for x in r])[:, 0]
      scale = p / (1 + eps * p)
      u = (qk @ (scale * (qk.T @ self.m.reshape(-1)))).reshape(self.shape)
    # Statistics: H_i <- beta H_i + (1 - beta) (s_i / N) G_(i) (kron_{j != i} H_j^{-1}) G_(i)^T
    # with H_j^{-1} = Q_j diag(r_j^2) Q_j^T (the identity before the first basis).
    n = g.size
    contributions = []
    for i in range(k):
      if not self.factored[i]:
        contributions.append(None)
        continue
      inverses = []
      for j in range(k):
        if j == i:
          continue
        if first or not self.factored[j] or unset[j]:
          inverses.append(np.eye(self.shape[j]))
        else:
          inverses.append(self.q[j] @ np.diag(r[j] ** 2) @ self.q[j].T)
      gi = _unfold(g, i)
      contributions.append(self.shape[i] / n * gi @ _kron(inverses) @ gi.T)
    n_factors = sum(self.factored)
    for i, c in enumerate(contributions):
      if c is None:
        continue
      diag = np.diag(self.q[i].T @ c @ self.q[i])
      self.h[i] = beta * self.h[i] + (1 - beta) * c
      if unset[i]:
        self.d[i] = np.full(self.shape[i], (np.trace(c) / self.shape[i]) ** (1 / n_factors))
      elif not first:
        self.d[i] = beta * self.d[i] + (1 - beta) * diag
    # Bases: eigenvectors (decreasing eigenvalue) on the first call, then every
    # `frequency` calls one step of power iteration Q <- qr(H Q), columns in order.
    for i in range(k):
      if not self.factored[i]:
        continue
      if first:
        self.q[i] = np.linalg.eigh(self.h[i])[1][:, ::-1]
      elif self.count % frequency == 0:
        self.q[i] = np.linalg.qr(self.h[i] @ self.q[i])[0]
    self.count += 1
    return u


class Diagonal:
  """A leaf without factors: Adam (bias-corrected), the first call a zero update."""

  def __init__(self, shape):
    self.m = np.zeros(shape)
    self.v = np.zeros(shape)
    self.count = 0

  def step(self, g, *, b1, b2, eps):
    first = self.count == 0
    self.count += 1
    if first:
      return np.zeros_like(g)
    self.m = b1 * self.m + (1 - b1) * g
    self.v = b2 * self.v + (1 - b2) * g * g
    k = self.count - 1
    return (self.m / (1 - b1 ** k)) / (np.sqrt(self.v / (1 - b2 ** k)) + eps)
