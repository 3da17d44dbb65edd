"""Block hashing for prefix caching.

A full block's hash chains its parent's hash, its token ids and its extra keys:

    root ──▶ h0 = H(root, tokens[0:B], (cache_salt,)) ──▶ h1 = H(h0, tokens[B:2B], ()) ──▶ ...

H is sha256 over a stable byte encoding, so equal hashes mean equal prefixes (up to sha256
collisions), whatever process or tenant computed them. The root is random per process unless a
seed is given, so hashes cannot be precomputed from outside to probe another tenant's cache.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.core.request import Request

# A sha256 digest (32 bytes).
BlockHash = bytes
# Extra keys mixed into one block's hash: cache salt now; LoRA names and multimodal hashes later.
ExtraKey = str | int | bytes

_PROCESS_ROOT_HASH: BlockHash = os.urandom(32)
_INT64_STRUCTS: dict[int, struct.Struct] = {}


def root_block_hash(hash_seed: int | None) -> BlockHash:
    """The parent hash of every request's first block."""
    if hash_seed is None:
        return _PROCESS_ROOT_HASH
    return hashlib.sha256(b"pagedserve-prefix-root:" + str(hash_seed).encode()).digest()


def _encode_extra_keys(extra_keys: Sequence[ExtraKey]) -> bytes:
    # Every key is tagged and length-prefixed so that no two key tuples share an encoding.
    parts = [struct.pack("<I", len(extra_keys))]
    for key in extra_keys:
        if isinstance(key, str):
            data = key.encode()
            parts.append(b"s" + struct.pack("<Q", len(data)) + data)
        elif isinstance(key, bytes):
            parts.append(b"b" + struct.pack("<Q", len(key)) + key)
        elif isinstance(key, int):
            parts.append(b"i" + key.to_bytes(16, "little", signed=True))
        else:
            raise TypeError(f"unsupported extra key type {type(key).__name__}")
    return b"".join(parts)


def _pack_int64(token_ids: Sequence[int]) -> bytes:
    n = len(token_ids)
    packer = _INT64_STRUCTS.get(n)
    if packer is None:
        packer = _INT64_STRUCTS[n] = struct.Struct(f"<Q{n}q")
    return packer.pack(n, *token_ids)


def hash_block_tokens(
    parent_block_hash: BlockHash,
    token_ids: Sequence[int],
    extra_keys: Sequence[ExtraKey] | None = None,
) -> BlockHash:
    """sha256(parent digest ‖ token count and ids as int64 LE ‖ encoded extra keys)."""
    hasher = hashlib.sha256(parent_block_hash)
    hasher.update(_pack_int64(token_ids))
    if extra_keys:
        hasher.update(_encode_extra_keys(extra_keys))
    return hasher.digest()


def block_extra_keys(request: Request, block_index: int) -> tuple[ExtraKey, ...] | None:
    """Extra keys of one block of `request`.

    The cache salt goes into the first block only: through the chain it changes every later
    hash, so requests with different salts never share a block.
    """
    # Slot for multimodal input hashes overlapping the block.
    if block_index != 0:
        return None
    # Like the salt, the adapter id changes every later hash through the chain: a base-model
    # prefix never serves an adapter's request, nor one adapter's prefix another's.
    lora_request = request.lora_request
    if lora_request is None:
        return None if request.cache_salt is None else (request.cache_salt,)
    if request.cache_salt is None:
        return (lora_request.lora_int_id,)
    return (request.cache_salt, lora_request.lora_int_id)


class RequestBlockHasher:
    """Returns the hashes of a request's full blocks not hashed yet.

    A Request calls it when created and whenever a block fills up, and extends its
    `block_hashes`, so each block is hashed exactly once.
    """

    __slots__ = ("block_size", "root_hash")

    def __init__(self, block_size: int, hash_seed: int | None = None) -> None:
        self.block_size = block_size
        self.root_hash = root_block_hash(hash_seed)

    def __call__(self, request: Request) -> list[BlockHash]:
        block_size = self.block_size
        block_hashes = request.block_hashes
        start = len(block_hashes)
        token_ids = request.all_token_ids
        num_full_blocks = len(token_ids) // block_size
        if start >= num_full_blocks:
            return []
        parent = block_hashes[-1] if block_hashes else self.root_hash
        new_hashes: list[BlockHash] = []
        for block_index in range(start, num_full_blocks):
            begin = block_index * block_size
            parent = hash_block_tokens(
                parent,
                token_ids[begin : begin + block_size],
                block_extra_keys(request, block_index),
            )
            new_hashes.append(parent)
        return new_hashes


def get_request_block_hasher(block_size: int, hash_seed: int | None = None) -> RequestBlockHasher:
    """The block hasher a Scheduler attaches to its requests (vLLM's factory name)."""
    return RequestBlockHasher(block_size, hash_seed)
