"""Exceptions of the model package; every message is one line naming the problem and the fix."""

from common.errors import Sat2SoundError, first_line

__all__ = [
    "AudioDecodeError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "DataError",
    "DownloadError",
    "InputError",
    "Sat2SoundError",
    "TextBackboneError",
    "first_line",
]


class ConfigError(Sat2SoundError):
    """A model configuration or hyper-parameter set is unusable."""


class CheckpointError(Sat2SoundError):
    """A file is not a loadable Sat2Sound checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tensors do not fit the architecture its hyper-parameters describe."""


class DataError(Sat2SoundError):
    """Training data (a dataset folder, a Parquet shard, a pairs CSV or a file it names) is missing or malformed."""


class DownloadError(Sat2SoundError):
    """A remote file (Hugging Face Hub or HTTP) could not be fetched."""


class InputError(Sat2SoundError):
    """Model inputs have the wrong shape, dtype or range."""


class AudioDecodeError(InputError):
    """An audio file cannot be read or decoded."""


class TextBackboneError(Sat2SoundError):
    """A text backbone cannot be loaded or does not fit the checkpoint."""
