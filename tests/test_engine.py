"""The engine end to end: continuous batching over the paged pool gives the tokens of the dense
store (tests/dense_reference.py) for every policy, with admission waits, sequences finishing at
different steps and preemptions all happening; fan-out, teacher forcing, streaming, bad input."""

import json

import pytest
import torch
from conftest import real_text
from dense_reference import dense_generate, dense_generate_each
from helpers import gib, run_cli, small_engine

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling
from engine.tokenizer import Detok
from weights.errors import UserError

POLICIES = {
    "full": {},
    "refreekv": dict(threshold=0.2, protected=(0,)),
    "streaming": dict(budget=0.5),
    "h2o": dict(budget=0.5),
    "snapkv": dict(budget=12),
    "refreekv-h2o": dict(threshold=0.2),
    "refreekv-topp": dict(threshold=0.2, protected=(1,)),
}


class Trace:
    """Records the engine's decode step at which each sequence finished."""

    def __init__(self, eng):
        self.eng, self.at = eng, {}

    def __call__(self, key, result):
        self.at[key] = result.stats["new_tokens"], len(self.at)


def check_busy(stats, n_requests):
    assert stats["admission_waits"] > 0, "admission never waited for pages"
    assert stats["preemptions"] > 0, "no sequence was preempted"
    assert stats["peak_concurrent"] < n_requests, "everything fit at once"
    assert stats["peak_pages"] <= stats["pool_pages"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_every_policy_equals_the_dense_store_through_a_small_pool(tiny_ckpts, family):
    path = tiny_ckpts[family, False]
    eng = small_engine(path, 37)
    eng.eos = set()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (20, 35, 9, 50, 14, 27, 33, 8)]
    s = Sampling(max_new_tokens=24)
    free = eng.generate(prompts, refreekv.make("full"), s)
    eng.eos = {free[1].tokens[9], free[4].tokens[3]}  # some sequences stop early, at their own steps
    for name, kw in POLICIES.items():
        res = eng.generate(prompts, refreekv.make(name, **kw), s)
        if name == "full":  # the pool is the limit at full cache; pruned policies may fit
            check_busy(eng.stats, len(prompts))
            assert len({r.stats["finished_at_step"] for r in res}) > 2
        for p, r in zip(prompts, res):
            want, kept = dense_generate(eng.model, [p], refreekv.make(name, **kw), 24, eng.eos)
            assert r.tokens == want[0], name
            assert r.stats["kept_per_head"] == kept[:, 0].tolist(), name


def test_fan_out_equals_one_policy_at_a_time_and_sequences_finish_apart(tiny_ckpts):
    eng = small_engine(tiny_ckpts["llama", False], 200, max_seqs=14)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (30, 45, 12)]
    free = eng.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=20))
    eng.eos = {free[0].tokens[6], free[2].tokens[11]}  # real stops at different steps
    policies = [refreekv.make(n, **kw) for n, kw in POLICIES.items()]
    trace = Trace(eng)
    fan = eng.generate(prompts, policies, Sampling(max_new_tokens=20), on_finish=trace)
    assert eng.stats["sequences"] == len(prompts) * len(policies)
    for j, p in enumerate(policies):
        alone = eng.generate(prompts, p, Sampling(max_new_tokens=20))
        for i in range(len(prompts)):
            assert (
                fan[i][j].tokens == alone[i].tokens
                and fan[i][j].stats["kept_per_head"] == alone[i].stats["kept_per_head"]
            )
    assert len({n for n, _ in trace.at.values()}) > 2  # sequences ended after different numbers of tokens
    # a list of one policy is a fan-out of one: results[i][0] (it crashed on its keys once)
    one = eng.generate(prompts, policies[-1:], Sampling(max_new_tokens=20))
    assert [r[0].tokens for r in one] == [fan[i][-1].tokens for i in range(len(prompts))]


def test_teacher_forcing_reproduces_full_sequence_logits(tiny_ckpts):
    """Forced tokens through the full cache: the logits at every step equal one prefill of the
    whole text (an independent path through the model)."""
    from helpers import paged

    eng = small_engine(tiny_ckpts["qwen2", False], 60)
    g = torch.Generator().manual_seed(7)
    ctx, tgt = torch.randint(3, 256, (2, 30), generator=g), torch.randint(3, 256, (2, 12), generator=g)
    got = {}

    def hook(keys, steps, logits):
        for k, st, row in zip(keys, steps, logits):
            got[k, st] = row.clone()

    out = eng.generate(
        ctx.tolist(), refreekv.make("full"), Sampling(max_new_tokens=12), forced=tgt.tolist(), on_logits=hook
    )
    assert [r.tokens for r in out] == tgt.tolist()
    kv, slots = paged(eng.config, [42, 42])
    whole, _ = eng.model.prefill(
        torch.cat([ctx, tgt], 1), torch.tensor([42, 42]), kv, slots, probe_rows=0, all_logits=True
    )
    for b in range(2):
        for t in range(12):
            torch.testing.assert_close(got[b, t], whole[b, 29 + t], atol=1e-4, rtol=0)


def test_streaming_survives_preemption(tiny_ckpts):
    eng = small_engine(tiny_ckpts["mistral", False], 27)
    eng.eos = set()
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (40, 33, 25, 47, 18)]
    seen = {}

    def on_token(i, text):
        assert text.startswith(seen.get(i, "")), "streamed text was taken back"
        seen[i] = text

    res = eng.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=30), on_token=on_token)
    assert eng.stats["preemptions"] > 0
    assert [seen[i] for i in range(len(prompts))] == [r.text for r in res]
    # a preempted sequence counts once in the workload
    for k in ("pages_after_prefill", "pages_after_pruning"):
        assert eng.stats[k] == sum(r.stats[k] for r in res), k


def test_streaming_ends_with_the_result_text_at_eos(tiny_ckpts):
    """A sequence that ends on EOS while its text's tail is held back (it could start a stop
    string) streams that tail before it ends: the last streamed text is the result's."""
    eng = small_engine(tiny_ckpts["llama", False], 40)
    eng.eos = set()
    ids = list(range(40, 70))
    free = eng.generate([ids], refreekv.make("full"), Sampling(max_new_tokens=20))[0]
    k = next(i for i in range(4, 20) if free.tokens[i] not in free.tokens[:i])  # EOS at its first occurrence
    eng.eos = {free.tokens[k]}
    text = eng.tokenizer.decode(free.tokens[:k])
    stop = text[-1] + "\x00\x00"  # never matches, but the text's last character could start it
    seen = []
    r = eng.generate(
        [ids],
        refreekv.make("full"),
        Sampling(max_new_tokens=20, stop=[stop]),
        on_token=lambda i, t: seen.append(t),
    )[0]
    assert r.tokens == free.tokens[:k] and r.text == text
    assert seen[-1] == text and (len(seen) < 2 or seen[-2] != text)  # held back until the end


def test_peak_pages_count_the_prompt_before_pruning(tiny_ckpts):
    eng = small_engine(tiny_ckpts["llama", False], 40)
    eng.eos = set()
    r = eng.generate(
        [list(range(3, 83))], refreekv.make("streaming", budget=0.25), Sampling(max_new_tokens=4)
    )[0]
    assert r.stats["pages_after_pruning"] < r.stats["pages_after_prefill"] == eng.stats["peak_pages"]


def test_pool_is_allocated_once(tiny_ckpts):
    eng = small_engine(tiny_ckpts["llama", False], 34)
    kv = eng.kv
    ptrs = [t.data_ptr() for t in (kv.k, kv.v, kv.pos, kv.table, kv.lengths, kv.next_pos, kv.live)]
    for n in (10, 60):
        eng.generate([list(range(3, 3 + n))] * 3, refreekv.make("refreekv"), Sampling(max_new_tokens=8))
        assert eng.kv is kv and kv.n_free == kv.n_pages  # every page back after the workload
    assert ptrs == [t.data_ptr() for t in (kv.k, kv.v, kv.pos, kv.table, kv.lengths, kv.next_pos, kv.live)]


def test_pool_and_scheduler_arguments_are_checked(tiny_ckpts, capsys):
    from engine.generate import main

    path = str(tiny_ckpts["llama", False])
    with pytest.raises(UserError, match="power of two"):
        Engine(path, device="cpu", page_size=12, load=False)
    # the Python API names its arguments; the command line says its flags (engine/cli.py: in_flags)
    with pytest.raises(UserError, match=r"^max_seqs must be in \[1, 4096\]"):
        Engine(path, device="cpu", max_seqs=0, load=False)
    with pytest.raises(UserError, match="^kv_memory must be > 0"):
        Engine(path, device="cpu", kv_memory=-1, load=False)
    rc = main(["--model", path, "--prompt", "x" * 100, "--kv-memory", "0.00001", "--max-new-tokens", "10"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    # 3 layers x 2 KV heads x ceil(109 / 16) = 7 pages = 42;
    # 0.00001 GiB = 10737 B / (16 tokens x (2 x 16 x 4 + 4) B) = 5 pages
    assert "needs 42 KV pages" in err and "pool holds 5 pages" in err, err
    eng = Engine(path, device="cpu", max_seqs=2)
    with pytest.raises(UserError, match="3 policies per prompt need 3 sequences at once but max_seqs is 2"):
        eng.generate([[5, 6, 7]], [refreekv.make("full")] * 3, Sampling(max_new_tokens=2))


def test_incremental_detokenisation_equals_full_decoding(smollm):
    """Multi-byte characters split across tokens: the incremental text is always a prefix of the
    full decode and equals it at the end."""
    from engine.tokenizer import Tokenizer

    tok = Tokenizer(smollm)
    text = "Grüße aus Köln: naïve café, 東京タワー 🚀🙂, ½ + ¾ = 1¼ — «ok»\n" + real_text(600)
    ids = tok.encode(text)
    d = Detok(tok)
    for i, t in enumerate(ids):
        got = d.push(t)
        assert tok.decode(ids[: i + 1]).startswith(got)
        assert not got.endswith("\ufffd")
    assert got == tok.decode(ids)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_models_every_policy_equals_the_dense_store(name):
    """Both bundled real models, fp32 on CPU, four real chat prompts of different lengths:
    (1) every policy fanned out from one prefill per prompt through a pool that holds about one
    prompt's fan-out at a time; (2) full and ReFreeKV alone through a pool of about two sequences,
    long enough answers that running sequences outgrow it and get preempted. Every sequence's
    tokens and kept counts equal the dense store's (tests/dense_reference.py; one dense prefill per
    part, each policy planning from it). The 0.5B model takes the first three prompts only."""
    from weights.bundled import ensure_bundled

    eng = Engine(str(ensure_bundled(name)), device="cpu", max_seqs=28, page_size=4, load=False)
    c = eng.config
    docs = [
        real_text(n, start)
        for n, start in [
            (400, "assert"),
            (500, "atom-identifiers"),
            (300, "break"),
            (600, "calls"),
        ][: 4 if name.startswith("smollm") else 3]
    ]
    prompts = [eng.encode(f"{d}\n\nExplain this text in detail, step by step.") for d in docs]
    # pages of the longest, whole
    rows = lambda m: c.n_layers * c.n_kv_heads * -(-(max(map(len, prompts)) + m) // 4)
    policies = [refreekv.make(n, **({"budget": 0.3} if "budget" in kw else {})) for n, kw in POLICIES.items()]
    eng.kv_memory = gib(int(1.3 * len(policies) * rows(10)), c, 4)
    eng.load()
    fan = eng.generate(prompts, policies, Sampling(max_new_tokens=10))
    assert eng.stats["admission_waits"] > 0 and eng.stats["peak_concurrent"] < len(prompts) * len(policies)
    for j, (p, (want, kept)) in enumerate(
        zip(policies, dense_generate_each(eng.model, prompts, policies, 10, eng.eos))
    ):
        for i in range(len(prompts)):
            assert fan[i][j].tokens == want[i], (p.name, i)
            assert fan[i][j].stats["kept_per_head"] == kept[:, i].tolist(), (p.name, i)

    eng = Engine(
        str(eng.path), device="cpu", max_seqs=8, page_size=4, kv_memory=gib(int(1.7 * rows(40)), c, 4)
    )
    # (the 0.5B model runs ReFreeKV alone here: full's preemptions are the small model's)
    pair = [refreekv.make("full"), refreekv.make("refreekv")][0 if name.startswith("smollm") else 1 :]
    for p, (want, kept) in zip(pair, dense_generate_each(eng.model, prompts, pair, 40, eng.eos)):
        res = eng.generate(prompts, p, Sampling(max_new_tokens=40))
        check_busy(eng.stats, len(prompts))
        assert len({r.stats["finished_at_step"] for r in res}) > 1
        for i, r in enumerate(res):
            assert r.tokens == want[i], (p.name, i)
            assert r.stats["kept_per_head"] == kept[:, i].tolist(), (p.name, i)


@pytest.mark.slow
def test_cli_batch_prints_every_answer_in_order(smollm, tmp_path):
    r = run_cli(
        "--prompt",
        "What is the capital of France?",
        "--prompt",
        "Name a primary colour.",
        "--max-seqs",
        "1",
        "--max-new-tokens",
        "12",
        "--stats-json",
        str(tmp_path / "s.json"),
    )
    assert r.returncode == 0, r.stderr
    st = json.loads((tmp_path / "s.json").read_text())
    assert "Paris" in r.stdout.split("\n\n")[0]
    assert all(s["pages_after_pruning"] <= s["pages_after_prefill"] for s in st)
    assert "workload:" in r.stderr and "peak 1 seqs" in r.stderr


def test_an_error_mid_generation_leaves_the_pool_whole(tiny_ckpts):
    eng = small_engine(tiny_ckpts["llama", False], 40)
    eng.eos = set()
    prompts = [list(range(3, 40)), list(range(50, 70))]

    def boom(i, text):
        if len(text) > 3:
            raise KeyboardInterrupt  # a user's Ctrl-C, or a callback's bug

    with pytest.raises(KeyboardInterrupt):
        eng.generate(prompts, refreekv.make("refreekv"), Sampling(max_new_tokens=10), on_token=boom)
    assert eng.kv.n_free == eng.kv.n_pages and not eng.kv.h_pages.any() and not eng.kv.lengths.any()
    again = eng.generate(prompts, refreekv.make("refreekv"), Sampling(max_new_tokens=10))
    want, _ = dense_generate(eng.model, prompts, refreekv.make("refreekv"), 10)
    assert [r.tokens for r in again] == want


def test_token_ids_are_checked(tiny_ckpts):
    eng = small_engine(tiny_ckpts["llama", False], 40)
    with pytest.raises(UserError, match=r"prompt 1 holds a token id outside the vocabulary \[0, 256\)"):
        eng.generate([[5, 6], [7, 256]], refreekv.make("full"), Sampling(max_new_tokens=2))
    with pytest.raises(UserError, match="prompt 0 is empty"):
        eng.generate([[]], refreekv.make("full"), Sampling(max_new_tokens=2))
    with pytest.raises(UserError, match="forced tokens of prompt 0 holds a token id outside"):
        eng.generate([[5, 6]], refreekv.make("full"), Sampling(max_new_tokens=2), forced=[[-1]])
    assert eng.kv.n_free == eng.kv.n_pages
