"""The prefix cache: full page-sized blocks of prompt tokens whose K/V stay in the pool after their
request ends, found again by the next prompt that starts with them (engine/kv.py owns the pages).

A block is the `page_size` tokens of prompt positions [i ps, (i + 1) ps): in every (layer, KV head)
row its K/V fill exactly one page, so a cached block is one page per row, [L, Hkv] page ids. Blocks
chain: a block's key is (its parent block, its tokens), so a block matches only after the same
tokens at every position before it (vLLM's chained block hashes, with the tuple itself as the key:
no collision to verify). The cache belongs to one engine (one model, dtype and device), so
nothing else goes into the key.

Every cached page carries one reference of the cache (PagedKV.ref); a request that matches a block
references its pages in every row instead of prefilling them. A page with more than one reference
is never written: pruning writes a row's kept tokens into fresh pages of its own (PagedKV.compact),
so the cached block stays whole. A block whose pages only the cache references is *unused*; unused
blocks are evicted least recently used first, leaves first (a block's parent is used at least as
recently), when the pool runs short (PagedKV._alloc), before anyone is preempted.

With prompt log-probabilities (echo), a block also keeps its tokens' entries and the final
hidden state of its last token, so a scoring request that matches it scores only its suffix.
"""

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Block:
    parent: "Block | None"
    tokens: tuple
    pages: torch.Tensor  # [L, Hkv] int32: the block's page in every row
    used: int = 0  # the cache's clock when a request last matched or wrote it
    children: int = 0
    logprobs: list | None = None  # its tokens' prompt log-probability entries (top `top` each)
    top: int | None = None
    last_h: torch.Tensor | None = None  # [dim] its last token's final hidden state
    key: tuple = field(init=False)

    def __post_init__(self):
        self.key = (id(self.parent), self.tokens)


class PrefixCache:
    def __init__(self, kv):
        self.kv = kv
        self.ps = kv.ps
        self.blocks: dict[tuple, Block] = {}
        self.clock = 0
        self.hit_tokens = 0  # prompt tokens found in the cache (not prefilled)
        self.query_tokens = 0  # prompt tokens of the requests that looked
        self.evictions = 0  # blocks evicted
        self._stack = None  # [blocks, L, Hkv] their pages, in self.blocks' order (rebuilt on change)
        kv.cache = self

    # ------------------------------------------------------------------------------ lookup
    def match(self, tokens: list[int], limit: int, top: int | None = None) -> list[Block]:
        """The longest chain of cached blocks that starts `tokens`, within its first `limit` tokens
        (whole blocks). top: the request scores its prompt with this many top log-probabilities,
        so only blocks that kept exactly those entries match."""
        out, parent = [], None
        for i in range(min(limit, len(tokens)) // self.ps):
            blk = self.blocks.get((id(parent), tuple(tokens[i * self.ps : (i + 1) * self.ps])))
            if blk is None or (top is not None and (blk.logprobs is None or blk.top != top)):
                break
            out.append(blk)
            parent = blk
        return out

    def pages(self, blocks: list[Block]) -> int:
        """Pool pages the blocks hold (one per row each)."""
        return len(blocks) * self.kv.L * self.kv.H

    def take(self, blocks: list[Block], prompt_tokens: int):
        """A request uses these blocks (its rows reference their pages: PagedKV.assign)."""
        self.clock += 1
        for blk in blocks:
            blk.used = self.clock
        self.hit_tokens += len(blocks) * self.ps
        self.query_tokens += prompt_tokens

    # ------------------------------------------------------------------------------ insertion
    def insert(self, tokens: list[int], slot: int, logprobs=None, top=None, block_h=None):
        """Cache the full blocks of a prompt just prefilled into `slot` (its rows hold the whole
        prompt, before pruning) that are not cached yet. logprobs, top, block_h: the prompt's
        log-probability entries, their top-k and each block's last hidden state {block: [dim]}."""
        kv, parent = self.kv, None
        self.clock += 1
        apart = False  # the row prefilled a block that was cached meanwhile: its pages are its own
        for i in range(len(tokens) // self.ps):
            part = tuple(tokens[i * self.ps : (i + 1) * self.ps])
            blk = self.blocks.get((id(parent), part))
            mine = kv.h_table[:, slot, :, i]
            if blk is None:
                if apart:  # a row references a prefix of every chain it uses (so unused blocks
                    break  # are closed downwards): none of its pages goes under a parent it lacks
                blk = Block(parent, part, mine.clone())
                kv.ref_pages(blk.pages, 1)
                self.blocks[blk.key] = blk
                self._stack = None
                if parent is not None:
                    parent.children += 1
            elif not torch.equal(blk.pages, mine):
                apart = True
            if logprobs is not None and block_h and i in block_h and (blk.logprobs is None or blk.top != top):
                # the entries depend on the tokens alone; another top-k's are replaced
                blk.logprobs = logprobs[i * self.ps : (i + 1) * self.ps]
                blk.top, blk.last_h = top, block_h[i]
            blk.used = self.clock
            parent = blk

    # ------------------------------------------------------------------------------ eviction
    def _unused(self) -> list[Block]:
        if not self.blocks:
            return []
        blocks = list(self.blocks.values())
        if self._stack is None:
            self._stack = torch.stack([b.pages for b in blocks]).long()
        free = (self.kv.ref[self._stack] == 1).flatten(1).all(1).tolist()
        return [b for b, f in zip(blocks, free) if f]

    def evictable(self) -> int:
        """Pages that evicting every unused block would free."""
        return self.pages(self._unused())

    def evict(self, pages: int) -> int:
        """Evict unused blocks, least recently used leaves first, until `pages` pool pages are free
        (or none is left). Returns the pages freed."""
        unused = self._unused()
        freed = 0
        while freed < pages and unused:
            leaves = [b for b in unused if b.children == 0]
            blk = min(leaves, key=lambda b: b.used)
            unused.remove(blk)
            self.drop(blk)
            freed += self.pages([blk])
        return freed

    def drop(self, blk: Block):
        del self.blocks[blk.key]
        self._stack = None
        if blk.parent is not None:
            blk.parent.children -= 1
        self.kv.ref_pages(blk.pages, -1)
        self.evictions += 1

    def clear(self):
        """Evict every block (the pages of running requests stay theirs)."""
        while self.blocks:
            leaves = [b for b in self.blocks.values() if b.children == 0]
            for blk in leaves:
                self.drop(blk)

    @property
    def cached_pages(self) -> int:
        return self.pages(list(self.blocks.values()))
