"""bench/standard/cli.py end to end on a tiny checkpoint: RULER samples and LongBench fixture files through
the engine's fan-out, one row per (sample, policy), resumable, and the Table-2 report."""

import json
from pathlib import Path

import refreekv
from bench.standard import cli as standard
from engine.engine import Engine

FIXTURES = Path(__file__).parent / "fixtures"


class Args:
    tasks = None
    n = 2
    seed = 3
    raw = True
    data_dir = None
    lengths = [512]


def test_ruler_through_the_engine_is_resumable(tiny_ckpts, tmp_path):
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", kv_memory=0.05, max_seqs=8)
    a = Args()
    a.tasks = "niah_single_2,fwe"  # what fits a byte-level 512-token context
    items = standard.ruler_items(eng, a)
    assert [(i["task"], i["idx"]) for i in items] == [
        ("niah_single_2", 0),
        ("niah_single_2", 1),
        ("fwe", 0),
        ("fwe", 1),
    ]
    assert all(len(i["ids"]) + i["max_new"] <= 512 for i in items)
    policies = [refreekv.make("full"), refreekv.make("snapkv", budget=0.5)]
    out = tmp_path / "r.jsonl"
    standard.run(eng, items, policies, out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8 and {r["policy"] for r in rows} == {"full", "snapkv 50%"}
    snap = [r for r in rows if r["policy"] == "snapkv 50%"]
    assert all(0.45 < r["budget"] < 0.6 for r in snap) and all(
        r["budget"] == 1 for r in rows if r["policy"] == "full"
    )
    calls = []
    inner = eng.generate
    eng.generate = lambda *x, **k: calls.append(1) or inner(*x, **k)
    standard.run(eng, items, policies, out)  # everything is there: nothing runs again
    assert not calls and len(out.read_text().splitlines()) == 8
    # a method added later runs alone: one call per sample with only the new policy
    seen = []
    eng.generate = lambda prompts, pols, *x, **k: seen.append(len(pols)) or inner(prompts, pols, *x, **k)
    standard.run(eng, items, policies + [refreekv.make("knorm", budget=0.5)], out)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert seen == [1] * len(items) and len(rows) == 12
    assert sorted(r["policy"] for r in rows).count("knorm 50%") == len(items)
    # a gold answer scores 100 under RULER's metric, a miss 0
    assert standard.sample_score(items[0], " " + items[0]["gold"][0]) == 100.0
    assert standard.sample_score(items[0], "nothing") == 0.0


def test_longbench_fixtures_through_the_engine(tiny_ckpts, tmp_path):
    eng = Engine(str(tiny_ckpts["llama", False]), device="cpu", kv_memory=0.05, max_seqs=8)
    a = Args()
    a.tasks, a.data_dir = "trec,hotpotqa", FIXTURES / "longbench"
    items = standard.longbench_items(eng, a)
    assert {i["task"] for i in items} == {"trec", "hotpotqa"}
    assert all(len(i["ids"]) + i["max_new"] <= eng.context for i in items)
    out = tmp_path / "lb.jsonl"
    standard.run(eng, items, [refreekv.make("full"), refreekv.make("refreekv", threshold=0.2)], out)
    assert len(out.read_text().splitlines()) == 2 * len(items)


def test_report_is_table_2_with_the_threshold_free_verdict():
    rows = []
    for task, full, a, b in (("t1", [100, 50], [100, 50], [100, 0]), ("t2", [80, 80], [80, 79.5], [80, 80])):
        for i in range(2):
            rows.append(
                dict(suite="gsm8k", task=task, length=0, idx=i, policy="full", score=full[i], budget=1.0)
            )
            rows.append(dict(suite="gsm8k", task=task, length=0, idx=i, policy="A", score=a[i], budget=0.5))
            rows.append(dict(suite="gsm8k", task=task, length=0, idx=i, policy="B", score=b[i], budget=0.25))
    table = standard.report(rows)
    lines = table.splitlines()
    assert lines[2] == "| t1 | 2 | 75.0 | 75.0 (50%) | 50.0 (25%) |"
    assert lines[3] == "| t2 | 2 | 80.0 | 79.8 (50%) | 80.0 (25%) |"  # 79.75 >= 0.99 x 80
    # the field's one number per method: the mean over the task rows, score and budget
    assert lines[4] == "| average of the 2 tasks | | 77.5 | 77.4 (50%) | 65.0 (25%) |"
    assert lines[5] == "| within 1% of full on every task | | | yes | no |"


def test_report_groups_longbench_by_task_with_its_length_buckets():
    """LongBench's `length` is each sample's own: one row per task (in the verdict), and one per
    LongBench-E bucket (0-4k / 4-8k / 8k+ words; not in the verdict)."""
    rows = []
    for idx, (length, full, a) in enumerate(((1200, 100, 100), (6000, 40, 20), (9000, 60, 60))):
        for policy, score in (("full", full), ("A", a)):
            rows.append(
                dict(
                    suite="longbench",
                    task="qa",
                    length=length,
                    idx=idx,
                    policy=policy,
                    score=score,
                    budget=0.5,
                )
            )
    lines = standard.report(rows).splitlines()
    assert lines[2] == "| qa | 3 | 66.7 | 60.0 (50%) |"
    assert lines[3:6] == [
        "| qa LongBench-E 0-4k | 1 | 100.0 | 100.0 (50%) |",
        "| qa LongBench-E 4-8k | 1 | 40.0 | 20.0 (50%) |",
        "| qa LongBench-E 8k+ | 1 | 60.0 | 60.0 (50%) |",
    ]
    assert lines[6] == "| average of the 1 tasks | | 66.7 | 60.0 (50%) |"  # the buckets are not tasks
    assert lines[7] == "| within 1% of full on every task | | | no |"


def test_leaderboard_averages_and_plot(tmp_path):
    """The summary picture's numbers: per policy the mean over task rows of (budget, score); a
    fixed budget is one curve per method (its knobs kept apart), a threshold-free policy a point."""
    rows = []
    for task, scores in (("a", (100, 60, 20, 90)), ("b", (50, 40, 0, 50))):
        for policy, budget, score in zip(
            ("full", "snapkv 50%", "snapkv 20% avg", "refreekv T=0.01"), (1.0, 0.5, 0.2, 0.75), scores
        ):
            rows.append(
                dict(suite="ruler", task=task, length=1024, idx=0, policy=policy, score=score, budget=budget)
            )
    avg = standard.averages(rows)
    assert (
        avg["full"] == (1.0, 75.0)
        and avg["snapkv 50%"] == (0.5, 50.0)
        and avg["refreekv T=0.01"] == (0.75, 70.0)
    )
    assert [standard.method_of(p) for p in avg] == [None, "snapkv", "snapkv avg", None]
    standard.summary_plot(rows, tmp_path / "s.png", "t")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
