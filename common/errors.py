"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a value, a file): printed as ``error: <message>``, exit code 2."""
