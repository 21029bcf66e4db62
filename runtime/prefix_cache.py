"""A frame's prompt prefix computed once: the decoder's KV state up to and including the image's
visual tokens, kept in a byte-bounded LRU so a follow-up question about the same frame prefills
only its own text (a robot's periodic prompt on the latest frame, a chat about one picture).

    key = prefix_key(frame_input, budget, prefix_ids)   # the image's content, the budget, and the
                                                        # prompt tokens before it (template, system)
    entry = cache.get(key)                              # PrefixEntry or None
    cache.put(key, PrefixEntry(features, kv))           # evicts least recently used past max_bytes

The key hashes the exact array the vision graph takes (decoded frame or preprocessed pixels), so
two encodings of one picture that decode to the same pixels share an entry; anything else (one
pixel, the budget, the template or system prompt) misses. Thread-safe.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_MB = 256  # the Pipeline's default bound (a 576-token prefix of `small` is ~28 MB)
TEXT_PREFIX_MB = 16  # the text-before-the-image cache's bound (ChatML's 22 positions of `small`: 1 MB)


@dataclass(frozen=True)
class PrefixEntry:
    """What a hit needs: the image's visual tokens [T, D] (the prompt's embeddings are rebuilt
    from them) and the KV state of the prefix, per layer (k, v), each [1, kv_heads, P, head_dim]."""

    features: np.ndarray
    kv: tuple[tuple[np.ndarray, np.ndarray], ...]

    @property
    def length(self) -> int:
        """P: prompt tokens the entry covers (up to and including the last visual token)."""
        return int(self.kv[0][0].shape[2])

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + sum(k.nbytes + v.nbytes for k, v in self.kv))


def frame_digest(frame_input: np.ndarray) -> bytes:
    """A digest of an image as its vision graph takes it (dtype, shape, every byte)."""
    h = hashlib.blake2b(digest_size=20)
    a = np.ascontiguousarray(frame_input)
    h.update(f"{a.dtype.str}{a.shape}|".encode())
    h.update(memoryview(a).cast("B"))
    return h.digest()


def prefix_key(
    frame_input: np.ndarray, budget: int, prefix_ids: Sequence[int], digest: bytes | None = None
) -> str:
    """The cache key of an image (the exact array its vision graph takes; `digest`: its
    frame_digest, when already computed), a budget and the prompt tokens before the image
    (template, system prompt)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(digest if digest is not None else frame_digest(frame_input))
    h.update(f"|{budget}|".encode())
    h.update(np.asarray(prefix_ids, dtype=np.int64).tobytes())
    return h.hexdigest()


def text_prefix_key(prefix_ids: Sequence[int]) -> str:
    """The cache key of the prompt tokens before the image (template, system prompt) alone."""
    return (
        "text:"
        + hashlib.blake2b(np.asarray(prefix_ids, dtype=np.int64).tobytes(), digest_size=20).hexdigest()
    )


class PrefixCache:
    """LRU of PrefixEntry by key, at most `max_bytes` in all (an entry larger than that is not kept)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"prefix cache of {max_bytes} bytes: pass a size >= 0 (0 disables it)")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PrefixEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> PrefixEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: PrefixEntry) -> bool:
        """Keep `entry` (True), evicting the least recently used; False when it alone exceeds the bound."""
        size = entry.nbytes
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            while self._entries and self.bytes + size > self.max_bytes:
                _, gone = self._entries.popitem(last=False)
                self.bytes -= gone.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.bytes += size
            return True

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether `key` is held (a look: no hit or miss counted, no LRU move)."""
        with self._lock:
            return key in self._entries

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
