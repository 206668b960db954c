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
length). compile=True compiles the decode step (engine/runner.py; on CUDA with CUDA graphs, one
recording per batch-size bucket); it is off by default: on the CPU its warm-up takes 70-90 s for
the bundled models for a 1.05-1.2x faster batch-1 step, and on CUDA it waits for a GPU run that
shows it right (the first H200 run failed it: bench/RESULTS.md, "First GPU run").
"""

import time

import torch

import refreekv
from engine.budget import StepBudget
from engine.core import Core
from engine.figures import workload
from engine.kernels.attention import pow2
from engine.kernels.gemv import gemv, use_gemv
from engine.kv import PagedKV
from engine.limits import Limits
from engine.prefix import PrefixCache
from engine.runner import Runner
from engine.sampling import Sampling
from engine.tokenizer import Tokenizer
from weights.errors import UserError

PROBE_GIB = 2.0  # the prefill probe of one admitted batch (a request alone must fit it too)
MAX_SEQS = 4096  # sequences decoded at once: past this the page tables alone outgrow any pool
# The server's chunked prefill (bench/RESULTS.md, "Chunked prefill": "the mixed step", "the step
# bound" and "the prompt due earliest first"). On CPU a step's tokens adapt to what steps cost
# (engine/budget.py): a step with chunks takes at most SERVE_STEP_BOUND decode steps of its batch
# (at 2.5 the p99 gap stayed within 1.4-2.7x its median on both bundled models and three policies,
# with the TTFT p50 0.39-1.14x that of whole prompts; at 3, 1.2-3.1x), the whole prefill cap when
# no stream waits; 96 tokens until the costs are measured. On CUDA vLLM's online default, fixed,
# not yet measured here. Offline (the CLI, run_batch, the Python API) prompts are prefilled whole
# unless asked: no stream waits there, and chunks only cost prefill throughput.
SERVE_BATCHED_TOKENS_CPU = 96
SERVE_BATCHED_TOKENS_CUDA = 2048
SERVE_STEP_BOUND = 2.5


class Engine(Limits):
    """A checkpoint on a device, its paged pool and its step-driven core (engine/limits.py: what it
    can hold and the checks a request gets)."""

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
        max_batched_tokens: int | None = None,
        step_bound: float | None = None,
        load: bool = True,
        tp: int | None = None,
        decode_window: int = 8,
        prefix_cache: bool = False,
    ):
        """Cheap checks and the tokenizer first; `load=False` stops there (call load() later), so
        a caller can check its prompts before the weights are read."""
        from engine import tp as tp_mod
        from weights.config import load_config
        from weights.resolve import resolve
        from weights.shard import shard_config

        self.tp = tp_mod.init(tp, device)  # rank 0 of 1 without a tensor-parallel group
        self.dev = self._device(device)
        self.dtype = self._dtype(dtype)
        self.device, self.cuda = str(self.dev), self.dev.type == "cuda"
        self._check_sizes(page_size, max_seqs, kv_memory, decode_window)
        # decode queries each slot keeps for decode-time re-plans (engine/pruning.py)
        self.decode_window = decode_window
        self.page_size, self.kv_memory = page_size, kv_memory
        self.max_seqs = max_seqs or (64 if self.cuda else 16)
        self.max_prefill_tokens = max_prefill_tokens or (16384 if self.cuda else 4096)
        # chunked prefill: the tokens one step processes, decode rows first (0: prompts whole)
        self._max_batched_tokens = self._batched(max_batched_tokens)
        # a step with chunks costs at most this many decode steps of its batch (0: the budget alone)
        self._step_bound = self._bound(step_bound, max_batched_tokens)
        if self._step_bound and max_batched_tokens is None:  # the bound alone: within the prefill cap
            self._max_batched_tokens = max(self.max_prefill_tokens, self.max_seqs)
        if prefix_cache and self.tp.on:
            raise UserError("the prefix cache does not run with tensor parallelism yet", "prefix_cache")
        # full page-sized blocks of prompts stay in the pool for the next prompt that starts with them
        self.use_prefix_cache = bool(prefix_cache)
        # the prefill's attention probe ([L, B, H, rows, N] fp32): an admitted batch stays within
        # it, and a request whose probe alone would not is refused (check_policy)
        self.max_probe_bytes = PROBE_GIB * 2**30
        self.path = resolve(model)
        self.config = load_config(self.path)  # a bad config.json or tokenizer fails before any weights load
        self.local = shard_config(self.config, self.tp.rank, self.tp.world)  # this rank's heads and ffn units
        self.tokenizer = Tokenizer(self.path)
        self.context = self._context(max_length)
        # opt-in: the compiled CUDA path failed its tests on the first (and so far only) H200 run
        self.compiled = bool(compile)
        self._eos = set(self.config.eos_ids) | {
            i for i in [self.tokenizer.token_id(self.tokenizer.eos)] if i is not None
        }
        self.kv = self.core = self.runner = None
        self.stats: dict = {}  # the last generate() call's workload figures
        if load:
            self.load()

    def serve_defaults(self):
        """The chunked prefill the server runs with unless told (see SERVE_BATCHED_TOKENS_* and
        SERVE_STEP_BOUND): on CPU a bound on a step's cost within the prefill cap; on CUDA a fixed
        budget; with tensor parallelism a fixed budget too (the ranks schedule alike)."""
        if self.cuda or self.tp.on:
            self.max_batched_tokens = max(
                SERVE_BATCHED_TOKENS_CUDA if self.cuda else SERVE_BATCHED_TOKENS_CPU, self.max_seqs
            )
            self.step_bound = 0  # (a bound set before would otherwise stay)
        else:
            self.max_batched_tokens = max(self.max_prefill_tokens, self.max_seqs)
            self.step_bound = SERVE_STEP_BOUND

    @property
    def max_batched_tokens(self) -> int:
        """Tokens one step processes, decode rows first, then chunks of prompts (0: whole prompts)."""
        return self._max_batched_tokens

    @max_batched_tokens.setter
    def max_batched_tokens(self, tokens: int):
        """Change the budget between workloads (while nothing is prefilled); checked as at start."""
        if self.core is not None and self.core.sched.prefilling:
            raise RuntimeError("max_batched_tokens changes only while no prompt is being prefilled")
        self._max_batched_tokens = self._batched(tokens)
        if self.core is not None:
            self.core.sched.max_batched_tokens = self._max_batched_tokens
            self.core.sched.budget = self._budget()

    @property
    def step_bound(self) -> float:
        """With a token budget: a step with prefill chunks costs at most this many decode steps of
        its running batch, measured as it runs (engine/budget.py); 0: the budget alone."""
        return self._step_bound

    @step_bound.setter
    def step_bound(self, bound: float):
        if self.core is not None and self.core.sched.prefilling:
            raise RuntimeError("step_bound changes only while no prompt is being prefilled")
        self._step_bound = self._bound(bound, self._max_batched_tokens)
        if self.core is not None:
            self.core.sched.budget = self._budget()

    def _budget(self) -> StepBudget | None:
        if not self._step_bound or not self._max_batched_tokens:
            return None
        start = max(SERVE_BATCHED_TOKENS_CPU, self.max_seqs)  # until a step's costs are measured
        return StepBudget(self._max_batched_tokens, self._step_bound, start)

    @property
    def eos(self) -> set:
        """Token ids that end a sequence (set it to set() to generate every max_new_tokens)."""
        return self._eos

    @eos.setter
    def eos(self, ids):
        self._eos = set(ids)
        if self.core is not None:
            self.core.eos = self._eos

    # ------------------------------------------------------------------- arguments, checked once
    def _device(self, device: str | None) -> torch.device:
        name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise UserError(f"device must be cpu, cuda or cuda:N, got {name!r}", "device")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("device cuda requested but CUDA is not available", "device")
        if dev.type == "cuda" and (dev.index is None or self.tp.on):
            dev = torch.device("cuda", torch.cuda.current_device())  # each rank its own GPU (LOCAL_RANK)
        return dev

    def _dtype(self, dtype: str | None) -> torch.dtype:
        dt = dtype or ("bfloat16" if self.dev.type == "cuda" else "float32")
        if dt not in ("float32", "bfloat16", "float16"):
            raise UserError(f"dtype must be float32, bfloat16 or float16, got {dt!r}", "dtype")
        return getattr(torch, dt)

    def _check_sizes(self, page_size, max_seqs, kv_memory, decode_window):
        if page_size < 1 or page_size & (page_size - 1) or page_size > 256:
            raise UserError(f"page_size must be a power of two from 1 to 256, got {page_size}", "page_size")
        if max_seqs is not None and not 1 <= max_seqs <= MAX_SEQS:
            raise UserError(f"max_seqs must be in [1, {MAX_SEQS}], got {max_seqs}", "max_seqs")
        if kv_memory is not None and not kv_memory > 0:
            raise UserError(f"kv_memory must be > 0 GiB, got {kv_memory}", "kv_memory")
        ram = _ram_gib()
        if kv_memory is not None and ram and kv_memory > ram and not self.cuda:
            raise UserError(
                f"kv_memory {kv_memory:g} GiB is more than this machine's {ram:.1f} GiB of memory",
                "kv_memory",
            )
        if decode_window < 1:
            raise UserError(f"decode_window must be >= 1, got {decode_window}", "decode_window")

    def _batched(self, tokens: int | None) -> int:
        if tokens is None:
            return 0
        if tokens < 0 or 0 < tokens < self.max_seqs:
            raise UserError(
                f"max_batched_tokens must be 0 (prompts prefilled whole) or at least max_seqs "
                f"({self.max_seqs}): a step decodes up to max_seqs rows before any prefill, got {tokens}",
                "max_batched_tokens",
            )
        return tokens

    def _bound(self, bound: float | None, tokens: int | None) -> float:
        """A step bound checked with the token budget it goes with (None: not given)."""
        if not bound:
            return 0.0
        if not bound > 1:
            raise UserError(
                f"step_bound must be 0 (the token budget alone) or more than 1 (a step decodes its "
                f"batch, then prefills), got {bound:g}",
                "step_bound",
            )
        if self.tp.on:
            raise UserError(
                "step_bound does not run with tensor parallelism (ranks schedule alike)", "step_bound"
            )
        if tokens == 0:
            raise UserError(
                "step_bound bounds chunked prefill, but max_batched_tokens 0 prefills prompts whole: "
                "give a token budget (or none: the prefill cap)",
                "step_bound",
            )
        return float(bound)

    def _context(self, max_length: int | None) -> int:
        if max_length is not None and max_length < 2:
            raise UserError(f"max_length must be >= 2, got {max_length}", "max_length")
        limit = self.config.context_limit
        if max_length is not None and max_length > limit:
            raise UserError(f"max_length {max_length} exceeds the model's {limit} positions", "max_length")
        return max_length or self.config.max_positions  # a RoPE-scaled model reaches `limit` when asked

    # --------------------------------------------------------------------------------- set-up
    def load(self):
        """Read the weights, allocate the pool, build the runner (compiling its steps when asked)
        and the core."""
        from engine.model import load_model

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
        pages = self.pool_pages()
        if self.tp.on:
            pages = self.tp.host_min(pages)  # the same pool on every rank (free memory may differ)
        c = self.local
        slots = pow2(self.max_seqs) if self.cuda and self.compiled else self.max_seqs  # the last bucket
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
        if self.use_prefix_cache:
            PrefixCache(self.kv)  # kv.cache
        self.runner = Runner(self.model, self.kv, self.config, c, self.tp, self.dev, self.compiled)
        self.core = Core(
            self.runner,
            self.tokenizer,
            self.check_request,
            self.max_seqs,
            self.max_prefill_tokens,
            lambda rows, n, batch, stats: self.probe_bytes(rows, n, batch, stats) <= self.max_probe_bytes,
            self._eos,
            self.max_batched_tokens,
        )
        self.core.sched.budget = self._budget()
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
            raise UserError(
                "system needs the chat template (the checkpoint has none, or chat=False)", "system"
            )
        return self.tokenizer.encode(prompt)

    def fit(self, ids: list[int], max_new: int, truncate: str | None = None) -> list[int]:
        """Check a prompt against the context; middle-truncate when asked."""
        room = self.context - max_new
        if len(ids) <= room:
            return ids
        if room < 1:
            raise UserError(
                f"max_new_tokens {max_new} leaves no room for a prompt in the context of "
                f"{self.context} tokens; lower it",
                "max_new_tokens",
            )
        if truncate == "middle" and room >= 2:
            return ids[: room // 2] + ids[len(ids) - (room - room // 2) :]
        raise UserError(
            f"prompt has {len(ids)} tokens but the context is {self.context} tokens "
            f"(max_length / max_position_embeddings) and {max_new} new tokens were asked for; "
            "shorten it, lower max_new_tokens or pass truncate middle"
        )

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
            self.check_request(ids, policies, s, forced[i] if forced else None, index=i)
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
            results = _drive(core, key, on_token, on_finish)
        except BaseException:
            core.reset()  # an error or an interrupt mid-generation: the pool is whole again for the next call
            raise
        finally:
            core.on_logits, core.probe_rows = None, 0
        self.stats = workload(core, groups)
        peak = self.stats["peak_memory_bytes"]
        for r in results.values():
            r.stats["peak_memory_bytes"] = peak
        if fan:
            return [[results[i, j] for j in range(len(policies))] for i in range(len(prompts))]
        return [results[i] for i in range(len(prompts))]


def _drive(core, key, on_token, on_finish) -> dict:
    """Step the core until it is idle: every Result by key(request key), the hooks called as it goes."""
    results = {}
    while core.busy():
        for u in core.step():
            if on_token is not None and (u.tokens or u.result is not None):
                on_token(key(u.key), u.text)
            if u.result is not None:
                results[key(u.key)] = u.result
                if on_finish is not None:
                    on_finish(key(u.key), u.result)
    return results


def _ram_gib() -> float | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None
