"""secondorder's SOAP against pytorch-optimizer's SOAP: the same trajectories in float64.

A one-off check, outside the test suite. Both optimizers train the same small problem from
the same start in float64: a square 8 x 8 least-squares layer, its bias (a vector: Adam
unrotated in both) and a [4, 5, 6] tensor contracted with random inputs (one factor per
dimension). The weights are square and the tensor's unfoldings full rank from the first
step on: a rectangular matrix's first factor is rank-deficient, and the eigenbasis of its
null space (in both libraries) is whatever LAPACK returns, so trajectories there need not
agree even between two correct implementations.

pytorch-optimizer needs torch, so its half runs in its own virtual environment, with
neither JAX nor secondorder. The environment (the versions this check was run with)::

  python3 -m venv benchmarks/envs/soap_torch
  benchmarks/envs/soap_torch/bin/pip install torch==2.13.0 pytorch-optimizer==4.1.0 numpy

(the CPU wheel of torch: on Linux, PyPI's default wheel pulls in the CUDA libraries; a
local ``torch-2.13.0+cpu`` wheel installs the same way). Usage, from the repository root::

  python -m benchmarks.soap_torch_check [--python benchmarks/envs/soap_torch/bin/python]

It prints the largest relative parameter difference over the run for each configuration.
pytorch-optimizer (4.1.0) computes the power-iteration QR in float32 whatever the
parameters' dtype, so once a refresh has happened the two agree to float32's precision
rather than float64's; the first row (no refresh within the run) compares float64 with
float64 throughout.
With weight decay the two differ by design: secondorder decays ``theta`` before the step,
``-lr (u + wd theta)`` from the first call on (optax's `add_decayed_weights`), while
pytorch-optimizer multiplies the updated parameters by ``1 - lr wd`` and skips the first
call; that row shows how far apart this puts them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

STEPS = 30
SHAPES = {"w": (8, 8), "b": (8,), "k": (4, 5, 6)}
CONFIGS = [
    # No refresh after the first eigendecomposition within the run: every operation in
    # float64 on both sides.
    dict(lr=3e-3, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.0, precondition_frequency=100),
    dict(lr=3e-3, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.0, precondition_frequency=1),
    dict(lr=3e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, precondition_frequency=3),
    dict(lr=1e-2, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.0, precondition_frequency=10),
    dict(lr=3e-3, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.1, precondition_frequency=3),
]


def make_setup(seed: int = 0) -> dict[str, np.ndarray]:
  """The data and the starting point, float64."""
  rng = np.random.RandomState(seed)
  return {
      "x": rng.randn(64, 8), "y": rng.randn(64, 8), "z": rng.randn(64, 4, 5),
      "t": rng.randn(64, 6),
      "w": rng.randn(8, 8) / np.sqrt(8), "b": np.zeros(8), "k": rng.randn(4, 5, 6) / 5,
  }


def run_torch(setup_path: str, out_path: str) -> None:
  """pytorch-optimizer's SOAP on the setup, one trajectory per configuration."""
  import torch
  from pytorch_optimizer import SOAP

  torch.set_default_dtype(torch.float64)
  data = dict(np.load(setup_path))
  x, y, z, t = (torch.tensor(data[k]) for k in ("x", "y", "z", "t"))
  results = {}
  for i, cfg in enumerate(CONFIGS):
    params = {k: torch.tensor(data[k], requires_grad=True) for k in SHAPES}
    opt = SOAP(list(params.values()), lr=cfg["lr"], betas=(cfg["b1"], cfg["b2"]),
               eps=cfg["eps"], weight_decay=cfg["weight_decay"],
               precondition_frequency=cfg["precondition_frequency"])
    traj = []
    for _ in range(STEPS):
      opt.zero_grad()
      loss = (0.5 * ((x @ params["w"] + params["b"] - y) ** 2).mean()
              + 0.5 * ((torch.einsum("nab,abc->nc", z, params["k"]) - t) ** 2).mean())
      loss.backward()
      opt.step()
      traj.append(np.concatenate([params[k].detach().numpy().ravel() for k in SHAPES]))
    results[f"config{i}"] = np.stack(traj)
  np.savez(out_path, **results)


def run_ours(setup: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """secondorder's SOAP on the setup (float64), one trajectory per configuration."""
  import jax
  import jax.numpy as jnp
  import optax

  from secondorder.transforms.soap import soap

  out = {}
  with jax.enable_x64(True):
    data = {k: jnp.asarray(v) for k, v in setup.items()}

    def loss(p):
      return (0.5 * jnp.mean((data["x"] @ p["w"] + p["b"] - data["y"]) ** 2)
              + 0.5 * jnp.mean((jnp.einsum("nab,abc->nc", data["z"], p["k"]) - data["t"]) ** 2))

    for i, cfg in enumerate(CONFIGS):
      tx = soap(cfg["lr"], b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"],
                weight_decay=cfg["weight_decay"],
                precondition_frequency=cfg["precondition_frequency"],
                statistics_dtype=jnp.float64)
      params = {k: data[k] for k in SHAPES}
      state = tx.init(params)

      @jax.jit
      def step(params, state):
        u, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, u), state

      traj = []
      for _ in range(STEPS):
        params, state = step(params, state)
        traj.append(np.concatenate([np.asarray(params[k]).ravel() for k in SHAPES]))
      out[f"config{i}"] = np.stack(traj)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--python", default="benchmarks/envs/soap_torch/bin/python",
                      help="the virtual environment's python with torch and pytorch-optimizer")
  args = parser.parse_args()
  setup = make_setup()
  with tempfile.TemporaryDirectory() as tmp:
    setup_path, out_path = os.path.join(tmp, "setup.npz"), os.path.join(tmp, "torch.npz")
    np.savez(setup_path, **setup)
    subprocess.run([args.python, os.path.abspath(__file__), "--torch", setup_path, out_path],
                   check=True)
    theirs = dict(np.load(out_path))
  ours = run_ours(setup)
  start = np.concatenate([setup[k].ravel() for k in SHAPES])
  print("| b1 | b2 | frequency | lr | weight decay | max rel. param difference | "
        "max rel. displacement difference |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for i, cfg in enumerate(CONFIGS):
    a, b = ours[f"config{i}"], theirs[f"config{i}"]
    rel = np.max(np.abs(a - b)) / np.max(np.abs(b))
    moved = np.max(np.abs(a - b)) / np.max(np.abs(b - start))
    rows.append({**cfg, "rel_param": float(rel), "rel_displacement": float(moved)})
    print(f"| {cfg['b1']} | {cfg['b2']} | {cfg['precondition_frequency']} | {cfg['lr']} | "
          f"{cfg['weight_decay']} | {rel:.2e} | {moved:.2e} |")
  print(json.dumps(rows))


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--torch":
    run_torch(sys.argv[2], sys.argv[3])
  else:
    main()
