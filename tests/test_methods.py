"""The field's methods beside the paper's baselines: SnapKV's pooling families, PyramidKV, AdaKV,
TOVA, KNorm, Twilight's rule and CAKE, each against a plain-loop reference written from its
paper (or a hand-worked plan); the probe's keys and values against transformers' own cache."""

import math
import weakref

import pytest
import torch
from helpers import budgets, examples, probe, probes
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv
from refreekv import Policy, Probe, budget_tokens
from refreekv.cake import adjust_budgets
from refreekv.pyramidkv import pyramid

SET = settings(max_examples=examples(40), deadline=None)


def ranked(scores: dict, k: int) -> set:
    """The k keys of the highest scores (ties: the later key)."""
    return set(sorted(scores, key=lambda j: (-scores[j], -j))[:k])


def group_sum(attn, l, b, h, group, rows, j):
    return sum(float(attn[l, b, h * group + g, r, j]) for g in range(group) for r in rows)


# --------------------------------------------------------------------- SnapKV's two poolings
@SET
@given(probes(), budgets, st.sampled_from([1, 3, 5, 7]), st.sampled_from(["max", "avg"]))
def test_snapkv_pooling_matches_loops(case, budget, kernel, pooling):
    attn, lens, n_kv = case
    L, B, H, w, N = attn.shape
    keep = refreekv.make("snapkv", budget=budget, window=w, kernel=kernel, pooling=pooling).plan(
        probe(attn, lens, n_kv)
    )
    ks = budget_tokens(refreekv.check_budget(budget), torch.tensor(lens)).tolist()
    for l in range(L):
        for b, n in enumerate(lens):
            win = min(w, n)
            kw = min(win, ks[b])
            for h in range(n_kv):
                votes = [group_sum(attn, l, b, h, H // n_kv, range(w), j) for j in range(n)]
                older = range(n - win)
                pooled = {}
                for j in older:
                    near = [votes[t] for t in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= t < n - win]
                    # avg: what is outside the older keys counts 0, the divisor is the kernel
                    pooled[j] = max(near) if pooling == "max" else sum(near) / kernel
                want = set(range(n - kw, n)) | ranked(pooled, ks[b] - kw)
                got = set(torch.nonzero(keep[l, b, h]).flatten().tolist())
                assert got == want


def test_snapkv_avg_by_hand():
    # n = 12, window 2 (slots 10, 11), kernel 3: one spike of 1.0 at slot 4 and .9 at slot 0
    attn = torch.zeros(1, 1, 1, 2, 12)
    attn[0, 0, 0, 1, 4] = 1.0
    attn[0, 0, 0, 0, 0] = 0.9
    # avg: slots 3, 4, 5 -> 1/3, slots 0, 1 -> .3 (slot 0's left neighbour is padding: 0), max: 1.0 / .9
    avg = refreekv.make("snapkv", budget=5, window=2, kernel=3, pooling="avg").plan(probe(attn, [12]))
    mx = refreekv.make("snapkv", budget=5, window=2, kernel=3, pooling="max").plan(probe(attn, [12]))
    assert torch.nonzero(avg[0, 0, 0]).flatten().tolist() == [3, 4, 5, 10, 11]
    assert torch.nonzero(mx[0, 0, 0]).flatten().tolist() == [3, 4, 5, 10, 11]
    avg = refreekv.make("snapkv", budget=6, window=2, kernel=3, pooling="avg").plan(probe(attn, [12]))
    assert torch.nonzero(avg[0, 0, 0]).flatten().tolist() == [1, 3, 4, 5, 10, 11]  # .3 tie: the later
    with pytest.raises(refreekv.UserError, match="pooling"):
        refreekv.make("snapkv", pooling="mean")


# ------------------------------------------------------------------------------- PyramidKV
def test_pyramid_budgets_by_hand():
    # n = 100, k = 40, window 8, 4 layers, beta 20: s = 32, lo = 1, hi = 63, step 20
    assert pyramid(40, 100, 8, 4, 20, "factory") == [71, 51, 31, 11]
    # kvpress: lo = 2 < window: its guard falls back to k everywhere; with beta 2 the pyramid holds
    assert pyramid(40, 100, 8, 4, 20, "kvpress") == [40] * 4
    assert pyramid(40, 100, 8, 4, 2, "kvpress") == [60, 47, 33, 20]
    # n < 2 s: the factory's uniform branch; k >= n: everything
    assert pyramid(40, 60, 8, 4, 20, "factory") == [40] * 4
    assert pyramid(60, 60, 8, 4, 20, "factory") == [60] * 4


@SET
@given(probes(), budgets, st.sampled_from(["factory", "kvpress"]), st.integers(1, 30))
def test_pyramidkv_is_snapkv_at_each_layers_budget(case, budget, shape, beta):
    attn, lens, n_kv = case
    p = probe(attn, lens, n_kv)
    w = attn.shape[3]
    pol = refreekv.make("pyramidkv", budget=budget, window=w, shape=shape, beta=beta)
    keep = pol.plan(p)
    per_layer = pol.layer_budgets(p)[..., 0]  # [L, B]
    for b, n in enumerate(lens):
        k = int(budget_tokens(pol.budget, torch.tensor([n]))[0])
        col = per_layer[:, b].tolist()
        assert col == pyramid(k, n, min(w, k), attn.shape[0], beta, shape)
        assert all(min(w, k) <= c <= n for c in col)
        assert col == sorted(col, reverse=True)  # lower layers keep more
        for l, c in enumerate(col):
            one = refreekv.make("snapkv", budget=c if c > 1 else 1 / n, window=w)  # 1 alone is a share
            alone = one.plan(probe(attn[l : l + 1, b : b + 1], [n], n_kv))
            assert torch.equal(keep[l, b, :, :n], alone[0, 0, :, :n])


def test_pyramidkv_keeps_the_average():
    attn = torch.rand(8, 1, 4, 8, 600)
    pol = refreekv.make("pyramidkv", budget=0.25)
    kept = pol.plan(probe(attn, [600], 2)).sum(-1).double()
    assert abs(kept.mean().item() - 150) <= 8  # the factory's integer steps lose < L tokens
    assert refreekv.make("pyramidkv").replan is None  # prompt only: no decode knobs
    assert "interval" not in refreekv.knobs("pyramidkv")


# ----------------------------------------------------------------------------------- AdaKV
def adakv_reference(scores, real, k, alpha, safeguard):
    """One (layer, sequence): scores [Hkv, N] (+inf kept always, -inf padding) -> kept sets."""
    H, N = scores.shape
    s = {(h, j): float(scores[h, j]) for h in range(H) for j in range(N) if real[j]}
    order = sorted(s, key=lambda hj: (-s[hj], hj[0], -hj[1]))  # ties: lower head, later slot

    def head_top(h, m):
        mine = {j: s[(h, j)] for (g, j) in s if g == h}
        return ranked(mine, m)

    if safeguard == "kvpress":
        safe = {(h, j) for h in range(H) for j in head_top(h, math.floor(k * alpha))}
        order = sorted(s, key=lambda hj: (hj not in safe, -s[hj], hj[0], -hj[1]))
        return [{j for (g, j) in order[: k * H] if g == h} for h in range(H)]
    fixed = [min(sum(1 for (g, j) in s if g == h and s[(g, j)] == math.inf), k) for h in range(H)]
    base = [k - f for f in fixed]
    finite = [hj for hj in order if math.isfinite(s[hj])]
    chosen = finite[: sum(base)]
    out = []
    for h in range(H):
        c = sum(1 for (g, _) in chosen if g == h)
        share = round(c * (1 - alpha) + math.floor(base[h] * alpha))
        out.append(head_top(h, fixed[h] + share))
    return out


@SET
@given(
    probes(),
    budgets,
    st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    st.sampled_from(["adakv", "kvpress"]),
    st.sampled_from(["snapkv", "tova"]),
)
def test_adakv_matches_loops(case, budget, alpha, safeguard, scorer):
    attn, lens, n_kv = case
    w = attn.shape[3]
    p = probe(attn, lens, n_kv)
    knobs = {"window": w} if scorer == "snapkv" else {}
    pol = refreekv.make("adakv", budget=budget, alpha=alpha, safeguard=safeguard, scorer=scorer, **knobs)
    keep = pol.plan(p)
    scores = pol.inner.scores(p)
    ks = budget_tokens(pol.budget, torch.tensor(lens)).tolist()
    for l in range(attn.shape[0]):
        for b, n in enumerate(lens):
            want = adakv_reference(scores[l, b], p.real[b], ks[b], alpha, safeguard)
            got = [set(torch.nonzero(keep[l, b, h]).flatten().tolist()) for h in range(n_kv)]
            assert got == want
            if safeguard == "kvpress":
                assert sum(map(len, got)) == min(ks[b], n) * n_kv  # exact: the layer keeps k x Hkv


def test_adakv_moves_budget_to_the_spread_head():
    # head 0 attends to one key, head 1 to many: k = 4 of 16, window 1 (slot 15), kernel 1, alpha 0:
    # the layer's 6 selectable tokens go 1 (head 0's spike) + 5 (head 1's latest and largest)
    attn = torch.zeros(1, 1, 2, 1, 16)
    attn[0, 0, 0, 0, 5] = 1.0
    attn[0, 0, 1, 0] = torch.linspace(1, 2, 16) / 24
    for safeguard in ("adakv", "kvpress"):
        pol = refreekv.make("adakv", budget=4, window=1, kernel=1, alpha=0.0, safeguard=safeguard)
        keep = pol.plan(probe(attn, [16], 2))
        assert keep.sum(-1).tolist() == [[[2, 6]]]
        assert torch.nonzero(keep[0, 0, 0]).flatten().tolist() == [5, 15]
        assert torch.nonzero(keep[0, 0, 1]).flatten().tolist() == [10, 11, 12, 13, 14, 15]
    # alpha 1: every head its even share, as SnapKV
    even = refreekv.make("adakv", budget=4, window=1, kernel=1, alpha=1.0).plan(probe(attn, [16], 2))
    assert even.sum(-1).tolist() == [[[4, 4]]]


# ------------------------------------------------------------------------------------ TOVA
@SET
@given(probes(), budgets, st.sampled_from(["layer", "kv"]))
def test_tova_matches_loops(case, budget, heads):
    attn, lens, n_kv = case
    L, B, H, w, N = attn.shape
    keep = refreekv.make("tova", budget=budget, heads=heads).plan(probe(attn, lens, n_kv))
    ks = budget_tokens(refreekv.check_budget(budget), torch.tensor(lens)).tolist()
    group = H // n_kv
    for l in range(L):
        for b, n in enumerate(lens):
            for h in range(n_kv):
                mates = range(H) if heads == "layer" else range(h * group, (h + 1) * group)
                s = {j: sum(float(attn[l, b, q, -1, j]) for q in mates) for j in range(n - 1)}
                s[n - 1] = math.inf
                assert set(torch.nonzero(keep[l, b, h]).flatten().tolist()) == ranked(s, ks[b])


# ----------------------------------------------------------------------------------- KNorm
class Keys:
    """A reader over given keys [L, B, Hkv, N, D]."""

    def __init__(self, keys):
        self.k, self.calls = keys, []

    def __call__(self, layer, what, rope):
        self.calls.append(layer)
        return self.k[layer].clone()


@SET
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.lists(st.integers(1, 20), min_size=1, max_size=3),
    budgets,
    st.integers(0, 2**31 - 1),
)
def test_knorm_matches_loops(L, n_kv, D, lens, budget, seed):
    N, B = max(lens), len(lens)
    keys = torch.randn(L, B, n_kv, N, D, generator=torch.Generator().manual_seed(seed))
    reader = Keys(keys)
    p = Probe(None, torch.tensor(lens), L, n_kv, N, reader)
    keep = refreekv.make("knorm", budget=budget).plan(p)
    assert reader.calls == list(range(L))  # layer by layer, each once
    ks = budget_tokens(refreekv.check_budget(budget), torch.tensor(lens)).tolist()
    for l in range(L):
        for b, n in enumerate(lens):
            for h in range(n_kv):
                norms = {j: -math.sqrt(sum(float(x) ** 2 for x in keys[l, b, h, j])) for j in range(n)}
                assert set(torch.nonzero(keep[l, b, h]).flatten().tolist()) == ranked(norms, ks[b])


def test_a_hand_made_probe_has_no_keys():
    p = Probe(None, torch.tensor([4]), 1, 1, 4)
    with pytest.raises(RuntimeError, match="no KV pool"):
        p.keys(0)
    with pytest.raises(IndexError):
        Probe(None, torch.tensor([4]), 1, 1, 4, Keys(torch.zeros(1, 1, 1, 4, 2))).values(1)


# ---------------------------------------------------------------------------- Twilight's rule
def test_twilight_by_hand():
    # masses .4 .05 .3 .2 | .05 (the last token, always kept); p = .7: drop lowest first while the
    # dropped mass stays <= .3: slot 1 (.05), slot 3 (.25 in all); slot 2 would make .55
    attn = torch.tensor([0.4, 0.05, 0.3, 0.2, 0.05])[None, None, None, None]
    keep = refreekv.make("twilight", p=0.7).plan(probe(attn, [5]))
    assert torch.nonzero(keep[0, 0, 0]).flatten().tolist() == [0, 2, 4]
    assert refreekv.make("twilight", p=1.0).plan(probe(attn, [5])).all()  # p = 1 keeps everything
    with pytest.raises(refreekv.UserError, match="p must be"):
        refreekv.make("twilight", p=1.5)


# ------------------------------------------------------------------------------------ CAKE
def test_adjust_budgets_by_hand():
    assert adjust_budgets([10.7, 20.2, 30.1], 61, 100) == [11, 20, 30]  # int() then +1 to the first
    assert adjust_budgets([5.0, 50.0, 5.0], 60, 30) == [15, 30, 15]  # 20 over the cap: 10 each
    assert adjust_budgets([40.0, 10.0, 10.0], 58, 100) == [39, 9, 10]  # 2 too many: -1 from the first two
    assert sum(adjust_budgets([0.3] * 7, 21, 4)) == 21


def cake_reference(a, k, n, n_kv, window=32, gamma=200.0):
    """a [L, H, rows, n] float64 (rows >= window) of one sequence -> kept sets [L][Hkv]."""
    L, H = a.shape[0], a.shape[1]
    w = window
    if k <= w:  # the last k tokens alone
        return [[set(range(n - k, n))] * n_kv for _ in range(L)]
    rows = range(a.shape[2] - w, a.shape[2])
    pref, score = [], []
    for l in range(L):
        disp = var_sum = 0.0
        per_head = []
        for h in range(H):
            col = []
            for j in range(n):
                xs = [float(a[l, h, r, j]) for r in rows]
                mean = sum(xs) / w
                var = sum((x - mean) ** 2 for x in xs) / (w - 1)
                if j < n - w:
                    disp -= sum(x * math.log(x + 1e-10) for x in xs)
                    var_sum += var
                col.append(mean + gamma * var)
            per_head.append(col)
        pref.append(disp * var_sum)
        group = H // n_kv
        pooled = []
        for g in range(n_kv):
            heads = range(g * group, (g + 1) * group)
            pooled.append(
                {
                    j: sum(per_head[h][t] for h in heads for t in range(j - 2, j + 3) if 0 <= t < n - w)
                    / 5
                    / group
                    for j in range(n - w)
                }
            )
        score.append(pooled)
    total = (k - w) * L
    sel = adjust_budgets([p / sum(pref) * total for p in pref], total, n - w)
    return [[ranked(score[l][g], sel[l]) | set(range(n - w, n)) for g in range(n_kv)] for l in range(L)]


@settings(max_examples=examples(8), deadline=None)
@given(
    st.integers(1, 3), st.integers(1, 2), st.integers(40, 90), st.floats(0.3, 0.9), st.integers(0, 2**31 - 1)
)
def test_cake_matches_loops(L, n_kv, n, share, seed):
    g = torch.Generator().manual_seed(seed)
    H = 2 * n_kv
    logits = torch.randn(L, 1, H, 32, n, generator=g) * 3
    attn = torch.softmax(logits, -1)
    keep = refreekv.make("cake", budget=share).plan(probe(attn, [n], n_kv))
    k = int(budget_tokens(share, torch.tensor([n]))[0])
    want = cake_reference(attn[:, 0].double(), k, n, n_kv)
    got = [[set(torch.nonzero(keep[l, 0, h]).flatten().tolist()) for h in range(n_kv)] for l in range(L)]
    assert got == want
    assert keep.sum().item() == k * L * n_kv  # the layers share the total exactly


# ------------------------------------------------------------ the probe's keys and values, for real
class Recorder(Policy):
    """Keeps everything; records what the probe's reader gives, layer by layer."""

    name = "recorder"
    probe_rows = 0

    def __init__(self):
        self.seen, self.alive = [], []

    def plan(self, probe):
        for layer in range(probe.n_layers):
            k, pre, v = probe.keys(layer), probe.keys(layer, rope=False), probe.values(layer)
            self.seen.append((k, pre, v))
            self.alive.append(weakref.ref(k))
        return probe.real[None, :, None].expand(probe.n_layers, -1, probe.n_kv_heads, -1).clone()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_probe_keys_and_values_are_transformers_cache(tmp_path, family):
    from helpers import hf_model, write_tiny

    from engine.engine import Engine
    from engine.sampling import Sampling

    path = write_tiny(family, tmp_path / family)
    eng = Engine(str(path), device="cpu", page_size=4)
    hf = hf_model(path)
    prompts = [list(range(3, 40)), list(range(60, 73))]
    rec = Recorder()
    eng.generate(prompts, rec, Sampling(max_new_tokens=1))
    L = hf.config.num_hidden_layers
    N = max(map(len, prompts))
    for b, ids in enumerate(prompts):
        n = len(ids)
        with torch.no_grad():
            out = hf(torch.tensor([ids]), use_cache=True, output_hidden_states=True)
        for layer in range(L):
            k, pre, v = (t[b] for t in rec.seen[layer])  # [Hkv, N, D]
            cache = out.past_key_values.layers[layer]
            torch.testing.assert_close(k[:, :n], cache.keys[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v[:, :n], cache.values[0], atol=1e-5, rtol=1e-4)
            attn = hf.model.layers[layer].self_attn
            x = hf.model.layers[layer].input_layernorm(out.hidden_states[layer])
            want = attn.k_proj(x)[0].view(n, -1, attn.head_dim).transpose(0, 1)  # pre-RoPE [Hkv, n, D]
            torch.testing.assert_close(pre[:, :n], want, atol=1e-4, rtol=1e-4)
            assert not k[:, n:].any() and k.shape[1] == N  # zero past the prompt
    # the probe keeps nothing: one layer's tensors live only as long as the policy holds them
    rec.seen.clear()
    del k, pre, v
    assert all(ref() is None for ref in rec.alive)


class DecodeRecorder(Recorder):
    """Keeps everything at prefill and at every re-plan; records the decode probe's keys."""

    def __init__(self):
        super().__init__()
        self.decoded = []

    def replan(self, probe):
        self.decoded.append((probe.lens.clone(), [probe.keys(layer) for layer in range(probe.n_layers)]))
        self.decoded[-1][1].append([probe.values(layer) for layer in range(probe.n_layers)])
        return probe.real.clone()


def test_decode_probe_keys_are_transformers_cache(tmp_path):
    from helpers import hf_model, write_tiny

    from engine.engine import Engine
    from engine.sampling import Sampling

    path = write_tiny("llama", tmp_path / "m")
    eng = Engine(str(path), device="cpu", page_size=4)
    hf = hf_model(path)
    prompt = list(range(3, 30))
    rec = DecodeRecorder()
    rec.interval = 5
    out = eng.generate([prompt], rec, Sampling(max_new_tokens=12))[0]
    assert rec.decoded, "no re-plan ran"
    L = hf.config.num_hidden_layers
    for lens, per_layer in rec.decoded:
        values = per_layer.pop()
        n = int(lens[0, 0, 0])
        assert (lens == n).all()  # nothing was pruned: every row holds the same tokens
        ids = (prompt + out.tokens)[:n]
        with torch.no_grad():
            cache = hf(torch.tensor([ids]), use_cache=True).past_key_values
        for layer in range(L):
            torch.testing.assert_close(
                per_layer[layer][0, :, :n], cache.layers[layer].keys[0], atol=1e-5, rtol=1e-4
            )
            torch.testing.assert_close(
                values[layer][0, :, :n], cache.layers[layer].values[0], atol=1e-5, rtol=1e-4
            )


NEW = ["knorm", "tova", "pyramidkv", "adakv", "cake", "twilight", "expected-attention"]
FREE = {"twilight": {"p": 0.5}, "refreekv-union": {"threshold": 0.5}, "refreekv-snap": {"threshold": 0.5}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers import write_tiny

    from engine.engine import Engine

    return Engine(str(write_tiny("qwen2", tmp_path_factory.mktemp("tiny") / "q")), device="cpu", page_size=4)


@pytest.mark.parametrize("name", NEW + list(FREE))
def test_each_method_frees_pages_end_to_end(tiny, name):
    from engine.sampling import Sampling

    prompts = [list(range(5, 85)), list(range(90, 131))]
    knobs = FREE.get(name, {"budget": 0.5})
    full = tiny.generate(prompts, refreekv.make("full"), Sampling(max_new_tokens=6))
    for r, f, ids in zip(
        tiny.generate(prompts, refreekv.make(name, **knobs), Sampling(max_new_tokens=6)), full, prompts
    ):
        assert r.error is None and r.finish_reason == "length"
        n = len(ids)
        kept = r.stats["kept_per_head"]  # [L][Hkv]
        mean = sum(map(sum, kept)) / sum(map(len, kept))
        if name in FREE:  # no budget: it chooses its own
            assert 0 < mean <= n
        elif name == "pyramidkv":
            assert [round(sum(h) / len(h)) for h in kept] == pyramid(
                math.ceil(n / 2), n, 8, len(kept), 20, "factory"
            )
        else:  # every row, or the layer on average (adakv, cake), keeps half
            # adakv: the paper's floor mix rounds each head down by up to one token
            assert (
                abs(mean - math.ceil(n / 2)) <= 1 if name in ("adakv", "cake") else mean == math.ceil(n / 2)
            )
        assert r.stats["pages_after_pruning"] < f.stats["pages_after_pruning"]


@pytest.mark.parametrize("name", ["knorm", "tova", "adakv", "expected-attention"])
def test_methods_prune_during_decoding(tiny, name):
    from engine.sampling import Sampling

    r = tiny.generate(
        [list(range(5, 45))], refreekv.make(name, budget=24, interval=8), Sampling(max_new_tokens=24)
    )[0]
    assert r.error is None and r.stats["replans"] == 2  # at 8 and 16 tokens written (the 24th never is)
    assert all(kept <= 24 + 8 for _, kept in r.stats["budget_trace"])  # the cap, plus the window kept
