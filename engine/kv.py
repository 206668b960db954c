"""The ragged KV store: allocated once, every (layer, sequence, KV head) row has its own length.

Buffers are [layers, batch, kv_heads, capacity, head_dim]. Row r = (l, b, h) holds live
entries in slots [0, lengths[r]); slots at or past that are never read. Keys are stored
post-RoPE with their original absolute positions in `pos` (needed for sliding windows and
for researchers who inspect what survived), so compaction never touches the rotary phase.
"""
import torch
import torch.nn.functional as F


class RaggedKV:
    def __init__(self, n_layers, batch, n_kv_heads, capacity, head_dim, dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.zeros(shape[:4], dtype=torch.int32, device=device)
        self.lengths = torch.zeros(shape[:3], dtype=torch.int64, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.int64, device=device)  # absolute position of the next token
        self.capacity = capacity
        self._bi = torch.arange(batch, device=device)[:, None].expand(batch, n_kv_heads)
        self._hi = torch.arange(n_kv_heads, device=device)[None, :].expand(batch, n_kv_heads)
        if torch.device(device).type == "cuda":  # fixed addresses: CUDA graphs may then mutate them in place
            for t in (self.k, self.v, self.pos, self.lengths, self.next_pos):
                torch._dynamo.mark_static_address(t)

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, prompt_lens: torch.Tensor):
        """Write a right-padded prompt's K/V [B, Hkv, N, D]; row b is live up to prompt_lens[b]."""
        n = k.shape[2]
        self.k[layer, :, :, :n] = k
        self.v[layer, :, :, :n] = v
        self.pos[layer, :, :, :n] = torch.arange(n, dtype=torch.int32, device=k.device)
        self.lengths[layer] = prompt_lens[:, None]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write one new token per sequence [B, Hkv, 1, D] at each row's own length."""
        slot = self.lengths[layer]
        self.k[layer].index_put_((self._bi, self._hi, slot), k[:, :, 0])
        self.v[layer].index_put_((self._bi, self._hi, slot), v[:, :, 0])
        self.pos[layer].index_put_((self._bi, self._hi, slot), self.next_pos[:, None].expand_as(slot).int())
        self.lengths[layer] += 1

    def attend(self, layer: int, q: torch.Tensor, span: int, window: int | None = None) -> torch.Tensor:
        """Decode attention of q [B, H, 1, D] over the live slots of `layer`, reading only [0, span).

        `span` must cover every row's length (the caller knows it on the host); GQA is done by
        folding each group's query heads into the query-length axis, so K/V are never repeated."""
        B, H, _, D = q.shape
        hkv = self.k.shape[2]
        k, v = self.k[layer, :, :, :span], self.v[layer, :, :, :span]
        live = torch.arange(span, device=q.device) < self.lengths[layer][..., None]  # [B, Hkv, span]
        if window is not None:
            live &= (self.next_pos[:, None, None] - self.pos[layer, :, :, :span]) < window
        out = F.scaled_dot_product_attention(q.view(B, hkv, H // hkv, D), k, v, attn_mask=live[:, :, None, :])
        return out.reshape(B, H, 1, D)

    def compact(self, keep: torch.Tensor):
        """Keep the slots marked in keep [L, B, Hkv, N] (N <= capacity), moved to the front in order.

        One batched gather for all layers; afterwards lengths = keep.sum(-1). Slots of a row
        that were not live before must not be marked."""
        n = keep.shape[-1]
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept slots first, in order
        for buf in (self.k, self.v):
            idx = order[..., None].expand(*order.shape, buf.shape[-1])
            buf[:, :, :, :n] = torch.gather(buf[:, :, :, :n], 3, idx)
        self.pos[:, :, :, :n] = torch.gather(self.pos[:, :, :, :n], 3, order)
        self.lengths.copy_(keep.sum(-1))
