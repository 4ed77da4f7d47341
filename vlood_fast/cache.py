"""On-disk cache of encoder outputs (frozen CLIP features), safe against stale and broken entries.

Both CLIP encoders are frozen in CRoFT, so an evaluation set needs one encoder pass per run (the
paper's code encodes it every epoch), and training views can be reused when the augmentation is
a pure function of (image, epoch, seed) (``vlood_fast.data.SeededViews``).

A ``CacheKey`` has two parts:

- the *slot* (which entry): ``name`` (your label for the split, e.g. ``"pacs/sketch/test"``),
  ``model`` name, ``epoch`` and ``aug_seed`` (``None`` for evaluation sets);
- the *fingerprint* (what the entry must have been built from): ``weights`` (``sha256:<hex>`` of
  the weights file, ``random-init:<seed>`` or ``tag:<tag>``, see ``weights_fingerprint``), the
  file list with sizes and mtimes (as a digest), and the transform description.

An entry whose fingerprint differs from the request is **stale**; one that cannot be read or
fails its checksum is **corrupt**. Either is reported with a ``CacheWarning`` naming the entry
and the reason, then rebuilt by the compute function and overwritten; neither is ever returned.
Entries are written to a temporary file in the cache directory and moved into place with
``os.replace`` (atomic on POSIX and Windows), so readers never see a partial entry.

File format: ``MAGIC``, an 8-byte little-endian header length, a JSON header (key, payload
length and sha256), then the payload written by ``torch.save`` (read back with
``weights_only=True``: tensors, numbers, strings, lists, tuples, dicts).
"""
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

MAGIC = b"VLOODFAST-FEATURE-CACHE\x00v1\n"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz", ".tar")

__all__ = ["CacheKey", "CacheWarning", "FeatureCache", "describe_transform", "make_key",
           "weights_fingerprint"]


class CacheWarning(UserWarning):
    """A cache entry was stale or corrupt and is being rebuilt (or could not be written)."""


# ---------------------------------------------------------------- key parts
_SHA_MEMO = {}


def file_sha256(path) -> str:
    """Hex sha256 of a file, memoized per (path, size, mtime) within the process."""
    path = os.path.realpath(path)
    st = os.stat(path)
    memo_key = (path, st.st_size, st.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA_MEMO[memo_key] = digest.hexdigest()
    return _SHA_MEMO[memo_key]


def looks_like_path(value: str) -> bool:
    """True for a string that names a file rather than an open_clip pretrained tag."""
    return (os.path.exists(value) or os.sep in value or "/" in value
            or value.lower().endswith(_WEIGHT_SUFFIXES))


def weights_fingerprint(pretrained=None, seed=0) -> str:
    """Identity of model weights for cache keys.

    ``None`` -> ``"random-init:<seed>"``; a local file -> ``"sha256:<hex of its bytes>"``;
    anything else -> ``"tag:<tag>"`` (an open_clip pretrained tag).

    Example::

        weights_fingerprint("weights/vit_b16.pt")   # 'sha256:9f2c...'
    """
    if pretrained is None:
        return f"random-init:{int(seed)}"
    pretrained = os.fspath(pretrained)
    if looks_like_path(pretrained):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"weights file {pretrained!r} does not exist")
        return "sha256:" + file_sha256(pretrained)
    return f"tag:{pretrained}"


def describe_transform(transform) -> str:
    """A stable text description of a transform: strings as is, ``None`` -> ``"none"``, else ``repr``.

    Raises ValueError when the repr holds a memory address (lambdas, plain objects): such a
    description would differ every run; pass a descriptive string instead.
    """
    if transform is None:
        return "none"
    if isinstance(transform, str):
        return transform
    text = repr(transform)
    if re.search(r" at 0x[0-9a-fA-F]+", text):
        raise ValueError(f"transform repr {text!r} holds a memory address, so it is not stable "
                         f"across runs; pass transform as a descriptive string instead")
    return text


def _files_digest(files):
    """(sha256 over path, size, mtime_ns of each file in the given order, count)."""
    digest = hashlib.sha256()
    count = 0
    for path in files:
        path = os.fspath(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"file {path!r} in the cache key's file list does not exist") from None
        digest.update(f"{os.path.abspath(path)}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
        count += 1
    return digest.hexdigest(), count


@dataclasses.dataclass(frozen=True)
class CacheKey:
    """What a cache entry holds (slot fields) and what it was built from (fingerprint fields).

    Build it with ``make_key``; fields are plain JSON-able values.
    """

    name: str
    model: str
    weights: str
    transform: str = "none"
    files_sha256: str = ""
    n_files: int = 0
    epoch: int | None = None
    aug_seed: int | None = None

    SLOT_FIELDS = ("name", "model", "epoch", "aug_seed")
    FINGERPRINT_FIELDS = ("weights", "files_sha256", "n_files", "transform")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def slot(self) -> str:
        """The entry's file stem: a readable prefix plus a digest of the slot fields."""
        slot = json.dumps([getattr(self, f) for f in self.SLOT_FIELDS])
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.name}-{self.model}")[:80]
        suffix = "" if self.epoch is None else f"-e{self.epoch}"
        suffix += "" if self.aug_seed is None else f"-s{self.aug_seed}"
        return f"{label}{suffix}-{hashlib.sha256(slot.encode()).hexdigest()[:16]}"


def make_key(name, *, model, weights, files=(), transform=None, epoch=None, aug_seed=None) -> CacheKey:
    """Build a ``CacheKey``; stats every file now (sizes and mtimes go into the fingerprint).

    Args:
        name: label of the data split, e.g. ``"pacs/sketch/test"``.
        model: model name, e.g. ``"ViT-B-16"``.
        weights: ``weights_fingerprint(pretrained, seed)``.
        files: image paths in dataset order (rows of the cached features follow this order;
            ``ImageFolderDataset.files`` is already sorted).
        transform: a transform object (its ``repr``) or a description string.
        epoch, aug_seed: for cached training views; ``None`` for evaluation sets.

    Example::

        key = make_key("pacs/sketch/test", model="ViT-B-16", weights=weights_fingerprint(path),
                       files=test_ds.files, transform=preprocess)
        feats, labels = cache.get_or_compute(key, lambda: encode_images(model, test_ds))
    """
    for field, value in (("name", name), ("model", model), ("weights", weights)):
        if not isinstance(value, str) or not value:
            raise TypeError(f"{field} must be a non-empty str, got {value!r}")
    for field, value in (("epoch", epoch), ("aug_seed", aug_seed)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{field} must be an int or None, got {value!r}")
    if isinstance(files, (str, os.PathLike)):
        raise TypeError("files must be a list of paths, not a single path")
    files_sha256, n_files = _files_digest(files)
    return CacheKey(name=name, model=model, weights=weights, transform=describe_transform(transform),
                    files_sha256=files_sha256, n_files=n_files, epoch=epoch, aug_seed=aug_seed)


# ---------------------------------------------------------------- the cache
class _Corrupt(Exception):
    pass


class FeatureCache:
    """A directory of cached encoder outputs; see the module docstring for keys and guarantees.

    Counters: ``hits``, ``misses`` (= compute calls, i.e. encoder passes), ``stale``,
    ``corrupt`` (both included in ``misses``); ``stats()`` returns them as a dict.

    Example::

        cache = FeatureCache("~/.cache/vlood_fast")
        feats, labels = cache.get_or_compute(key, lambda: encode_images(model, test_ds))
        cache.stats()   # {'hits': 0, 'misses': 1, 'stale': 0, 'corrupt': 0}
    """

    def __init__(self, directory):
        self.directory = Path(os.path.expanduser(os.fspath(directory)))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = self.stale = self.corrupt = 0

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "stale": self.stale, "corrupt": self.corrupt}

    def path(self, key: CacheKey) -> Path:
        """The entry file of ``key``'s slot."""
        return self.directory / f"{key.slot}.vfc"

    def get_or_compute(self, key: CacheKey, compute_fn):
        """The cached value of ``key``; on a miss, stale or corrupt entry: ``compute_fn()``, stored.

        ``compute_fn`` takes no arguments and returns a tensor or a (nested) tuple/list/dict of
        tensors and plain values. The returned value is what was stored (tensors on the CPU
        after a hit; as returned by ``compute_fn`` after a miss).
        """
        if not isinstance(key, CacheKey):
            raise TypeError(f"key must be a CacheKey (see make_key), got {type(key).__name__}")
        path = self.path(key)
        if path.exists():
            try:
                stored_key, value = self._read(path)
            except _Corrupt as exc:
                self.corrupt += 1
                warnings.warn(f"vlood_fast cache: entry {path.name!r} ({key.name}) is corrupt "
                              f"({exc}); rebuilding it", CacheWarning, stacklevel=2)
            else:
                changed = [f for f in CacheKey.SLOT_FIELDS + CacheKey.FINGERPRINT_FIELDS
                           if stored_key.get(f) != getattr(key, f)]
                if not changed:
                    self.hits += 1
                    return value
                self.stale += 1
                warnings.warn(f"vlood_fast cache: entry {path.name!r} ({key.name}) is stale: "
                              f"{_describe_changes(changed, stored_key, key)}; rebuilding it",
                              CacheWarning, stacklevel=2)
        self.misses += 1
        value = compute_fn()
        self._write(path, key, value)
        return value

    def clear(self) -> int:
        """Delete every entry (and leftover temporary file); returns the number of files removed."""
        removed = 0
        for p in self.directory.iterdir():
            if p.suffix == ".vfc" or (p.name.startswith(".tmp-") and p.name.endswith(".vfc.part")):
                p.unlink()
                removed += 1
        return removed

    # ------------------------------------------------------------ file format
    def _write(self, path: Path, key: CacheKey, value) -> None:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        payload = buffer.getvalue()
        header = json.dumps({"key": key.as_dict(), "payload_bytes": len(payload),
                             "payload_sha256": hashlib.sha256(payload).hexdigest()}).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".vfc.part", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                f.write(len(header).to_bytes(8, "little"))
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            warnings.warn(f"vlood_fast cache: could not write entry {path.name!r} ({exc}); "
                          f"the value is used uncached", CacheWarning, stacklevel=3)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @staticmethod
    def _read(path: Path):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise _Corrupt(f"unreadable: {exc}") from None
        if not data.startswith(MAGIC):
            raise _Corrupt("not a vlood_fast cache file (bad magic bytes)")
        start = len(MAGIC) + 8
        if len(data) < start:
            raise _Corrupt("truncated header")
        header_len = int.from_bytes(data[len(MAGIC):start], "little")
        try:
            header = json.loads(data[start:start + header_len].decode())
            stored_key = header["key"]
            size, checksum = int(header["payload_bytes"]), header["payload_sha256"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise _Corrupt("unreadable header") from None
        payload = data[start + header_len:]
        if len(payload) != size:
            raise _Corrupt(f"payload is {len(payload)} bytes, expected {size} (truncated write?)")
        if hashlib.sha256(payload).hexdigest() != checksum:
            raise _Corrupt("payload checksum mismatch")
        try:
            value = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken entry
            raise _Corrupt(f"payload does not load: {exc}") from None
        return stored_key, value


def _describe_changes(changed, stored, key):
    reasons = []
    for field in changed:
        if field == "files_sha256" or field == "n_files":
            if "file list" not in " ".join(reasons):
                reasons.append(f"file list changed ({stored.get('n_files')} -> {key.n_files} files, "
                               f"or a size/mtime differs)")
        elif field == "weights":
            reasons.append(f"weights changed ({stored.get('weights')} -> {key.weights})")
        elif field == "transform":
            reasons.append(f"transform changed ({stored.get('transform')!r} -> {key.transform!r})")
        else:
            reasons.append(f"{field} changed ({stored.get(field)!r} -> {getattr(key, field)!r})")
    return "; ".join(reasons)
