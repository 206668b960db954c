"""Generation through the engine: transformers parity, sampling, limits, stop strings, EOS, the CLI."""

import json
import math

import pytest
import torch
from conftest import real_text
from dense_reference import dense_generate
from helpers import hf_model, run_cli

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling
from refreekv.refreekv import cut_reference

GREEDY = Sampling(max_new_tokens=32)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen2-window"])
def test_full_kv_greedy_equals_transformers_and_refreekv_first_token(tiny_ckpts, family):
    path = tiny_ckpts[family, False]
    g = Engine(str(path), device="cpu")
    ids = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    g.eos = set()  # random weights: run all 32 steps
    full = g.generate([ids], refreekv.make("full"), GREEDY)[0]
    out = hf_model(path).generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)
    assert full.tokens == out[0, 20:].tolist()
    policy = refreekv.make("refreekv", threshold=0.5, protected=())
    pruned = g.generate([ids], policy, GREEDY)[0]
    want, kept = dense_generate(g.model, [ids], policy, 32)
    assert (
        pruned.stats["budget"] < 1
        and pruned.tokens == want[0]
        and pruned.stats["kept_per_head"] == kept[:, 0].tolist()
    )


def test_sampling_is_seeded_and_respects_top_k(tiny_ckpts):
    g = Engine(str(tiny_ckpts["llama", False]), device="cpu")
    g.eos = set()
    ids = list(range(10, 30))
    s = Sampling(max_new_tokens=16, temperature=1.0, top_k=3, top_p=0.9, seed=7)
    a = g.generate([ids], refreekv.make("full"), s)[0].tokens
    assert a == g.generate([ids], refreekv.make("full"), s)[0].tokens
    one = g.generate(
        [ids], refreekv.make("full"), Sampling(max_new_tokens=16, temperature=1.0, top_k=1, seed=1)
    )[0]
    # top-1 = greedy
    assert one.tokens == g.generate([ids], refreekv.make("full"), Sampling(max_new_tokens=16))[0].tokens


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["full", "refreekv"])
def test_cli_answers_paris_on_default_model(kv, smollm, tmp_path):
    r = run_cli(
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--kv",
        kv,
        "--stats-json",
        str(tmp_path / "s.json"),
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    st = json.loads((tmp_path / "s.json").read_text())
    assert {
        "prompt_tokens",
        "kept_per_layer",
        "budget",
        "new_tokens",
        "prefill_s",
        "prune_s",
        "decode_tok_s",
    } <= set(st)
    assert "KV budget" in r.stderr and "tok/s" in r.stderr


@pytest.mark.slow
def test_kept_per_layer_matches_transformers_eager_attention(smollm, smollm_gen, tmp_path):
    """CLI's kept_per_layer == loop reference on attention rows from transformers' eager attention.

    Disagreement is allowed only where the reference gap at the cut lies within float rounding of
    T. Bound: with a = last-row attention and |da| <= d elementwise, each head's suffix norm moves
    by at most sqrt(n) d, so S and base move by <= sqrt(n) d and gap = 1 - S/base by at most
    eps = 2 sqrt(n) d / base. d is measured between our probe and transformers' attention."""
    text = real_text(1500)
    (tmp_path / "p.txt").write_text(text)
    r = run_cli(
        "--model",
        str(smollm),
        "--raw",
        "--prompt-file",
        str(tmp_path / "p.txt"),
        "--max-new-tokens",
        "2",
        "--stats-json",
        str(tmp_path / "s.json"),
    )
    assert r.returncode == 0, r.stderr
    st = json.loads((tmp_path / "s.json").read_text())
    ids = smollm_gen.tokenizer.encode(text)
    n = len(ids)
    assert st["prompt_tokens"] == n and 200 <= n <= 600
    hf = hf_model(smollm)
    with torch.no_grad():
        att = hf(torch.tensor([ids]), output_attentions=True).attentions  # per layer [1, H, n, n]
    from helpers import paged

    c = smollm_gen.config
    kv, slots = paged(c, [n])
    _, probe = smollm_gen.model.prefill(torch.tensor([ids]), torch.tensor([n]), kv, slots, probe_rows=1)
    exact = 0
    for l in range(c.n_layers):
        row = att[l][0, :, -1, :].double()  # [H, n]
        d = (probe[l, 0, :, 0].double() - row).abs().max().item()
        assert d < 1e-4
        if l in (0, 1):
            assert st["kept_per_layer"][l] == n
            continue
        ref_keep = 4 + n - cut_reference(row, n, 0.01, 4)
        if st["kept_per_layer"][l] == ref_keep:
            exact += 1
            continue
        cand = row[:, 4:]
        base = cand.square().sum(-1).sqrt().mean().item()
        eps = 2 * math.sqrt(n) * d / base
        for kept in (st["kept_per_layer"][l], ref_keep):
            j = n - kept
            gap = (base - cand[:, j:].square().sum(-1).sqrt().mean().item()) / base
            nxt = (base - cand[:, j + 1 :].square().sum(-1).sqrt().mean().item()) / base
            assert abs(gap - 0.01) <= eps or abs(nxt - 0.01) <= eps, (l, kept, gap, nxt, eps)
    assert exact >= c.n_layers - 4  # boundary ties are rare
    assert st["budget"] < 1


@pytest.mark.slow
def test_batch_of_three_equals_each_alone(smollm_gen):
    g = smollm_gen
    prompts = [
        g.encode("What is the capital of France?"),
        g.encode("Summarise this:\n" + real_text(900, "for")),
        g.encode("Explain what a Python list comprehension is, with an example."),
    ]
    assert len({len(p) for p in prompts}) == 3
    s = Sampling(max_new_tokens=24)
    batch = g.generate(prompts, refreekv.make("refreekv"), s)
    for p, b in zip(prompts, batch):
        alone = g.generate([p], refreekv.make("refreekv"), s)[0]
        assert b.tokens == alone.tokens
        assert b.stats["kept_per_layer"] == alone.stats["kept_per_layer"]
        assert b.stats["prompt_tokens"] == alone.stats["prompt_tokens"] == len(p)


def test_context_limits_and_middle_truncation(tiny_ckpts):
    from weights.errors import UserError

    g = Engine(str(tiny_ckpts["llama", False]), device="cpu", max_length=64)
    ids = list(range(100))
    with pytest.raises(UserError, match="prompt has 100 tokens but the context is 64 tokens"):
        g.fit(ids, 16)
    cut = g.fit(ids, 16, "middle")
    assert cut == ids[:24] + ids[-24:]
    r = g.generate([cut], refreekv.make("full"), Sampling(max_new_tokens=16))[0]
    assert r.stats["prompt_tokens"] == 48


def test_cli_reads_prompt_from_stdin_and_writes_batch_stats(tiny_ckpts, tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.generate",
            "--model",
            str(tiny_ckpts["mistral", False]),
            "--prompt-file",
            "-",
            "--prompt",
            "second prompt",
            "--max-new-tokens",
            "5",
            "--stats-json",
            str(tmp_path / "s.json"),
        ],
        cwd=ROOT,
        input="first prompt from stdin",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    st = json.loads((tmp_path / "s.json").read_text())
    assert isinstance(st, list) and [s["prompt_tokens"] for s in st] == [
        len("first prompt from stdin"),
        len("second prompt"),
    ]


def test_each_row_stops_at_its_own_eos(tiny_ckpts):
    g = Engine(str(tiny_ckpts["llama", False]), device="cpu")
    g.eos = set()
    prompts = [list(range(10, 40)), list(range(50, 62))]
    s = Sampling(max_new_tokens=24)
    free = [r.tokens for r in g.generate(prompts, refreekv.make("refreekv"), s)]
    g.eos = {free[0][5]}  # row 0 stops at step 5 (or earlier); row 1 at its own first occurrence, if any
    got = [r.tokens for r in g.generate(prompts, refreekv.make("refreekv"), s)]
    for f, t in zip(free, got):
        cut = next((i for i, x in enumerate(f) if x in g.eos), len(f))
        assert t == f[:cut]
    assert len(got[0]) <= 5


def test_stop_strings_are_never_streamed(tiny_ckpts):
    from engine.tokenizer import stop_prefix as _stop_prefix

    assert (
        _stop_prefix("abc</s", ["</stop>"]) == 3
        and _stop_prefix("abc", ["xyz"]) == 0
        and _stop_prefix("a", []) == 0
    )
    g = Engine(str(tiny_ckpts["qwen2", False]), device="cpu")
    g.eos = set()
    ids = list(range(60, 90))
    text = g.generate([ids], refreekv.make("full"), Sampling(max_new_tokens=24))[0].text
    stop = text[6:9]
    streamed = []
    r = g.generate(
        [ids],
        refreekv.make("full"),
        Sampling(max_new_tokens=24, stop=[stop]),
        on_token=lambda b, t: streamed.append(t),
    )[0]
    assert r.text == text[: text.find(stop)] and streamed
    assert all(r.text.startswith(t) for t in streamed), (streamed, r.text)


def test_cli_kv_args_and_per_head_stats(tiny_ckpts, tmp_path, capsys):
    from engine.generate import main

    out = tmp_path / "s.json"
    rc = main(
        [
            "--model",
            str(tiny_ckpts["llama", False]),
            "--prompt",
            "x" * 40,
            "--prompt",
            "y" * 25,
            "--kv",
            "snapkv",
            "--budget",
            "10",
            "--kv-args",
            '{"window": 4, "protected": [0]}',
            "--max-new-tokens",
            "3",
            "--stats-json",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    st = json.loads(out.read_text())
    assert [s["prompt_tokens"] for s in st] == [40, 25]  # command-line order
    for s in st:
        heads = s["kept_per_head"]
        assert len(heads) == 3 and all(len(h) == 2 for h in heads)  # [layer][KV head]
        assert heads[0] == [s["prompt_tokens"]] * 2 and heads[1] == heads[2] == [10, 10]
        assert s["kept_per_layer"] == [s["prompt_tokens"], 10, 10]


@pytest.mark.slow
def test_system_message_goes_through_the_chat_template(smollm_gen):
    g = smollm_gen
    plain, sys_ = g.encode("Hi"), g.encode("Hi", system="You are a pirate.")
    assert "You are a pirate." in g.tokenizer.decode(sys_)
    assert "You are a pirate." not in g.tokenizer.decode(plain)
    from weights.errors import UserError

    with pytest.raises(UserError, match="^system needs the chat template"):
        g.encode("Hi", chat=False, system="You are a pirate.")


def _draw(logits, temperature=1.0, top_k=0, top_p=1.0, seed0=0, step=0):
    """One draw per row of logits [B, V], row b with seed seed0 + b (every row its own noise)."""
    from engine.sampling import sample_rows

    B = logits.shape[0]
    params = torch.tensor([[temperature, top_k, top_p]], dtype=torch.float64).expand(B, 3)
    seeds = seed0 + torch.arange(B)
    keys = torch.stack([seeds & 0xFFFFFFFF, seeds >> 32, torch.full((B,), step)], 1)
    return sample_rows(logits, params, keys)


def test_sampling_draws_from_the_filtered_distribution():
    """Temperature, top-k and top-p shape the distribution the (sync-free, counter-based) sampler
    draws from: 40,000 rows with 40,000 seeds give the filtered probabilities."""
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = p.log().expand(40000, -1)

    def freq(**kw):
        return torch.bincount(_draw(logits, **kw), minlength=5).double() / 40000

    # high seed bits and the token index move the draws too
    for got, want in [
        (freq(), p),
        (freq(top_k=2), torch.tensor([4 / 7, 3 / 7, 0, 0, 0])),
        (freq(top_p=0.8), torch.tensor([0.4, 0.3, 0.15, 0, 0]) / 0.85),
        (freq(seed0=2**40, step=7), p),
    ]:
        assert (got - want.double()).abs().max() < 0.01, (got, want)
    # at the boundary: the mass before token 1 is exactly top_p, so transformers keeps token 0 alone
    from transformers.generation.logits_process import TopPLogitsWarper

    exact = torch.tensor([[0.5, 0.25, 0.25]]).log()
    kept = TopPLogitsWarper(0.5)(None, exact.clone()).isfinite()[0]
    drawn = _draw(exact.expand(2000, -1), top_p=0.5)
    assert kept.tolist() == [True, False, False] and set(drawn.tolist()) == {0}
    hot = torch.bincount(_draw(logits, temperature=2.0), minlength=5).double() / 40000
    assert (hot - (p.sqrt() / p.sqrt().sum()).double()).abs().max() < 0.01
    # top-k keeps every token tied with the k-th (transformers' TopKLogitsWarper)
    tied = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).log().expand(20000, -1)
    assert set(_draw(tied, top_k=2).tolist()) == {0, 1, 2, 3}
    # successive token indices of one seed are not one fixed draw
    walk = torch.cat([_draw(logits[:1], seed0=5, step=t) for t in range(400)])
    assert len(set(walk.tolist())) == 5


def test_each_row_samples_with_its_own_settings_and_seed():
    """A batch of rows with different settings draws, row by row, exactly what each draws alone
    (no shared generator, no cross-row state), and greedy rows stay argmax."""
    from engine.sampling import sample_rows

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g) * 3
    params = torch.tensor(
        [[0, 0, 1], [1.0, 0, 1], [0.7, 5, 1], [1.3, 0, 0.6], [1.0, 3, 0.8], [0, 4, 0.5]], dtype=torch.float64
    )
    keys = torch.tensor([[11, 0, 0], [12, 1, 4], [13, 0, 9], [14, 2, 1], [15, 0, 3], [16, 0, 0]])
    together = sample_rows(logits, params, keys)
    alone = torch.cat([sample_rows(logits[i : i + 1], params[i : i + 1], keys[i : i + 1]) for i in range(6)])
    assert together.tolist() == alone.tolist()
    assert together[0] == logits[0].argmax() and together[5] == logits[5].argmax()
    assert sample_rows(logits, params, keys, filtered=False)[1] == together[1]  # no filter in row 1


def test_policy_knob_errors_name_the_policy_and_what_it_takes(tiny_ckpts, capsys):
    from engine.generate import main

    path = str(tiny_ckpts["llama", False])
    cases = [
        (
            ["--budget", "0.5"],
            "KV policy 'refreekv' has no knob 'budget'; it takes: threshold, sinks, rows, protected",
        ),
        (
            ["--kv-args", '{"sinks": -1}'],
            "KV policy 'refreekv': sinks must be a whole number in [0, 2147483647], got -1",
        ),
        (["--kv-args", '{"metric": "l1"}'], "metric must be 'l2' or 'mass', got 'l1'"),
        (
            ["--kv", "snapkv", "--threshold", "0.1"],
            "KV policy 'snapkv' has no knob 'threshold'; it takes: budget",
        ),
        (
            ["--kv-args", '{"protected": [0, 99]}'],
            "protected layer 99 does not exist (the model has 3 layers, 0-2)",
        ),
        (["--stop", ""], "--stop must not be empty"),
        (
            ["--stats-json", "/no/such/dir/s.json"],
            "--stats-json: directory of /no/such/dir/s.json does not exist",
        ),
        (["--max-new-tokens", "100000"], "--max-new-tokens 100000 leaves no room for a prompt"),
    ]
    for extra, msg in cases:
        rc = main(["--model", path, "--prompt", "hello", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, (extra, err)
