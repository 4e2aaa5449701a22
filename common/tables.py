"""CSV tables handed in beside data (recordings and their captions, class shares), all read one way: UTF-8 (a
byte-order mark allowed, as spreadsheets write it), the header checked before any row is used, cells stripped."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from common.errors import Sat2SoundError, first_line


def read_table(path: Path, columns: Sequence[str], fix: str, error: type[Sat2SoundError]) -> list[dict[str, str]]:
    """The rows of the CSV at `path`, once its header holds every one of `columns`, none twice: each a dict of its
    stripped cells (a short row's missing ones empty; a long row's extra ones must be empty, as a spreadsheet's
    trailing commas are). A file that is missing, cannot be read, lacks a column or holds a row with a cell under
    no column (an unquoted comma, which would cut a caption short) raises `error` in one line naming the problem."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header, rows = reader.fieldnames or [], []
            for row in reader:
                extra = [cell for cell in row.get(None) or () if cell.strip()]
                if extra:
                    raise error(
                        f"{path} line {reader.line_num}: the cell {extra[0].strip()!r} lies under none of its"
                        f" {len(header)} columns; quote cells that hold a comma"
                    )
                rows.append(row)
    except FileNotFoundError:
        raise error(f"{path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise error(f"cannot read the CSV {path} ({first_line(exc)}); {fix}") from None
    check_unique_columns(path, header, error)
    absent = [name for name in columns if name not in header]
    if absent:
        raise error(f"{path} has no column {absent[0]!r}; {fix}")
    return [{name: (cell or "").strip() for name, cell in row.items() if name is not None} for row in rows]


def check_unique_columns(path: Path, header: Sequence[str], error: type[Sat2SoundError]) -> None:
    """Refuse a CSV header that names a column twice: csv.DictReader keeps only the last one's cells. Unnamed
    columns (a spreadsheet's trailing empty ones) are never read, and may repeat."""
    twice = next((name for index, name in enumerate(header) if name and name in header[:index]), None)
    if twice is not None:
        raise error(f"{path} has column {twice!r} twice, and only the last would count; keep one")
