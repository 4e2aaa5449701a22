"""What a build hands to map readers, from its `soundscape.zarr`: COGs with QGIS styles, the top places as
GeoPackage and CSV, the imagery at preview resolution, the HTML preview and the QGIS project."""

from pipeline.export.cog import write_concept_cog, write_dominant_cog, write_query_cogs
from pipeline.export.preview import write_preview
from pipeline.export.qgis_project import write_qgis_project
from pipeline.export.underlay import write_underlay

__all__ = [
    "write_concept_cog",
    "write_dominant_cog",
    "write_preview",
    "write_qgis_project",
    "write_query_cogs",
    "write_underlay",
]
