"""The one exception type that reaches the user as a message instead of a traceback, and the hint every refused file
access carries."""

import os


class UserError(Exception):
    """Bad input from the user (a path, a value, a file): printed as ``error: <message>``, exit code 2."""


def access_hint() -> str:
    """Who this process is and what to do, for a file or folder it may not read or write: in a container the image's
    user (uid 10001) meets folders the host's user owns, and the other way round."""
    return (
        f"this process runs as uid {os.getuid()}, gid {os.getgid()}: give that user access, or run as the owner "
        '(docker run --user "$(id -u):$(id -g)", compose: CONVNETS_USER="$(id -u):$(id -g)")'
    )
