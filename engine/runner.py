"""The model on its device: the paged pool, the prefill and decode steps (compiled or eager) and the
device helpers the core shares. Below the core: it knows nothing of requests or policies.

Compiled (opt-in): the decode step with the batch and the pages read symbolic (dynamic=True, the
pool's state static inputs), no graph breaks (fullgraph); on CUDA with CUDA graphs, one recording
per batch-size bucket (a power of two), and prefill with dynamic prompt length and batch (one
program per probe width, i.e. per policy). On the CPU only the decode step is compiled: a compiled
prefill measured slower than eager's packed, matmul-bound one (bench/RESULTS.md). Policies' plans
run eagerly: once per admitted batch, a few dozen small ops, and a researcher's Python control flow
would otherwise recompile per prompt length.
"""

import os

import torch

from engine.kernels.attention import pow2
from engine.model import query_moments


class Runner:
    def __init__(self, model, kv, config, local, tp, dev: torch.device, compiled: bool):
        self.model, self.kv, self.config, self.local, self.tp, self.dev = model, kv, config, local, tp, dev
        self.cuda = dev.type == "cuda"
        self.compiled = compiled
        # eager prefill packs the prompts end to end (no padding, attention per prompt); compiled
        # prefill keeps right-padded static shapes (REFREEKV_PREFILL=padded forces those eagerly too)
        self.packed = (
            not (compiled and self.cuda) and os.environ.get("REFREEKV_PREFILL", "packed") != "padded"
        )
        self.decode_step, self.prefill_step = _decode_step, _prefill_step
        # chunked prefill decodes the running batch and prefills the chunks in one forward (a mixed
        # step: the weights read once) when eager and packed; compiled, the decode step keeps its
        # static shapes (REFREEKV_STEP=apart: two forwards eagerly too, to measure the difference)
        self.mix = os.environ.get("REFREEKV_STEP", "mixed") != "apart"
        if compiled:
            self._compile()

    def _compile(self):
        import torch._dynamo.config as dynamo_config
        import torch.fx.experimental._config as fx_config

        # no duck shaping: a prompt of 16 tokens must not be unified with the page size 16 (or a
        # batch of 2 with 2 KV heads) and so compile a program for that length alone
        fx_config.use_duck_shape = False
        # the model's floats (norm eps) as constants: traced as CPU scalars they would split the
        # CUDA graph; and room for every prefill program (probe width x batch 1 / more x dtype)
        # before dynamo's limit, past which it would run eagerly without a word
        if hasattr(dynamo_config, "specialize_float"):
            dynamo_config.specialize_float = True
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        # module-level wrappers, not the no_grad-decorated methods themselves: the decorator's inner
        # function would be one code object (one cache, one recompile budget) for both
        # the pool's sizes are fixed: static, so only the batch and the pages read (span) are symbolic
        # (dynamic=True alone would make every size of every input symbolic, KV heads included)
        kv = self.kv
        for t in (kv.k, kv.v, kv.pos, kv.table, kv.lengths, kv.next_pos, kv.live, kv.queries):
            torch._dynamo.mark_static(t)
        mode = "reduce-overhead" if self.cuda else None
        self.decode_step = torch.compile(_decode_step, fullgraph=True, dynamic=True, mode=mode)
        # prefill on CUDA only (on the CPU eager's packed prefill is faster), and not windowed: the
        # windowed prefill loops over query chunks, so compiled it would specialise on the prompt
        # length (one program per length); eager it is matmul-bound
        if self.cuda and not self.config.sliding_window:
            self.prefill_step = torch.compile(_prefill_step, fullgraph=True, dynamic=True)

    @property
    def mixed(self) -> bool:
        """Whether a step with prefill chunks decodes the running batch in the same forward."""
        return self.mix and self.packed and not self.compiled

    # ------------------------------------------------------------------------------- the steps
    def bucket(self, n: int) -> int:
        """The batch a decode step of n sequences runs at (a CUDA-graph bucket when compiled)."""
        return pow2(n) if self.cuda and self.compiled else n

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of the running slots [0, n): tokens [n] -> logits [n, V]."""
        kv, n = self.kv, tokens.shape[0]
        nb = self.bucket(n)
        toks = tokens if nb == n else torch.cat([tokens, tokens.new_zeros(nb - n)])
        return self.decode_step(self.model, toks, kv, self._span(n))[:n]

    def _span(self, n: int) -> int | None:
        """The pages the PyTorch decode attention reads for slots [0, n). Under CUDA graphs a changing
        host value would re-record per span, so there it reads the whole table (a debugging path on
        GPUs). At least 2: compiled, a span of 1 would be a program of its own (the extra page is
        masked)."""
        kv = self.kv
        if kv.triton or (self.cuda and self.compiled):
            return None
        return min(max(2, int(kv.h_pages[:, :n].max())), kv.table.shape[-1])

    def prefill(
        self,
        prompts: list[list[int]],
        slots: list[int],
        rows: int,
        hidden: bool,
        note=None,
        stats=False,
        prefix: list[int] | None = None,
        ends: list[int] | None = None,
        decode: torch.Tensor | None = None,
    ):
        """Prefill prompts into the pages of their slots: (last-token logits [B, V], the probe
        [L, B, H, rows, N] over every query head or None, with `hidden` the final hidden states
        [T, dim] with each prompt's (token ids, first row) in them, and with `stats` the prompts'
        query moments over every query head (engine/model.py query_moments) or None). note(layers_done,
        layers) follows a long eager prefill. Chunks of longer prompts: prompt b goes after the
        prefix[b] tokens its rows already hold, and its whole prompt is ends[b] tokens long (the
        probe's rows are its last queries, those of this chunk filled; engine/model.py).

        A mixed step (`self.mixed`): `decode` [n] are the next tokens of the running slots [0, n),
        decoded in the same forward; their logits [n, V] come sixth. A forward that raises leaves
        their rows as they were (their lengths restored; what it wrote past them is never read)."""
        lens_l = [len(p) for p in prompts]
        B, N, dev = len(prompts), max(lens_l), self.dev
        first = prefix if prefix and any(prefix) else None
        total = [f + n for f, n in zip(prefix or [0] * B, lens_l)]
        ends = ends if ends and ends != total else None
        src = torch.tensor(slots, device=dev)
        moments = query_moments(self.model.c, B, dev) if stats else None
        if decode is not None and not self.mixed:
            raise ValueError("decode: only an eager packed prefill runs decode rows (runner.mixed)")
        decoded = None
        if self.packed:  # eager: the prompts end to end, no padding
            flat = torch.tensor([t for p in prompts for t in p], device=dev)
            mixed = {}
            if decode is not None:
                mixed = dict(decode=decode, span=self._span(decode.shape[0]))
                lengths = self.kv.lengths.clone()
            try:
                logits, probe, *states = self.model.prefill_packed(
                    flat, lens_l, self.kv, src, rows, hidden, note, moments, first, ends, **mixed
                )
            except Exception:
                if mixed:
                    self.kv.lengths.copy_(lengths)
                raise
            if mixed:
                decoded, logits = logits[: decode.shape[0]], logits[decode.shape[0] :]
            starts = [sum(lens_l[:b]) for b in range(B)]
            where = [(flat, starts[b]) for b in range(B)]
        else:  # right-padded to the longest prompt (static shapes)
            tokens = torch.zeros(B, N, dtype=torch.long)  # right padding: never read, never a sink
            for b, p in enumerate(prompts):
                tokens[b, : lens_l[b]] = torch.tensor(p)
            tokens = tokens.to(dev)
            lens = torch.tensor(lens_l, device=dev)
            chunk = dict(
                prefix=None if first is None else torch.tensor(first, device=dev),
                ends=None if ends is None else torch.tensor(ends, device=dev),
                width=max(total),
            )
            logits, probe, states = self.prefill_step(
                self.model, tokens, lens, self.kv, src, rows, hidden, moments, **chunk
            )
            states = [] if states is None else [states.flatten(0, 1)]
            where = [(tokens.flatten(), b * N) for b in range(B)]
        if self.tp.on:  # every query head: each policy plans as on one process
            probe = None if probe is None else self.tp.gather(probe, 2)
            moments = None if moments is None else tuple(self.tp.gather(m, 2) for m in moments)
        return logits, probe, (states[0] if states else None), where, moments, decoded

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head over hidden states [n, dim] (prompt log-probabilities)."""
        return self.model._logits(h)

    # --------------------------------------------------------------------------- device helpers
    def dev_long(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long, pin_memory=self.cuda)
        return t.to(self.dev, non_blocking=True) if self.cuda else t

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A device tensor's values on the host, without waiting (read them after the step's event)."""
        if not self.cuda:
            return t
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        return h

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)


def _decode_step(model, tokens, kv, span):
    return model.decode(tokens, kv, span)


def _prefill_step(model, tokens, lens, kv, slots, probe_rows, hidden=False, moments=None, **chunk):
    """(logits, probe, hidden states or None); `moments` filled in place when given; `chunk`:
    prefix / ends / width of a chunk of longer prompts (engine/model.py prefill)."""
    out = model.prefill(
        tokens, lens, kv, slots, probe_rows=probe_rows, hidden=hidden, moments=moments, **chunk
    )
    return out if hidden else (*out, None)
