"""What a build hands to map readers, from its `soundscape.zarr`: COGs with QGIS styles, the top places as
GeoPackage and CSV, and the HTML preview."""

from pipeline.export.cog import write_concept_cog, write_dominant_cog, write_query_cogs
from pipeline.export.preview import write_preview

__all__ = ["write_concept_cog", "write_dominant_cog", "write_preview", "write_query_cogs"]
