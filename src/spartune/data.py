"""Token corpora: where a run's tokens come from, and how training and held-out batches are cut.

Every source is local (DESIGN.md: no download at run time), so a study runs the same on a laptop,
a cluster node or a machine with no network:

- `pystdlib` (default): the Python standard library's own `.py` source, read as bytes (vocab
  256). Every Python install has it, so the default needs no data set; it is built once and
  cached under `data.cache_dir`.
- `text`: your own files (a path or a glob), read as bytes (vocab 256).
- `memmap`: a nanoGPT-style folder with `train.bin` / `val.bin` of uint16 token ids.
- `synthetic`: a tiny generated corpus with learnable structure, for tests and smoke runs.

Why batches look the way they do: the sampler runs every training step, so a batch is one
vectorized gather from the split (no Python loop over rows) and only the batch is widened to
int64, never the corpus. Random offsets come only from the `torch.Generator` the trainer passes
in, so the same run seed gives the same batches; held-out batches depend only on their own seed
(`data.val_seed`), so every run of a study is evaluated on the same tokens. `Corpus.fingerprint`
names the exact token content so a results record says what a run was trained on.

Usage::

    corpus = load_corpus(cfg.data, root=project_dir)
    corpus.check_seq_len(cfg.train.seq_len)
    x, y = corpus.train_batch(16, 64, generator)
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import platform
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import ConfigError, DataConfig

log = logging.getLogger(__name__)

SYNTHETIC_TOKENS = 200_000
VOCAB_CHECK_TOKENS = 1 << 20  # memmap: ids checked against the vocab (a cheap check, not a proof)
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
# Above this many bytes per split, the fingerprint hashes evenly spaced chunks instead of every
# byte: hashing a 17 GB nanoGPT memmap at every trial start would cost more than the trial.
_FULL_HASH_BYTES = 64 << 20
_HASH_CHUNKS, _HASH_CHUNK_BYTES = 256, 1 << 16


class Corpus:
    """A tokenized corpus split into train and val, with the batch samplers the trainer uses.

    `train` and `val` are 1-D uint8 or uint16 numpy arrays (possibly `np.memmap`s); batches are
    int64 CPU tensors `x, y` of shape (batch_size, seq_len) with `y` = `x` shifted by one.
    """

    def __init__(
        self,
        *,
        name: str,
        vocab_size: int,
        train: np.ndarray,
        val: np.ndarray,
        fingerprint: str | None = None,
    ) -> None:
        for split, arr in (("train", train), ("val", val)):
            if arr.ndim != 1 or arr.dtype not in (np.uint8, np.uint16):
                raise ValueError(
                    f"{split} must be a 1-D uint8/uint16 array, got {arr.ndim}-D {arr.dtype}"
                )
        if train.dtype != val.dtype:
            raise ValueError(f"train and val dtypes differ: {train.dtype} vs {val.dtype}")
        self.name = name
        self.vocab_size = vocab_size
        self.train = train
        self.val = val
        self.fingerprint = fingerprint if fingerprint is not None else content_hash(train, val)
        # Plain-ndarray views for the gather: fancy indexing on an np.memmap would wrap every
        # batch in a memmap object. Gathering in numpy (not torch) also keeps uint16 working.
        self._train = np.asarray(train)
        self._val = np.asarray(val)

    def __repr__(self) -> str:
        return (
            f"Corpus(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"train={len(self.train):,}, val={len(self.val):,}, dtype={self.train.dtype}, "
            f"fingerprint={self.fingerprint!r})"
        )

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ConfigError('train.seq_len') unless each split has over seq_len + 1 tokens."""
        self._check(len(self.train), "train", seq_len)
        self._check(len(self.val), "val", seq_len)

    def train_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """A random batch from the train split; the offsets come only from `generator`."""
        n = self._check(len(self._train), "train", seq_len)
        offsets = torch.randint(
            n - seq_len, (batch_size,), generator=generator, device=generator.device
        )
        return _gather(self._train, offsets.cpu().numpy(), seq_len)

    def val_batches(
        self, n: int, batch_size: int, seq_len: int, seed: int
    ) -> list[tuple[Tensor, Tensor]]:
        """`n` fixed batches from the val split: a pure function of the arguments and the corpus.

        The offsets are drawn as one (n, batch_size) block, so the first k of `n` batches are the
        same batches `val_batches(k, ...)` returns: evaluating on more batches only adds some.
        """
        size = self._check(len(self._val), "val", seq_len)
        g = torch.Generator().manual_seed(seed)
        offsets = torch.randint(size - seq_len, (n, batch_size), generator=g).numpy()
        return [_gather(self._val, row, seq_len) for row in offsets]

    def _check(self, size: int, split: str, seq_len: int) -> int:
        if seq_len < 1:
            raise ConfigError("train.seq_len", f"must be >= 1, got {seq_len}")
        if size <= seq_len + 1:
            fix = (
                f"lower train.seq_len to at most {size - 2}"
                if size > 2
                else "use a corpus with more tokens"
            )
            raise ConfigError(
                "train.seq_len",
                f"{seq_len} needs a {split} split of more than {seq_len + 1} tokens, but the "
                f"{self.name} corpus's {split} split has {size}; {fix}, or give the split more "
                f"tokens (data.max_bytes, data.val_fraction, more or bigger files)",
            )
        return size


def _gather(split: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """Cut rows split[o : o + seq_len + 1] with one fancy index; widen only the batch to int64."""
    rows = split[offsets[:, None] + np.arange(seq_len + 1)]
    x = torch.from_numpy(rows[:, :-1].astype(np.int64, order="C"))
    y = torch.from_numpy(rows[:, 1:].astype(np.int64, order="C"))
    return x, y


def content_hash(train: np.ndarray, val: np.ndarray) -> str:
    """16 hex digits naming the token content (dtype, split sizes, tokens) of a corpus.

    Splits above 64 MiB are hashed from their size and 256 evenly spaced 64 KiB chunks (plus the
    last one), not every byte, so that opening a large memmap stays cheap.
    """
    h = hashlib.blake2b(digest_size=8)
    for arr in (train, val):
        a = np.ascontiguousarray(arr).view(np.uint8)
        h.update(f"{np.dtype(arr.dtype).str}:{len(arr)};".encode())
        if a.nbytes <= _FULL_HASH_BYTES:
            h.update(a.data)
            continue
        starts = np.linspace(0, a.nbytes - _HASH_CHUNK_BYTES, _HASH_CHUNKS + 1).astype(np.int64)
        for s in starts:
            h.update(a[s : s + _HASH_CHUNK_BYTES].data)
    return h.hexdigest()


def load_corpus(cfg: DataConfig, *, root: str | Path = ".") -> Corpus:
    """Build the corpus `cfg` names; a relative `path` or `cache_dir` resolves against `root`."""
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError("data.val_fraction", f"must be in (0, 1), got {cfg.val_fraction}")
    if cfg.name in ("pystdlib", "text") and cfg.max_bytes < 1:
        raise ConfigError("data.max_bytes", f"must be >= 1, got {cfg.max_bytes}")
    root = Path(root)
    match cfg.name:
        case "pystdlib":
            tokens = _load_pystdlib(cfg, root)
            train, val = _split(tokens, cfg.val_fraction)
            return Corpus(name="pystdlib", vocab_size=256, train=train, val=val)
        case "text":
            tokens = _load_text(cfg, root)
            train, val = _split(tokens, cfg.val_fraction)
            return Corpus(name="text", vocab_size=256, train=train, val=val)
        case "memmap":
            train, val = _load_memmap(cfg, root)
            return Corpus(name="memmap", vocab_size=cfg.vocab_size, train=train, val=val)
        case "synthetic":
            if cfg.vocab_size < 2:
                raise ConfigError("data.vocab_size", f"must be >= 2, got {cfg.vocab_size}")
            vocab = min(cfg.vocab_size, 256)
            train, val = _split(synthetic_tokens(vocab), cfg.val_fraction)
            return Corpus(name="synthetic", vocab_size=vocab, train=train, val=val)
        case _:
            raise ConfigError(
                "data",
                f"unknown data set {cfg.name!r}; choose one of pystdlib, text, memmap, synthetic",
            )


def _split(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The last `val_fraction` of the tokens is val, the rest train (views, no copy)."""
    n_val = int(len(tokens) * val_fraction)
    if len(tokens) >= 2:
        n_val = min(max(n_val, 1), len(tokens) - 1)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def _resolve(path: str, root: Path) -> Path:
    return root / Path(path).expanduser()  # an absolute path ignores root


# ----------------------------------------------------------------------------- pystdlib


def _load_pystdlib(cfg: DataConfig, root: Path) -> np.ndarray:
    """Read the cache if present; otherwise build the bytes and write the cache atomically."""
    version = f"{sys.implementation.name}{platform.python_version()}"
    cache = _resolve(cfg.cache_dir, root) / f"pystdlib-{version}-{cfg.max_bytes}.bin"
    if cache.is_file() and cache.stat().st_size > 0:
        return np.fromfile(cache, dtype=np.uint8)
    log.info("building the pystdlib corpus (%d bytes max) into %s", cfg.max_bytes, cache)
    data = stdlib_bytes(cfg.max_bytes)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache, data)
    except OSError as e:
        raise ConfigError(
            "data.cache_dir",
            f"cannot write the corpus cache {cache}: "
            f"{e.strerror or e}; point data.cache_dir at a writable folder",
        ) from e
    return np.frombuffer(data, dtype=np.uint8)


def stdlib_bytes(max_bytes: int) -> bytearray:
    """The standard library's `.py` files in sorted relative-path order, newline-separated.

    Third-party packages (`site-packages`, `dist-packages`) are skipped so that the corpus is the
    same for every environment built on one interpreter.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        rel_dir = Path(dirpath).relative_to(stdlib)
        rels += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    buf = bytearray()
    for rel in sorted(rels):
        if len(buf) >= max_bytes:
            break
        try:
            text = (stdlib / rel).read_bytes()
        except OSError:  # e.g. a file only root may read; the fingerprint records what was used
            continue
        if buf:
            buf += b"\n"
        buf += text
    del buf[max_bytes:]
    if not buf:
        raise ConfigError(
            "data",
            f"found no readable .py files under {stdlib}; use data=text "
            "with data.path=<file or glob> instead",
        )
    return buf


def _write_atomic(path: Path, data: bytes | bytearray) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should be readable by all
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- text


def _load_text(cfg: DataConfig, root: Path) -> np.ndarray:
    """Concatenate the bytes of every file `cfg.path` matches (sorted), capped at max_bytes."""
    if not cfg.path:
        raise ConfigError(
            "data.path", "data=text needs data.path=<file or glob>, e.g. data.path='notes/*.txt'"
        )
    pattern = _resolve(cfg.path, root)
    if pattern.is_file():  # checked first: a literal name may contain glob characters
        files = [str(pattern)]
    else:
        matches = sorted(glob.glob(str(pattern), recursive=True))
        files = [m for m in matches if os.path.isfile(m)]
        if not files and matches:
            raise ConfigError(
                "data.path",
                f"{cfg.path!r} matches only folders ({matches[0]}); "
                f"point data.path at files, e.g. '{cfg.path}/*.txt'",
            )
        if not files:
            raise ConfigError(
                "data.path",
                f"no file matches {cfg.path!r} (looked for {pattern}); "
                "point data.path at an existing file or glob",
            )
    buf = bytearray()
    for f in files:
        if len(buf) >= cfg.max_bytes:
            break
        try:
            with open(f, "rb") as fh:
                buf += fh.read(cfg.max_bytes - len(buf))
        except OSError as e:
            raise ConfigError(
                "data.path",
                f"cannot read {f}: {e.strerror or e}; fix its permissions or narrow data.path",
            ) from e
    if not buf:
        raise ConfigError(
            "data.path",
            f"{cfg.path!r} matches {len(files)} file(s) but they are "
            "empty; point data.path at files with content",
        )
    return np.frombuffer(buf, dtype=np.uint8)


# ----------------------------------------------------------------------------- memmap


def _load_memmap(cfg: DataConfig, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Open `train.bin` / `val.bin` (uint16, nanoGPT's prepare.py format) without reading them."""
    if not cfg.path:
        raise ConfigError(
            "data.path", "data=memmap needs data.path=<folder with train.bin and val.bin>"
        )
    folder = _resolve(cfg.path, root)
    if not folder.is_dir():
        raise ConfigError(
            "data.path",
            f"{folder} is not a folder; data=memmap needs "
            "data.path=<folder with train.bin and val.bin>",
        )
    if cfg.vocab_size < 1:
        raise ConfigError("data.vocab_size", f"must be >= 1, got {cfg.vocab_size}")
    splits = []
    for split in ("train", "val"):
        f = folder / f"{split}.bin"
        if not f.is_file():
            raise ConfigError(
                "data.path",
                f"{f.name} is missing from {folder}; data=memmap "
                "needs train.bin and val.bin (uint16 token ids)",
            )
        size = f.stat().st_size
        if size == 0:
            raise ConfigError("data.path", f"{f} is empty; re-create it with token ids")
        if size % 2:
            raise ConfigError(
                "data.path",
                f"{f} has an odd number of bytes ({size}), so it "
                "does not hold uint16 token ids; write it as np.uint16",
            )
        try:
            arr = np.memmap(f, dtype=np.uint16, mode="r")
        except OSError as e:
            raise ConfigError(
                "data.path", f"cannot read {f}: {e.strerror or e}; fix its permissions"
            ) from e
        top = int(arr[:VOCAB_CHECK_TOKENS].max())
        if top >= cfg.vocab_size:
            raise ConfigError(
                "data.vocab_size",
                f"{f.name} holds token id {top} but "
                f"data.vocab_size={cfg.vocab_size}; set data.vocab_size to at least "
                f"{top + 1} (the tokenizer's vocabulary size)",
            )
        splits.append(arr)
    return splits[0], splits[1]


# ----------------------------------------------------------------------------- synthetic


def synthetic_tokens(vocab: int, n: int = SYNTHETIC_TOKENS) -> np.ndarray:
    """A deterministic order-2 Markov text over `vocab` (<= 256) tokens, as uint8.

    Each previous token `b` has k=4 successors (drawn Zipf-weighted, so the unigram marginal is
    skewed and a model's first steps already gain), and the token before it, `a`, picks which
    successor is likely (~78%). The noise floor is 2% uniform. So a bigram model gets to about
    1.6 nats and a trigram model to about 1.0, against ln(vocab) for a uniform guess: a small
    model's loss drops clearly within tens of steps. The seed is fixed (0), independent of the
    run seed, so every run sees the same tokens. 1,000 chains are generated side by side
    (vectorized) and concatenated, which keeps it cheap (tens of ms).
    """
    if not 2 <= vocab <= 256:
        raise ValueError(f"vocab must be in [2, 256], got {vocab}")
    rng = np.random.default_rng(0)
    k = min(4, vocab)
    zipf = 1.0 / np.arange(1, vocab + 1)
    zipf /= zipf.sum()
    succ = np.stack([rng.choice(vocab, size=k, replace=False, p=zipf) for _ in range(vocab)])
    favourite = rng.integers(k, size=vocab)  # which successor the token two back favours
    n_chains = 1000
    length = -(-n // n_chains)
    u = rng.random((length, n_chains))
    pick = rng.integers(k, size=(length, n_chains))
    noise = rng.integers(vocab, size=(length, n_chains))
    seq = np.empty((length, n_chains), dtype=np.int64)
    seq[:2] = rng.integers(vocab, size=(2, n_chains))
    for t in range(2, length):
        a, b = seq[t - 2], seq[t - 1]
        choice = np.where(u[t] < 0.7, favourite[a], pick[t])
        seq[t] = np.where(u[t] >= 0.98, noise[t], succ[b, choice])
    return np.ascontiguousarray(seq.T).reshape(-1)[:n].astype(np.uint8)
