"""The state every part of the engine reads: a Sequence (one prompt under one policy, from the
queue to its end), the Update one step made to it, and its Result."""

from dataclasses import dataclass, field


@dataclass(eq=False)
class Sequence:
    idx: int  # prompt index in the request
    fork: int  # policy index (fan-out)
    prompt: list[int]
    policy: object
    forced: list[int] = field(default_factory=list)  # tokens taken instead of sampling, in order
    out: list[int] = field(default_factory=list)  # tokens produced so far (forced and sampled)
    slot: int = -1
    order: int = -1  # admission counter: the highest is preempted first
    arrival: int = 0  # the scheduler's prefill clock when it was queued (engine/scheduler.py _due)
    n_chosen: int = 0  # tokens chosen on the device in this admission (some not yet read back)
    n_accepted: int = 0  # of those, read back and accepted
    done: bool = False
    stats: dict = field(default_factory=dict)
    # set by the core (engine/core.py) when the request is added
    key: object = None  # the request id, or (id, fork) for a request with several policies
    sampling: object = None  # engine.sampling.Sampling
    seed: int = 0  # its sampling seed (drawn at random when the request named none)
    detok: object = None
    text: str = ""
    shown: int = 0  # characters of text streamed so far
    lp: list = field(default_factory=list)  # log-probabilities of chosen tokens not yet read back
    logprobs: list | None = None  # of accepted tokens, when asked for
    prompt_logprobs: list | None = None
    prompt_sent: bool = False  # prompt_logprobs went out with an update
    reason: str = "length"  # finish reason
    error: str | None = None
    # decode-time pruning (engine/pruning.py): the next interval trigger, g at the last re-plan
    next_replan: int = 0
    replanned_at: int = 0
    peak_pages: int = 0  # the most pages its rows held at once (this admission and earlier ones)

    @property
    def live(self) -> bool:
        """Still fed: its last chosen token goes through another decode step (else it only drains)."""
        return self.n_chosen < self.sampling.max_new_tokens

    @property
    def fed(self) -> int:
        """Tokens generated into its rows in this admission (the last chosen one is not in yet)."""
        return self.n_chosen - 1

    @property
    def seen(self) -> int:
        """Tokens its rows have seen: the prompt and what was fed since (its next position)."""
        return len(self.prompt) + self.fed


@dataclass
class Result:
    tokens: list[int]
    text: str
    stats: dict
    finish_reason: str = "length"  # "stop" (EOS or a stop string), "length", "abort" or "error"
    # per token (an ending EOS included): (token, logprob, {token: logprob} of the top)
    logprobs: list | None = None
    # per prompt token: (token, logprob, top) (logprob, top None for the first)
    prompt_logprobs: list | None = None
    error: str | None = None


@dataclass
class Update:
    """What one step did to one sequence: tokens accepted and/or its end."""

    key: object  # the request id, or (id, fork) for a request with several policies
    full: str = ""  # the sequence's text as this step left it (a reference to it, never a copy)
    shown: int = 0  # how much of it may be shown (a possible stop string's prefix waits until it resolves)
    tokens: list[int] = field(default_factory=list)  # tokens accepted this step
    logprobs: list = field(default_factory=list)  # theirs, when the request asked for them
    prompt_logprobs: list | None = None  # with the sequence's first update, when asked for
    result: Result | None = None  # set once the sequence is done

    @property
    def text(self) -> str:
        """All text shown so far."""
        return self.full[: self.shown]

    def delta(self, since: int) -> str:
        """The text shown after the first `since` characters: a stream's next piece, in time
        proportional to the piece (not to the output)."""
        return self.full[since : self.shown]


@dataclass(eq=False)
class Prefill:
    """A group admitted and being prefilled, chunk by chunk (engine/admission.py): its source
    (group[0]) owns pages for the whole prompt; pages for the forks' copies are held until pruning.
    What pruning and prompt log-probabilities need from earlier chunks is carried here."""

    group: list  # the Sequences: one prompt, one per policy
    held: int = 0  # pages held for the forks (PagedKV.held)
    done: int = 0  # prompt tokens in the pool so far
    cached: int = 0  # of them, found in the prefix cache (not prefilled)
    insert: bool = False  # its full blocks go into the prefix cache once it is whole
    chunks: int = 0  # forwards its prompt went through
    seconds: float = 0.0  # wall time of those forwards
    probe: object = None  # [L, 1, H, rows, n] the probe's rows of earlier chunks (rows outside are 0)
    moments: tuple | None = None  # the query moments so far (engine/model.py query_moments, batch 1)
    last_h: object = None  # [dim] the final hidden state of the last token so far (prompt logprobs)
    logprobs: list | None = None  # prompt log-probabilities so far, when asked for
    block_h: dict = field(default_factory=dict)  # {block: [dim]} its last token's final state (logprobs)

    @property
    def prompt(self) -> list[int]:
        return self.group[0].prompt

    @property
    def left(self) -> int:
        return len(self.group[0].prompt) - self.done
