"""Errors the user can act on: printed as one line, never as a traceback."""


class UserError(Exception):
    """A problem with input or environment that the user can fix.

    The message must be a single line that names the fix.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NotFound(UserError):
    """What was named does not exist: no such model name, file, repository (HTTP 404)."""
