"""The README's quickstart is executed as written, so it cannot rot."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text):
  return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quickstart_trains():
  blocks = [b for b in _python_blocks(README.read_text()) if "nnx.Optimizer" in b]
  assert blocks, "README has no NNX quickstart block"
  namespace = {}
  exec(compile(blocks[0], "README-quickstart", "exec"), namespace)  # pylint: disable=exec-used
  y = namespace["y"]
  final = float(namespace["loss"])
  baseline = float(jnp.mean((y - y.mean()) ** 2))  # loss of the best constant predictor
  assert final < 0.2 * baseline, (final, baseline)
