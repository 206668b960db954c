class UserError(Exception):
    """Something the user can fix (bad path, unsupported model, bad argument).

    The CLI prints `error: <message>` on one line and exits non-zero; no traceback."""
