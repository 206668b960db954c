"""The test oracle for the paged pool and the scheduler: the dense ragged store the engine used
before pages (one [layers, batch, kv_heads, capacity, head_dim] buffer, rows compacted in place,
attention masked to each row's length) and a plain greedy loop over one fixed batch. No pages,
no queue, no preemption, no pipelining: what the engine must reproduce token for token."""

import copy

import torch
import torch.nn.functional as F

import refreekv


class DenseKV:
    def __init__(self, n_layers, batch, n_kv_heads, capacity, head_dim, dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        z = lambda s, dt: torch.zeros(s, dtype=dt, device=device)
        self.k, self.v = z(shape, dtype), z(shape, dtype)
        self.pos, self.lengths = z(shape[:4], torch.int64), z(shape[:3], torch.int64)
        self.next_pos, self.live = z(batch, torch.int64), z(batch, torch.int64) + 1

    def write_prompt(self, layer, slots, k, v, lens, first=None):
        assert first is None, "the oracle prefills whole prompts"
        n = k.shape[2]
        self.k[layer, :, :, :n], self.v[layer, :, :, :n] = k, v
        self.pos[layer, :, :, :n] = torch.arange(n)
        self.lengths[layer] = lens[:, None]

    def begin_decode(self, B, windows, span=None):
        """The paged pool builds what a step's layers share here; the oracle does each layer alone."""

    def append(self, layer, k, v, step=None):
        """One new token per sequence [B, Hkv, 1, D] at each row's own length."""
        B, H = k.shape[:2]
        bi = torch.arange(B, device=k.device)[:, None].expand(B, H)
        hi = torch.arange(H, device=k.device)[None, :].expand(B, H)
        slot = self.lengths[layer]
        self.k[layer].index_put_((bi, hi, slot), k[:, :, 0])
        self.v[layer].index_put_((bi, hi, slot), v[:, :, 0])
        self.pos[layer].index_put_((bi, hi, slot), self.next_pos[:, None].expand(B, H))
        self.lengths[layer] += 1

    def end_decode(self, q):
        """Every live row moves on by one position (the paged pool also keeps the decode queries, for
        re-plans during decoding; the oracle never re-plans)."""
        self.next_pos += self.live

    def attend(self, layer, q, window=None, step=None):
        """q [B, H, D] over each row's live slots (a bool mask, every slot read)."""
        B, H, D = q.shape
        hkv = self.k.shape[2]
        k, v = self.k[layer], self.v[layer]
        live = torch.arange(k.shape[2], device=q.device) < self.lengths[layer][..., None]
        if window:
            live &= (self.next_pos[:, None, None] - self.pos[layer]) < window
        o = F.scaled_dot_product_attention(q.view(B, hkv, H // hkv, D), k, v, attn_mask=live[:, :, None, :])
        return o.reshape(B, H, D)

    def compact(self, keep):
        """Kept slots of each row to its front, in order."""
        n = keep.shape[-1]
        for idx in torch.nonzero(torch.ones(keep.shape[:3], dtype=torch.bool)).tolist():
            l, b, h = idx
            src = torch.nonzero(keep[l, b, h])[:, 0].to(self.k.device)
            m = src.numel()
            for buf in (self.k, self.v, self.pos):
                buf[l, b, h, :m] = buf[l, b, h, src].clone()
            self.lengths[l, b, h] = m
        assert n <= self.k.shape[3]


@torch.no_grad()
def dense_generate(model, prompts, policy, max_new, eos=()):
    """Greedy generation of a fixed batch through the dense store: prefill -> plan -> compact ->
    decode, each row stopping at its own EOS. Returns (tokens per prompt, kept [L, B, Hkv])."""
    return dense_generate_each(model, prompts, [policy], max_new, eos)[0]


def dense_generate_each(model, prompts, policies, max_new, eos=()):
    """dense_generate for each policy, from one prefill (its probe has the most rows any policy
    reads; each policy gets its last rows, as the engine's fan-out gives them)."""
    c, B, dev = model.c, len(prompts), model.embed.weight.device
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    N = int(lens.max())
    tokens = torch.zeros(B, N, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    prefilled = DenseKV(c.n_layers, B, c.n_kv_heads, N + max_new, c.head_dim, model.embed.weight.dtype, dev)
    rows = max(p.probe_rows for p in policies)
    logits, probe = model.prefill(
        tokens.to(dev), lens, prefilled, torch.arange(B, device=dev), probe_rows=rows
    )
    results = []
    for policy in policies:
        kv = copy.deepcopy(prefilled) if len(policies) > 1 else prefilled
        w = policy.probe_rows
        attn = probe[..., rows - w :, :] if w else None
        kv.compact(policy.plan(refreekv.Probe(attn, lens, c.n_layers, c.n_kv_heads, N)))
        kept = kv.lengths.to("cpu", copy=True)
        out, done = [[] for _ in range(B)], [False] * B
        tok = logits.argmax(-1)
        for step in range(max_new):
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    if t in eos:
                        done[b] = True
                    else:
                        out[b].append(t)
            if all(done) or step == max_new - 1:
                break
            tok = model.decode(tok, kv).argmax(-1)
        results.append((out, kept))
    return results
