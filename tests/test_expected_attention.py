"""Expected Attention and the query statistics it reads: the probe's query moments against
transformers' own queries (at prefill and at a decode re-plan), the rotary tables against its
rotary embedding, and the method's plan against a plain-loop reference written from the paper's
formula (kvpress's conventions)."""

import math

import pytest
import torch
from helpers import budgets, examples
from hypothesis import given, settings
from hypothesis import strategies as st

import refreekv
from refreekv import Policy, Probe, budget_tokens


def hf_queries(hf, ids, layer):
    """transformers' pre-RoPE queries of one layer over ids: [H, n, D] (float64)."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        attn = hf.model.layers[layer].self_attn
        x = hf.model.layers[layer].input_layernorm(out.hidden_states[layer])
        return attn.q_proj(x)[0].view(len(ids), -1, attn.head_dim).transpose(0, 1).double()


def moments(q):
    """Mean [H, D] and population covariance [H, D, D] of queries q [H, n, D]."""
    mean = q.mean(1)
    centred = q - mean[:, None]
    return mean, centred.transpose(-1, -2) @ centred / q.shape[1]


class StatsRecorder(Policy):
    """Keeps everything; records the query statistics, the rotary tables and (decoding) the lens."""

    name = "stats-recorder"
    probe_rows = 0
    query_stats = True

    def __init__(self, skips=(0, 4)):
        self.skips, self.seen, self.decoded = skips, [], []

    def plan(self, probe):
        stats = {s: [probe.query_stats(layer, s) for layer in range(probe.n_layers)] for s in self.skips}
        self.seen.append((stats, probe.rope(torch.tensor([0, 5, 3000]))))
        return probe.real[None, :, None].expand(probe.n_layers, -1, probe.n_kv_heads, -1).clone()

    def replan(self, probe):
        per_layer = [probe.query_stats(layer) for layer in range(probe.n_layers)]
        self.decoded.append((probe.seen.clone(), per_layer))
        return probe.real.clone()


@pytest.mark.parametrize("family", ["llama", "qwen2-yarn"])
def test_query_stats_are_transformers_queries(tmp_path, family):
    from helpers import hf_model, write_tiny

    from engine.engine import Engine
    from engine.sampling import Sampling

    path = write_tiny(family, tmp_path / family)
    eng = Engine(str(path), device="cpu", page_size=4)
    hf = hf_model(path)
    prompts = [list(range(3, 40)), list(range(60, 66)), list(range(70, 73))]  # 37, 6 and 3 tokens
    rec = StatsRecorder()
    eng.generate(prompts, rec, Sampling(max_new_tokens=1))
    ((stats, (cos, sin)),) = rec.seen
    for b, ids in enumerate(prompts):
        for layer in range(hf.config.num_hidden_layers):
            q = hf_queries(hf, ids, layer)
            for skip in rec.skips:
                mean, cov = (t[b].double() for t in stats[skip][layer])
                if skip >= len(ids):  # nothing left to average: zero, never a division by zero
                    assert not mean.any() and not cov.any()
                    continue
                want_mean, want_cov = moments(q[:, skip:])
                torch.testing.assert_close(mean, want_mean, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(cov, want_cov, atol=1e-4, rtol=1e-3)
    # the rotary tables at any position, as transformers rotates (YaRN's factor included)
    positions = torch.tensor([[0, 5, 3000]])
    want_cos, want_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, want_cos[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, want_sin[0], atol=1e-5, rtol=1e-5)


def test_decode_query_stats_are_the_last_decode_queries(tmp_path):
    from helpers import hf_model, write_tiny

    from engine.engine import Engine
    from engine.sampling import Sampling

    path = write_tiny("llama", tmp_path / "m")
    eng = Engine(str(path), device="cpu", page_size=4, decode_window=6)
    hf = hf_model(path)
    prompt = list(range(3, 30))
    rec = StatsRecorder(skips=(0,))
    rec.interval = 4  # re-plans after 4 (fewer than the window) and 8 tokens written
    out = eng.generate([prompt], rec, Sampling(max_new_tokens=10))[0]
    assert len(rec.decoded) == 2
    for seen, per_layer in rec.decoded:
        n = int(seen[0])  # the tokens seen; the decode queries are those at positions [27, n)
        ids = (prompt + out.tokens)[:n]
        first = max(len(prompt), n - 6)
        for layer in range(hf.config.num_hidden_layers):
            want_mean, want_cov = moments(hf_queries(hf, ids, layer)[:, first:n])
            mean, cov = (t[0].double() for t in per_layer[layer])
            torch.testing.assert_close(mean, want_mean, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cov, want_cov, atol=1e-4, rtol=1e-3)


# ------------------------------------------------------------------- the plan, against loops
class Rows:
    """A reader over given keys / values [L, B, Hkv, N, D] with the rotary tables of base 10000."""

    def __init__(self, keys, values):
        self.k, self.v = keys, values

    def __call__(self, layer, what, rope):
        return (self.k if what == "k" else self.v)[layer].clone()

    def rope(self, positions):
        D = self.k.shape[-1]
        inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
        f = positions.double()[:, None] * inv
        emb = torch.cat((f, f), -1)
        return emb.cos().float(), emb.sin().float()


def rotated(x, p, D):
    """x [D] (float64) rotated to position p by RoPE (rotate-half, base 10000)."""
    inv = [1.0 / 10000 ** (2 * i / D) for i in range(D // 2)]
    out = []
    for i in range(D):
        a = inv[i % (D // 2)] * p
        partner = -x[i + D // 2] if i < D // 2 else x[i - D // 2]
        out.append(x[i] * math.cos(a) + partner * math.sin(a))
    return out


def expected_reference(queries, keys, values, n, sink, future, covariance, vnorm, group):
    """kvpress's ExpectedAttentionPress score of one (layer, sequence, KV head) row, by loops:
    per query head of the group, the pre-RoPE query mean / covariance after the sinks, moved by the
    rotation averaged over positions [n, n + future), then softmax over the keys after the sinks."""
    D = keys.shape[-1]
    per_head = []
    for q in queries:  # [n, D] pre-RoPE queries of one head
        rows = [[float(x) for x in q[t]] for t in range(sink, n)]
        m = len(rows)
        mean = [sum(r[i] for r in rows) / m for i in range(D)]
        cov = [
            [sum((r[i] - mean[i]) * (r[j] - mean[j]) for r in rows) / m for j in range(D)] for i in range(D)
        ]
        # the averaged rotation as a matrix: column j is the average of rotated unit vectors e_j
        R = [[0.0] * D for _ in range(D)]
        for j in range(D):
            e = [1.0 if i == j else 0.0 for i in range(D)]
            for p in range(n, n + future):
                col = rotated(e, p, D)
                for i in range(D):
                    R[i][j] += col[i] / future
        mu = [sum(R[i][j] * mean[j] for j in range(D)) for i in range(D)]
        RS = [[sum(R[i][k] * cov[k][j] for k in range(D)) for j in range(D)] for i in range(D)]
        S = [[sum(RS[i][k] * R[j][k] for k in range(D)) for j in range(D)] for i in range(D)]
        logits = {}
        for t in range(sink, n):
            k = [float(x) for x in keys[t]]
            z = sum(mu[i] * k[i] for i in range(D)) / math.sqrt(D)
            if covariance:
                z += sum(k[i] * S[i][j] * k[j] for i in range(D) for j in range(D)) / D / 2
            logits[t] = z
        top = max(logits.values())
        total = sum(math.exp(z - top) for z in logits.values())
        per_head.append({t: math.exp(z - top) / total for t, z in logits.items()})
    scores = {}
    for t in range(sink, n):
        s = sum(h[t] for h in per_head) / group
        if vnorm:
            s *= math.sqrt(sum(float(x) ** 2 for x in values[t]))
        scores[t] = s
    return scores


@settings(max_examples=examples(12), deadline=None)
@given(
    st.integers(1, 2),
    st.sampled_from([(1, 1), (2, 1), (2, 2)]),
    st.lists(st.integers(1, 12), min_size=1, max_size=2),
    budgets,
    st.integers(0, 3),
    st.sampled_from([1, 4, 16]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_expected_attention_matches_loops(L, heads, lens, budget, sink, future, covariance, vnorm, seed):
    from types import SimpleNamespace

    from engine.model import query_moments

    H, n_kv = heads
    D, N, B = 4, max(lens), len(lens)
    g = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(L, B, n_kv, N, D, generator=g) for _ in range(2))
    queries = torch.randn(L, B, H, N, D, generator=g)
    real = torch.arange(N) < torch.tensor(lens)[:, None]  # [B, N]
    keys, values, queries = (t * real[None, :, None, :, None] for t in (keys, values, queries))
    # the moments the prefill sums (engine/model.py), from these queries
    s1, s2, head = query_moments(SimpleNamespace(n_layers=L, n_heads=H, head_dim=D), B)
    s1 += queries.sum(3)
    s2 += queries.transpose(-1, -2) @ queries
    head += queries[:, :, :, :8] if N >= 8 else torch.nn.functional.pad(queries, (0, 0, 0, 8 - N))
    probe = Probe(
        None, torch.tensor(lens), L, n_kv, N, Rows(keys, values), (s1, s2, head, torch.tensor(lens))
    )
    pol = refreekv.make(
        "expected-attention",
        budget=budget,
        n_sink=sink,
        n_future_positions=future,
        use_covariance=covariance,
        use_vnorm=vnorm,
    )
    keep = pol.plan(probe)
    ks = budget_tokens(refreekv.check_budget(budget), torch.tensor(lens)).tolist()
    group = H // n_kv
    for layer in range(L):
        for b, n in enumerate(lens):
            for h in range(n_kv):
                got = set(torch.nonzero(keep[layer, b, h]).flatten().tolist())
                k, sinks = ks[b], min(sink, n)
                if k <= sinks:  # the sinks outrank the rest; among them the later ones first
                    assert got == set(range(sinks - k, sinks))
                    continue
                qs = queries[layer, b, h * group : (h + 1) * group, :n]
                s = expected_reference(
                    qs, keys[layer, b, h], values[layer, b, h], n, sink, future, covariance, vnorm, group
                )
                order = sorted(s, key=lambda t: (-s[t], -t))
                assert len(got) == k and set(range(sinks)) <= got
                if k - sinks < len(order) and s[order[k - sinks - 1]] - s[order[k - sinks]] < 1e-6:
                    continue  # a near tie at the cut: fp32 and the float64 loops may order it either way
                assert got == set(range(sinks)) | set(order[: k - sinks])


def test_query_moments_count_in_the_probe_bound(tmp_path):
    """The moments a prefill sums for Expected Attention are held to the probe's bound: two prompts
    whose moments fit one at a time are prefilled one at a time, with the same tokens."""
    from helpers import write_tiny

    from engine.engine import Engine
    from engine.sampling import Sampling

    eng = Engine(str(write_tiny("llama", tmp_path / "m")), device="cpu", page_size=4)
    c = eng.config
    one = eng.probe_bytes(0, 40, 1, stats=True)
    assert one == c.n_layers * c.n_heads * c.head_dim * (c.head_dim + 9) * 4  # [L, H, D x D + 9 D] fp32
    assert eng.probe_bytes(0, 40, 2, stats=True) == 2 * one and eng.probe_bytes(0, 40, 2) == 0
    prompts = [list(range(3, 40)), list(range(50, 80))]
    pol = refreekv.make("expected-attention", budget=0.5)
    together = eng.generate(prompts, pol, Sampling(max_new_tokens=4))
    assert [r.stats["batch"] for r in together] == [2, 2]
    eng.max_probe_bytes = one  # one fits, two do not
    apart = eng.generate(prompts, pol, Sampling(max_new_tokens=4))
    assert [r.stats["batch"] for r in apart] == [1, 1]
    assert [r.tokens for r in apart] == [r.tokens for r in together]
    assert [r.stats["kept_per_head"] for r in apart] == [r.stats["kept_per_head"] for r in together]
