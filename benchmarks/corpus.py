"""The ladder's corpus: a fixed list of Python standard-library sources, the same bytes anywhere.

The language model's default corpus (`benchmarks.lm.ByteCorpus.load`) is whatever top-level
``*.py`` files the running interpreter ships (about 4.7 MB): a 250k-parameter model at 20
tokens per parameter would read it about twice, and another Python gives other bytes. The
size ladder (`benchmarks.ladder`) trains on this corpus instead: every ``*.py`` file of
CPython 3.11.7's standard library, recursively (tests included, ``site-packages`` left
out), named with its SHA-256 in the committed manifest ``benchmarks/corpus_manifest.txt``
(1,790 files, about 31.5 MB). Building checks every file against the manifest, so two
machines that build it hold the same bytes, or the build fails naming the file that
differs.

The build writes one file, ``benchmarks/out/corpus/stdlib-3.11.7.npz`` (git-ignored, made
again by the command below), holding the training and validation bytes split by file with
the same fixed hash of the file's path as the default corpus (one file in ten is
validation). A machine without CPython 3.11.7's sources (a GPU machine with another Python)
does not build it: it gets this file beside the checkout (the device run carries
``benchmarks/out/corpus``) and `load` checks the file's digest against the manifest's.

Usage::

  python -m benchmarks.corpus build      # check the sources, write the .npz (a few seconds)
  python -m benchmarks.corpus manifest   # write the manifest from this interpreter (once)

  from benchmarks import corpus
  data = corpus.load()                   # a benchmarks.lm.ByteCorpus; builds it if missing
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sysconfig

import numpy as np

__all__ = ["MANIFEST", "DEFAULT_PATH", "read_manifest", "write_manifest", "build", "load"]

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, "corpus_manifest.txt")
PYTHON = "3.11.7"
DEFAULT_PATH = os.path.join(HERE, "out", "corpus", f"stdlib-{PYTHON}.npz")


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _source_files(stdlib: str) -> list[str]:
  """Every ``*.py`` under `stdlib`, recursively, as sorted paths relative to it."""
  found = []
  for root, dirs, files in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
    for name in files:
      if name.endswith(".py"):
        found.append(os.path.relpath(os.path.join(root, name), stdlib).replace(os.sep, "/"))
  return sorted(found)


def write_manifest(path: str = MANIFEST, stdlib: str | None = None) -> int:
  """Writes ``sha256 size path`` per source file of `stdlib` (default: this interpreter's).

  Returns the number of files listed. Refuses any interpreter but CPython `PYTHON`: the
  manifest names that version's sources.
  """
  if stdlib is None and platform.python_version() != PYTHON:
    raise ValueError(f"the manifest lists CPython {PYTHON}'s sources; this is "
                     f"{platform.python_version()}")
  stdlib = stdlib or sysconfig.get_paths()["stdlib"]
  lines = []
  for rel in _source_files(stdlib):
    with open(os.path.join(stdlib, rel), "rb") as f:
      data = f.read()
    lines.append(f"{_sha256(data)} {len(data)} {rel}\n")
  with open(path, "w") as f:
    f.write(f"# CPython {PYTHON} standard library, every *.py recursively but "
            "site-packages: sha256, bytes, path\n")
    f.writelines(lines)
  return len(lines)


def read_manifest(path: str = MANIFEST) -> list[tuple[str, int, str]]:
  """The manifest's ``(sha256, size, path)`` entries, in order."""
  entries = []
  with open(path) as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      digest, size, rel = line.rstrip("\n").split(" ", 2)
      entries.append((digest, int(size), rel))
  return entries


def _digest(train: np.ndarray, validation: np.ndarray) -> str:
  return _sha256(train.tobytes() + b"\0" + validation.tobytes())


def _split(entries, read) -> tuple[np.ndarray, np.ndarray, tuple, tuple]:
  from benchmarks.lm import is_validation_file

  halves: dict[bool, list[bytes]] = {False: [], True: []}
  files: dict[bool, list[str]] = {False: [], True: []}
  for digest, size, rel in entries:
    data = read(rel)
    if len(data) != size or _sha256(data) != digest:
      raise ValueError(f"corpus file {rel!r}: its bytes differ from the manifest's "
                       f"({len(data)} bytes, expected {size}); the corpus needs CPython "
                       f"{PYTHON}'s sources, or the built {os.path.basename(DEFAULT_PATH)} "
                       "carried from a machine that has them")
    halves[is_validation_file(rel)].append(data)
    files[is_validation_file(rel)].append(rel)
  as_array = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8)
  return as_array(halves[False]), as_array(halves[True]), tuple(files[False]), tuple(files[True])


def build(path: str = DEFAULT_PATH, stdlib: str | None = None,
          manifest: str = MANIFEST) -> str:
  """Reads the manifest's files from `stdlib`, checks each, writes the split corpus to `path`.

  Returns the corpus digest (SHA-256 of the training bytes, a zero byte, the validation
  bytes), which `load` checks.
  """
  stdlib = stdlib or sysconfig.get_paths()["stdlib"]

  def read(rel):
    full = os.path.join(stdlib, rel)
    if not os.path.isfile(full):
      raise ValueError(f"corpus file {rel!r} is missing under {stdlib!r}; the corpus needs "
                       f"CPython {PYTHON}'s sources")
    with open(full, "rb") as f:
      return f.read()

  train, validation, train_files, validation_files = _split(read_manifest(manifest), read)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  digest = _digest(train, validation)
  tmp = path + ".tmp.npz"
  np.savez(tmp, train=train, validation=validation,
           train_files=np.array(train_files), validation_files=np.array(validation_files),
           digest=np.array(digest))
  os.replace(tmp, path)
  return digest


def load(path: str = DEFAULT_PATH, build_if_missing: bool = True):
  """The corpus as a `benchmarks.lm.ByteCorpus`, built first when `path` does not exist.

  Raises ValueError when the file's bytes do not match its recorded digest.
  """
  from benchmarks.lm import ByteCorpus

  if not os.path.exists(path):
    if not build_if_missing:
      raise ValueError(f"no corpus at {path!r}: run `python -m benchmarks.corpus build`")
    build(path)
  with np.load(path) as z:
    train, validation = z["train"], z["validation"]
    digest = str(z["digest"])
    train_files = tuple(str(s) for s in z["train_files"])
    validation_files = tuple(str(s) for s in z["validation_files"])
  if _digest(train, validation) != digest:
    raise ValueError(f"corpus {path!r} is damaged: its bytes do not match its digest")
  return ByteCorpus(train, validation, train_files, validation_files)


def _main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.corpus", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=["build", "manifest"])
  parser.add_argument("--out", default=DEFAULT_PATH)
  args = parser.parse_args(argv)
  if args.command == "manifest":
    print(f"{write_manifest()} files listed in {MANIFEST}")
    return 0
  digest = build(args.out)
  data = load(args.out, build_if_missing=False)
  print(f"wrote {args.out}: {len(data.train):,} training bytes ({len(data.train_files)} files), "
        f"{len(data.validation):,} validation bytes ({len(data.validation_files)} files); "
        f"digest {digest[:16]}")
  return 0


if __name__ == "__main__":
  raise SystemExit(_main())
