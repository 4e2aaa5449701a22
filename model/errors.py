"""Exceptions of the Sat2Sound project; every message is one line naming the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if empty), for one-line errors."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class Sat2SoundError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(Sat2SoundError):
    """A model configuration or hyper-parameter set is unusable."""


class CheckpointError(Sat2SoundError):
    """A file is not a loadable Sat2Sound checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tensors do not fit the architecture its hyper-parameters describe."""


class DownloadError(Sat2SoundError):
    """A remote file (Hugging Face Hub or HTTP) could not be fetched."""


class InputError(Sat2SoundError):
    """Model inputs have the wrong shape, dtype or range."""


class AudioDecodeError(InputError):
    """An audio file cannot be read or decoded."""


class TextBackboneError(Sat2SoundError):
    """A text backbone cannot be loaded or does not fit the checkpoint."""
