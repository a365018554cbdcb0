"""Paged KV-cache bookkeeping: a pool of fixed-size blocks, block tables and the prefix cache.

Pure Python over integers; the tensors live in the model runner. A block is either used
(reference count > 0) or free (count 0, in the free queue). With prefix caching, a full block is
also named by a key chaining its tokens to the previous block's key; a free block keeps its name
(and KV content) until it is handed out again, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict

from gllm_engine.core.request import Sequence

BlockKey = tuple[int, tuple[int, ...]]  # (hash of the previous block's key or 0, this block's tokens)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def root_key(cache_salt: str | None) -> int:
    """The parent of a sequence's first block key: 0, or a hash of its cache salt (whatever else shapes
    its KV entries, e.g. an adapter or a tenant), so that only sequences with equal salts share blocks."""
    return 0 if cache_salt is None else hash(("cache_salt", cache_salt))


def block_keys(token_ids: list[int], block_size: int, num_blocks: int, start: int = 0,
               parent: int = 0) -> list[BlockKey]:
    """Keys of full blocks `start..num_blocks-1`; `parent` is the hash of block `start-1`'s key."""
    keys = []
    for b in range(start, num_blocks):
        key = (parent, tuple(token_ids[b * block_size:(b + 1) * block_size]))
        keys.append(key)
        parent = hash(key)
    return keys


class BlockPool:
    """Hands out block ids and takes them back, with reference counts and a cache of named blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self.cached: dict[BlockKey, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` free blocks, evicting the least recently freed cached ones."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with {len(self._free)} free")
        ids = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            if self.keys[b] is not None:
                del self.cached[self.keys[b]]
                self.keys[b] = None
            self.ref_counts[b] = 1
            ids.append(b)
        return ids

    def acquire_cached(self, block: int) -> None:
        """Take one more reference on a cached block (taking it off the free queue if it was free)."""
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def name(self, block: int, key: BlockKey) -> None:
        """Register a full, used block under `key` unless an identical block is cached already."""
        if self.keys[block] is None and key not in self.cached:
            self.keys[block] = key
            self.cached[key] = block

    def unname(self, block: int) -> None:
        """Forget a block's name (its content is not what the name promises)."""
        key = self.keys[block]
        if key is not None:
            del self.cached[key]
            self.keys[block] = None

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue in this order."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"block {b} released while already free")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def check_integrity(self) -> None:
        """Raise AssertionError if counts, the free queue and the cache disagree."""
        for b, count in enumerate(self.ref_counts):
            if count < 0 or (count == 0) != (b in self._free):
                raise AssertionError(f"block {b}: reference count {count}, free={b in self._free}")
        for key, b in self.cached.items():
            if self.keys[b] != key:
                raise AssertionError(f"cached block {b} is not named by its key")
        named = sum(k is not None for k in self.keys)
        if named != len(self.cached):
            raise AssertionError(f"{named} named blocks but {len(self.cached)} cache entries")


class KVCacheManager:
    """Grows, shares and frees the block tables of sequences."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.num_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_hits = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached run of `seq`'s full blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        full = (seq.num_tokens - 1) // self.block_size
        found = []
        for key in block_keys(seq.token_ids, self.block_size, full, parent=root_key(seq.cache_salt)):
            block = self.pool.cached.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def record_lookup(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Count an admitted sequence's prefix-cache lookup in the hit-rate statistics."""
        self.num_queries += num_tokens
        self.num_hits += num_cached_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make room for `num_new_tokens` more KV entries of `seq` after its cached prefix.

        `cached_blocks` (from `find_cached_prefix`, for a sequence holding no blocks yet) become
        the start of its table and count as computed. Returns False, changing nothing, if the
        pool is too small.
        """
        num_cached = len(cached_blocks) * self.block_size
        total = seq.num_computed_tokens + num_cached + num_new_tokens
        if (not num_cached and total <= len(seq.block_ids) * self.block_size
                and (not self.enable_prefix_caching or total // self.block_size <= seq.num_named_blocks)):
            return True  # the common decode step: room left in the last block, no block newly full
        need = blocks_needed(total, self.block_size) - len(seq.block_ids) - len(cached_blocks)
        # Cached blocks that are free right now leave the free queue when acquired.
        reclaimed = sum(1 for b in cached_blocks if self.pool.ref_counts[b] == 0)
        if need + reclaimed > self.pool.num_free:
            return False
        for b in cached_blocks:
            self.pool.acquire_cached(b)
        seq.block_ids.extend(cached_blocks)
        seq.num_computed_tokens += num_cached
        if need > 0:
            seq.block_ids.extend(self.pool.allocate(need))
        if self.enable_prefix_caching:
            self._name_full_blocks(seq, total)
        return True

    def _name_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Name the blocks that will be full once this step's tokens are written, of tokens known here
        (a block ending in a token still being sampled is named by a later step)."""
        start, end = seq.num_named_blocks, min(num_tokens, len(seq.token_ids)) // self.block_size
        if end <= start:
            return
        parent = hash(seq.last_block_key) if seq.last_block_key is not None else root_key(seq.cache_salt)
        keys = block_keys(seq.token_ids, self.block_size, end, start, parent)
        for b, key in zip(seq.block_ids[start:end], keys):
            self.pool.name(b, key)
        seq.num_named_blocks, seq.last_block_key = end, keys[-1]

    def free(self, seq: Sequence) -> None:
        """Return `seq`'s blocks; its last blocks go first in the eviction order."""
        self.pool.release(seq.block_ids[::-1])
        seq.block_ids = []
        seq.num_named_blocks, seq.last_block_key = 0, None
