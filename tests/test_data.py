"""Protects data.py: batch shapes and determinism, split hygiene, the cache, and error fields.

Run: PYTHONPATH=src python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spartune import data
from spartune.config import ConfigError, DataConfig
from spartune.data import Corpus, load_corpus


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def synthetic() -> Corpus:
    return load_corpus(DataConfig(name="synthetic"))


def write_split_text(tmp_path: Path) -> Path:
    """9,000 train bytes in [0, 128) and 1,000 val bytes in [128, 256): a leak is visible."""
    rng = np.random.default_rng(0)
    body = np.concatenate([rng.integers(0, 128, 9000), rng.integers(128, 256, 1000)])
    path = tmp_path / "corpus.txt"
    path.write_bytes(body.astype(np.uint8).tobytes())
    return path


# ---------------------------------------------------------------- batches


def test_train_batch_shapes_dtypes_and_shift(synthetic: Corpus) -> None:
    x, y = synthetic.train_batch(4, 32, gen(0))
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert x.is_contiguous() and y.is_contiguous()  # models call y.view(-1)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < synthetic.vocab_size and int(x.min()) >= 0
    # Each row with its last target is a contiguous window of the train split.
    windows = np.lib.stride_tricks.sliding_window_view(synthetic.train, 33)
    row = np.concatenate([x[0].numpy(), y[0, -1:].numpy()])
    assert (windows == row).all(axis=1).any()


def test_train_batch_same_seed_same_batches(synthetic: Corpus) -> None:
    g1, g2 = gen(7), gen(7)
    for _ in range(3):
        a, b = synthetic.train_batch(8, 16, g1), synthetic.train_batch(8, 16, g2)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x0, _ = synthetic.train_batch(8, 16, gen(7))
    x1, _ = synthetic.train_batch(8, 16, gen(8))
    assert not torch.equal(x0, x1)
    g = gen(7)
    first, second = synthetic.train_batch(8, 16, g)[0], synthetic.train_batch(8, 16, g)[0]
    assert not torch.equal(first, second)  # the generator advances


def test_train_batch_draws_only_from_the_generator(synthetic: Corpus) -> None:
    torch.manual_seed(0)
    a = synthetic.train_batch(4, 16, gen(3))[0]
    torch.manual_seed(99)  # the global RNG must not matter
    b = synthetic.train_batch(4, 16, gen(3))[0]
    assert torch.equal(a, b)


def test_val_batches_deterministic_and_from_val_only(tmp_path: Path) -> None:
    path = write_split_text(tmp_path)
    corpus = load_corpus(DataConfig(name="text", path=str(path), val_fraction=0.1))
    assert len(corpus.train) == 9000 and len(corpus.val) == 1000
    batches = corpus.val_batches(4, 8, 16, seed=1234)
    again = corpus.val_batches(4, 8, 16, seed=1234)
    assert len(batches) == 4
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert int(x.min()) >= 128 and int(y.min()) >= 128  # val bytes only
    assert not torch.equal(batches[0][0], corpus.val_batches(1, 8, 16, seed=1)[0][0])
    prefix = corpus.val_batches(2, 8, 16, seed=1234)  # more batches only add batches
    assert all(torch.equal(p[0], b[0]) for p, b in zip(prefix, batches[:2], strict=True))
    for _ in range(5):
        x, y = corpus.train_batch(8, 16, gen(0))
        assert int(x.max()) < 128 and int(y.max()) < 128  # train bytes only


def test_check_seq_len(synthetic: Corpus) -> None:
    synthetic.check_seq_len(64)
    with pytest.raises(ConfigError) as err:
        synthetic.check_seq_len(len(synthetic.val) - 1)  # train is long enough, val is not
    assert err.value.field == "train.seq_len"
    assert "val" in str(err.value) and str(len(synthetic.val)) in str(err.value)
    small = Corpus(
        name="tiny", vocab_size=4, train=np.zeros(10, np.uint8), val=np.zeros(10, np.uint8)
    )
    small.check_seq_len(8)  # 10 > 8 + 1
    with pytest.raises(ConfigError, match="train.seq_len"):
        small.check_seq_len(9)
    with pytest.raises(ConfigError, match="train.seq_len"):
        small.train_batch(2, 9, gen(0))
    with pytest.raises(ConfigError, match="train.seq_len"):
        small.val_batches(1, 2, 9, seed=0)
    x, _ = small.train_batch(2, 8, gen(0))  # the longest allowed window still fits
    assert x.shape == (2, 8)


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_vocab_and_size() -> None:
    a = load_corpus(DataConfig(name="synthetic", vocab_size=16))
    b = load_corpus(DataConfig(name="synthetic", vocab_size=16))
    assert a.fingerprint == b.fingerprint and np.array_equal(a.train, b.train)
    assert a.vocab_size == 16 and int(a.train.max()) < 16 and a.train.dtype == np.uint8
    assert len(a.train) + len(a.val) == data.SYNTHETIC_TOKENS
    assert load_corpus(DataConfig(name="synthetic", vocab_size=50257)).vocab_size == 256
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="synthetic", vocab_size=1))
    assert err.value.field == "data.vocab_size"


def test_synthetic_is_learnable_within_50_steps(synthetic: Corpus) -> None:
    """A bigram table trained for 50 SGD steps must beat a uniform guess by a wide margin."""
    # Plain SGD by hand: building a torch.optim optimizer first imports torch._dynamo (~2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threads only add overhead here
    try:
        v = synthetic.vocab_size
        logits = torch.zeros(v, v, requires_grad=True)
        g = gen(0)
        for _ in range(50):
            x, y = synthetic.train_batch(16, 64, g)
            loss = F.cross_entropy(F.embedding(x, logits).view(-1, v), y.view(-1))
            (grad,) = torch.autograd.grad(loss, logits)
            with torch.no_grad():
                logits -= 50.0 * grad
        with torch.no_grad():
            x, y = synthetic.val_batches(1, 64, 64, seed=0)[0]
            val = F.cross_entropy(F.embedding(x, logits).view(-1, v), y.view(-1)).item()
    finally:
        torch.set_num_threads(threads)
    assert val < np.log(v) - 2.5, val  # ln 256 = 5.55; a bigram model can reach about 1.6


# ---------------------------------------------------------------- pystdlib


def test_pystdlib_builds_caches_and_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(name="pystdlib", max_bytes=200_000, cache_dir="cache")
    first = load_corpus(cfg, root=tmp_path)
    assert first.name == "pystdlib" and first.vocab_size == 256
    assert first.train.dtype == first.val.dtype == np.uint8
    assert len(first.train) + len(first.val) == 200_000 and len(first.val) == 20_000
    caches = list((tmp_path / "cache").iterdir())
    assert [p.name for p in caches] == [p.name for p in caches if p.suffix == ".bin"]  # no temps
    assert len(caches) == 1 and caches[0].name.startswith("pystdlib-")
    assert "200000" in caches[0].name
    cached = np.fromfile(caches[0], dtype=np.uint8)
    assert np.array_equal(cached[-20_000:], first.val)  # val is the tail
    assert np.array_equal(cached[:-20_000], first.train)
    assert b"import " in cached.tobytes()  # it is Python source

    def no_rebuild(max_bytes: int) -> bytearray:
        raise AssertionError("the second load must read the cache")

    monkeypatch.setattr(data, "stdlib_bytes", no_rebuild)
    second = load_corpus(cfg, root=tmp_path)
    assert second.fingerprint == first.fingerprint
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)


def test_stdlib_bytes_is_sorted_concat_and_capped() -> None:
    small = data.stdlib_bytes(1000)
    assert len(small) == 1000
    assert data.stdlib_bytes(3000)[:1000] == small  # a larger cap only extends the prefix


# ---------------------------------------------------------------- text


def test_text_glob_concatenates_sorted(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_bytes(b"second file\n" * 100)
    (tmp_path / "a.txt").write_bytes(b"first file\n" * 100)
    (tmp_path / "skip.md").write_bytes(b"not matched")
    corpus = load_corpus(DataConfig(name="text", path="*.txt"), root=tmp_path)
    joined = np.concatenate([corpus.train, corpus.val]).tobytes()
    assert joined == b"first file\n" * 100 + b"second file\n" * 100
    assert corpus.vocab_size == 256 and corpus.train.dtype == np.uint8
    capped = load_corpus(DataConfig(name="text", path="*.txt", max_bytes=1200), root=tmp_path)
    assert np.concatenate([capped.train, capped.val]).tobytes() == joined[:1200]
    assert capped.fingerprint != corpus.fingerprint


def test_text_errors_name_data_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="text", path="nowhere/*.txt"), root=tmp_path)
    assert err.value.field == "data.path" and "nowhere/*.txt" in str(err.value)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="text", path="empty.txt"), root=tmp_path)
    assert err.value.field == "data.path" and "empty" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="text", path=None))
    assert err.value.field == "data.path"
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="text", path="sub"), root=tmp_path)
    assert err.value.field == "data.path" and "folder" in str(err.value)


def test_text_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.txt"
    path.write_bytes(b"hidden")

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # chmod 0 would not stop root (the CI user), so make the module's own `open` fail instead.
    monkeypatch.setattr(data, "open", denied, raising=False)
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="text", path=str(path)))
    assert err.value.field == "data.path" and "secret.txt" in str(err.value)
    assert "Permission denied" in str(err.value)


# ---------------------------------------------------------------- memmap


def write_memmap(folder: Path, train: np.ndarray, val: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    train.astype(np.uint16).tofile(folder / "train.bin")
    val.astype(np.uint16).tofile(folder / "val.bin")


def test_memmap_loads_uint16(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 1000, 5000), rng.integers(0, 1000, 800)
    write_memmap(tmp_path / "owt", train, val)
    corpus = load_corpus(DataConfig(name="memmap", path="owt", vocab_size=1000), root=tmp_path)
    assert corpus.vocab_size == 1000
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint16
    assert np.array_equal(corpus.train, train) and np.array_equal(corpus.val, val)
    x, y = corpus.train_batch(4, 32, gen(0))
    assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) > 255  # ids past a byte survive the gather
    vx, _ = corpus.val_batches(1, 4, 32, seed=0)[0]
    windows = np.lib.stride_tricks.sliding_window_view(val, 32)
    assert (windows == vx[0].numpy()).all(axis=1).any()


def test_memmap_errors(tmp_path: Path) -> None:
    ok = np.arange(100)
    write_memmap(tmp_path / "d", ok, ok)
    (tmp_path / "d" / "val.bin").unlink()
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="memmap", path="d"), root=tmp_path)
    assert err.value.field == "data.path" and "val.bin" in str(err.value)

    write_memmap(tmp_path / "d", ok, np.array([], dtype=np.uint16))
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="memmap", path="d"), root=tmp_path)
    assert err.value.field == "data.path" and "empty" in str(err.value)

    write_memmap(tmp_path / "d", ok, np.array([5, 300, 7]))
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="memmap", path="d", vocab_size=256), root=tmp_path)
    assert err.value.field == "data.vocab_size" and "300" in str(err.value)

    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="memmap", path="missing"), root=tmp_path)
    assert err.value.field == "data.path"


# ---------------------------------------------------------------- dispatch and fingerprint


def test_unknown_name_and_bad_val_fraction() -> None:
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="owt"))
    assert err.value.field == "data"
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="synthetic", val_fraction=1.0))
    assert err.value.field == "data.val_fraction"
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(name="text", path="x.txt", max_bytes=0))
    assert err.value.field == "data.max_bytes"


def test_fingerprint_tracks_content_and_split() -> None:
    tokens = np.arange(100, dtype=np.uint8)

    def fp(train: np.ndarray, val: np.ndarray) -> str:
        return Corpus(name="t", vocab_size=256, train=train, val=val).fingerprint

    base = fp(tokens[:90], tokens[90:])
    assert base == fp(tokens[:90].copy(), tokens[90:].copy())
    assert base != fp(tokens[:80], tokens[80:])  # same bytes, other split
    changed = tokens.copy()
    changed[3] = 0
    assert base != fp(changed[:90], changed[90:])
    assert base != fp(tokens[:90].astype(np.uint16), tokens[90:].astype(np.uint16))


def test_fingerprint_of_large_splits_is_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_FULL_HASH_BYTES", 1000)  # pretend 10 kB is large
    tokens = np.random.default_rng(0).integers(0, 256, 10_000).astype(np.uint8)
    base = data.content_hash(tokens[:9000], tokens[9000:])
    assert base == data.content_hash(tokens[:9000].copy(), tokens[9000:].copy())
    for i in (0, 8999):  # the first and last chunks are always hashed
        changed = tokens.copy()
        changed[i] ^= 1
        assert data.content_hash(changed[:9000], changed[9000:]) != base
