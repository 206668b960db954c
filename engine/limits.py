"""What an engine can hold and what a request may ask: the pool's size, and the one home of every
check a request gets before it is queued (Engine.check_request: its token ids, its sampling, its
policies against the model and its prompt, its fit in the context and, alone, in the pool). The
server's parser and the core's add_request both ask here; messages name the API's arguments.

Limits is the part of Engine (engine/engine.py) that answers these questions; it reads the
engine's settings (config, local, context, page_size, max_seqs, kv_memory, dtype, device, kv,
decode_window, max_probe_bytes)."""

import torch

from engine.kv import page_bytes, row_pages, seq_pages
from engine.model import MOMENT_HEAD
from weights.errors import UserError

CPU_KV_GIB = 2.0  # default pool on CPU
CUDA_KV_SHARE = 0.8  # default pool on CUDA: this share of the memory left after loading the weights


class Limits:
    # ------------------------------------------------------------------------------- the pool
    def pool_pages(self) -> int | None:
        """Pages the pool will hold (None on CUDA without kv_memory until the weights are loaded):
        what the memory asked for buys, but never more than can be used."""
        if self.kv is not None:
            return self.kv.n_pages
        asked = self.requested_pages()
        return None if asked is None else min(asked, self.usable_pages())

    def requested_pages(self) -> int | None:
        """Pages the pool's memory (kv_memory, or the device's default) buys."""
        if self.kv_memory is not None:
            budget = self.kv_memory * 2**30
        elif not self.cuda:
            budget = CPU_KV_GIB * 2**30
        elif getattr(self, "model", None) is not None:
            budget = CUDA_KV_SHARE * torch.cuda.mem_get_info(self.dev)[0]
        else:
            return None
        return int(budget // page_bytes(self.page_size, self.config.head_dim, self.dtype))

    def usable_pages(self) -> int:
        """Pages that max_seqs sequences of the whole context can hold at once."""
        c = self.local
        return self.max_seqs * seq_pages(self.context, c.n_layers, c.n_kv_heads, self.page_size)

    def pool_gib(self, pages: int) -> float:
        return pages * page_bytes(self.page_size, self.config.head_dim, self.dtype) / 2**30

    def needed_gib(self, lengths: list[int]) -> float:
        """The pool that sequences of these lengths need at once (no pruning, one page of slack
        per row), up to the CPU default: "Hi" does not allocate 2 GiB."""
        c = self.local
        rows = c.n_layers * c.n_kv_heads
        pages = sum(seq_pages(n, c.n_layers, c.n_kv_heads, self.page_size) + rows for n in lengths)
        return min(CPU_KV_GIB, self.pool_gib(pages))

    def probe_bytes(self, rows: int, prompt_len: int, batch: int = 1, stats: bool = False) -> int:
        """The prefill probe of `batch` prompts padded to prompt_len: [L, B, H, rows, N] fp32, and with
        `stats` their query moments (engine/model.py query_moments: [L, B, H, D x D + 9 D] fp32)."""
        c = self.config
        moments = c.head_dim * (c.head_dim + 1 + MOMENT_HEAD) if stats else 0
        return c.n_layers * batch * c.n_heads * (rows * prompt_len + moments) * 4

    def max_new_fitting(self, n: int) -> int:
        """The most new tokens a prompt of n tokens can ask for: within the context and, alone in
        the pool without pruning, within its pages."""
        room = self.context - n
        pages = self.pool_pages()
        if pages is not None:
            rows = pages // (self.local.n_layers * self.local.n_kv_heads)
            room = min(room, rows * self.page_size - n + 1)
        return max(0, room)

    # ------------------------------------------------------------------------------ requests
    def check_request(
        self, prompt: list[int], policies, sampling, forced: list[int] | None = None, index=None
    ):
        """Everything a request could fail on once queued, checked before it is (`index`: the
        prompt's number in a batch, for the message). A UserError names what is wrong; its `part`
        says which part failed (ids, sampling, policy, fit): the server names the field from it."""
        for part, check in (
            ("ids", lambda: self.check_ids(prompt, forced, index)),
            ("sampling", sampling.check),
            ("policy", lambda: [self.check_policy(p, len(prompt)) for p in policies]),
            ("fit", lambda: self.check_fits([prompt], sampling.max_new_tokens, len(policies), index)),
        ):
            try:
                check()
            except UserError as e:
                e.part = part
                raise

    def check_ids(self, prompt: list[int], forced: list[int] | None = None, index=None):
        V = self.config.vocab_size
        name = "the prompt" if index is None else f"prompt {index}"
        if not prompt:
            raise UserError(f"{name} is empty")
        forced_name = "the forced tokens" if index is None else f"forced tokens of prompt {index}"
        for what, ids in ((name, prompt), (forced_name, forced or [])):
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
            if bad:
                raise UserError(f"{what} holds a token id outside the vocabulary [0, {V}): {bad[0]!r}")

    def check_policy(self, policy, prompt_len: int | None = None):
        """Knobs that only the model can judge: protected layers must exist; a policy pruning during
        decoding reads at most the engine's decode window of queries; and its attention probe over a
        prompt of prompt_len tokens must stay within max_probe_bytes."""
        name, L = policy.name, self.config.n_layers
        bad = [x for x in getattr(policy, "protected", ()) if x >= L]
        if bad:
            raise UserError(
                f"KV policy {name!r}: protected layer {bad[0]} does not exist "
                f"(the model has {L} layers, 0-{L - 1})"
            )
        if policy.decodes and policy.probe_rows > self.decode_window:
            raise UserError(
                f"KV policy {name!r} reads {policy.probe_rows} queries but the engine keeps the last "
                f"{self.decode_window} during decoding; lower its window or raise decode_window"
            )
        if prompt_len is not None and policy.probe_rows:
            need = self.probe_bytes(policy.probe_rows, prompt_len)
            if need > self.max_probe_bytes:
                raise UserError(
                    f"KV policy {name!r} reads {policy.probe_rows} queries of a {prompt_len}-token "
                    f"prompt: an attention probe of {need / 2**30:.2f} GiB, over this engine's "
                    f"{self.max_probe_bytes / 2**30:.2f} GiB; lower its window (rows)"
                )

    def check_fits(self, prompts: list[list[int]], max_new: int, forks: int = 1, index=None):
        """Every request must fit the context, and alone in the pool at its largest (no pruning);
        `index`: the number of a single prompt in its batch, for the message."""
        c, ps = self.local, self.page_size
        if forks > self.max_seqs:
            raise UserError(
                f"{forks} policies per prompt need {forks} sequences at once but max_seqs is {self.max_seqs}"
            )
        pages = self.pool_pages()
        for i, p in enumerate(prompts):
            i = i if index is None else index
            n = len(p)
            if n + max_new > self.context:
                raise UserError(
                    f"prompt of {n} tokens + {max_new} new tokens exceeds the context of "
                    f"{self.context} tokens"
                )
            rows = row_pages(max(n, n + max_new - 1), ps)  # prefill writes n; decoding feeds max_new - 1
            need = forks * c.n_layers * c.n_kv_heads * rows
            if pages is not None and need > pages:
                per = f"{c.n_layers} layers x {c.n_kv_heads} KV heads x {rows} pages of {ps} tokens" + (
                    f" x {forks} policies" if forks > 1 else ""
                )
                size = pages * page_bytes(ps, c.head_dim, self.dtype)
                size = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.3g} MiB"
                raise UserError(
                    f"prompt {i} ({n} tokens + {max_new} new) needs {need} KV pages ({per}) but the pool "
                    f"holds {pages} pages ({size}); raise kv_memory or lower max_new_tokens"
                )
