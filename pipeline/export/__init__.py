"""What a build hands to map readers, from its `soundscape.zarr`: COGs with QGIS styles, the top places as
GeoPackage and CSV, the imagery at preview resolution, the HTML preview and the QGIS project.

Each export step imports only its own module: the package imports none of them, so no export job pays for
another's imports (none of them loads torch).
"""
