"""The language-model race: a small decoder-only transformer on bytes of Python source.

The headline problem of the benchmarks. Everything ships offline: the corpus is the source of
the Python standard library that runs the benchmark (its top-level ``*.py`` files), read as
bytes (vocabulary 256), split into training and validation *by file* with a fixed hash of the
file name, so no file contributes to both halves.

The model (`DecoderLM`) is a pre-norm decoder-only transformer in Flax NNX: token and
learned position embeddings, ``layers`` identical blocks (RMSNorm, causal multi-head
self-attention, RMSNorm, a GELU MLP) created with ``nnx.vmap`` and applied with ``nnx.scan``,
so every block parameter is one leaf with a leading layer axis ``[layers, ...]``; a final
RMSNorm and a head tied to the token embedding (``embed.attend``). The attention and MLP
kernels are plain ``nnx.Linear`` layers: a stacked kernel ``[layers, d_in, d_out]`` reads as
``layers`` independent matrices under ``MuonDimensionNumbers(reduction_axis=1,
output_axis=2)`` (`weight_dimension_numbers`).

Every optimizer trains it under the same warm-up + cosine shape (`schedule`): linear warm-up
over the first ``warmup`` fraction of the steps, cosine decay to ``final_fraction`` of the
peak. The harness multiplies each optimizer's update by this shape, which for every method
whose learning rate scales its final update is exactly a warm-up + cosine learning-rate
schedule. Validation loss is measured every ``eval_every`` steps on a fixed set of windows.

API::

  from benchmarks import lm

  config = lm.SIZES["cpu"]                      # an LMConfig; lm.SIZES["gpu"] for a larger one
  data = lm.ByteCorpus.load()                   # train / validation bytes, split by file
  model = lm.DecoderLM(config, rngs=nnx.Rngs(0))
  logits = model(tokens)                        # tokens int32 [B, T] -> [B, T, 256]
  problem = lm.lm_problem("cpu")                # a benchmarks.problems.Problem
  params = problem.init_params(0); batch = next(problem.batches(0))
  problem.loss(params, batch); problem.eval_loss(params)
  dims = lm.weight_dimension_numbers(params)    # MuonDimensionNumbers per leaf (None: not a matrix)

``python -m benchmarks full --only lm`` races every optimizer on it (``--size gpu`` for the
larger model); ``python -m benchmarks.lm --size cpu --steps 200`` trains AdamW alone and
prints the validation curve.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sysconfig
import zlib
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers

__all__ = ["LMConfig", "SIZES", "QUICK_ROWS", "ByteCorpus", "Block", "DecoderLM", "schedule",
           "lm_problem", "weight_dimension_numbers", "VOCAB", "is_validation_file",
           "parameter_count"]

VOCAB = 256  # bytes

# The rows `python -m benchmarks quick` races (the full preset runs every row), kept few for
# quick's 5-minute budget: the baseline, the library's Kronecker and Fisher methods, and Muon.
QUICK_ROWS = ("adamw", "shampoo", "kfac", "muon")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Sizes of the model, the data pipeline and the run.

  Attributes:
    context: tokens per training window.
    dim: model width; heads: attention heads (``dim % heads == 0``); layers: blocks.
    mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    batch_size: windows per training batch.
    steps: optimizer steps of a run.
    warmup: fraction of the steps spent warming up linearly from 0.
    final_fraction: the cosine's end value as a fraction of the peak.
    eval_every: steps between validation-loss measurements.
    eval_windows: fixed validation windows (and as many fixed training windows).
  """

  context: int = 64
  dim: int = 64
  heads: int = 4
  layers: int = 2
  mlp_ratio: int = 4
  batch_size: int = 16
  steps: int = 400
  warmup: float = 0.05
  final_fraction: float = 0.1
  eval_every: int = 25
  eval_windows: int = 64

  def __post_init__(self):
    for name in ("context", "dim", "heads", "layers", "mlp_ratio", "batch_size", "steps",
                 "eval_every", "eval_windows"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"LMConfig.{name} must be a positive integer, got {value!r}")
    if self.dim % self.heads:
      raise ValueError(f"LMConfig.dim ({self.dim}) must be a multiple of heads ({self.heads})")
    if not 0.0 <= self.warmup < 1.0:
      raise ValueError(f"LMConfig.warmup must be in [0, 1), got {self.warmup!r}")
    if not 0.0 <= self.final_fraction <= 1.0:
      raise ValueError(f"LMConfig.final_fraction must be in [0, 1], got {self.final_fraction!r}")


# "tiny": the quick preset and the tests; "cpu": the race on 2 CPU cores; "gpu": the same race
# scaled for one accelerator. At "cpu" a 200-step run takes 10-16 s on a quiet 2-core machine
# (compile included), so `full`'s race, 22 rows of about 10 runs each (sweep, extensions,
# the second setting, 3 seeds), takes well over an hour there: race a few rows with --only.
SIZES: dict[str, LMConfig] = {
    "tiny": LMConfig(context=32, dim=32, heads=2, layers=2, batch_size=8, steps=120,
                     eval_every=20, eval_windows=32),
    "cpu": LMConfig(),
    "gpu": LMConfig(context=256, dim=384, heads=6, layers=6, batch_size=64, steps=2000,
                    eval_every=100, eval_windows=256),
    # The size ladder's ends (`benchmarks.ladder`; "cpu" is its middle): 35,296 and 345,744
    # parameters, heads of width 16 at every size. Steps and evaluations are set per run.
    "small": LMConfig(context=64, dim=32, heads=2, layers=2, batch_size=8, eval_windows=128),
    "large": LMConfig(context=128, dim=112, heads=7, layers=2, batch_size=16,
                      eval_windows=128),
}


# ----------------------------------------------------------------------------- data


def is_validation_file(name: str) -> bool:
  """One file in ten, chosen by a fixed hash of its name (the same on every machine)."""
  return zlib.crc32(name.encode()) % 10 == 0


_is_validation = is_validation_file  # the name the corpus tests read


@dataclasses.dataclass(frozen=True)
class ByteCorpus:
  """The standard library's top-level sources as bytes, split into halves by file.

  Attributes:
    train: uint8 bytes of the training files, concatenated in name order.
    validation: uint8 bytes of the validation files, concatenated in name order.
    train_files / validation_files: the file names in each half.
  """

  train: np.ndarray
  validation: np.ndarray
  train_files: tuple[str, ...]
  validation_files: tuple[str, ...]

  @staticmethod
  @functools.lru_cache(maxsize=None)
  def load(directory: str | None = None) -> "ByteCorpus":
    """Reads every top-level ``*.py`` file of ``directory`` (default: the stdlib's).

    Args:
      directory: a folder of Python sources; None reads the running interpreter's standard
        library.

    Returns:
      The corpus; raises ValueError when either half would be empty.
    """
    directory = directory or sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(directory)
                   if n.endswith(".py") and os.path.isfile(os.path.join(directory, n)))
    halves: dict[bool, list[bytes]] = {False: [], True: []}
    files: dict[bool, list[str]] = {False: [], True: []}
    for name in names:
      with open(os.path.join(directory, name), "rb") as f:
        halves[is_validation_file(name)].append(f.read())
      files[is_validation_file(name)].append(name)
    if not files[False] or not files[True]:
      raise ValueError(f"directory {directory!r} has too few .py files to split by file "
                       f"({len(names)} found)")
    as_array = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    return ByteCorpus(as_array(halves[False]), as_array(halves[True]),
                      tuple(files[False]), tuple(files[True]))


def parameter_count(config: LMConfig) -> int:
  """The number of parameters of `DecoderLM(config)` (tied head: the embedding counts once).

  Per block: the attention's ``4 d^2`` kernels, the MLP's ``2 m d`` kernels and ``m + d``
  biases, two RMSNorm scales; plus the token and position embeddings and the final norm.
  """
  d, m = config.dim, config.mlp_ratio * config.dim
  block = 4 * d * d + 2 * m * d + m + d + 2 * d
  return config.layers * block + (VOCAB + config.context) * d + d


def _windows(data: np.ndarray, starts: np.ndarray, context: int) -> tuple[jax.Array, jax.Array]:
  """(inputs, next-byte targets), each int32 [len(starts), context]."""
  idx = starts[:, None] + np.arange(context + 1)[None, :]
  chunk = data[idx].astype(np.int32)
  return jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:])


def batches(data: np.ndarray, config: LMConfig, seed: int) -> Iterator[tuple[jax.Array, jax.Array]]:
  """Endless batches of random windows of `data`, deterministic given `seed`."""
  rng = np.random.RandomState(seed)
  while True:
    starts = rng.randint(0, len(data) - config.context - 1, size=config.batch_size)
    yield _windows(data, starts, config.context)


def fixed_windows(data: np.ndarray, config: LMConfig, seed: int) -> tuple[jax.Array, jax.Array]:
  """``config.eval_windows`` windows of `data` at fixed, evenly spread positions."""
  del seed  # evenly spread: the same windows for every run
  starts = np.linspace(0, len(data) - config.context - 2, config.eval_windows).astype(np.int64)
  return _windows(data, starts, config.context)


# ----------------------------------------------------------------------------- model


class Block(nnx.Module):
  """Pre-norm block: causal multi-head self-attention, then a GELU MLP, each residual.

  .. math::

    h = x + W_o\\,\\mathrm{attn}(\\mathrm{rms}(x) W_{qkv}), \\qquad
    y = h + W_2\\,\\mathrm{gelu}(\\mathrm{rms}(h) W_1)
  """

  def __init__(self, config: LMConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    d, m = config.dim, config.mlp_ratio * config.dim
    self.heads = config.heads
    kw = dict(param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
    self.norm1 = nnx.RMSNorm(d, **kw)
    self.qkv = nnx.Linear(d, 3 * d, use_bias=False, **kw)
    self.proj = nnx.Linear(d, d, use_bias=False, **kw)
    self.norm2 = nnx.RMSNorm(d, **kw)
    self.fc1 = nnx.Linear(d, m, **kw)
    self.fc2 = nnx.Linear(m, d, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    h = self.heads
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    x = x + self.proj(y)
    return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class DecoderLM(nnx.Module):
  """Decoder-only transformer over bytes, blocks stacked on a layer axis and scanned.

  .. math::

    x_0 = E[\\text{tokens}] + P[0{:}T], \\quad x_{l+1} = \\mathrm{block}_l(x_l), \\quad
    \\text{logits} = \\mathrm{rms}(x_L) E^\\top

  Args:
    config: the sizes (`LMConfig`).
    param_dtype: dtype of the parameters and of the computation (float32; float64 in the
      tests' comparison with an unrolled copy).
    rngs: the parameter initialisation's random streams.

  Example::

    model = DecoderLM(SIZES["tiny"], rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((2, 32), jnp.int32))   # [2, 32, 256]
  """

  def __init__(self, config: LMConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    kw = dict(param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
    # Small embeddings (std 0.02): the tied head's logits start near zero, so the loss at
    # initialisation is close to log(256).
    small = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(VOCAB, config.dim, embedding_init=small, **kw)
    self.pos = nnx.Embed(config.context, config.dim, embedding_init=small, **kw)

    @nnx.split_rngs(splits=config.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return Block(config, param_dtype=param_dtype, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.norm = nnx.RMSNorm(config.dim, **kw)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[1]))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def through(x, block):
      return block(x)

    x = through(x, self.blocks)
    return self.embed.attend(self.norm(x))


def weight_dimension_numbers(params) -> object:
  """The dimension numbers of the stacked blocks; None for the unstacked leaves.

  Args:
    params: the model's params as a pure dict (``nnx.to_pure_dict``).

  Returns:
    A pytree of the params' structure: each ``[layers, d_in, d_out]`` kernel of a block is
    ``layers`` independent ``d_in x d_out`` matrices (``MuonDimensionNumbers(1, 2)``); each
    ``[layers, d]`` bias or norm scale of a block is ``layers`` independent vectors
    (``MuonDimensionNumbers((), 1)``), so no method mixes two layers' vectors in one
    factor; the embeddings and the final norm are None (each method's default for that
    leaf). `secondorder.dimension_numbers_from_nnx` reads the same from the model.
  """
  def spec(path, leaf):
    keys = [getattr(k, "key", None) for k in path]
    if keys and keys[0] == "blocks" and leaf.ndim == 3 and keys[-1] == "kernel":
      return MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    if keys and keys[0] == "blocks" and leaf.ndim == 2:
      return MuonDimensionNumbers(reduction_axis=(), output_axis=1)
    return None

  return jax.tree_util.tree_map_with_path(spec, params)


def schedule(config: LMConfig, steps: int | None = None) -> Callable:
  """The warm-up + cosine shape every optimizer trains under (peak 1).

  .. math::

    s(t) = \\begin{cases} t / w & t < w \\\\
      f + (1 - f)\\,\\tfrac12\\left(1 + \\cos\\tfrac{\\pi (t - w)}{n - w}\\right) & t \\ge w
    \\end{cases}

  with ``w = warmup * n`` steps of warm-up and end value ``f = final_fraction``.

  Args:
    config: gives the warm-up fraction and the final fraction.
    steps: the run's length ``n`` (default ``config.steps``).

  Returns:
    An optax schedule ``count -> multiplier``.
  """
  n = config.steps if steps is None else steps
  warmup = max(1, int(round(config.warmup * n)))
  return optax.warmup_cosine_decay_schedule(
      0.0, 1.0, warmup, max(n, warmup + 1), end_value=config.final_fraction)


def _softmax_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def lm_problem(size: str | LMConfig = "cpu", corpus: ByteCorpus | None = None):
  """The race as a `benchmarks.problems.Problem` named ``lm``.

  Args:
    size: a key of `SIZES` ("tiny", "cpu", "gpu") or an `LMConfig`.
    corpus: the data (default `ByteCorpus.load()`).

  Returns:
    A Problem whose ``schedule`` is the warm-up + cosine shape, ``eval_every`` the validation
    interval, ``baseline`` "adamw", ``target_loss`` None (the race's target is AdamW's final
    validation loss, known only after AdamW has run) and ``weight_dimension_numbers`` the
    stacked kernels' axes.
  """
  from benchmarks.problems import Problem, pure_model

  if isinstance(size, LMConfig):
    config, label = size, "custom"
  elif size in SIZES:
    config, label = SIZES[size], size
  else:
    raise ValueError(f"size must be one of {sorted(SIZES)} or an LMConfig, got {size!r}")
  corpus = corpus or ByteCorpus.load()
  make = lambda seed: DecoderLM(config, rngs=nnx.Rngs(seed))
  init_params, apply, bind = pure_model(make)
  validation = fixed_windows(corpus.validation, config, 0)
  train = fixed_windows(corpus.train, config, 0)
  logits_fn = lambda p, b: apply(p, b[0])
  loss = lambda p, b: _softmax_ce(apply(p, b[0]), b[1])
  return Problem(
      name="lm",
      description=(f"byte-level decoder-only transformer ({label}: {config.layers} scanned "
                   f"layers, d={config.dim}, {config.heads} heads, context {config.context}, "
                   f"batch {config.batch_size}) on the Python stdlib's sources, split by file; "
                   f"warm-up + cosine"),
      init_params=init_params,
      batches=lambda seed: batches(corpus.train, config, seed),
      loss=loss, eval_loss=lambda p: loss(p, validation), train_loss=lambda p: loss(p, train),
      target_loss=None, steps={"quick": config.steps, "full": config.steps},
      logits_fn=logits_fn, logits_loss=lambda logits, b: _softmax_ce(logits, b[1]),
      apply=apply, make_model=make, bind=bind, inputs=lambda b: b[0], labels=lambda b: b[1],
      output_loss=_softmax_ce, kind="language_model", likelihood="softmax",
      schedule=lambda n: schedule(config, n), eval_every=config.eval_every, baseline="adamw",
      weight_dimension_numbers=weight_dimension_numbers, quick_rows=QUICK_ROWS)


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.lm",
                                   description="AdamW alone on the language model.")
  parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--lr", type=float, default=3e-3)
  args = parser.parse_args(argv)
  config = SIZES[args.size]
  if args.steps is not None:
    config = dataclasses.replace(config, steps=args.steps)
  problem = lm_problem(config)
  tx = optax.chain(optax.adamw(args.lr, weight_decay=1e-4),
                   optax.scale_by_schedule(problem.schedule(config.steps)))
  params = problem.init_params(0)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(problem.loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  evaluate = jax.jit(problem.eval_loss)
  data = problem.batches(0)
  for t in range(config.steps + 1):
    if t % config.eval_every == 0 or t == config.steps:
      print(f"step {t:5d}  validation loss {float(evaluate(params)):.4f}")
    if t < config.steps:
      params, state, _ = step(params, state, next(data))
  return 0


if __name__ == "__main__":
  raise SystemExit(_main())
