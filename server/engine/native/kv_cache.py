"""Paged KV-cache bookkeeping: a preallocated block pool, per-sequence block tables,
prefix caching by block hash with reference counts and LRU eviction.

The tensors themselves live with the model runner; this module only hands out block ids.
A block whose reference count drops to zero goes to the back of the free queue; if it was
full and hashed it stays findable by its hash until it is handed out again (LRU eviction
from the front). Usage counts referenced blocks only, so a drained engine reports zero.

Models whose every attention layer sees only a bounded reach of keys (sliding window,
attention chunk: `KVCacheManager(reach=...)`) release a sequence's blocks once they hold only
positions no later query can see: its block table keeps their ids (never read again) and
`SequenceBlocks.dropped` counts them, so such a sequence holds about reach / block_size
blocks, not its whole context. The blocks stay findable in the prefix cache until evicted.

A hash is only a hint: a cached block also records its token ids and the block id of its
parent in the chain, and a hit is taken only when both match (the parent having been matched
the same way), so a hash collision can cost a cache miss but never serve another prompt's KV.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    # set while registered in the prefix cache: what the block holds, and its parent block
    token_ids: tuple[int, ...] | None = None
    parent_id: int | None = None


def hash_block(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.hits = 0
        self.queries = 0

    # -- accounting ---------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    # -- allocation ---------------------------------------------------------------------
    def allocate(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict it from the prefix cache
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = block.token_ids = block.parent_id = None
        block.ref_count = 1
        return block_id

    def share(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released twice"
        if block.ref_count == 0:
            self.free[block_id] = None

    # -- prefix cache -------------------------------------------------------------------
    def lookup(self, block_hash: int, token_ids: tuple[int, ...], parent_id: int | None) -> int | None:
        """The cached block holding `token_ids` after parent block `parent_id` (None: first
        block), found by `block_hash` and verified; None on a miss or a hash collision."""
        if not self.enable_prefix_caching:
            return None
        block_id = self.cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != token_ids or block.parent_id != parent_id:
            return None  # a different block under the same hash
        return block_id

    def register(self, block_id: int, block_hash: int, token_ids: tuple[int, ...], parent_id: int | None) -> None:
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash, block.token_ids, block.parent_id = block_hash, token_ids, parent_id
            self.cached[block_hash] = block_id


class SequenceBlocks:
    """A sequence's block table plus the hashes of its full, computed blocks."""

    __slots__ = ("table", "hashes", "dropped")

    def __init__(self) -> None:
        self.table: list[int] = []
        self.hashes: list[int] = []
        self.dropped = 0  # table[:dropped] released: outside every layer's reach (KVCacheManager.reach)


class KVCacheManager:
    def __init__(self, pool: BlockPool, reach: int | None = None):
        """`reach`: every attention layer's query at position p reads keys p - reach + 1 .. p at
        most (a sliding window or attention chunk on every layer); None: some layer reads all."""
        self.pool = pool
        self.block_size = pool.block_size
        self.reach = reach

    def blocks_needed(self, seq: SequenceBlocks, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.table))

    def match_prefix(self, seq: SequenceBlocks, token_ids: list[int]) -> int:
        """Attach cached blocks for the longest cached prefix of `token_ids` (at most
        len - 1 tokens, so at least one token is computed); returns the tokens covered."""
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        parent = None
        self.pool.queries += max_blocks * bs
        for i in range(max_blocks):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            block_id = self.pool.lookup(h, tokens, seq.table[-1] if seq.table else None)
            if block_id is None:
                break
            self.pool.share(block_id)
            seq.table.append(block_id)
            seq.hashes.append(h)
            parent = h
        self.pool.hits += len(seq.table) * bs
        return len(seq.table) * bs

    def allocate(self, seq: SequenceBlocks, num_computed: int, num_new: int, copies: list[tuple[int, int]]) -> bool:
        """Make room for `num_new` more tokens after `num_computed`. A shared partial last
        block is copied first (copy-on-write): the (src, dst) pair is appended to `copies`.
        Returns False, changing nothing, when the pool is short."""
        need = self.blocks_needed(seq, num_computed + num_new)
        cow = num_computed % self.block_size != 0 and self.pool.blocks[seq.table[-1]].ref_count > 1
        if need + cow > self.pool.num_free:
            return False
        if cow:
            src = seq.table[-1]
            dst = self.pool.allocate()
            self.pool.release(src)
            seq.table[-1] = dst
            copies.append((src, dst))
        for _ in range(need):
            seq.table.append(self.pool.allocate())
        return True

    def commit(self, seq: SequenceBlocks, token_ids: list[int], num_computed: int) -> None:
        """Register the hashes of blocks that became full with computed tokens."""
        bs = self.block_size
        full = min(num_computed, len(token_ids)) // bs
        while len(seq.hashes) < full:
            i = len(seq.hashes)
            parent = seq.hashes[-1] if seq.hashes else None
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            self.pool.register(seq.table[i], h, tokens, seq.table[i - 1] if i else None)
            seq.hashes.append(h)
        if self.reach is not None:
            self._drop_unreachable(seq, num_computed)

    def _drop_unreachable(self, seq: SequenceBlocks, num_computed: int) -> None:
        """Release the blocks before the first key the next query (position `num_computed`) can
        see, keeping the last full block (the parent the next block registers under)."""
        upto = min(max(0, num_computed - self.reach + 1) // self.block_size, len(seq.hashes) - 1)
        while seq.dropped < upto:
            self.pool.release(seq.table[seq.dropped])
            seq.dropped += 1

    def trim(self, seq: SequenceBlocks, num_tokens: int) -> None:
        """Release the whole blocks past the first `num_tokens` tokens (speculative decoding:
        the blocks that held only rejected drafts)."""
        keep = max(-(-num_tokens // self.block_size), len(seq.hashes))
        while len(seq.table) > keep:
            self.pool.release(seq.table.pop())

    def fork(self, seq: SequenceBlocks) -> SequenceBlocks:
        """A child sharing every block of `seq` (the partial last one is copied on write)."""
        child = SequenceBlocks()
        for block_id in seq.table[seq.dropped:]:
            self.pool.share(block_id)
        child.table = list(seq.table)
        child.hashes = list(seq.hashes)
        child.dropped = seq.dropped
        return child

    def free(self, seq: SequenceBlocks) -> None:
        # tail first, so the prefix stays cached longest
        for block_id in reversed(seq.table[seq.dropped:]):
            self.pool.release(block_id)
        seq.table.clear()
        seq.hashes.clear()
        seq.dropped = 0
