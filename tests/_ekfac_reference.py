"""EK-FAC in NumPy, built densely: the Kronecker eigenbasis as a full matrix Q = Q_A ⊗ Q_S,
the diagonal from per-example gradients in the parameters' basis projected by Q."""

from __future__ import annotations

import numpy as np


def mlp_rows(params: dict, x: np.ndarray, labels: np.ndarray) -> list:
  """`[(a, g)]` per Dense layer of a tanh MLP with a softmax cross-entropy averaged over
  the M = len(x) examples: the inputs with a trailing 1 `[M, in + 1]` and the gradients of
  the mean loss with respect to the layer's outputs `[M, out]`, by hand."""
  names = sorted(params)
  acts, h = [], x
  for i, name in enumerate(names):
    acts.append(np.concatenate([h, np.ones((len(h), 1))], axis=1))
    z = h @ params[name]["kernel"] + params[name]["bias"]
    h = np.tanh(z) if i < len(names) - 1 else z
  p = np.exp(h - h.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  g = (p - np.eye(h.shape[1])[labels]) / len(x)
  out = []
  for i in reversed(range(len(names))):
    out.append((acts[i], g))
    if i:
      g = (g @ params[names[i]]["kernel"].T) * (1 - acts[i][:, :-1] ** 2)
  return out[::-1]


def factors(a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """K-FAC's A = mean aaᵀ and S = M Σ ggᵀ of one batch."""
  return a.T @ a / len(a), len(a) * g.T @ g


def kron_basis(a_factor: np.ndarray, s_factor: np.ndarray) -> np.ndarray:
  """Q = Q_A ⊗ Q_S (columns), for a layer's gradient flattened row-major from `[in, out]`."""
  return np.kron(np.linalg.eigh(a_factor)[1], np.linalg.eigh(s_factor)[1])


def projected_diagonal(q: np.ndarray, per_example: np.ndarray, m: int) -> np.ndarray:
  """`(1/M) Σ_n (Qᵀ vec(M g_n))²`: the Fisher's diagonal in the basis Q, from the examples'
  contributions g_n `[N, in, out]` to the gradient of the mean loss."""
  v = (m * per_example.reshape(len(per_example), -1)) @ q
  return (v ** 2).sum(0) / m


def precondition(q: np.ndarray, diagonal: np.ndarray, grad: np.ndarray,
                 damping: float) -> np.ndarray:
  """`Q diag(1 / (d + λ)) Qᵀ vec(G)` as a dense matrix product, back to G's shape."""
  p = q @ np.diag(1.0 / (diagonal + damping)) @ q.T
  return (p @ grad.reshape(-1)).reshape(grad.shape)
