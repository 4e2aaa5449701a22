"""Errors and warnings of the map pipeline; each message is one line naming the problem and the fix."""

from common.errors import Sat2SoundError


class PipelineError(Sat2SoundError):
    """Base class of the pipeline's own errors."""


class RegionError(PipelineError):
    """A region specification cannot be turned into a usable geometry."""


class TilingError(PipelineError):
    """Tiling settings are inconsistent or the region is too large for them."""


class TooManyTilesError(TilingError):
    """A region needs more output tiles than the allowed limit."""


class ImageryError(PipelineError):
    """An imagery source is misconfigured or cannot serve imagery."""


class FetchError(ImageryError):
    """A remote tile or asset could not be fetched after all retries."""


class RetriesExhausted(FetchError):
    """A request failed every retry (timeouts, dropped connections, 429/5xx, garbled bodies): the item may be
    had later; unlike a refused request (401/403, a bad URL), which no retry mends."""


class CacheError(PipelineError):
    """The tile cache cannot be read or written."""


class RegionWarning(UserWarning):
    """A region was usable but changed (repaired, clipped, CRS assumed)."""


class ImageryWarning(UserWarning):
    """Imagery was usable but degraded (missing tiles, coarser than asked)."""


class SearchWarning(UserWarning):
    """A new query was answered, but the tile index could not be kept for the next one."""


class TileDecodeError(ImageryError):
    """Tile bytes are truncated or not a decodable JPEG, PNG or WebP image."""


class BuildConfigError(PipelineError):
    """The map build's config does not fit its schema or names inputs that cannot be used."""


class QueryError(PipelineError):
    """A query names an audio file that is missing, of an unknown type or undecodable, or a new query on a built
    map is empty, asks for no places or takes an id it cannot have."""


class BuildFolderError(PipelineError):
    """A folder given as a finished build is missing, is no build, or lacks what a command needs from it."""


class ImageryMismatchError(ImageryError):
    """The imagery is too coarse for the model's view at the chosen zoom level."""


class ImageryCoverageError(ImageryError):
    """The imagery holds nothing over the region."""


class OutputDirError(PipelineError):
    """The build's output folder cannot be created or written."""


class ExportError(PipelineError):
    """A build's Zarr store cannot be exported to COG, QGIS style or HTML preview."""


class DatasetError(PipelineError):
    """The demo training set cannot be made: a bad output folder or option, or shipped inputs that do not fit."""


class GalleryError(PipelineError):
    """A sound gallery cannot be built where asked (a bad source, CSV, output folder or model), or a folder given
    as a gallery is none, is empty or was embedded with other weights."""


class GalleryWarning(UserWarning):
    """A recording of a gallery source could not be decoded: it was skipped."""


class ListenError(PipelineError):
    """A place to listen to lies outside the build or has no prediction, a route or generator is unusable, or the
    sound cannot be written where asked."""
