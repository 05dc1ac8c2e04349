"""Keys of prompt prefixes: the blake2b hash chain over token blocks that the prefix cache stores blocks under,
and the affinity key the request router sends a prompt by. Both sides import it from here, so a router's key
names exactly the blocks a replica's cache holds.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

ROOT_KEY = b""  # the parent key of a sequence's first block


def hash_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Key of a block: a stable digest of its parent's key and its token ids (same on every host)."""
    data = array("q", tokens)
    if sys.byteorder == "big":
        data.byteswap()  # hash little-endian bytes everywhere, so routers on any host agree
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(data.tobytes())
    return h.digest()


def block_keys(token_ids: Sequence[int], block_size: int, parent: bytes = ROOT_KEY) -> list[bytes]:
    """Keys of the complete blocks of ``token_ids`` (the chain continues from ``parent``)."""
    keys = []
    for j in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[j * block_size:(j + 1) * block_size])
        keys.append(parent)
    return keys


def affinity_key(prompt_ids: Sequence[int], block_size: int, max_tokens: int) -> str | None:
    """The cache key of the last complete block within the first ``max_tokens`` prompt tokens, as hex (None for
    a prompt shorter than a block): replicas report the keys they served, the router matches requests to them."""
    keys = block_keys(prompt_ids[:max_tokens], block_size)
    return keys[-1].hex() if keys else None
