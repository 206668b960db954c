"""The engine: a checkpoint, the paged KV pool allocated once, and continuous batching.

    eng = Engine("Qwen/Qwen2.5-7B-Instruct", kv_memory=20, max_seqs=32)
    results = eng.generate([eng.encode(p) for p in prompts], refreekv.make("refreekv"), Sampling())

Each request is admitted when the pool holds its prompt, prefilled (with others admitted at the
same time), pruned by its policy at the prefill -> decode transition (the kept tokens move to the
front of each row's pages and the emptied pages go back to the pool at once), and then decoded
together with every running sequence, one token per step, until it stops; its pages then go to
the next request in the queue (engine/scheduler.py decides who runs).

Research hooks: `policy` may be a list (fan-out: each prompt is prefilled once and pruned by every
policy, one result per pair); `forced` feeds given tokens instead of sampling (teacher forcing);
`on_logits(keys, steps, logits)` sees every row of logits before a token is chosen from it.

The decode step never waits for the host: step t+1 is queued before the tokens of step t are read
back, and the pages a step needs are handed out by the host beforehand (it knows every row's
length). compile=True (CUDA only) compiles the step with CUDA graphs, one recording per batch-size
bucket; it is off by default until a GPU run shows it right (the first H200 run failed it:
bench/RESULTS.md, "First GPU run").
"""

import os
import time

import torch

import refreekv
from engine.attention import pow2
from engine.core import Core, Result  # noqa: F401  (Result: part of the engine's API)
from engine.gemv import gemv, use_gemv
from engine.kv import PagedKV, page_bytes
from engine.sampling import Sampling
from engine.tokenizer import Tokenizer
from weights.errors import UserError

CPU_KV_GIB = 2.0  # default pool on CPU
CUDA_KV_SHARE = 0.8  # default pool on CUDA: this share of the memory left after loading the weights
PROBE_GIB = 2.0  # the prefill probe of one admitted batch (a request alone must fit it too)


class Engine:
    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        compile: bool | None = None,
        kv_memory: float | None = None,
        max_seqs: int | None = None,
        page_size: int = 16,
        max_prefill_tokens: int | None = None,
        load: bool = True,
        tp: int | None = None,
        decode_window: int = 8,
    ):
        """Cheap checks and the tokenizer first; `load=False` stops there (call load() later), so
        a caller can check its prompts before the weights are read."""
        from engine import tp as tp_mod
        from weights.config import load_config
        from weights.resolve import resolve

        self.tp = tp_mod.init(tp, device)  # rank 0 of 1 without a tensor-parallel group
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.tp.on and self.device.startswith("cuda"):
            self.device = f"cuda:{torch.cuda.current_device()}"  # each rank its own GPU (LOCAL_RANK)
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise UserError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda requested but CUDA is not available")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.dev, self.cuda = dev, dev.type == "cuda"
        dt = dtype or ("bfloat16" if self.cuda else "float32")
        if dt not in ("float32", "bfloat16", "float16"):
            raise UserError(f"--dtype must be float32, bfloat16 or float16, got {dt!r}")
        self.dtype = getattr(torch, dt)
        if page_size < 1 or page_size & (page_size - 1) or page_size > 256:
            raise UserError(f"--page-size must be a power of two from 1 to 256, got {page_size}")
        if max_seqs is not None and max_seqs < 1:
            raise UserError(f"--max-seqs must be >= 1, got {max_seqs}")
        if kv_memory is not None and not kv_memory > 0:
            raise UserError(f"--kv-memory must be > 0 GiB, got {kv_memory}")
        if decode_window < 1:
            raise UserError(f"decode_window must be >= 1, got {decode_window}")
        # decode queries each slot keeps for decode-time re-plans (engine/prune.py)
        self.decode_window = decode_window
        self.page_size, self.kv_memory = page_size, kv_memory
        self.max_seqs = max_seqs or (64 if self.cuda else 16)
        self.max_prefill_tokens = max_prefill_tokens or (16384 if self.cuda else 4096)
        # the prefill's attention probe ([L, B, H, rows, N] fp32): an admitted batch stays within
        # it, and a request whose probe alone would not is refused (check_policy)
        self.max_probe_bytes = PROBE_GIB * 2**30
        self.path = resolve(model)
        self.config = load_config(self.path)  # a bad config.json or tokenizer fails before any weights load
        from weights.shard import shard_config

        self.local = shard_config(self.config, self.tp.rank, self.tp.world)  # this rank's heads and ffn units
        self.tokenizer = Tokenizer(self.path)
        if max_length is not None and max_length < 2:
            raise UserError(f"--max-length must be >= 2, got {max_length}")
        limit = self.config.context_limit
        if max_length is not None and max_length > limit:
            raise UserError(f"--max-length {max_length} exceeds the model's {limit} positions")
        # a RoPE-scaled model reaches `limit` when asked
        self.context = max_length or self.config.max_positions
        # opt-in: the compiled CUDA path failed its tests on the first (and so far only) H200 run
        self.compiled = bool(compile)
        self.eos = set(self.config.eos_ids) | {
            i for i in [self.tokenizer.token_id(self.tokenizer.eos)] if i is not None
        }
        self.kv = None
        self.stats: dict = {}  # the last generate() call's workload figures
        if load:
            self.load()

    # --------------------------------------------------------------------------------- set-up
    def pool_pages(self) -> int | None:
        """Pages the pool will hold (None on CUDA without --kv-memory until the weights are loaded):
        what the memory asked for buys, but never more than can be used."""
        if self.kv is not None:
            return self.kv.n_pages
        asked = self.requested_pages()
        return None if asked is None else min(asked, self.usable_pages())

    def requested_pages(self) -> int | None:
        """Pages the pool's memory (--kv-memory, or the device's default) buys."""
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
        return c.n_layers * c.n_kv_heads * self.max_seqs * -(-self.context // self.page_size)

    def pool_gib(self, pages: int) -> float:
        return pages * page_bytes(self.page_size, self.config.head_dim, self.dtype) / 2**30

    def load(self):
        from weights.loader import load_model

        err = None
        try:
            self.model, _ = load_model(self.path, self.device, self.dtype, self.tp.rank, self.tp.world)
        except UserError as e:
            err = str(e)
        if self.tp.on:  # every rank learns whether every rank loaded its shard: none is left waiting
            failed = self.tp.errors(err)
            if failed:
                raise UserError("; ".join(failed))
            self.model.tp = self.tp
        elif err:
            raise UserError(err)
        self.model.setup_rope(self.context, self.dev)  # once: a fixed table keeps compiled graphs valid
        if use_gemv(self.dev):  # opt-in (REFREEKV_GEMV=triton): the Triton GEMV for small decode batches
            self.model.gemv = gemv
        c = self.local
        # room for the last bucket
        slots = pow2(self.max_seqs) if self.cuda and self.compiled else self.max_seqs
        pages = self.pool_pages()
        if self.tp.on:
            pages = self.tp.host_min(pages)  # the same pool on every rank (free memory may differ)
        self.kv = PagedKV(
            c.n_layers,
            c.n_kv_heads,
            c.head_dim,
            pages,
            self.page_size,
            slots,
            self.context,
            self.dtype,
            self.dev,
            c.n_heads,
            self.decode_window,
        )
        # torch.compile: the decode step with the batch symbolic (dynamic=True) and, on CUDA, CUDA
        # graphs: one recording per batch-size bucket, the page tables and lengths static inputs.
        # Prefill compiles with dynamic prompt length and batch but no CUDA graphs (one program per
        # probe width, i.e. per policy). Policies' plans run eagerly: once per admitted batch, a few
        # dozen small ops (well under 1% of prefill), and a researcher's Python control flow, int
        # fields (prompt width) and new policy types would otherwise recompile per prompt length.
        # Off by default on CPU, where compiling costs more than it saves.
        self._decode, self._prefill = _decode_step, _prefill_step
        # eager prefill packs the prompts end to end (no padding, attention per prompt); compiled
        # prefill keeps right-padded static shapes (REFREEKV_PREFILL=padded forces those eagerly too)
        self.packed_prefill = not self.compiled and os.environ.get("REFREEKV_PREFILL", "packed") != "padded"
        if self.compiled:
            # no duck shaping: a prompt of 16 tokens must not be unified with the page size 16 (or a
            # batch of 2 with 2 KV heads) and so compile a program for that length alone
            import torch.fx.experimental._config as fx_config

            fx_config.use_duck_shape = False
            import torch._dynamo.config as dynamo_config

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
            self._decode = torch.compile(
                _decode_step, fullgraph=True, dynamic=True, mode="reduce-overhead" if self.cuda else None
            )
            if not c.sliding_window:  # the windowed prefill loops over query chunks: compiled, it would
                # specialise on the prompt length (one program per length); eager it is matmul-bound anyway
                self._prefill = torch.compile(_prefill_step, fullgraph=True, dynamic=True)
        self.core = Core(self)
        return self

    def encode(self, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        """chat=None: use the checkpoint's chat template when it has one."""
        if not prompt.strip():
            raise UserError("empty prompt")
        if chat is None:
            chat = self.tokenizer.chat_template is not None
        if chat:
            return self.tokenizer.encode(self.tokenizer.apply_chat(prompt, system), special=False)
        if system is not None:
            raise UserError("--system needs the chat template (the checkpoint has none, or --raw was given)")
        return self.tokenizer.encode(prompt)

    def fit(self, ids: list[int], max_new: int, truncate: str | None = None) -> list[int]:
        """Check a prompt against the context; middle-truncate when asked."""
        room = self.context - max_new
        if len(ids) <= room:
            return ids
        if room < 1:
            raise UserError(
                f"--max-new-tokens {max_new} leaves no room for a prompt in the context of "
                f"{self.context} tokens; lower it"
            )
        if truncate == "middle" and room >= 2:
            return ids[: room // 2] + ids[len(ids) - (room - room // 2) :]
        raise UserError(
            f"prompt has {len(ids)} tokens but the context is {self.context} tokens "
            f"(--max-length / max_position_embeddings) and {max_new} new tokens were asked for; "
            "shorten it, lower --max-new-tokens or pass --truncate middle"
        )

    def check_request(self, prompt_len: int, policies, sampling):
        """Everything a request could fail on once queued, checked once before it is (the core's
        add_request and the server's parser both ask here): its sampling, its policies against the
        model and its prompt, and its fit in the context and, alone, in the pool. A UserError names
        what is wrong."""
        for part, check in (
            ("sampling", sampling.check),
            ("policy", lambda: [self.check_policy(p, prompt_len) for p in policies]),
            ("fit", lambda: self.check_fits([range(prompt_len)], sampling.max_new_tokens, len(policies))),
        ):
            try:
                check()
            except UserError as e:
                e.part = part  # which part failed: the server names the field from it
                raise

    def probe_bytes(self, rows: int, prompt_len: int, batch: int = 1) -> int:
        """The prefill probe of `batch` prompts padded to prompt_len: [L, B, H, rows, N] fp32."""
        c = self.config
        return c.n_layers * batch * c.n_heads * rows * prompt_len * 4

    def check_policy(self, policy, prompt_len: int | None = None):
        """Knobs that only the model can judge: protected layers must exist; a policy pruning during
        decoding reads at most the engine's decode window of queries; and its attention probe over a
        prompt of prompt_len tokens must stay within max_probe_bytes."""
        bad = [x for x in getattr(policy, "protected", ()) if x >= self.config.n_layers]
        if bad:
            raise UserError(
                f"KV policy {policy.name!r}: protected layer {bad[0]} does not exist (the model has "
                f"{self.config.n_layers} layers, 0-{self.config.n_layers - 1})"
            )
        if policy.decodes and policy.probe_rows > self.decode_window:
            raise UserError(
                f"KV policy {policy.name!r} reads {policy.probe_rows} queries but the engine keeps the last "
                f"{self.decode_window} during decoding; lower its window or raise decode_window"
            )
        if prompt_len is not None and policy.probe_rows:
            need = self.probe_bytes(policy.probe_rows, prompt_len)
            if need > self.max_probe_bytes:
                raise UserError(
                    f"KV policy {policy.name!r} reads {policy.probe_rows} queries of a {prompt_len}-token "
                    f"prompt: an attention probe of {need / 2**30:.2f} GiB, over this engine's "
                    f"{self.max_probe_bytes / 2**30:.2f} GiB; lower its window (rows)"
                )

    def check_fits(self, prompts: list[list[int]], max_new: int, forks: int = 1):
        """Every request must fit the context, and alone in the pool at its largest (no pruning)."""
        c, ps = self.local, self.page_size
        if forks > self.max_seqs:
            raise UserError(
                f"{forks} policies per prompt need {forks} sequences at once "
                f"but --max-seqs is {self.max_seqs}"
            )
        pages = self.pool_pages()
        for i, p in enumerate(prompts):
            n = len(p)
            if n + max_new > self.context:
                raise UserError(
                    f"prompt of {n} tokens + {max_new} new tokens "
                    f"exceeds the context of {self.context} tokens"
                )
            rows = -(-max(n, n + max_new - 1) // ps)  # prefill writes n; decoding feeds max_new - 1 more
            need = forks * c.n_layers * c.n_kv_heads * rows
            if pages is not None and need > pages:
                per = f"{c.n_layers} layers x {c.n_kv_heads} KV heads x {rows} pages of {ps} tokens" + (
                    f" x {forks} policies" if forks > 1 else ""
                )
                size = pages * page_bytes(ps, c.head_dim, self.dtype)
                size = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.3g} MiB"
                raise UserError(
                    f"prompt {i} ({n} tokens + {max_new} new) needs {need} KV pages ({per}) but the pool "
                    f"holds {pages} pages ({size}); raise --kv-memory or lower --max-new-tokens"
                )

    def max_new_fitting(self, n: int) -> int:
        """The most new tokens a prompt of n tokens can ask for: within the context and, alone in
        the pool without pruning, within its pages."""
        room = self.context - n
        pages = self.pool_pages()
        if pages is not None:
            rows = pages // (self.local.n_layers * self.local.n_kv_heads)
            room = min(room, rows * self.page_size - n + 1)
        return max(0, room)

    def warmup(self, policy) -> float:
        """Compile ahead of the real work (prefill with this policy's probe, decode at batch 1 and 2,
        the CUDA graphs of those buckets); returns the seconds it took. Later buckets only record."""
        t0 = time.perf_counter()
        if self.compiled:
            new = max(1, min(3, self.context - 2))  # a context of a few tokens still warms up
            # lengths equal to no static size (page size, heads), within limits
            n = max(1, min(37, self.context - new))
            while n > 2 and self.kv.seq_pages(n + new - 1) * 2 > self.kv.n_pages:
                n //= 2
            ids = [[self.config.bos_id or 1] * n, [self.config.bos_id or 1] * max(1, n - 8)]
            eos, self.eos = self.eos, set()
            try:
                for batch in (ids[:1], ids):
                    self.generate(batch, policy, Sampling(max_new_tokens=new))
            finally:
                self.eos = eos
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        policy,
        s: Sampling,
        on_token=None,
        on_finish=None,
        forced: list[list[int]] | None = None,
        on_logits=None,
        probe_rows: int = 0,
    ):
        """Serve token-id prompts with one policy (results in prompt order) or a list of policies
        (fan-out: results[i][j] for prompt i and policy j): every prompt is added to the core
        (engine/core.py), which then steps until it is idle. `policy` may also be a registered name.
        on_token(key, text_so_far) streams, on_finish(key, Result) fires as each sequence ends; key
        = i, or (i, j) with fan-out. `forced[i]` are tokens prompt i takes instead of sampling;
        `probe_rows`: at least this many probe rows (>= 1 adds each sequence's evicted attention mass
        to its stats). on_logits(keys, steps, logits [n, V]) sees the logits each token is chosen
        from; they are valid during the call only (a CUDA graph reuses the buffer: clone what you
        keep), and a sequence preempted and resumed shows the steps it replays again.
        A seeded prompt's tokens do not depend on the other prompts (each draws from its own seed);
        batch composition can still move near-ties in greedy output on a GPU (kernels' summation
        order depends on the batch)."""
        if self.kv is None:
            raise UserError("the weights are not loaded: call Engine.load() first")
        core = self.core
        if core.busy():
            raise RuntimeError("generate() needs an idle engine (another driver is stepping its core)")
        fan = isinstance(policy, (list, tuple))
        policies = [refreekv.make(p) if isinstance(p, str) else p for p in (policy if fan else [policy])]
        if forced is not None and len(forced) != len(prompts):
            raise ValueError("forced needs one token list per prompt")
        for i, ids in enumerate(prompts):  # every request is checked before any is queued
            self._check_ids(ids, f"prompt {i}")
            self._check_ids(forced[i] if forced else [], f"forced tokens of prompt {i}", empty_ok=True)
        for ids in prompts:
            self.check_request(len(ids), policies, s)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)
        core.reset_workload()
        core.on_logits, core.probe_rows = on_logits, probe_rows
        slot_of, groups = {}, []
        try:
            for i, p in enumerate(prompts):
                rid = core.add_request(p, policies if fan else policies[0], s, forced[i] if forced else None)
                slot_of[rid] = i
                groups.append(core.group(rid))
            key = (lambda k: (slot_of[k[0]], k[1])) if fan else (lambda k: slot_of[k])
            if on_logits is not None:
                core.on_logits = lambda keys, steps, lg: on_logits([key(k) for k in keys], steps, lg)
            results = {}
            while core.busy():
                for u in core.step():
                    if on_token is not None and (u.tokens or u.result is not None):
                        on_token(key(u.key), u.text)
                    if u.result is not None:
                        results[key(u.key)] = u.result
                        if on_finish is not None:
                            on_finish(key(u.key), u.result)
        except BaseException:
            core.reset()  # an error or an interrupt mid-generation: the pool is whole again for the next call
            raise
        finally:
            core.on_logits, core.probe_rows = None, 0
        self.stats = core.workload(groups)
        peak = self.stats["peak_memory_bytes"]
        for r in results.values():
            r.stats["peak_memory_bytes"] = peak
        if fan:
            return [[results[i, j] for j in range(len(policies))] for i in range(len(prompts))]
        return [results[i] for i in range(len(prompts))]

    def _check_ids(self, ids, what: str, empty_ok: bool = False):
        V = self.config.vocab_size
        if not ids and not empty_ok:
            raise UserError(f"{what} is empty")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V for t in ids):
            raise UserError(f"{what} holds a token id outside the vocabulary [0, {V})")

    def dev_long(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long, pin_memory=self.cuda)
        return t.to(self.dev, non_blocking=True) if self.cuda else t

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)


def _decode_step(model, tokens, kv, span):
    return model.decode(tokens, kv, span)


def _prefill_step(model, tokens, lens, kv, slots, probe_rows, hidden=False):
    """(logits, probe, hidden states or None)."""
    if hidden:
        return model.prefill(tokens, lens, kv, slots, probe_rows=probe_rows, hidden=True)
    return (*model.prefill(tokens, lens, kv, slots, probe_rows=probe_rows), None)
