"""Training data for Sat2Sound: GeoSound and SoundingEarth in their Hugging Face Parquet layout, or a folder of
one's own pairs, prepared as upstream trains and collated into batches.

    sources.py     PairRecord (one decoded pair), PairSource (the abstract source), date -> month/hour
    parquet.py     GeoSoundParquet, SoundingEarthParquet: a local snapshot or `from_hub`
    folder.py      FolderPairs: DIR/pairs.csv and the files it names (layout in its docstring)
    transforms.py  SampleTransform: zoom, crop, resize, colour jitter, normalisation, mel segment
    dataset.py     PairDataset, collate -> TrainBatch, BlockShuffleSampler
"""
