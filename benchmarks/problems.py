"""Benchmark problems: data that ships with installed packages (or is generated) plus models.

Every problem is a `Problem`: pure-function access to a model (params are a nested dict of
arrays, `nnx.to_pure_dict` of a Flax NNX module), a deterministic batch iterator, the loss,
the logits for classification-shaped losses (Sophia-G, Fisher products), a held-out loss and
a target loss for "steps / seconds to target". Nothing is downloaded at run time:

  * ``autoencoder``: deep MLP autoencoder on sklearn's digits, 64-128-32-8-32-128-64 with tanh,
    Bernoulli-logit reconstruction loss (the K-FAC paper's MNIST autoencoder, scaled down).
  * ``autoencoder_full``: the same autoencoder with every step on all 1500 training images, a
    deterministic objective (where L-BFGS's line search applies; `full` only).
  * ``digits_mlp`` / ``digits_cnn``: digit classification (10 classes) with an MLP and a
    small CNN on the 8x8 images.
  * ``lm``: the language-model race (`benchmarks.lm`): a byte-level decoder-only transformer
    with scanned layers and warm-up + cosine schedules, raced to AdamW's held-out loss.
  * ``char_transformer``: a small decoder-only transformer, character level, trained on the
    source text of a fixed list of pure-Python standard-library modules (`full` only).
  * ``quadratic``: an ill-conditioned Kronecker-structured matrix quadratic (sanity row).
  * ``rosenbrock``: the chained Rosenbrock function in 8 dimensions (sanity row).

Usage::

  from benchmarks.problems import get_problem
  prob = get_problem("digits_mlp")
  params = prob.init_params(0)
  batches = prob.batches(0)
  batch = next(batches)
  loss = prob.loss(params, batch)                       # scalar
  logits = prob.logits_fn(params, batch)                # [B, 10] (None if not classification)
  held_out = prob.eval_loss(params)                     # scalar on held-out data
  model = prob.bind(params)                             # an nnx.Module carrying params
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Params = Any
Batch = Any

__all__ = ["Problem", "PROBLEMS", "get_problem", "problem_names", "pure_model"]


@dataclasses.dataclass(frozen=True)
class Problem:
  """One benchmark problem.

  Attributes:
    name: short identifier used on the command line.
    description: one line for tables and `python -m benchmarks list`.
    init_params: ``seed -> params`` (nested dict of float32 arrays).
    batches: ``seed -> iterator of batches``; infinite, deterministic given the seed. Every
      batch has the same shapes (so a jitted step compiles once).
    loss: ``(params, batch) -> scalar`` mean loss on the batch.
    eval_loss: ``params -> scalar`` loss on held-out data (the training objective itself
      for the deterministic sanity problems).
    train_loss: ``params -> scalar`` loss on the whole training set (or a fixed large
      subsample of it).
    target_loss: the training loss that counts as "reached" for steps/time to target.
    steps: number of optimizer steps per preset, ``{"quick": n, "full": n}``.
    logits_fn: ``(params, batch) -> logits [..., C]`` for losses that are mean softmax
      cross-entropy of these logits against the batch's labels; None otherwise.
    logits_loss: ``(logits, batch) -> scalar`` with ``loss(p, b) ==
      logits_loss(logits_fn(p, b), b)`` (set with `logits_fn`).
    apply: ``(params, inputs) -> outputs``, the model as a pure function (None for the
      synthetic problems).
    make_model: ``seed -> nnx.Module`` (None for the synthetic problems).
    bind: ``params -> nnx.Module`` carrying these params (for capture-based statistics).
    inputs: ``batch -> model inputs``; labels: ``batch -> targets``.
    output_loss: ``(outputs, targets) -> scalar`` so that ``loss(p, b) ==
      output_loss(apply(p, inputs(b)), labels(b))`` (None for the synthetic problems).
    kind: "classification", "autoencoder", "language_model" or "synthetic".
    stochastic: False when every "batch" is the same deterministic objective.
    likelihood: the output distribution whose negative log-likelihood `output_loss` is
      ("softmax", "bernoulli"; for `secondorder.capture`), None for the synthetic problems.
    lr_sweep: optional ``{preset: (points, factor)}``: the learning-rate grid of every
      optimizer on this problem (`points` rates spaced by `factor` around each optimizer's
      centre); None: the preset's grid. The same for every optimizer either way.
    held_out: False when `eval_loss` is the training objective itself (the sanity problems):
      tables then show no separate held-out column value.
    schedule: optional ``total_steps -> (count -> multiplier)``: a shape (peak 1) that
      multiplies every optimizer's update on this problem (the language model's warm-up +
      cosine); None: constant.
    eval_every: held-out loss every this many steps (None: the preset's number of
      evaluations per run).
    baseline: the row that ratios and races compare against ("adam"; "adamw" for the
      language model).
    weight_dimension_numbers: optional ``params -> pytree of MuonDimensionNumbers | None``
      (the axes of stacked leaves) for methods that take it.
    in_quick: False for a problem that `python -m benchmarks quick` leaves out (unless named
      with --only).
    quick_rows: optional optimizer names: the only rows `quick` runs on this problem (the
      baseline among them); None: every row that applies.
  """

  name: str
  description: str
  init_params: Callable[[int], Params]
  batches: Callable[[int], Iterator[Batch]]
  loss: Callable[[Params, Batch], jax.Array]
  eval_loss: Callable[[Params], jax.Array]
  train_loss: Callable[[Params], jax.Array]
  target_loss: float | None
  steps: dict
  logits_fn: Callable[[Params, Batch], jax.Array] | None = None
  logits_loss: Callable[[jax.Array, Batch], jax.Array] | None = None
  apply: Callable[[Params, Any], jax.Array] | None = None
  make_model: Callable[[int], nnx.Module] | None = None
  bind: Callable[[Params], nnx.Module] | None = None
  inputs: Callable[[Batch], Any] | None = None
  labels: Callable[[Batch], Any] | None = None
  output_loss: Callable[[jax.Array, Any], jax.Array] | None = None
  kind: str = "classification"
  stochastic: bool = True
  likelihood: str | None = None
  lr_sweep: dict | None = None
  held_out: bool = True
  schedule: Callable[[int], Callable] | None = None
  eval_every: int | None = None
  baseline: str = "adam"
  weight_dimension_numbers: Callable[[Params], Any] | None = None
  in_quick: bool = True
  quick_rows: tuple[str, ...] | None = None


# ----------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """sklearn's 8x8 digits (1797 images, ships with scikit-learn), pixels in [0, 1].

  Fixed split: 1500 training images, 297 held out (a fixed permutation).
  """
  from sklearn.datasets import load_digits

  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  perm = np.random.RandomState(1234).permutation(len(x))
  x, y = x[perm], y[perm]
  return x[:1500], y[:1500], x[1500:], y[1500:]


# Pure-Python standard-library modules whose source is the character corpus. Present in every
# CPython install; the text changes only across Python versions.
_CORPUS_MODULES = ("textwrap", "string", "heapq", "bisect", "fnmatch", "shlex", "glob",
                   "colorsys", "calendar", "difflib", "fractions", "statistics", "queue",
                   "this")
_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # newline + printable ASCII


@functools.lru_cache(maxsize=None)
def _corpus() -> tuple[np.ndarray, np.ndarray]:
  """Character ids of the corpus, split 90% train / 10% held out (by position)."""
  import importlib
  import io
  import contextlib

  parts = []
  for name in _CORPUS_MODULES:
    try:
      with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen
        module = importlib.import_module(name)
      parts.append(inspect.getsource(module))
    except (ImportError, OSError, TypeError):
      continue
  text = "\n".join(parts)
  if len(text) < 20_000:  # no sources installed: fall back to a generated corpus
    import this  # noqa: F401
    zen = "".join(this.d.get(c, c) for c in this.s)
    text = (zen + "\n") * 40
  lookup = {c: i for i, c in enumerate(_VOCAB)}
  unknown = lookup["?"]
  ids = np.array([lookup.get(c, unknown) for c in text], dtype=np.int32)
  split = int(0.9 * len(ids))
  return ids[:split], ids[split:]


def _infinite_minibatches(arrays: tuple[np.ndarray, ...], batch_size: int,
                          seed: int) -> Iterator[tuple[jax.Array, ...]]:
  """Epochs of shuffled full minibatches (the remainder of each epoch is dropped)."""
  n = len(arrays[0])
  rng = np.random.RandomState(seed)
  while True:
    perm = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
      idx = perm[start:start + batch_size]
      yield tuple(jnp.asarray(a[idx]) for a in arrays)


# ----------------------------------------------------------------------------- models


class MLP(nnx.Module):
  """Dense layers with an activation between them (none after the last)."""

  def __init__(self, sizes: tuple[int, ...], activation: Callable = jnp.tanh, *,
               rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.activation = activation

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = self.activation(x)
    return x


class CNN(nnx.Module):
  """Two 3x3 convolutions (the second with stride 2) and a dense classifier, for 8x8 inputs."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 32, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], 8, 8, 1)
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    return self.head(x.reshape(x.shape[0], -1))


class Block(nnx.Module):
  """Pre-norm transformer block: causal multi-head self-attention and a GELU MLP.

  Attention projections are plain `nnx.Linear` layers (2-D kernels), so layer-wise methods
  (K-FAC, Shampoo) see ordinary dense layers.
  """

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.heads
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    att = jax.nn.softmax(jnp.where(causal, att, -1e9), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + self.proj(y)
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class CharTransformer(nnx.Module):
  """Decoder-only transformer over characters: token + learned position embeddings."""

  def __init__(self, vocab: int, context: int, dim: int, heads: int, layers: int, *,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (context, dim)))
    self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
    self.ln = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))


def pure_model(make: Callable[[int], nnx.Module]):
  """(init_params, apply, bind) for an NNX module factory, with params as pure dicts.

  Args:
    make: ``seed -> nnx.Module``.

  Returns:
    ``init_params(seed) -> params`` (``nnx.to_pure_dict`` of the module's state),
    ``apply(params, inputs) -> outputs`` and ``bind(params) -> nnx.Module``.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make(0)))

  def init_params(seed: int) -> Params:
    _, state = nnx.split(make(seed))
    return nnx.to_pure_dict(state)

  def bind(params: Params) -> nnx.Module:
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)

  def apply(params: Params, inputs):
    return bind(params)(inputs)

  return init_params, apply, bind


# ----------------------------------------------------------------------------- losses


def _softmax_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _bernoulli_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean per-pixel Bernoulli negative log-likelihood with logits (targets in [0, 1])."""
  return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def _fixed_batch(arrays: tuple[np.ndarray, ...]) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(a) for a in arrays)


# ----------------------------------------------------------------------------- problems


def _autoencoder() -> Problem:
  x_train, _, x_test, _ = _digits()
  sizes = (64, 128, 32, 8, 32, 128, 64)
  make = lambda seed: MLP(sizes, jnp.tanh, rngs=nnx.Rngs(seed))
  init_params, apply, bind = pure_model(make)
  inputs = lambda b: b[0]
  labels = lambda b: b[0]
  loss = lambda p, b: _bernoulli_logit(apply(p, b[0]), b[0])

  def logits_fn(p, b):
    # Each pixel as a 2-class softmax with logits (0, z): softmax CE of these equals the
    # Bernoulli-logit loss, so Sophia-G's Gauss-Newton-Bartlett estimator applies directly.
    z = apply(p, b[0])
    return jnp.stack([jnp.zeros_like(z), z], axis=-1)

  train, test = _fixed_batch((x_train,)), _fixed_batch((x_test,))
  return Problem(
      name="autoencoder",
      description="digits MLP autoencoder 64-128-32-8-32-128-64 tanh, Bernoulli-logit loss",
      init_params=init_params,
      batches=lambda seed: _infinite_minibatches((x_train,), 100, seed),
      loss=loss, eval_loss=lambda p: loss(p, test), train_loss=lambda p: loss(p, train),
      target_loss=0.30, steps={"quick": 150, "full": 2000},
      logits_fn=logits_fn,
      logits_loss=lambda logits, b: _bernoulli_logit(logits[..., 1], b[0]),
      apply=apply, make_model=make, bind=bind, inputs=inputs, labels=labels,
      output_loss=_bernoulli_logit, kind="autoencoder", likelihood="bernoulli")


def _autoencoder_full() -> Problem:
  # The whole training set as every batch: the objective is train_loss itself.
  problem = get_problem("autoencoder")
  x_train = _fixed_batch(_digits()[:1])

  def batches(seed):
    del seed
    while True:
      yield x_train

  return dataclasses.replace(
      problem, name="autoencoder_full",
      description="digits autoencoder as above, full batch (all 1500 training images)",
      batches=batches, stochastic=False, steps={"quick": 100, "full": 400}, in_quick=False)


def _classifier(name: str, make: Callable[[int], nnx.Module], description: str,
                target: float, steps: dict) -> Problem:
  x_train, y_train, x_test, y_test = _digits()
  init_params, apply, bind = pure_model(make)
  logits_fn = lambda p, b: apply(p, b[0])
  loss = lambda p, b: _softmax_ce(apply(p, b[0]), b[1])
  train, test = _fixed_batch((x_train, y_train)), _fixed_batch((x_test, y_test))
  return Problem(
      name=name, description=description, init_params=init_params,
      batches=lambda seed: _infinite_minibatches((x_train, y_train), 64, seed),
      loss=loss, eval_loss=lambda p: loss(p, test), train_loss=lambda p: loss(p, train),
      target_loss=target, steps=steps, logits_fn=logits_fn,
      logits_loss=lambda logits, b: _softmax_ce(logits, b[1]), apply=apply, make_model=make,
      bind=bind, inputs=lambda b: b[0], labels=lambda b: b[1], output_loss=_softmax_ce,
      kind="classification", likelihood="softmax")


def _digits_mlp() -> Problem:
  return _classifier(
      "digits_mlp", lambda seed: MLP((64, 128, 64, 10), jnp.tanh, rngs=nnx.Rngs(seed)),
      "digits classifier, MLP 64-128-64-10 tanh, softmax cross-entropy",
      target=0.10, steps={"quick": 150, "full": 1500})


def _digits_cnn() -> Problem:
  return _classifier(
      "digits_cnn", lambda seed: CNN(rngs=nnx.Rngs(seed)),
      "digits classifier, CNN conv3x3(16)-conv3x3/2(32)-dense(10), softmax cross-entropy",
      target=0.10, steps={"quick": 100, "full": 1500})


def _char_transformer(size: str = "full") -> Problem:
  train_ids, test_ids = _corpus()
  context, batch_size = 32, 32
  vocab = len(_VOCAB)
  # quick: 1 layer of width 32 (compiles in a fraction of the time); full: 2 layers, width 64.
  dim, layers = (32, 1) if size == "quick" else (64, 2)
  make = lambda seed: CharTransformer(vocab, context, dim=dim, heads=4, layers=layers,
                                      rngs=nnx.Rngs(seed))
  init_params, apply, bind = pure_model(make)

  def windows(ids: np.ndarray, starts: np.ndarray) -> tuple[jax.Array, jax.Array]:
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    chunk = ids[idx]
    return jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:])

  def batches(seed: int):
    rng = np.random.RandomState(seed)
    while True:
      yield windows(train_ids, rng.randint(0, len(train_ids) - context - 1, size=batch_size))

  # Fixed evaluation windows: 256 from the held-out text, 256 from the training text.
  eval_rng = np.random.RandomState(99)
  test = windows(test_ids, eval_rng.randint(0, len(test_ids) - context - 1, size=256))
  train = windows(train_ids, eval_rng.randint(0, len(train_ids) - context - 1, size=256))
  logits_fn = lambda p, b: apply(p, b[0])
  loss = lambda p, b: _softmax_ce(apply(p, b[0]), b[1])
  return Problem(
      name="char_transformer",
      description=(f"char-level decoder-only transformer ({layers} layer(s), d={dim}, 4 heads, "
                   f"context {context}) on Python stdlib source"),
      init_params=init_params, batches=batches, loss=loss,
      eval_loss=lambda p: loss(p, test), train_loss=lambda p: loss(p, train),
      target_loss=2.8, steps={"quick": 100, "full": 2000}, in_quick=False,
      logits_fn=logits_fn, logits_loss=lambda logits, b: _softmax_ce(logits, b[1]),
      apply=apply, make_model=make, bind=bind,
      inputs=lambda b: b[0], labels=lambda b: b[1], output_loss=_softmax_ce,
      kind="language_model", likelihood="softmax")


def _spd(n: int, condition: float, seed: int) -> np.ndarray:
  rng = np.random.RandomState(seed)
  q, _ = np.linalg.qr(rng.randn(n, n))
  eig = np.logspace(0.0, np.log10(condition), n)
  return (q * eig) @ q.T


# The sanity rows are cheap, and their best learning rates lie further from the network
# problems' than a narrow grid reaches: a wider grid there, the same for every optimizer.
_SYNTHETIC_SWEEP = {"quick": (5, 10.0), "full": (9, 10 ** 0.5)}


def _quadratic() -> Problem:
  # f(W) = 1/2 tr((W - W*)^T A (W - W*) B): Hessian A (x) B, condition number 1e3 overall;
  # a Kronecker-factored preconditioner (Shampoo, K-FAC) can undo it exactly.
  a = jnp.asarray(_spd(16, 10 ** 1.5, 0), jnp.float32)
  b = jnp.asarray(_spd(8, 10 ** 1.5, 1), jnp.float32)
  target = jnp.asarray(np.random.RandomState(2).randn(16, 8), jnp.float32)
  scale = 1e-3  # largest Hessian eigenvalue 1

  def objective(p):
    d = p["w"] - target
    return 0.5 * scale * jnp.sum(d * (a @ d @ b))

  def init_params(seed):
    return {"w": jnp.asarray(np.random.RandomState(seed).randn(16, 8) * 0.1, jnp.float32)}

  def batches(seed):
    while True:
      yield ()

  return Problem(
      name="quadratic",
      description="ill-conditioned matrix quadratic 16x8, Hessian A (x) B, condition 1e3",
      init_params=init_params, batches=batches, loss=lambda p, b: objective(p),
      eval_loss=objective, train_loss=objective, target_loss=1e-2,
      steps={"quick": 200, "full": 1000}, kind="synthetic", stochastic=False, held_out=False,
      lr_sweep=_SYNTHETIC_SWEEP)


def _rosenbrock() -> Problem:
  n = 8

  def objective(p):
    x = p["x"]
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)

  def init_params(seed):
    base = np.tile(np.array([-1.2, 1.0], np.float32), n // 2)
    return {"x": jnp.asarray(base + 0.05 * np.random.RandomState(seed).randn(n), jnp.float32)}

  def batches(seed):
    while True:
      yield ()

  return Problem(
      name="rosenbrock", description=f"chained Rosenbrock in {n} dimensions, start (-1.2, 1, ...)",
      init_params=init_params, batches=batches, loss=lambda p, b: objective(p),
      eval_loss=objective, train_loss=objective, target_loss=1e-2,
      steps={"quick": 300, "full": 3000}, kind="synthetic", stochastic=False, held_out=False,
      lr_sweep=_SYNTHETIC_SWEEP)


def _lm(size: str = "full") -> Problem:
  from benchmarks import lm

  return lm.lm_problem(LM_SIZES.get(size, size))


# The language model's size per preset (`--size` picks any of `benchmarks.lm.SIZES`).
LM_SIZES = {"quick": "tiny", "full": "cpu"}

# Registry: name -> factory (problems are built lazily; building one loads its data).
PROBLEMS: dict[str, Callable[[], Problem]] = {
    "lm": _lm,
    "autoencoder": _autoencoder,
    "autoencoder_full": _autoencoder_full,
    "digits_mlp": _digits_mlp,
    "digits_cnn": _digits_cnn,
    "char_transformer": _char_transformer,
    "quadratic": _quadratic,
    "rosenbrock": _rosenbrock,
}


def problem_names() -> list[str]:
  return list(PROBLEMS)


@functools.lru_cache(maxsize=None)
def get_problem(name: str, size: str = "full") -> Problem:
  """The problem called `name` (one of `problem_names()`).

  `size="quick"` gives the small variants used by `python -m benchmarks quick` (the
  transformers differ: the character transformer has 1 layer of width 32 instead of 2 of
  width 64, the language model is `benchmarks.lm.SIZES["tiny"]` instead of "cpu"). The
  language model also takes any key of `benchmarks.lm.SIZES` ("tiny", "cpu", "gpu").
  """
  from benchmarks import lm

  if name not in PROBLEMS:
    raise ValueError(f"unknown problem {name!r}; choose from {problem_names()}")
  allowed = ("quick", "full") + (tuple(lm.SIZES) if name == "lm" else ())
  if size not in allowed:
    raise ValueError(f"size of problem {name!r} must be one of {allowed}, got {size!r}")
  factory = PROBLEMS[name]
  return factory(size) if "size" in inspect.signature(factory).parameters else factory()
