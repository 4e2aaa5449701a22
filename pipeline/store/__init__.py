"""The region-wide `soundscape.zarr`: its layout (`pipeline.store.layout`), scores of every kind (`.scores`), the
writer, the one place invalid tiles become nodata (`.write`), and the reader the exports use (`.read`).

Nothing is imported here: a job imports the module it uses, so that reading a store does not load dask.
"""
