"""Feature cache: hits, stale and corrupt entries rebuilt with a message, atomic writes."""
import os
import warnings

import pytest
import torch

import vlood_fast.cache as cache_mod
from vlood_fast.cache import CacheWarning, FeatureCache, describe_transform, make_key, weights_fingerprint
from vlood_fast.data import make_synthetic_image_folder, ImageFolderDataset


class Encoder:
    """Counts calls; returns features that depend on the call number (to see rebuilds)."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        g = torch.Generator().manual_seed(self.calls)
        return torch.randn(6, 4, generator=g), torch.arange(6) % 2


@pytest.fixture
def setup(tmp_path):
    root = make_synthetic_image_folder(tmp_path / "data", ["a", "b"], per_class=3, size=8, seed=0)
    files = ImageFolderDataset(root).files
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.arange(5.0)}, weights)
    cache = FeatureCache(tmp_path / "cache")

    def key(**overrides):
        args = dict(model="tiny", weights=weights_fingerprint(weights), files=files, transform="resize32")
        args.update(overrides)
        return make_key("toy/test", **args)

    return cache, key, files, weights


def _no_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        return fn()


def test_hit_returns_stored_value_and_counts(setup):
    cache, key, _, _ = setup
    enc = Encoder()
    first = _no_warnings(lambda: cache.get_or_compute(key(), enc))
    second = _no_warnings(lambda: cache.get_or_compute(key(), enc))
    assert enc.calls == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert isinstance(second, tuple)
    assert cache.stats() == {"hits": 1, "misses": 1, "stale": 0, "corrupt": 0}
    # a new FeatureCache on the same directory (a new run) hits too
    again = FeatureCache(cache.directory)
    assert torch.equal(again.get_or_compute(key(), enc)[0], first[0]) and enc.calls == 1
    assert again.hits == 1 and again.misses == 0


def test_epoch_and_seed_are_separate_slots(setup):
    cache, key, _, _ = setup
    enc = Encoder()
    keys = [key(epoch=e, aug_seed=s) for e in (0, 1) for s in (0, 1)]
    values = [_no_warnings(lambda k=k: cache.get_or_compute(k, enc)) for k in keys]
    assert enc.calls == 4 and len({cache.path(k) for k in keys}) == 4
    for k, v in zip(keys, values):
        assert torch.equal(cache.get_or_compute(k, enc)[0], v[0])
    assert enc.calls == 4 and cache.hits == 4


def _assert_rebuilt(cache, key, enc, match):
    old_calls = enc.calls
    with pytest.warns(CacheWarning, match=match):
        value = cache.get_or_compute(key, enc)
    assert enc.calls == old_calls + 1
    fresh = Encoder()
    fresh.calls = enc.calls - 1
    assert torch.equal(value[0], fresh()[0])             # the rebuilt value, not the old entry
    # and the rebuilt entry is now a clean hit
    assert torch.equal(_no_warnings(lambda: cache.get_or_compute(key, enc))[0], value[0])
    assert enc.calls == old_calls + 1


def test_stale_after_file_change(setup):
    cache, key, files, _ = setup
    enc = Encoder()
    cache.get_or_compute(key(), enc)
    st = os.stat(files[2])
    with open(files[2], "ab") as f:
        f.write(b"\x00")                                      # size changes
    _assert_rebuilt(cache, key(), enc, r"stale: file list changed")
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # only the mtime changes
    _assert_rebuilt(cache, key(), enc, r"stale: file list changed \(6 -> 6 files")
    _assert_rebuilt(cache, key(files=files[:-1]), enc, r"file list changed \(6 -> 5 files")
    assert cache.stale == 3


def test_stale_after_transform_change(setup):
    cache, key, _, _ = setup
    enc = Encoder()
    cache.get_or_compute(key(), enc)
    _assert_rebuilt(cache, key(transform="resize64"), enc, r"transform changed \('resize32' -> 'resize64'\)")


def test_stale_after_weights_change(setup):
    cache, key, _, weights = setup
    enc = Encoder()
    cache.get_or_compute(key(), enc)
    old = weights_fingerprint(weights)
    torch.save({"w": torch.arange(5.0) + 1}, weights)
    new = weights_fingerprint(weights)
    assert new != old and new.startswith("sha256:")
    _assert_rebuilt(cache, key(weights=new), enc, r"weights changed \(sha256:")
    _assert_rebuilt(cache, key(weights=weights_fingerprint(None, seed=3)), enc, "random-init:3")
    assert cache.stale == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "garbage", "empty", "bad_header"])
def test_corrupt_entry_rebuilt_with_message(setup, damage):
    cache, key, _, _ = setup
    enc = Encoder()
    cache.get_or_compute(key(), enc)
    path = cache.path(key())
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 17]
    elif damage == "flip_payload":
        data[-40] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"this is not a cache file at all")
    elif damage == "empty":
        data = bytearray()
    else:
        start = len(cache_mod.MAGIC) + 8
        data[start:start + 5] = b"#####"
    path.write_bytes(bytes(data))
    _assert_rebuilt(cache, key(), enc, r"is corrupt \(.+\); rebuilding")
    assert cache.corrupt == 1 and cache.stale == 0


def test_atomic_write_leaves_old_entry_on_failure(setup, monkeypatch):
    cache, key, _, _ = setup
    enc = Encoder()
    original = cache.get_or_compute(key(), enc)
    before = cache.path(key()).read_bytes()
    seen = []

    def failing_replace(src, dst):
        seen.append((os.fspath(src), os.fspath(dst)))
        assert os.path.getsize(src) > 0                      # the whole entry sits in the temp file
        assert open(dst, "rb").read() == before              # target untouched until the rename
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(cache_mod.os, "replace", failing_replace)
    with pytest.warns(CacheWarning) as record:
        value = cache.get_or_compute(key(transform="other"), enc)
    messages = " | ".join(str(w.message) for w in record)
    assert "stale" in messages and "could not write" in messages
    assert enc.calls == 2 and not torch.equal(value[0], original[0])
    src, dst = seen[0]
    assert os.path.dirname(src) == os.path.dirname(dst) == str(cache.directory) and src != dst
    assert sorted(p.name for p in cache.directory.iterdir()) == [cache.path(key()).name]  # no temp left
    monkeypatch.undo()
    assert torch.equal(_no_warnings(lambda: cache.get_or_compute(key(), enc))[0], original[0])


def test_writes_go_through_a_temp_file_then_os_replace(setup, monkeypatch):
    cache, key, _, _ = setup
    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", spy)
    cache.get_or_compute(key(), Encoder())
    assert len(calls) == 1 and calls[0][0].startswith(".tmp-") and calls[0][1] == cache.path(key()).name


def test_key_errors_and_descriptions(setup, tmp_path):
    cache, key, files, _ = setup
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_key("x", model="m", weights="tag:t", files=[str(tmp_path / "nope.png")])
    with pytest.raises(FileNotFoundError, match="weights file"):
        weights_fingerprint(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="memory address"):
        describe_transform(lambda im: im)
    with pytest.raises(TypeError, match="model must be a non-empty str"):
        make_key("x", model="", weights="tag:t")
    with pytest.raises(TypeError, match="key must be a CacheKey"):
        cache.get_or_compute({"name": "x"}, Encoder())
    assert weights_fingerprint("openai") == "tag:openai"
    assert weights_fingerprint(None, seed=2) == "random-init:2"
    assert describe_transform(None) == "none"
    k = key()
    assert k.n_files == 6 and k.slot == key().slot and k.slot != key(model="other").slot
    assert cache.clear() == 0
    cache.get_or_compute(k, Encoder())
    assert cache.clear() == 1 and not cache.path(k).exists()
