class UserError(Exception):
    """Something the user can fix (bad path, unsupported model, bad argument).

    The CLI prints `error: <message>` on one line and exits non-zero; no traceback. The engine's
    messages name its arguments (`kv_memory`, `max_new_tokens`); `arg` is the one a message
    starts with, so that a command line can say its flag instead (engine/cli.py: in_flags)."""

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.arg = arg
