"""`python -m engine.generate --interactive`: a multi-turn chat in the terminal (as gpt-fast's and
llama.cpp's). The conversation is kept as messages; each turn renders it through the checkpoint's
chat template and prefills it whole under the chosen policy (a new prompt every turn, so every
turn is pruned afresh), streams the answer and adds it to the conversation. /exit, /quit or
Ctrl-D leaves; /reset forgets the conversation. Oldest turns go when the context is full."""

import sys

from engine.cli import say
from weights.errors import UserError

COMMANDS = "/exit or Ctrl-D leaves, /reset starts over"


def interactive(eng, policy, s, a) -> int:
    if eng.tokenizer.chat_template is None or a.chat is False:
        raise UserError(
            "--interactive needs the checkpoint's chat template (it has none, or --raw was given)"
        )
    eng.check_policy(policy)
    if eng.kv_memory is None and not eng.cuda:
        eng.kv_memory = eng.needed_gib([eng.context])  # one conversation, up to the whole context
    eng.load()
    tty = sys.stdin.isatty()
    say(f"[{eng.path.name}] interactive chat, kv={policy.name}; {COMMANDS}")
    system = [{"role": "system", "content": a.system}] if a.system is not None else []
    turns: list[dict] = []
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # Ctrl-D / end of input
            if tty:
                print(file=sys.stderr)
            return 0
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            turns = []
            say("(conversation reset)")
            continue
        if not text.strip():
            continue
        turns.append({"role": "user", "content": text})
        ids = _fit(eng, system, turns, s.max_new_tokens)
        if ids is None:
            turns.pop()
            say(f"error: this message alone does not fit the context of {eng.context} tokens; shorten it")
            continue
        shown = [0]

        def stream(_, t):
            sys.stdout.write(t[shown[0] :])
            sys.stdout.flush()
            shown[0] = len(t)

        try:
            r = eng.generate([ids], policy, s, on_token=stream)[0]
        except KeyboardInterrupt:  # Ctrl-C ends this answer, not the chat
            sys.stdout.write("\n")
            say("(answer interrupted)")
            turns.pop()
            continue
        sys.stdout.write(r.text[shown[0] :] + "\n")
        sys.stdout.flush()
        turns.append({"role": "assistant", "content": r.text})
        st = r.stats
        say(
            f"[{st['prompt_tokens']} tok in, KV budget {100 * st['budget']:.1f}%, "
            f"{st['new_tokens']} tok out at {st['decode_tok_s']:.1f} tok/s]"
        )


def _fit(eng, system, turns, max_new):
    """The conversation's token ids, dropping the oldest turns while it does not fit; None when the
    last message alone does not."""
    while turns:
        ids = eng.tokenizer.encode(eng.tokenizer.apply_messages(system + turns), special=False)
        if len(ids) + max_new <= eng.context and eng.max_new_fitting(len(ids)) >= max_new:
            return ids
        if len(turns) == 1:
            return None
        del turns[:2]  # the oldest exchange
        say("(the oldest turn was dropped: the conversation outgrew the context)")
    return None
