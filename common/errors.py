"""The project's base exception; every message is one line naming the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if empty), for one-line errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class Sat2SoundError(Exception):
    """Base class of every error this project raises on purpose."""
