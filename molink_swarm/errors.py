"""Errors the user can cause: each message says what to do. The CLI prints them as one line."""


class UserError(Exception):
    """An error the user caused; the CLI prints str(e) as one line and exits 1. The message says what to do."""


class ModelNotFoundError(UserError):
    pass
