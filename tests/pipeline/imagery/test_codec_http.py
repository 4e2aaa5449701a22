"""Tile decoding (truncation, blank tiles, transparency) and the HTTP retry helpers."""

from __future__ import annotations

import io
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning
from rasterio.io import MemoryFile
from rasterio.windows import Window
from support.imagery_servers import encode_image
from support.paths import LANDSAT

from pipeline.errors import ImageryError, TileDecodeError
from pipeline.imagery.codec import MAX_TILE_PIXELS, decode_tile, encode_png, encode_webp
from pipeline.imagery.http import RetryPolicy, backoff_delay, is_http_url, redact, retry_after_s, retry_policy

RNG = np.random.default_rng(7)
NOISE = RNG.integers(0, 256, (3, 64, 64), dtype=np.uint8)


@pytest.mark.parametrize("driver", ["PNG", "JPEG", "WEBP"])
def test_each_format_decodes_and_truncation_is_detected(driver: str) -> None:
    body = encode_image(NOISE, driver)
    image = decode_tile(body)
    assert image.rgb.shape == (3, 64, 64)
    assert image.valid.all()
    if driver == "PNG":
        np.testing.assert_array_equal(image.rgb, NOISE)
    for cut in (len(body) // 2, len(body) - 2):
        with pytest.raises(TileDecodeError):
            decode_tile(body[:cut])


def test_a_jpeg_cut_anywhere_is_refused_and_bytes_after_its_end_are_ignored() -> None:
    body = encode_image(NOISE, "JPEG")
    for cut in range(len(body) - 1, 300, -97):
        with pytest.raises(TileDecodeError, match=r"JPEG tile of \d+ bytes does not decode"):
            decode_tile(body[:cut])
    padded = decode_tile(body + b"\0" * 16 + b"<!-- served by a CDN -->")
    np.testing.assert_array_equal(padded.rgb, decode_tile(body).rgb)


def test_jpeg_tiles_decode_as_faithfully_as_gdal_reads_them() -> None:
    with rasterio.open(LANDSAT) as scene:
        raw = scene.read([3, 2, 1], window=Window(300, 300, 256, 256)).astype(np.float32)
    low, high = np.percentile(raw, [2, 98])
    photo = np.clip((raw - low) / (high - low) * 255, 0, 255).astype(np.uint8)
    body = encode_image(photo, "JPEG")
    with warnings.catch_warnings(), MemoryFile(body) as memfile:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with memfile.open() as dataset:
            by_gdal = dataset.read()
    decoded = decode_tile(body)
    assert decoded.valid.all()
    error = np.abs(decoded.rgb.astype(int) - photo).mean()
    assert error < 4.0 and error <= np.abs(by_gdal.astype(int) - photo).mean()


def test_garbage_is_not_an_image() -> None:
    with pytest.raises(TileDecodeError, match="not a JPEG, PNG or WebP"):
        decode_tile(b"<html>rate limited</html>")


def test_png_alpha_becomes_the_validity_mask_and_round_trips() -> None:
    valid = np.zeros((64, 64), bool)
    valid[:, :20] = True
    image = decode_tile(encode_png(NOISE, valid))
    np.testing.assert_array_equal(image.valid, valid)
    np.testing.assert_array_equal(image.rgb[:, valid], NOISE[:, valid])
    assert not image.is_blank


def test_png_without_a_mask_is_rgb_at_any_compression_level() -> None:
    smooth = np.broadcast_to(np.arange(64, dtype=np.uint8), (3, 64, 64))
    bodies = [encode_png(smooth, zlevel=level) for level in (1, 9)]
    for body in bodies:
        image = decode_tile(body)
        np.testing.assert_array_equal(image.rgb, smooth)
        assert image.valid.all()
    assert len(bodies[0]) > len(bodies[1])


def test_lossy_webp_keeps_the_transparency_and_about_the_colours() -> None:
    smooth = np.broadcast_to(np.linspace(20, 230, 64).astype(np.uint8), (3, 64, 64))
    valid = np.ones((64, 64), bool)
    valid[:, :16] = False
    image = decode_tile(encode_webp(smooth, valid, 80))
    np.testing.assert_array_equal(image.valid, valid)
    assert np.abs(image.rgb[:, valid].astype(int) - smooth[:, valid]).max() <= 8


def _pillow_png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def _transparent_tiles() -> dict[str, bytes]:
    valid = np.random.default_rng(3).random((64, 64)) > 0.3
    alpha = np.where(valid, 255, 0).astype(np.uint8)
    key = tuple(int(value) for value in NOISE[:, 0, 0])
    return {
        "RGBA PNG": encode_png(NOISE, valid),
        "RGBA WebP": encode_webp(NOISE, valid, 80),
        "grey + alpha PNG": _pillow_png(Image.fromarray(np.stack([NOISE[0], alpha], axis=-1), "LA")),
        "palette PNG, index 0 transparent": _pillow_png(Image.fromarray(NOISE[0] // 32).convert("P"), transparency=0),
        "RGB PNG, one colour transparent": _pillow_png(Image.fromarray(np.moveaxis(NOISE, 0, -1)), transparency=key),
        "RGB PNG": encode_png(NOISE),
    }


@pytest.mark.parametrize("kind", list(_transparent_tiles()))
def test_where_a_tile_holds_imagery_is_what_gdal_masks(kind: str) -> None:
    body = _transparent_tiles()[kind]
    with warnings.catch_warnings(), MemoryFile(body) as memfile:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with memfile.open() as dataset:
            expected = dataset.dataset_mask() > 0
    np.testing.assert_array_equal(decode_tile(body).valid, expected)
    assert kind == "RGB PNG" or not expected.all()


def test_blank_tiles_are_transparent_or_one_flat_colour() -> None:
    flat = np.full((3, 64, 64), 17, np.uint8)
    assert decode_tile(encode_image(flat, "PNG")).is_blank
    assert decode_tile(encode_png(NOISE, np.zeros((64, 64), bool))).is_blank
    grey = decode_tile(encode_image(NOISE[:1], "PNG"))  # one band is grey, not blank
    assert grey.rgb.shape == (3, 64, 64)
    assert not grey.is_blank


def test_one_pixel_off_the_flat_colour_is_imagery_where_it_holds_imagery() -> None:
    flat = np.full((3, 64, 64), 17, np.uint8)
    flat[1, 37, 21] = 18  # not on the grid of pixels compared first
    valid = np.ones((64, 64), bool)
    assert not decode_tile(encode_png(flat, valid)).is_blank
    valid[37, 21] = False
    assert decode_tile(encode_png(flat, valid)).is_blank
    assert not decode_tile(encode_image(NOISE, "JPEG")).is_blank


def _jpeg_saying(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims `width` x `height` pixels."""
    body = bytearray(encode_image(NOISE, "JPEG"))
    frame = body.index(b"\xff\xc0")  # start of frame: marker, length, precision, height, width
    body[frame + 5 : frame + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(body)


def test_tiles_that_claim_more_pixels_than_any_tile_or_strip_are_refused_before_decoding() -> None:
    with pytest.raises(TileDecodeError, match="says it is 65000x65000 px, more than any tile or strip holds"):
        decode_tile(_jpeg_saying(65000, 65000))
    side = int(MAX_TILE_PIXELS**0.5)
    with pytest.raises(TileDecodeError, match=f"says it is {side + 1}x{side} px"):
        decode_tile(_jpeg_saying(side + 1, side))
    wide = np.zeros((3, 224, 16_384), np.uint8)  # a long strip of views, as the STAC reader caches them
    assert decode_tile(encode_png(wide, np.ones((224, 16_384), bool))).rgb.shape == (3, 224, 16_384)


@pytest.mark.parametrize("options", [{}, {"progressive": True}, {"subsampling": 0}], ids=["420", "progressive", "444"])
def test_jpeg_pixels_are_those_pillow_decodes(options: dict[str, object]) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.moveaxis(NOISE, 0, -1)).save(buffer, "JPEG", quality=85, **options)
    with Image.open(buffer) as image:
        expected = np.moveaxis(np.asarray(image.convert("RGB")), -1, 0)
    np.testing.assert_array_equal(decode_tile(buffer.getvalue()).rgb, expected)


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=6.0)
    rng = random.Random(3)
    for retry_index, ceiling in enumerate([1.0, 2.0, 4.0, 6.0, 6.0]):
        delays = [backoff_delay(policy, retry_index, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not constant


def test_retry_after_in_seconds_or_as_http_date() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert retry_after_s("7", now) == 7.0
    assert retry_after_s(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == pytest.approx(30.0)
    assert retry_after_s(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    assert retry_after_s(None, now) is None
    assert retry_after_s("soon", now) is None


def test_redact_hides_secrets_and_credential_parameters() -> None:
    url = "https://tiles.example/v1/SECRET123/1/2/3.jpg?access_token=abc&style=sat&key=zzz"
    shown = redact(url, ["SECRET123"])
    assert "SECRET123" not in shown and "abc" not in shown and "zzz" not in shown
    assert shown == "https://tiles.example/v1/***/1/2/3.jpg?access_token=***&style=sat&key=***"
    presigned = "https://b.s3.amazonaws.com/m.tif?X-Amz-Credential=AKIA&X-Amz-Signature=f00&X-Amz-Expires=60"
    assert (
        redact(presigned)
        == "https://b.s3.amazonaws.com/m.tif?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    )


@pytest.mark.parametrize(
    ("url", "usable"),
    [
        ("https://[::1]:8080/a", True),
        ("http://[::1/a", False),  # urllib: Invalid IPv6 URL
        ("http://127.0.0.1:99999/a", False),  # port out of range
        ("http://host:port/a", False),
        ("http://:80/a", False),
        ("ftp://host/a", False),
    ],
)
def test_an_http_url_needs_a_host_and_a_valid_port(url: str, usable: bool) -> None:
    assert is_http_url(url) is usable


def test_retry_settings_from_a_config_mapping() -> None:
    assert retry_policy({"attempts": 2, "backoff_s": 0.1}) == RetryPolicy(attempts=2, backoff_s=0.1)
    with pytest.raises(ImageryError, match="unknown retry setting 'tries'"):
        retry_policy({"tries": 2})


def test_parallel_decodes_leave_the_warning_filters_alone() -> None:
    body = encode_png(np.full((3, 64, 64), 90, np.uint8), np.ones((64, 64), bool))
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorded_filters = list(warnings.filters)
        with ThreadPoolExecutor(8) as pool:
            images = list(pool.map(lambda _: decode_tile(body), range(400)))
        assert list(warnings.filters) == recorded_filters
    assert not [warning for warning in caught if issubclass(warning.category, NotGeoreferencedWarning)]
    assert all(image.valid.all() for image in images)
    assert list(warnings.filters) == filters
