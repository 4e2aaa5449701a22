"""What the model and the map pipeline share: the base error and atomic file writes. Imports nothing of ours."""

from common.atomic import atomic_directory, atomic_path, atomic_save_npz, atomic_write_bytes
from common.errors import Sat2SoundError, first_line

__all__ = ["Sat2SoundError", "atomic_directory", "atomic_path", "atomic_save_npz", "atomic_write_bytes", "first_line"]
