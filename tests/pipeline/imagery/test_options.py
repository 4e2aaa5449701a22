"""Each reader's `OPTIONS` schema: it names exactly the keyword options its constructor takes from a config, and
the defaults those options have pass it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from support.paths import LANDSAT

from pipeline.errors import ImageryError
from pipeline.imagery import ImageryReader, LocalRasterReader, StacReader, XYZReader, open_reader

READERS = [LocalRasterReader, StacReader, XYZReader]
# Set by `open_reader` from the config's own keys (imagery.cache_dir, imagery.offline, imagery.on_missing) or
# the source spec, never from imagery.options.
NOT_OPTIONS = {"path", "url", "url_template", "cache", "offline", "on_missing"}


def keyword_options(reader: type[ImageryReader]) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(reader).parameters.items() if name not in NOT_OPTIONS}


@pytest.mark.parametrize("reader", READERS, ids=lambda reader: reader.__name__)
def test_the_schema_names_every_option_the_constructor_takes(reader: type[ImageryReader]) -> None:
    assert set(reader.OPTIONS) == set(keyword_options(reader))
    for schema in reader.OPTIONS.values():
        assert schema["description"].split()[0] in {"give", "use", "name"}


@pytest.mark.parametrize("reader", READERS, ids=lambda reader: reader.__name__)
def test_the_constructors_defaults_pass_their_schema(reader: type[ImageryReader]) -> None:
    defaults = {name: p.default for name, p in keyword_options(reader).items()}
    if "retry" in defaults:  # a RetryPolicy, which a config writes as a mapping of its fields
        defaults["retry"] = defaults["retry"]._asdict()
    reader.check_options(defaults)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"bands": "3,2,1"}, "imagery option bands: '3,2,1' is not of type 'array', 'null'; give three"),
        ({"bands": [3, 2, 1], "nodata": "none"}, "imagery option nodata: 'none' is not of type 'number', 'null'"),
        ({"bands": [3, 2, 1], "percentiles": [2, 101]}, "imagery option percentiles.1: 101 is greater than"),
        ({"bands": [3, 2, 1], "gdal_env": {"GDAL_CACHEMAX": [1]}}, "imagery option gdal_env.GDAL_CACHEMAX:"),
        (
            {"bands": [3, 2, 1], "gdal_env": {"gdal_cachemax": "512MB"}},
            "imagery option gdal_env.gdal_cachemax: '512MB' is not of type 'integer'; give GDAL config options as a"
            " mapping of names to values (GDAL_CACHEMAX in whole MB)",
        ),
        ({"bands": [3.0, 2, 1]}, "imagery option bands.0: 3.0 is not of type 'integer'; give three 1-based band"),
        ({"bands": [True]}, "imagery option bands.0: True is not of type 'integer'"),
        ({"bands": [3, 2, 1], "source_id": "../elsewhere"}, "imagery option source_id: '../elsewhere' does not match"),
        ({"bands": [3, 2, 1], "resampling": "lanczos"}, "imagery option resampling: 'lanczos' is not one of"),
    ],
)
def test_a_wrong_value_is_refused_before_the_raster_is_opened(
    options: dict[str, object], words: str, tmp_path: Path
) -> None:
    with pytest.raises(ImageryError) as refused:
        open_reader(str(tmp_path / "not-there.tif"), cache_dir=tmp_path, **options)
    assert words in str(refused.value)


def test_a_good_value_still_reaches_the_reader(tmp_path: Path) -> None:
    # Python code may pass tuples where a config writes lists.
    with open_reader(str(LANDSAT), cache_dir=tmp_path, bands=(3, 2, 1), percentiles=[1, 99], nodata=0) as reader:
        assert reader.bands == (3, 2, 1)
        assert reader.nodata == 0
