"""CSV tables beside data: one reader, one-line refusals in the caller's own error."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import Sat2SoundError
from common.tables import read_table


class TableProblem(Sat2SoundError):
    pass


def test_rows_come_stripped_whatever_the_spreadsheet_wrote(tmp_path: Path) -> None:
    table = tmp_path / "recordings.csv"
    # A byte-order mark, padded cells, a short row and a long one whose extra cells are empty.
    table.write_bytes("\ufefffile,caption\n owl.flac , a tawny owl \nduck.flac\ncat.flac,a cat,, \n".encode())
    rows = read_table(table, ["file", "caption"], "fix it", TableProblem)
    assert rows == [
        {"file": "owl.flac", "caption": "a tawny owl"},
        {"file": "duck.flac", "caption": ""},
        {"file": "cat.flac", "caption": "a cat"},
    ]


def test_unnamed_columns_may_repeat(tmp_path: Path) -> None:
    table = tmp_path / "recordings.csv"
    table.write_text("file,caption,,\nowl.flac,a tawny owl,,\n")  # a spreadsheet's trailing empty columns
    rows = read_table(table, ["file", "caption"], "fix it", TableProblem)
    assert [(row["file"], row["caption"]) for row in rows] == [("owl.flac", "a tawny owl")]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, "recordings.csv does not exist; give file and caption"),
        (b"file,caption\n\xff\xfe\x00owl\n", "cannot read the CSV"),
        (b"file,label\nowl.flac,owl\n", "has no column 'caption'; give file and caption"),
        (b"", "has no column 'file'; give file and caption"),
        (b"file,caption,file\nowl.flac,owl,duck.flac\n", "has column 'file' twice, and only the last would count"),
        (
            b"file,caption\nowl.flac,owl\ndog.flac,a dog, barking\n",
            "recordings.csv line 3: the cell 'barking' lies under none of its 2 columns; quote cells that hold a comma",
        ),
    ],
)
def test_a_table_that_cannot_serve_is_refused_in_one_line_with_the_callers_error(
    tmp_path: Path, body: bytes | None, message: str
) -> None:
    table = tmp_path / "recordings.csv"
    if body is not None:
        table.write_bytes(body)
    with pytest.raises(TableProblem) as raised:
        read_table(table, ["file", "caption"], "give file and caption", TableProblem)
    assert message in str(raised.value) and "\n" not in str(raised.value)
