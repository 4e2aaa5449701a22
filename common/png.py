"""How a PNG opens and closes: one whose last bytes are not its IEND chunk was cut short, and GDAL decodes the
missing rows as garbage without complaint, so readers check the ends before decoding."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: no data, its type, its CRC


def png_cut_short(head: bytes, tail: bytes) -> bool:
    """True when `head` (a body's first bytes) opens a PNG and `tail` (its last bytes) does not close it."""
    return head.startswith(PNG_SIGNATURE) and not tail.endswith(PNG_END)
